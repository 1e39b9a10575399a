//! A config's layer count checked against the layers the weights actually hold, before anything
//! is allocated per layer: a config.json or GGUF header claiming a billion layers is an error
//! naming the field, not a multi-gigabyte allocation.
use crate::error::{ModelError, Result};
use std::collections::BTreeSet;
use std::path::Path;

/// The layer index in a tensor name: the number after `layers`, `layer`, `blk` or `h`
/// (`model.layers.3.mlp.up_proj.weight`, `encoder.layer.3...`, `blk.3.attn_q.weight`).
pub fn layer_index(name: &str) -> Option<usize> {
    let parts: Vec<&str> = name.split('.').collect();
    parts.windows(2).find_map(|w| {
        matches!(w[0], "layers" | "layer" | "blk" | "h")
            .then(|| w[1].parse::<usize>().ok())
            .flatten()
    })
}

/// Fails unless the tensors hold every layer `0..declared` (`key` names the field in `file`;
/// `weights` names the weights in the message). Layers beyond `declared` are left to the
/// caller's check for unused tensors, which names them.
pub fn check<'a>(
    declared: u64,
    names: impl IntoIterator<Item = &'a str>,
    file: &Path,
    key: &str,
    weights: &str,
) -> Result<()> {
    let found: BTreeSet<usize> = names.into_iter().filter_map(layer_index).collect();
    // `declared` is only iterated once it is known to be no larger than what was found
    if declared <= found.len() as u64 && (0..declared as usize).all(|i| found.contains(&i)) {
        return Ok(());
    }
    let contiguous = found.iter().enumerate().all(|(i, n)| i == *n);
    let held = match (found.first(), found.last()) {
        (Some(a), Some(b)) if contiguous => format!("{} layers ({a}..={b})", found.len()),
        (Some(_), Some(_)) => format!(
            "{} layers with gaps (e.g. {:?})",
            found.len(),
            found.iter().take(5).collect::<Vec<_>>()
        ),
        _ => "no numbered layers".into(),
    };
    Err(ModelError::Config {
        file: file.to_path_buf(),
        key: key.into(),
        message: format!("is {declared} but {weights} holds only {held}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_layer_numbers_in_every_naming() {
        assert_eq!(layer_index("model.layers.12.mlp.up_proj.weight"), Some(12));
        assert_eq!(
            layer_index("bert.encoder.layer.3.output.dense.bias"),
            Some(3)
        );
        assert_eq!(layer_index("blk.0.attn_q.weight"), Some(0));
        assert_eq!(layer_index("model.embed_tokens.weight"), None);
    }

    #[test]
    fn a_count_the_weights_do_not_hold_is_refused() {
        let names = [
            "model.layers.0.a.weight",
            "model.layers.1.a.weight",
            "lm_head.weight",
        ];
        let f = Path::new("config.json");
        check(2, names, f, "num_hidden_layers", "w").unwrap();
        // more layers than declared: left to the unused-tensor check, which names them
        check(1, names, f, "num_hidden_layers", "w").unwrap();
        let e = check(
            1_000_000_000,
            names,
            f,
            "num_hidden_layers",
            "model.safetensors",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("num_hidden_layers")
                && e.contains("1000000000")
                && e.contains("model.safetensors holds only 2 layers"),
            "{e}"
        );
        let gappy = ["blk.0.x.weight", "blk.2.x.weight"];
        let e = check(2, gappy, f, "llama.block_count", "m.gguf")
            .unwrap_err()
            .to_string();
        assert!(e.contains("gaps"), "{e}");
        let e = check(u64::MAX, gappy, f, "llama.block_count", "m.gguf")
            .unwrap_err()
            .to_string();
        assert!(e.contains("18446744073709551615"), "{e}");
    }
}
