//! The `README.md` model card every adapter directory lorakit writes carries, in the form the
//! Hugging Face Hub reads: YAML front matter (`base_model`, `library_name: peft`, `tags`,
//! `license`), then what made the adapter, its figures, and how to load it in PEFT and llama.cpp.
use crate::config::LoraConfig;
use crate::error::Result;
use crate::fsutil::atomic_write;
use std::path::Path;

pub const CARD_FILE: &str = "README.md";

/// What a card says beyond what the config holds.
#[derive(Clone, Debug, Default)]
pub struct Card {
    /// The base model as the user named it (a hub id, a directory, a .gguf file).
    pub base_model: String,
    pub license: Option<String>,
    /// One line on how the adapter was made ("Trained by `lorakit train recipe.yaml`").
    pub made_by: String,
    /// Further sections, heading → Markdown body, in order (training data, recipe, metrics).
    pub sections: Vec<(String, String)>,
}

/// A YAML scalar, quoted when plain YAML would read it as something else.
fn yaml_str(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./@".contains(c))
        && !s.starts_with(['-', '.', '@'])
        && !["true", "false", "null", "yes", "no", "on", "off"]
            .contains(&s.to_ascii_lowercase().as_str())
        && s.parse::<f64>().is_err();
    if plain {
        s.to_string()
    } else {
        serde_json::to_string(s).unwrap_or_default()
    }
}

impl Card {
    /// The card's Markdown for an adapter with `config` in directory `dir_name` (its path, as
    /// the user will load it).
    pub fn render(&self, config: &LoraConfig, dir_name: &str) -> String {
        let mut out = String::from("---\n");
        out += &format!("base_model: {}\n", yaml_str(&self.base_model));
        out += "library_name: peft\n";
        if let Some(l) = &self.license {
            out += &format!("license: {}\n", yaml_str(l));
        }
        out += "tags:\n- lorakit\n- lora\n- peft\n";
        if config.use_dora {
            out += "- dora\n";
        }
        out += "---\n\n";
        out += &format!(
            "# {dir_name}\n\nA LoRA adapter for `{}`. {}\n\n",
            self.base_model, self.made_by
        );
        let targets = match &config.target_modules {
            Some(crate::config::ModuleSpec::List(v)) => v.join(", "),
            Some(crate::config::ModuleSpec::Regex(r)) => format!("regex `{r}`"),
            None => "the architecture's defaults".into(),
        };
        out += "## Adapter\n\n";
        out += &format!(
            "- rank `r` {}, `lora_alpha` {}{}{}\n- target modules: {targets}\n",
            config.r,
            config.lora_alpha,
            if config.use_rslora { ", rsLoRA" } else { "" },
            if config.rank_pattern.is_empty() && config.alpha_pattern.is_empty() {
                ""
            } else {
                ", per-module rank/alpha patterns"
            },
        );
        if let Some(m) = &config.modules_to_save {
            out += &format!("- trained whole: {}\n", m.join(", "));
        }
        out += "\n";
        for (heading, body) in &self.sections {
            out += &format!("## {heading}\n\n{}\n\n", body.trim_end());
        }
        let base = &self.base_model;
        // transformers reads a GGUF through `gguf_file=` next to its directory
        let load = match base.rsplit_once('/') {
            Some((d, f)) if base.ends_with(".gguf") => format!("\"{d}\", gguf_file=\"{f}\""),
            None if base.ends_with(".gguf") => format!("\".\", gguf_file=\"{base}\""),
            _ => format!("\"{base}\""),
        };
        let gguf_base = if base.ends_with(".gguf") {
            base.as_str()
        } else {
            "BASE.gguf"
        };
        out += &format!(
            "## How to use\n\n\
             PEFT:\n\n```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n\
             base = AutoModelForCausalLM.from_pretrained({load})\nmodel = PeftModel.from_pretrained(base, \"{dir_name}\")\n```\n\n\
             llama.cpp (as a GGUF LoRA adapter beside the base model's GGUF):\n\n```sh\n\
             lorakit export --base {gguf_base} --adapter {dir_name} --out adapter.gguf\n\
             llama-cli -m {gguf_base} --lora adapter.gguf\n```\n\n\
             lorakit:\n\n```sh\nlorakit generate --model {base} --adapter {dir_name} --prompt \"...\"\n\
             lorakit merge --base {base} --adapter {dir_name} --out merged\n```\n"
        );
        out
    }

    /// Writes `dir/README.md` (atomically) for an adapter with `config` that will live at
    /// `dest` (`dir` may be the temporary directory it is built in).
    pub fn write(&self, dir: &Path, dest: &Path, config: &LoraConfig) -> Result<()> {
        let name = dest.display().to_string();
        atomic_write(&dir.join(CARD_FILE), self.render(config, &name).as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn front_matter_is_yaml_the_hub_reads() {
        let json =
            serde_json::json!({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]});
        let config = LoraConfig::from_peft_json(json, "t").unwrap().0;
        let card = Card {
            base_model: "HuggingFaceTB/SmolLM2-135M-Instruct".into(),
            license: Some("apache-2.0".into()),
            made_by: "Trained by `lorakit train r.yaml`.".into(),
            sections: vec![("Metrics".into(), "| eval loss | 1.5 |".into())],
        };
        let text = card.render(&config, "out");
        let front = text
            .strip_prefix("---\n")
            .unwrap()
            .split("\n---\n")
            .next()
            .unwrap();
        assert!(front.contains("base_model: HuggingFaceTB/SmolLM2-135M-Instruct\n"));
        assert!(front.contains("library_name: peft\n") && front.contains("license: apache-2.0\n"));
        assert!(
            text.contains("q_proj, v_proj") && text.contains("## Metrics\n\n| eval loss | 1.5 |")
        );
        // a path with spaces or a YAML keyword is quoted
        assert_eq!(yaml_str("my model/dir"), "\"my model/dir\"");
        assert_eq!(yaml_str("yes"), "\"yes\"");
        assert_eq!(yaml_str("org/name"), "org/name");
    }
}
