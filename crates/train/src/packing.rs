//! Sample packing: short examples share rows of `data.max_seq_len` tokens instead of each
//! filling a row of its own padded to the batch's longest. Each example keeps its own positions
//! and sees only itself (the attention mask numbers the examples of a row 1, 2, 3, ...; the
//! models turn that into a block-diagonal causal mask and restarting positions), so the loss is
//! the unpacked loss over the same target tokens.

/// The examples of one row (indices into the data set, in data-set order).
pub type Row = Vec<usize>;

/// Packs examples of `lengths` into rows holding at most `capacity` tokens: first fit, longest
/// example first (first-fit decreasing), which leaves rows fuller than data order does. An
/// example longer than `capacity` gets a row of its own. Deterministic: ties keep data order.
pub fn pack(lengths: &[usize], capacity: usize) -> Vec<Row> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|i| std::cmp::Reverse(lengths[*i]));
    let mut free = FreeSpace::new(lengths.len(), capacity);
    let mut rows: Vec<Row> = Vec::new();
    for i in order {
        let len = lengths[i].min(capacity);
        let r = free.first_fit(len);
        free.take(r, len);
        if r == rows.len() {
            rows.push(Vec::new());
        }
        rows[r].push(i);
    }
    for r in &mut rows {
        r.sort_unstable();
    }
    rows
}

/// The unpacked layout: one example per row.
pub fn one_per_row(n: usize) -> Vec<Row> {
    (0..n).map(|i| vec![i]).collect()
}

/// Share of the token slots of `batches` (rows of example `lengths`, each batch padded to its
/// longest row) that are padding.
pub fn padding_fraction(batches: &[&[Row]], lengths: &[usize]) -> f64 {
    let (mut real, mut slots) = (0usize, 0usize);
    for batch in batches {
        let row_len = |r: &Row| r.iter().map(|i| lengths[*i]).sum::<usize>();
        let longest = batch.iter().map(row_len).max().unwrap_or(0);
        real += batch.iter().map(row_len).sum::<usize>();
        slots += longest * batch.len();
    }
    if slots == 0 {
        0.0
    } else {
        1.0 - real as f64 / slots as f64
    }
}

/// The free space of up to `n` rows, as a max-tree: the first row with room for `len` tokens is
/// found in O(log n), so packing a large data set stays fast.
struct FreeSpace {
    leaves: usize,
    max: Vec<usize>,
}

impl FreeSpace {
    fn new(n: usize, capacity: usize) -> Self {
        let leaves = n.max(1).next_power_of_two();
        FreeSpace {
            leaves,
            max: vec![capacity; 2 * leaves],
        }
    }

    /// The lowest-numbered row with at least `len` tokens free (a fresh row if none).
    fn first_fit(&self, len: usize) -> usize {
        let mut node = 1;
        if self.max[node] < len {
            // only for len > capacity, which callers clamp away
            return self.leaves - 1;
        }
        while node < self.leaves {
            node = if self.max[2 * node] >= len {
                2 * node
            } else {
                2 * node + 1
            };
        }
        node - self.leaves
    }

    fn take(&mut self, row: usize, len: usize) {
        let mut node = row + self.leaves;
        self.max[node] -= len;
        while node > 1 {
            node /= 2;
            self.max[node] = self.max[2 * node].max(self.max[2 * node + 1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tree gives what a plain first-fit-decreasing scan gives, and every row fits.
    #[test]
    fn packing_is_first_fit_decreasing_and_rows_fit() {
        let mut state = 12345u64;
        let lengths: Vec<usize> = (0..500)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                1 + (state >> 33) as usize % 100
            })
            .collect();
        let cap = 160;
        let rows = pack(&lengths, cap);
        // the plain scan
        let mut order: Vec<usize> = (0..lengths.len()).collect();
        order.sort_by_key(|i| std::cmp::Reverse(lengths[*i]));
        let mut want: Vec<(usize, Vec<usize>)> = Vec::new();
        for i in order {
            match want.iter_mut().find(|(used, _)| used + lengths[i] <= cap) {
                Some((used, r)) => {
                    *used += lengths[i];
                    r.push(i);
                }
                None => want.push((lengths[i], vec![i])),
            }
        }
        let want: Vec<Row> = want
            .into_iter()
            .map(|(_, mut r)| {
                r.sort_unstable();
                r
            })
            .collect();
        assert_eq!(rows, want);
        let mut seen: Vec<usize> = rows.iter().flatten().copied().collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..lengths.len()).collect::<Vec<_>>());
        let total: usize = lengths.iter().sum();
        assert!(rows.len() <= total.div_ceil(cap) + 2, "{} rows", rows.len());
    }

    #[test]
    fn an_example_longer_than_a_row_gets_its_own_row() {
        assert_eq!(pack(&[5, 20, 4], 10), vec![vec![1], vec![0, 2]]);
        assert_eq!(pack(&[], 10), Vec::<Row>::new());
    }

    #[test]
    fn padding_fraction_counts_slots_up_to_each_batch_longest_row() {
        let lengths = [4, 2, 2];
        let rows = one_per_row(3);
        // one batch of three rows padded to 4: 12 slots, 8 real
        assert!((padding_fraction(&[&rows[..]], &lengths) - 1.0 / 3.0).abs() < 1e-12);
        let packed = pack(&lengths, 4);
        assert_eq!(packed, vec![vec![0], vec![1, 2]]);
        assert_eq!(padding_fraction(&[&packed[..]], &lengths), 0.0);
    }
}
