//! Which keys each query of an attention call sees, said as a rule (causal, sliding window,
//! cached keys before the queries, padding and packed examples by segment number) instead of a
//! dense `[b, 1, s, t]` bias. The tiled kernels ask the rule about whole tiles (skip, take
//! whole, or mask element by element) and about the range of keys a block of queries can see,
//! so hidden blocks cost nothing and no `s × t` matrix exists. A dense additive bias remains
//! for patterns the rule cannot say (rows packing several candidates behind one shared prompt).
use candle_core::{DType, Device, Result, Tensor};
use std::sync::Arc;

/// The mask of one attention call.
#[derive(Clone, Debug)]
pub enum AttnMask {
    /// Visibility by rule: no dense matrix anywhere.
    Rule(MaskRule),
    /// An additive f32 bias `[1 or b, 1, s, t]` (0 = visible, a large negative number or −∞ =
    /// hidden), for patterns a rule cannot say.
    Bias(Tensor),
}

/// Key `j` is visible to query `i` (at key position `p = past + i`) when all of these hold:
/// `j ≤ p` if `causal`; `|p − j| < window` if a window is set; and, with segment numbers, key
/// `j` is no padding (segment 0) and belongs to the query's example — a padding query sees
/// every key of any example the other rules let it see.
#[derive(Clone, Debug, Default)]
pub struct MaskRule {
    pub causal: bool,
    pub window: Option<usize>,
    /// Keys cached before the queries (cached decoding).
    pub past: usize,
    segments: Option<Segments>,
}

/// Segment numbers `[b][t]` of the key positions, flattened.
#[derive(Clone, Debug)]
struct Segments {
    ids: Arc<Vec<u32>>,
    t: usize,
}

/// What a tile of queries × keys needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tile {
    /// Every key hidden from every query: not computed.
    Skip,
    /// Every key visible to every query: no masking.
    Whole,
    /// Mixed: masked element by element.
    Partial,
}

impl AttnMask {
    /// Causal attention over rows whose tokens carry the segment numbers `segments` `[b][s]`
    /// (see [`crate::layers::mask_segments`]: 0 = padding, 1, 2, … = the examples packed into
    /// a row), within a sliding `window` if given.
    pub fn causal(segments: &[Vec<u32>], window: Option<usize>) -> Result<Self> {
        Ok(AttnMask::Rule(MaskRule {
            causal: true,
            window,
            past: 0,
            segments: Segments::of(segments)?,
        }))
    }

    /// Every query sees every key that is no padding (encoders: BERT).
    pub fn bidirectional(segments: &[Vec<u32>]) -> Result<Self> {
        Ok(AttnMask::Rule(MaskRule {
            causal: false,
            window: None,
            past: 0,
            segments: Segments::of(segments)?,
        }))
    }

    /// `s` new tokens after `past` cached ones (one row): each sees the cached tokens and the
    /// new ones up to itself, within `window` if given.
    pub fn cached(past: usize, window: Option<usize>) -> Self {
        AttnMask::Rule(MaskRule {
            causal: true,
            window,
            past,
            segments: None,
        })
    }

    /// A dense additive bias `[1 or b, 1, s, t]` in f32.
    pub fn bias(bias: Tensor) -> Self {
        AttnMask::Bias(bias)
    }

    /// Checks the mask against `b` rows of `s` queries over `t` keys.
    pub fn check(&self, b: usize, s: usize, t: usize) -> Result<()> {
        match self {
            AttnMask::Bias(bias) => match bias.dims() {
                [bb, 1, bs, bt]
                    if (*bb == 1 || *bb == b)
                        && *bs == s
                        && *bt == t
                        && bias.dtype() == DType::F32 => {}
                other => candle_core::bail!(
                    "attention: bias {other:?} ({:?}) does not fit [{b}, 1, {s}, {t}] f32",
                    bias.dtype()
                ),
            },
            AttnMask::Rule(r) => {
                if r.past + s != t {
                    candle_core::bail!(
                        "attention: {s} queries after {} cached keys do not make {t} keys",
                        r.past
                    );
                }
                if let Some(seg) = &r.segments {
                    if seg.t != t || seg.ids.len() != b * t {
                        candle_core::bail!(
                            "attention: segment numbers for {} rows of {} keys, not {b} of {t}",
                            seg.ids.len() / seg.t.max(1),
                            seg.t
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// The mask as an additive f32 bias `[1 or b, 1, s, t]` (0 visible, −10⁹ hidden): for the
    /// composed reference and callers that need a dense matrix.
    pub fn to_bias(&self, b: usize, s: usize, t: usize, device: &Device) -> Result<Tensor> {
        match self {
            AttnMask::Bias(bias) => Ok(bias.clone()),
            AttnMask::Rule(r) => r.dense(b, s, t, device),
        }
    }
}

impl Segments {
    /// `None` when every token is in example 1 (nothing to mask).
    fn of(rows: &[Vec<u32>]) -> Result<Option<Self>> {
        let t = rows.first().map(|r| r.len()).unwrap_or(0);
        if rows.iter().any(|r| r.len() != t) {
            candle_core::bail!("attention mask rows differ in length");
        }
        if rows.iter().flatten().all(|v| *v == 1) {
            return Ok(None);
        }
        Ok(Some(Segments {
            ids: Arc::new(rows.concat()),
            t,
        }))
    }

    fn row(&self, bi: usize) -> &[u32] {
        &self.ids[bi * self.t..(bi + 1) * self.t]
    }
}

impl MaskRule {
    /// Whether query `i` of batch row `bi` sees key `j`.
    #[inline]
    pub fn visible(&self, bi: usize, i: usize, j: usize) -> bool {
        let p = self.past + i;
        if (self.causal && j > p) || self.window.is_some_and(|w| p.abs_diff(j) >= w) {
            return false;
        }
        match &self.segments {
            None => true,
            Some(seg) => {
                let row = seg.row(bi);
                let (sq, sk) = (row[p], row[j]);
                sk != 0 && (sq == 0 || sq == sk)
            }
        }
    }

    /// The keys `[lo, hi)` that queries `[i0, i1)` can see at most (of `t`).
    pub fn key_range(&self, i0: usize, i1: usize, t: usize) -> (usize, usize) {
        let (p0, p1) = (self.past + i0, self.past + i1.max(i0 + 1) - 1);
        let hi = if self.causal { (p1 + 1).min(t) } else { t };
        let lo = self.window.map_or(0, |w| (p0 + 1).saturating_sub(w));
        (lo.min(hi), hi)
    }

    /// The queries `[lo, hi)` (of `s`) that can see keys `[j0, j1)` at all.
    pub fn query_range(&self, j0: usize, j1: usize, s: usize) -> (usize, usize) {
        let lo = if self.causal {
            j0.saturating_sub(self.past).min(s)
        } else {
            0
        };
        let hi = self.window.map_or(s, |w| {
            (j1.max(j0 + 1) - 1 + w).saturating_sub(self.past).min(s)
        });
        (lo, hi.max(lo))
    }

    /// Whether the tile of queries `[i0, i1)` × keys `[j0, j1)` of row `bi` is hidden, whole
    /// or mixed. Exact for the position rules; for segments it looks at the numbers' ranges.
    pub fn tile(&self, bi: usize, (i0, i1): (usize, usize), (j0, j1): (usize, usize)) -> Tile {
        let (p0, p1) = (self.past + i0, self.past + i1 - 1);
        let (k0, k1) = (j0, j1 - 1);
        let mut whole = true;
        if self.causal {
            if k0 > p1 {
                return Tile::Skip;
            }
            whole &= k1 <= p0;
        }
        if let Some(w) = self.window {
            // the nearest pair is apart by the gap between the ranges (0 when they overlap)
            let nearest = if k0 > p1 {
                k0 - p1
            } else {
                p0.saturating_sub(k1)
            };
            if nearest >= w {
                return Tile::Skip;
            }
            whole &= p1.max(k1) - p0.min(k0) < w;
        }
        if let Some(seg) = &self.segments {
            let row = seg.row(bi);
            let span = |xs: &[u32]| {
                xs.iter()
                    .fold((u32::MAX, 0u32, false), |(lo, hi, pad), &x| {
                        if x == 0 {
                            (lo, hi, true)
                        } else {
                            (lo.min(x), hi.max(x), pad)
                        }
                    })
            };
            let (qlo, qhi, qpad) = span(&row[p0..=p1]);
            let (klo, khi, kpad) = span(&row[k0..=k1]);
            let keys_all_pad = klo == u32::MAX;
            if keys_all_pad || (!qpad && (khi < qlo || klo > qhi)) {
                return Tile::Skip;
            }
            whole &= !qpad && !kpad && qlo == qhi && klo == khi && qlo == klo;
        }
        if whole {
            Tile::Whole
        } else {
            Tile::Partial
        }
    }

    /// Sets the hidden entries of query `i`'s scores for keys `j0..` to −∞.
    #[inline]
    pub fn hide(&self, bi: usize, i: usize, j0: usize, row: &mut [f32]) {
        for (j, x) in (j0..).zip(row.iter_mut()) {
            if !self.visible(bi, i, j) {
                *x = f32::NEG_INFINITY;
            }
        }
    }

    /// The rule as a dense bias `[1 or b, 1, s, t]` built on the CPU (tests, small calls).
    fn dense(&self, b: usize, s: usize, t: usize, device: &Device) -> Result<Tensor> {
        let rows = if self.segments.is_some() { b } else { 1 };
        let mut v = Vec::with_capacity(rows * s * t);
        for bi in 0..rows {
            for i in 0..s {
                v.extend((0..t).map(|j| if self.visible(bi, i, j) { 0f32 } else { -1.0e9 }));
            }
        }
        Tensor::from_vec(v, (rows, 1, s, t), device)
    }

    /// The segment numbers `[b][t]` of the key positions, flattened (`None`: every token is in
    /// example 1).
    pub fn segment_ids(&self) -> Option<&[u32]> {
        self.segments.as_ref().map(|s| s.ids.as_slice())
    }

    /// The rule ready to build block biases on `device` for `b` rows: the segment numbers
    /// uploaded once, not once per block.
    pub fn blocks(&self, b: usize, device: &Device) -> Result<BlockBiases<'_>> {
        let ids = match &self.segments {
            Some(seg) => {
                let ids: Vec<f32> = seg.ids.iter().map(|x| *x as f32).collect();
                Some(Tensor::from_vec(ids, (b, seg.t), device)?)
            }
            None => None,
        };
        Ok(BlockBiases {
            rule: self,
            ids,
            device: device.clone(),
        })
    }
}

/// A [`MaskRule`] with its segment numbers on a device (see [`MaskRule::blocks`]).
pub struct BlockBiases<'a> {
    rule: &'a MaskRule,
    /// Segment numbers `[b, t]` as f32, when the rule has any.
    ids: Option<Tensor>,
    device: Device,
}

impl BlockBiases<'_> {
    /// The bias `[1 or b, 1, rows, cols]` (0 visible, −10⁹ hidden) of queries `i0..i0+rows`
    /// and keys `j0..j0+cols`, built on the device from positions and segment numbers by
    /// broadcast comparisons: one block's mask, never the whole matrix.
    pub fn block(&self, (i0, rows): (usize, usize), (j0, cols): (usize, usize)) -> Result<Tensor> {
        let (r, device) = (self.rule, &self.device);
        let p0 = (r.past + i0) as f32;
        let qp = Tensor::arange(p0, p0 + rows as f32, device)?.reshape((rows, 1))?;
        let kp = Tensor::arange(j0 as f32, (j0 + cols) as f32, device)?.reshape((1, cols))?;
        let mut vis = Tensor::ones((rows, cols), DType::U8, device)?;
        if r.causal {
            vis = (vis * kp.broadcast_le(&qp)?)?;
        }
        if let Some(w) = r.window {
            let near = qp.broadcast_sub(&kp)?.abs()?.lt(w as f64)?;
            vis = (vis * near)?;
        }
        let mut vis = vis.unsqueeze(0)?;
        if let Some(ids) = &self.ids {
            let b = ids.dim(0)?;
            let sq = ids.narrow(1, r.past + i0, rows)?.unsqueeze(2)?;
            let sk = ids.narrow(1, j0, cols)?.unsqueeze(1)?;
            let same = sq
                .broadcast_eq(&sk)?
                .maximum(&sq.eq(0f64)?.broadcast_as((b, rows, cols))?)?;
            let key = sk.ne(0f64)?.broadcast_as((b, rows, cols))?;
            vis = vis.broadcast_mul(&(same * key)?)?;
        }
        let (n, _, _) = vis.dims3()?;
        ((vis.to_dtype(DType::F32)? - 1.0)? * 1.0e9)?.reshape((n, 1, rows, cols))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(m: &AttnMask) -> &MaskRule {
        match m {
            AttnMask::Rule(r) => r,
            _ => unreachable!(),
        }
    }

    /// Tile answers agree with element-by-element visibility, and key/query ranges cover every
    /// visible pair, for causal, windowed, padded, packed and cached masks.
    #[test]
    fn tiles_and_ranges_agree_with_visibility() -> Result<()> {
        let segs = vec![
            vec![1, 1, 1, 2, 2, 2, 2, 3, 3, 0, 0],
            vec![1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        ];
        let masks = [
            (AttnMask::causal(&segs, None)?, 11, 11),
            (AttnMask::causal(&segs, Some(3))?, 11, 11),
            (AttnMask::bidirectional(&segs)?, 11, 11),
            (AttnMask::cached(4, Some(5)), 7, 11),
            (AttnMask::cached(0, None), 11, 11),
        ];
        for (m, s, t) in &masks {
            let r = rule(m);
            let rows = if r.segments.is_some() { 2 } else { 1 };
            for bi in 0..rows {
                for (bq, bk) in [(1, 1), (2, 3), (4, 4), (3, 5)] {
                    for i0 in (0..*s).step_by(bq) {
                        let i1 = (i0 + bq).min(*s);
                        let (klo, khi) = r.key_range(i0, i1, *t);
                        for j0 in (0..*t).step_by(bk) {
                            let j1 = (j0 + bk).min(*t);
                            let seen: Vec<bool> = (i0..i1)
                                .flat_map(|i| (j0..j1).map(move |j| (i, j)))
                                .map(|(i, j)| r.visible(bi, i, j))
                                .collect();
                            let tile = r.tile(bi, (i0, i1), (j0, j1));
                            match tile {
                                Tile::Skip => assert!(seen.iter().all(|v| !v), "{m:?} {i0} {j0}"),
                                Tile::Whole => assert!(seen.iter().all(|v| *v), "{m:?} {i0} {j0}"),
                                Tile::Partial => {}
                            }
                            let (qlo, qhi) = r.query_range(j0, j1, *s);
                            for i in i0..i1 {
                                for j in j0..j1 {
                                    if r.visible(bi, i, j) {
                                        assert!(j >= klo && j < khi, "key range {m:?}");
                                        assert!(i >= qlo && i < qhi, "query range {m:?}");
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        // exact tiles: a causal row's diagonal tile is partial, those below whole
        let r = rule(&masks[4].0);
        assert_eq!(r.tile(0, (4, 8), (0, 4)), Tile::Whole);
        assert_eq!(r.tile(0, (4, 8), (4, 8)), Tile::Partial);
        assert_eq!(r.tile(0, (0, 4), (4, 8)), Tile::Skip);
        // packed examples: example 1's queries skip example 3's keys
        let r = rule(&masks[0].0);
        assert_eq!(r.tile(0, (0, 3), (7, 9)), Tile::Skip);
        Ok(())
    }

    /// The block bias built by broadcast comparisons equals the dense rule's block.
    #[test]
    fn block_bias_equals_the_dense_rule() -> Result<()> {
        let dev = Device::Cpu;
        let segs = vec![vec![1, 1, 2, 2, 2, 0], vec![1, 1, 1, 1, 1, 1]];
        for m in [
            AttnMask::causal(&segs, Some(2))?,
            AttnMask::bidirectional(&segs)?,
            AttnMask::cached(2, None),
        ] {
            let r = rule(&m);
            let (s, t) = (6 - r.past, 6);
            let dense = m.to_bias(2, s, t, &dev)?;
            let blocks = r.blocks(2, &dev)?;
            for (i0, rows, j0, cols) in [(0, s, 0, t), (1, 2, 0, 3), (2, s - 2, 1, 5)] {
                let got = blocks.block((i0, rows), (j0, cols))?;
                let want = dense.narrow(2, i0, rows)?.narrow(3, j0, cols)?;
                let want = want.broadcast_as(got.shape())?;
                assert_eq!(
                    got.flatten_all()?.to_vec1::<f32>()?,
                    want.flatten_all()?.to_vec1::<f32>()?
                );
            }
        }
        Ok(())
    }

    #[test]
    fn misfit_masks_are_refused() -> Result<()> {
        let m = AttnMask::causal(&[vec![1, 2, 0]], None)?;
        let e = m.check(1, 4, 4).unwrap_err().to_string();
        assert!(e.contains("segment numbers"), "{e}");
        let e = AttnMask::cached(2, None)
            .check(1, 3, 4)
            .unwrap_err()
            .to_string();
        assert!(e.contains("cached keys"), "{e}");
        let bias = Tensor::zeros((1, 1, 3, 3), DType::F32, &Device::Cpu)?;
        let e = AttnMask::bias(bias).check(1, 3, 4).unwrap_err().to_string();
        assert!(e.contains("bias"), "{e}");
        Ok(())
    }
}
