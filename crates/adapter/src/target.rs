//! `TargetSelector`: which modules get an adapter, with PEFT's matching rules
//! (`check_target_module_exists`): exclusion wins; a list entry matches the full path or a
//! `.`-separated suffix; a string is a regex that must match the whole path; `layers_to_transform`
//! filters list matches by layer index; `"all-linear"` means every linear layer but the output head.
use crate::config::{LayerIndices, LoraConfig, ModuleSpec};
use crate::error::{AdapterError, Result};
use regex::Regex;
use std::collections::BTreeSet;

/// PEFT's shorthand for "every linear layer except the output layer".
pub const ALL_LINEAR: &str = "all-linear";

/// Names PEFT treats as the output layer, never wrapped by `all-linear`.
const OUTPUT_LAYERS: &[&str] = &["lm_head", "score", "classifier"];

#[derive(Clone, Debug)]
enum Spec {
    AllLinear,
    List(Vec<String>),
    Regex(Regex),
}

impl Spec {
    fn new(spec: &ModuleSpec) -> Result<Self> {
        Ok(match spec {
            ModuleSpec::Regex(s) if s.eq_ignore_ascii_case(ALL_LINEAR) => Spec::AllLinear,
            ModuleSpec::Regex(s) => {
                Spec::Regex(Regex::new(&format!("^(?:{s})$")).map_err(|e| {
                    AdapterError::InvalidConfig {
                        file: "LoRA config".into(),
                        key: "target_modules".into(),
                        message: format!("invalid regex: {e}"),
                    }
                })?)
            }
            ModuleSpec::List(v) => Spec::List(v.clone()),
        })
    }

    /// The list entry (or the regex / all-linear marker) that matches `path`.
    fn matching_entry(&self, path: &str) -> Option<String> {
        match self {
            Spec::AllLinear => {
                let last = path.rsplit('.').next().unwrap_or(path);
                (!OUTPUT_LAYERS.contains(&last)).then(|| ALL_LINEAR.to_string())
            }
            Spec::Regex(re) => re.is_match(path).then(|| re.as_str().to_string()),
            Spec::List(v) => v
                .iter()
                .find(|e| path == e.as_str())
                .or_else(|| v.iter().find(|e| path.ends_with(&format!(".{e}"))))
                .cloned(),
        }
    }
}

/// Decides, module path by module path, whether a LoRA adapter wraps the module.
#[derive(Clone, Debug)]
pub struct TargetSelector {
    targets: Spec,
    exclude: Option<Spec>,
    layers: Option<LayerIndices>,
    layers_pattern: Vec<String>,
    modules_to_save: Vec<Regex>,
}

impl TargetSelector {
    pub fn new(config: &LoraConfig) -> Result<Self> {
        let targets =
            config
                .target_modules
                .as_ref()
                .ok_or_else(|| AdapterError::InvalidConfig {
                    file: "LoRA config".into(),
                    key: "target_modules".into(),
                    message: "missing".into(),
                })?;
        Ok(TargetSelector {
            targets: Spec::new(targets)?,
            exclude: config.exclude_modules.as_ref().map(Spec::new).transpose()?,
            layers: config
                .layers_to_transform
                .clone()
                .filter(|l| !matches!(l, LayerIndices::Many(v) if v.is_empty())),
            layers_pattern: config
                .layers_pattern
                .as_ref()
                .map(|p| p.names())
                .unwrap_or_default(),
            modules_to_save: config
                .modules_to_save
                .iter()
                .flatten()
                .filter_map(|m| Regex::new(&format!(r"^(?:.*\.)?(?:{m})(?:$|\..*)")).ok())
                .collect(),
        })
    }

    /// Whether the linear module at `path` (e.g. `model.layers.0.self_attn.q_proj`) is wrapped.
    pub fn matches(&self, path: &str) -> bool {
        self.matching_entry(path).is_some()
    }

    /// The target entry responsible for wrapping `path`, if any.
    pub fn matching_entry(&self, path: &str) -> Option<String> {
        if let Some(ex) = &self.exclude {
            if ex.matching_entry(path).is_some() {
                return None;
            }
        }
        // A module to save whole is never also wrapped (PEFT excludes it the same way).
        if self.modules_to_save.iter().any(|re| re.is_match(path)) {
            return None;
        }
        let entry = self.targets.matching_entry(path)?;
        // PEFT applies the layer filter only to suffix matches of a list.
        let exact = matches!(&self.targets, Spec::List(v) if v.iter().any(|e| e == path));
        if let (Spec::List(_), false, Some(layers)) = (&self.targets, exact, &self.layers) {
            return match self.layer_index(path) {
                Some(i) if layers.contains(i) => Some(entry),
                _ => None,
            };
        }
        Some(entry)
    }

    /// The layer index of `path` as PEFT finds it: the number after `<layers_pattern>.`, or with
    /// no pattern the first `<name>.<digits>.` after at least one other component.
    fn layer_index(&self, path: &str) -> Option<usize> {
        let parts: Vec<&str> = path.split('.').collect();
        // A number must be followed by another component (the trailing `.` in PEFT's regex).
        let candidates = (1..parts.len().saturating_sub(1)).filter_map(|i| {
            parts[i]
                .parse::<usize>()
                .ok()
                .filter(|_| parts[i].chars().all(|c| c.is_ascii_digit()))
                .map(|n| (i, n))
        });
        if self.layers_pattern.is_empty() {
            // `.*?\.[^.]*\.(\d+)\.` is lazy: it takes the first numbered component after two others.
            candidates.filter(|(i, _)| *i >= 2).map(|(_, n)| n).next()
        } else {
            for pat in &self.layers_pattern {
                if let Some((_, n)) = candidates.clone().find(|(i, _)| parts[i - 1] == pat) {
                    return Some(n);
                }
            }
            None
        }
    }

    /// Target entries that wrap none of `wrapped` (the paths that [`matches`](Self::matches)).
    pub fn unmatched_entries<'a>(&self, wrapped: impl IntoIterator<Item = &'a str>) -> Vec<String> {
        let used: BTreeSet<String> = wrapped
            .into_iter()
            .filter_map(|p| self.matching_entry(p))
            .collect();
        let all: Vec<String> = match &self.targets {
            Spec::AllLinear => vec![ALL_LINEAR.into()],
            Spec::Regex(re) => vec![re.as_str().to_string()],
            Spec::List(v) => v.clone(),
        };
        let mut out: Vec<String> = all.into_iter().filter(|e| !used.contains(e)).collect();
        out.dedup();
        out
    }

    /// Fails with [`AdapterError::NoTargetMatched`] if some target entry wraps no module of
    /// `linear_paths` (all linear modules of the model).
    pub fn check_all_matched(&self, linear_paths: &[String]) -> Result<Vec<String>> {
        let wrapped: Vec<String> = linear_paths
            .iter()
            .filter(|p| self.matches(p))
            .cloned()
            .collect();
        let unmatched = self.unmatched_entries(wrapped.iter().map(String::as_str));
        if !unmatched.is_empty() {
            let mut examples: Vec<String> = linear_paths
                .iter()
                .map(|p| p.rsplit('.').next().unwrap_or(p).to_string())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            examples.truncate(8);
            return Err(AdapterError::NoTargetMatched {
                entries: unmatched,
                examples,
            });
        }
        Ok(wrapped)
    }
}

/// `target_modules` as one regex selecting exactly these module paths (PEFT full-matches a string
/// target), for adapters whose modules follow no list-and-layers pattern.
pub fn exact_regex<'a>(modules: impl IntoIterator<Item = &'a str>) -> ModuleSpec {
    let alternatives: Vec<String> = modules.into_iter().map(regex::escape).collect();
    ModuleSpec::Regex(alternatives.join("|"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::NameOrList;

    fn sel(targets: ModuleSpec, f: impl FnOnce(&mut LoraConfig)) -> TargetSelector {
        let mut c = LoraConfig {
            target_modules: Some(targets),
            ..Default::default()
        };
        f(&mut c);
        TargetSelector::new(&c).unwrap()
    }
    fn list(v: &[&str]) -> ModuleSpec {
        ModuleSpec::List(v.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn list_entries_match_full_path_or_dotted_suffix() {
        let s = sel(list(&["q_proj", "self_attn.v_proj"]), |_| {});
        assert!(s.matches("model.layers.0.self_attn.q_proj"));
        assert!(s.matches("model.layers.3.self_attn.v_proj"));
        assert!(!s.matches("model.layers.0.self_attn.qq_proj"));
        assert!(!s.matches("model.layers.0.mlp.v_proj_x"));
        assert!(s.matches("q_proj"));
    }

    #[test]
    fn regex_must_match_whole_path() {
        let s = sel(
            ModuleSpec::Regex(r".*\.1\.self_attn\.(q|v)_proj".into()),
            |_| {},
        );
        assert!(s.matches("model.layers.1.self_attn.q_proj"));
        assert!(!s.matches("model.layers.11.self_attn.q_proj"));
        assert!(!s.matches("model.layers.1.self_attn.q_proj.extra"));
        let s = sel(ModuleSpec::Regex("q_proj".into()), |_| {});
        assert!(!s.matches("model.layers.1.self_attn.q_proj"));
    }

    #[test]
    fn exclusion_wins() {
        let s = sel(ModuleSpec::Regex(ALL_LINEAR.into()), |c| {
            c.exclude_modules = Some(list(&["down_proj"]))
        });
        assert!(s.matches("model.layers.0.mlp.up_proj"));
        assert!(!s.matches("model.layers.0.mlp.down_proj"));
        assert!(!s.matches("lm_head"));
    }

    #[test]
    fn layers_to_transform_filters_suffix_matches_only() {
        let s = sel(list(&["q_proj", "model.layers.0.self_attn.v_proj"]), |c| {
            c.layers_to_transform = Some(LayerIndices::Many(vec![1]))
        });
        assert!(!s.matches("model.layers.0.self_attn.q_proj"));
        assert!(s.matches("model.layers.1.self_attn.q_proj"));
        // an exact full-path entry is not filtered, as in PEFT
        assert!(s.matches("model.layers.0.self_attn.v_proj"));
        let s = sel(list(&["q_proj"]), |c| {
            c.layers_to_transform = Some(LayerIndices::One(2));
            c.layers_pattern = Some(NameOrList::One("layers".into()));
        });
        assert!(s.matches("model.layers.2.self_attn.q_proj"));
        assert!(!s.matches("model.layers.12.self_attn.q_proj"));
        assert!(!s.matches("model.blocks.2.self_attn.q_proj"));
        // with no layers_pattern the first numbered component counts (MoE expert indices don't)
        let s = sel(list(&["w1"]), |c| {
            c.layers_to_transform = Some(LayerIndices::One(1))
        });
        assert!(s.matches("model.layers.1.experts.0.w1"));
        assert!(!s.matches("model.layers.0.experts.1.w1"));
    }

    #[test]
    fn modules_to_save_are_never_wrapped() {
        let s = sel(list(&["q_proj", "score"]), |c| {
            c.modules_to_save = Some(vec!["score".into()])
        });
        assert!(!s.matches("score"));
        assert!(s.matches("model.layers.0.self_attn.q_proj"));
    }

    #[test]
    fn unmatched_entries_are_reported() {
        let s = sel(list(&["q_proj", "qkv"]), |_| {});
        let paths = vec![
            "model.layers.0.self_attn.q_proj".to_string(),
            "model.layers.0.self_attn.k_proj".to_string(),
        ];
        let err = s.check_all_matched(&paths).unwrap_err().to_string();
        assert!(err.contains("qkv") && !err.contains("q_proj,"), "{err}");
        assert!(err.contains("k_proj"), "{err}");
    }
}
