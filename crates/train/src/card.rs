//! The model card (`README.md`) of an adapter a recipe trains: the base, the data files with
//! their sha256 (so a reader can tell which data made it), the recipe's settings, and the
//! figures at the moment the adapter was saved.
use crate::recipe::Recipe;
use lorakit_adapter::card::Card;
use sha2::{Digest, Sha256};
use std::path::Path;

/// Hex sha256 of a file's bytes (`None` if it cannot be read).
pub fn sha256_file(path: &Path) -> Option<String> {
    let mut f = std::fs::File::open(path).ok()?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).ok()?;
    Some(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// The base model's licence: `license:` in its model card's front matter (a Hugging Face
/// directory) or `general.license` (a GGUF file).
pub fn base_license(model_path: &Path) -> Option<String> {
    if lorakit_models::is_gguf(model_path) {
        let h = lorakit_models::gguf::GgufHeader::from_file(model_path).ok()?;
        return h
            .metadata
            .get("general.license")?
            .as_str()
            .map(String::from);
    }
    let text = std::fs::read_to_string(model_path.join("README.md")).ok()?;
    let front = text.strip_prefix("---")?.split("\n---").next()?;
    front.lines().find_map(|l| {
        l.strip_prefix("license:")
            .map(|v| v.trim().trim_matches(['"', '\'']).to_string())
            .filter(|v| !v.is_empty())
    })
}

/// The card of a run of `recipe` (from file `recipe_name`), without figures yet.
pub fn recipe_card(recipe: &Recipe, model_path: &Path) -> Card {
    let mut data = String::from("| split | file | sha256 |\n|---|---|---|\n");
    let mut files = vec![("train", &recipe.data.train)];
    if let Some(e) = &recipe.data.eval {
        files.push(("eval", e));
    }
    for (split, f) in files {
        data += &format!(
            "| {split} | `{}` | `{}` |\n",
            f.display(),
            sha256_file(f).unwrap_or_else(|| "unreadable".into())
        );
    }
    if let Some(s) = recipe.data.eval_split {
        data += &format!("\nEval: {:.0}% of the training file held out.\n", s * 100.0);
    }
    let t = &recipe.train;
    let settings = format!(
        "| setting | value |\n|---|---|\n\
         | data format | {:?} |\n| max_seq_len | {} |\n| packing | {} |\n\
         | objective | {:?} |\n| epochs | {} |\n| batch size × accumulation | {} × {} |\n\
         | learning rate | {} ({:?}) |\n| weight decay | {} |\n| seed | {} |\n| dtype | {} |",
        recipe.data.format,
        recipe.data.max_seq_len,
        recipe.data.packing,
        t.objective,
        match t.max_steps {
            Some(n) => format!("{} (max_steps {n})", t.epochs),
            None => t.epochs.to_string(),
        },
        t.batch_size,
        t.grad_accum_steps,
        t.learning_rate,
        t.lr_scheduler,
        t.weight_decay,
        t.seed,
        recipe.model.dtype,
    );
    Card {
        base_model: recipe.model.path.display().to_string(),
        license: base_license(model_path),
        made_by: format!(
            "Trained with lorakit {} (`lorakit train`), {}.",
            env!("CARGO_PKG_VERSION"),
            if recipe.model.task == crate::recipe::Task::SequenceClassification {
                "a sequence classifier"
            } else {
                "a causal language model"
            }
        ),
        sections: vec![
            ("Training data".into(), data),
            ("Training settings".into(), settings),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_and_licence_are_read_from_the_files() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("d.jsonl");
        std::fs::write(&f, b"abc").unwrap();
        assert_eq!(
            sha256_file(&f).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        std::fs::write(
            t.path().join("README.md"),
            "---\nlicense: apache-2.0\ntags: [x]\n---\n# m\n",
        )
        .unwrap();
        assert_eq!(base_license(t.path()).as_deref(), Some("apache-2.0"));
    }
}
