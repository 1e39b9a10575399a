//! Token generation with a KV cache: the prompt is run once, then one token per step; greedy at
//! temperature 0, else temperature + nucleus (top-p) sampling from a seeded generator, so a
//! seed reproduces a sample.
use crate::error::{ModelError, Result};
use crate::model::CausalLm;
use candle_core::{Device, Tensor};

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// 0 = greedy.
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
    /// Generation stops after producing any of these (it is included in the output).
    pub stop: Vec<u32>,
}

/// SplitMix64: small, seedable, good enough to draw tokens.
struct Rng(u64);

impl Rng {
    fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Picks the next token from one row of logits.
fn pick(logits: &[f32], opts: &GenerateOptions, rng: &mut Rng) -> u32 {
    let argmax = || {
        (0..logits.len())
            .max_by(|a, b| logits[*a].total_cmp(&logits[*b]))
            .unwrap_or(0) as u32
    };
    if opts.temperature <= 0.0 {
        return argmax();
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, l)| (i as u32, ((*l as f64 - max) / opts.temperature).exp()))
        .collect();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    let total: f64 = probs.iter().map(|p| p.1).sum();
    // the smallest set of most likely tokens whose mass reaches top_p
    let mut kept = 0.0;
    let mut n = 0;
    for p in &probs {
        kept += p.1 / total;
        n += 1;
        if kept >= opts.top_p {
            break;
        }
    }
    let mass: f64 = probs[..n].iter().map(|p| p.1).sum();
    let mut r = rng.next_f64() * mass;
    for p in &probs[..n] {
        r -= p.1;
        if r <= 0.0 {
            return p.0;
        }
    }
    probs[n - 1].0
}

/// Generates after `prompt`, calling `on_token` with each new token as soon as it is chosen
/// (return `false` to stop). Returns the new tokens.
pub fn generate(
    model: &dyn CausalLm,
    prompt: &[u32],
    opts: &GenerateOptions,
    device: &Device,
    mut on_token: impl FnMut(u32) -> Result<bool>,
) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        return Err(ModelError::Input("the prompt is empty".into()));
    }
    let limit = model.max_positions();
    if prompt.len() >= limit {
        return Err(ModelError::Input(format!(
            "the prompt has {} tokens; the model's context is {limit}",
            prompt.len()
        )));
    }
    let mut rng = Rng(opts.seed);
    let mut cache = model.new_cache();
    let mut out = Vec::new();
    let mut input = prompt.to_vec();
    while out.len() < opts.max_new_tokens && cache.len + input.len() <= limit {
        let ids = Tensor::new(input.as_slice(), device)?.unsqueeze(0)?;
        let logits = model.forward_cached(&ids, &mut cache)?;
        let last = logits.squeeze(0)?.get(input.len() - 1)?.to_vec1::<f32>()?;
        // NaN or infinite logits pick garbage: a broken model or adapter, not an answer
        if let Some(bad) = last.iter().find(|v| !v.is_finite()) {
            return Err(ModelError::Input(format!(
                "the model computes a logit of {bad} at generated token {} (NaN or infinite values in the model or adapter: check lora_alpha in adapter_config.json, rms_norm_eps and rope_theta in config.json)",
                out.len() + 1
            )));
        }
        let next = pick(&last, opts, &mut rng);
        out.push(next);
        if !on_token(next)? || opts.stop.contains(&next) {
            break;
        }
        input = vec![next];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(temperature: f64, top_p: f64) -> GenerateOptions {
        GenerateOptions {
            max_new_tokens: 1,
            temperature,
            top_p,
            seed: 7,
            stop: vec![],
        }
    }

    #[test]
    fn greedy_takes_the_argmax_and_top_p_cuts_the_tail() {
        let logits = [0.0f32, 3.0, 1.0, 2.9];
        let mut rng = Rng(1);
        assert_eq!(pick(&logits, &opts(0.0, 1.0), &mut rng), 1);
        // top_p small: only the most likely token survives, whatever is drawn
        for _ in 0..50 {
            assert_eq!(pick(&logits, &opts(1.0, 0.01), &mut rng), 1);
        }
        // top_p 0.9 at T=1 keeps tokens 1 and 3 (≈0.47 + 0.43) and never draws 0 or 2
        let mut seen = [0; 4];
        for _ in 0..400 {
            seen[pick(&logits, &opts(1.0, 0.9), &mut rng) as usize] += 1;
        }
        assert_eq!((seen[0], seen[2]), (0, 0), "{seen:?}");
        assert!(seen[1] > 100 && seen[3] > 100, "{seen:?}");
    }

    #[test]
    fn sampling_follows_the_distribution_and_the_seed() {
        let logits = [0.0f32, (3.0f32).ln()]; // p = 0.25, 0.75
        let mut rng = Rng(3);
        let n = 4000;
        let ones = (0..n)
            .filter(|_| pick(&logits, &opts(1.0, 1.0), &mut rng) == 1)
            .count();
        let p = ones as f64 / n as f64;
        assert!((p - 0.75).abs() < 0.03, "{p}");
        let draw = |seed| {
            let mut r = Rng(seed);
            (0..20)
                .map(|_| pick(&logits, &opts(1.0, 1.0), &mut r))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(5), draw(5));
        assert_ne!(draw(5), draw(6));
    }
}
