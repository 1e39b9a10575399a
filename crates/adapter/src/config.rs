//! `LoraConfig`: the PEFT `adapter_config.json` schema (field names are PEFT's, a public contract).
use crate::error::{AdapterError, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::path::Path;

/// `target_modules` / `exclude_modules`: a list of names (full path or `.`-suffix) or one regex
/// string that must match the whole module path. `"all-linear"` is a special string.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ModuleSpec {
    List(Vec<String>),
    Regex(String),
}

/// `layers_to_transform`: one layer index or a list of them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LayerIndices {
    One(usize),
    Many(Vec<usize>),
}

impl LayerIndices {
    pub fn contains(&self, i: usize) -> bool {
        match self {
            LayerIndices::One(j) => *j == i,
            LayerIndices::Many(v) => v.contains(&i),
        }
    }
}

/// `layers_pattern`: a name or a list of names of the module list holding the layers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum NameOrList {
    One(String),
    Many(Vec<String>),
}

impl NameOrList {
    pub fn names(&self) -> Vec<String> {
        match self {
            NameOrList::One(s) => vec![s.clone()],
            NameOrList::Many(v) => v.clone(),
        }
    }
}

/// The LoRA settings lorakit understands. Unknown PEFT keys are handled by
/// [`LoraConfig::from_peft_json`], not by serde, so this struct stays strict for recipes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    #[serde(default = "default_r")]
    pub r: usize,
    #[serde(default = "default_alpha")]
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    #[serde(default)]
    pub target_modules: Option<ModuleSpec>,
    #[serde(default)]
    pub exclude_modules: Option<ModuleSpec>,
    #[serde(default)]
    pub use_rslora: bool,
    /// Module pattern → rank, checked in file order (first match wins, as in PEFT).
    #[serde(default)]
    pub rank_pattern: Map<String, Value>,
    /// Module pattern → alpha, checked in file order.
    #[serde(default)]
    pub alpha_pattern: Map<String, Value>,
    #[serde(default)]
    pub layers_to_transform: Option<LayerIndices>,
    #[serde(default)]
    pub layers_pattern: Option<NameOrList>,
    #[serde(default = "default_bias")]
    pub bias: String,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    pub task_type: Option<String>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// DoRA: a trained magnitude per output row ([`crate::dora`]).
    #[serde(default)]
    pub use_dora: bool,
    /// How A and B start: `true` (Kaiming-uniform A, zero B), or an initialisation from the base
    /// weight that rewrites it to a residual (`"pissa"`, `"pissa_niter_N"`, `"olora"`).
    #[serde(default)]
    pub init_lora_weights: InitLoraWeights,
    /// The adapted layers store weights `[in, out]` (GPT-2's `Conv1D`). The model knows its
    /// layers' layout; this is written for PEFT, which reads it (and, as PEFT does, a value that
    /// contradicts the layer is overridden by it).
    #[serde(default)]
    pub fan_in_fan_out: bool,
}

/// PEFT's `init_lora_weights`: a boolean or the name of an initialisation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum InitLoraWeights {
    Bool(bool),
    Method(String),
}

impl Default for InitLoraWeights {
    fn default() -> Self {
        InitLoraWeights::Bool(true)
    }
}

/// The initialisations lorakit implements, from [`InitLoraWeights`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LoraInit {
    /// `true`: Kaiming-uniform A, zero B.
    Default,
    /// `false`, `"gaussian"`, `"eva"`, `"orthogonal"`: other starting values of plain LoRA; they only matter when
    /// training starts, so a saved adapter that names them loads as plain LoRA.
    OtherPlain,
    /// `"pissa"`: A, B from the exact SVD of W.
    Pissa,
    /// `"pissa_niter_N"`: from a randomized SVD with N power iterations.
    PissaNiter(usize),
    /// `"olora"`: A, B from the QR decomposition of W.
    Olora,
}

impl InitLoraWeights {
    /// The initialisation this names, or a description of why lorakit cannot take it.
    pub fn parse(&self) -> std::result::Result<LoraInit, String> {
        let name = match self {
            InitLoraWeights::Bool(true) => return Ok(LoraInit::Default),
            InitLoraWeights::Bool(false) => return Ok(LoraInit::OtherPlain),
            InitLoraWeights::Method(s) => s.to_ascii_lowercase(),
        };
        if ["gaussian", "eva", "orthogonal"].contains(&name.as_str()) {
            return Ok(LoraInit::OtherPlain);
        }
        if name == "pissa" {
            return Ok(LoraInit::Pissa);
        }
        if name == "olora" {
            return Ok(LoraInit::Olora);
        }
        if let Some(n) = name.strip_prefix("pissa_niter_") {
            return n
                .parse::<usize>()
                .map(LoraInit::PissaNiter)
                .map_err(|_| format!("\"{name}\": expected pissa_niter_N with N a whole number"));
        }
        Err(format!(
            "\"{name}\" is not an initialisation lorakit implements (true, \"pissa\", \"pissa_niter_N\", \"olora\"; a saved adapter may also say false or \"gaussian\")"
        ))
    }
}

fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    8.0
}
fn default_bias() -> String {
    "none".into()
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            r: default_r(),
            lora_alpha: default_alpha(),
            lora_dropout: 0.0,
            target_modules: None,
            exclude_modules: None,
            use_rslora: false,
            rank_pattern: Map::new(),
            alpha_pattern: Map::new(),
            layers_to_transform: None,
            layers_pattern: None,
            bias: default_bias(),
            modules_to_save: None,
            task_type: None,
            base_model_name_or_path: None,
            use_dora: false,
            init_lora_weights: InitLoraWeights::default(),
            fan_in_fan_out: false,
        }
    }
}

/// Rank, alpha and the resulting scale of one wrapped module.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ModuleLora {
    pub r: usize,
    pub alpha: f64,
    pub scaling: f64,
}

/// PEFT keys that change nothing lorakit computes (bookkeeping, training-time options, configs of
/// other init methods left at their defaults). Accepted whatever they hold.
const INERT_KEYS: &[&str] = &[
    "peft_type",
    "auto_mapping",
    "revision",
    "inference_mode",
    "lora_bias",
    "megatron_config",
    "megatron_core",
    "loftq_config",
    "eva_config",
    "corda_config",
    "kasa_config",
    "lora_ga_config",
    "runtime_config",
    "qalora_group_size",
    "use_qalora",
    "layer_replication",
    "trainable_token_indices",
    "target_parameters",
    "alora_invocation_tokens",
    "arrow_config",
    "ensure_weight_tying",
    "peft_version",
    "use_bdlora",
    "bdlora_config",
    "velora_config",
    "monteclora_config",
];

/// Keys whose non-default value changes the math or the base weights: refused, never ignored.
/// Returns a description of the feature when `value` switches it on.
fn switched_on_feature(key: &str, value: &Value) -> Option<&'static str> {
    let truthy = !is_default_like(value);
    match key {
        "lora_bias" if value == &Value::Bool(true) => Some("trainable LoRA bias (lora_bias)"),
        "use_qalora" if value == &Value::Bool(true) => Some("QA-LoRA"),
        "layer_replication" if truthy => Some("layer replication"),
        "trainable_token_indices" if truthy => Some("trainable token embeddings"),
        "target_parameters" if truthy => Some("LoRA on nn.Parameter targets"),
        "alora_invocation_tokens" if truthy => Some("activated LoRA (aLoRA)"),
        "use_bdlora" if value == &Value::Bool(true) => Some("block-diagonal LoRA"),
        "kasa_config" if truthy => Some("KaSA"),
        "arrow_config" if truthy => Some("Arrow routing between adapters"),
        "velora_config" if truthy => Some("VeLoRA"),
        "monteclora_config" if truthy => Some("MonteCLoRA"),
        "init_lora_weights" => match value.as_str() {
            Some(s)
                if ["corda", "loftq", "lora_ga"]
                    .iter()
                    .any(|p| s.to_ascii_lowercase().starts_with(p)) =>
            {
                Some("an initialisation that rewrites the base weights (CorDA/LoftQ/LoRA-GA); convert the adapter to plain LoRA first")
            }
            _ => None,
        },
        _ => None,
    }
}

/// null, false, 0, "", [] and {}: the values PEFT uses for "off".
fn is_default_like(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
    }
}

/// Fields of [`LoraConfig`], the keys we parse ourselves (and the valid keys of a recipe's
/// `lora:` block).
pub const LORA_FIELDS: &[&str] = &[
    "r",
    "fan_in_fan_out",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "exclude_modules",
    "use_rslora",
    "rank_pattern",
    "alpha_pattern",
    "layers_to_transform",
    "layers_pattern",
    "bias",
    "modules_to_save",
    "task_type",
    "base_model_name_or_path",
    "use_dora",
    "init_lora_weights",
];

impl LoraConfig {
    /// Reads an `adapter_config.json` written by any recent PEFT. Returns the config and warnings
    /// (unknown keys holding non-default values, which are ignored).
    pub fn from_peft_file(path: &Path) -> Result<(Self, Vec<String>)> {
        let text = std::fs::read_to_string(path).map_err(|e| AdapterError::io(path, e))?;
        let value: Value = serde_json::from_str(&text).map_err(|e| AdapterError::Json {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Self::from_peft_json(value, &path.display().to_string())
    }

    /// As [`LoraConfig::from_peft_file`], on parsed JSON; `file` names the source in errors.
    pub fn from_peft_json(value: Value, file: &str) -> Result<(Self, Vec<String>)> {
        let Value::Object(map) = value else {
            return Err(AdapterError::InvalidConfig {
                file: file.into(),
                key: "(top level)".into(),
                message: "expected a JSON object".into(),
            });
        };
        if let Some(t) = map.get("peft_type") {
            if t.as_str() != Some("LORA") {
                return Err(AdapterError::Unsupported {
                    file: file.into(),
                    key: "peft_type".into(),
                    value: t.to_string(),
                    feature: "a PEFT method other than LORA".into(),
                });
            }
        }
        let mut own = Map::new();
        let mut warnings = Vec::new();
        for (key, value) in map {
            if let Some(feature) = switched_on_feature(&key, &value) {
                return Err(AdapterError::Unsupported {
                    file: file.into(),
                    key,
                    value: value.to_string(),
                    feature: feature.into(),
                });
            }
            if LORA_FIELDS.contains(&key.as_str()) {
                if !value.is_null() || key == "target_modules" {
                    own.insert(key, value);
                }
            } else if !INERT_KEYS.contains(&key.as_str()) && !is_default_like(&value) {
                warnings.push(format!(
                    "{file}: unknown key `{key}` = {value} ignored (not a LoRA setting lorakit knows)"
                ));
            }
        }
        let config: LoraConfig = serde_json::from_value(Value::Object(own)).map_err(|e| {
            AdapterError::InvalidConfig {
                file: file.into(),
                key: field_of_serde_error(&e.to_string()),
                message: e.to_string(),
            }
        })?;
        config.validate(file)?;
        if config.layers_to_transform.is_some()
            && matches!(config.target_modules, Some(ModuleSpec::Regex(_)))
        {
            warnings.push(format!(
                "{file}: `layers_to_transform` has no effect with a regex or \"all-linear\" `target_modules` (PEFT ignores it too)"
            ));
        }
        Ok((config, warnings))
    }

    /// Checks values that parse but cannot work.
    pub fn validate(&self, file: &str) -> Result<()> {
        let bad = |key: &str, message: String| AdapterError::InvalidConfig {
            file: file.into(),
            key: key.into(),
            message,
        };
        if self.r == 0 {
            return Err(bad("r", "rank must be at least 1".into()));
        }
        let init = self
            .init_lora_weights
            .parse()
            .map_err(|m| bad("init_lora_weights", m))?;
        if self.use_dora
            && matches!(
                init,
                LoraInit::Pissa | LoraInit::PissaNiter(_) | LoraInit::Olora
            )
        {
            return Err(bad(
                "init_lora_weights",
                format!(
                    "{:?} together with use_dora: true is not supported; choose one",
                    self.init_lora_weights
                ),
            ));
        }
        if !self.lora_alpha.is_finite() {
            return Err(bad("lora_alpha", "must be a finite number".into()));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(bad(
                "lora_dropout",
                format!("must be in [0, 1), got {}", self.lora_dropout),
            ));
        }
        if self.bias != "none" {
            return Err(AdapterError::Unsupported {
                file: file.into(),
                key: "bias".into(),
                value: format!("{:?}", self.bias),
                feature: "training base-layer biases (only \"none\" is supported)".into(),
            });
        }
        match &self.target_modules {
            None => {
                return Err(bad(
                    "target_modules",
                    "missing: list the modules to adapt, e.g. [\"q_proj\", \"v_proj\"], a regex, or \"all-linear\"".into(),
                ))
            }
            Some(ModuleSpec::List(v)) if v.is_empty() => {
                return Err(bad("target_modules", "is an empty list".into()))
            }
            _ => {}
        }
        for (key, spec) in [
            ("target_modules", &self.target_modules),
            ("exclude_modules", &self.exclude_modules),
        ] {
            if let Some(ModuleSpec::Regex(re)) = spec {
                if !re.eq_ignore_ascii_case(crate::target::ALL_LINEAR) {
                    regex::Regex::new(re).map_err(|e| bad(key, format!("invalid regex: {e}")))?;
                }
            }
        }
        for (key, map) in [
            ("rank_pattern", &self.rank_pattern),
            ("alpha_pattern", &self.alpha_pattern),
        ] {
            for (pat, v) in map {
                let ok = if key == "rank_pattern" {
                    v.as_u64().is_some_and(|r| r > 0)
                } else {
                    v.as_f64().is_some_and(f64::is_finite)
                };
                if !ok {
                    return Err(bad(
                        &format!("{key}.{pat}"),
                        format!("expected a positive number, got {v}"),
                    ));
                }
                regex::Regex::new(&format!("^(?:{pat})$"))
                    .map_err(|e| bad(&format!("{key}.{pat}"), format!("invalid pattern: {e}")))?;
            }
        }
        Ok(())
    }

    /// Rank, alpha and scaling for one module path, honouring `rank_pattern` / `alpha_pattern`.
    pub fn for_module(&self, path: &str) -> ModuleLora {
        let r = pattern_value(&self.rank_pattern, path)
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
            .unwrap_or(self.r);
        let alpha = pattern_value(&self.alpha_pattern, path)
            .and_then(|v| v.as_f64())
            .unwrap_or(self.lora_alpha);
        let scaling = if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        };
        ModuleLora { r, alpha, scaling }
    }

    /// The LoRA variant every module of this adapter uses (plain LoRA; a variant's config field
    /// selects it here).
    pub fn variant(&self) -> std::sync::Arc<dyn crate::variant::LoraVariant> {
        if self.use_dora {
            return std::sync::Arc::new(crate::dora::Dora);
        }
        match self.init() {
            LoraInit::Pissa => std::sync::Arc::new(crate::pissa::Pissa { niter: None }),
            LoraInit::PissaNiter(n) => std::sync::Arc::new(crate::pissa::Pissa { niter: Some(n) }),
            LoraInit::Olora => std::sync::Arc::new(crate::olora::Olora),
            LoraInit::Default | LoraInit::OtherPlain => crate::variant::lora(),
        }
    }

    /// The initialisation (`validate` has refused the ones lorakit does not implement).
    pub fn init(&self) -> LoraInit {
        self.init_lora_weights.parse().unwrap_or(LoraInit::Default)
    }

    /// The JSON PEFT writes for this config: the standard keys only (older PEFT versions refuse
    /// unknown keys), optional ones only when set.
    pub fn to_peft_json(&self) -> Value {
        let mut m = Map::new();
        let mut put = |k: &str, v: Value| {
            m.insert(k.to_string(), v);
        };
        put("peft_type", "LORA".into());
        put(
            "task_type",
            self.task_type.clone().unwrap_or("CAUSAL_LM".into()).into(),
        );
        put(
            "base_model_name_or_path",
            self.base_model_name_or_path.clone().into(),
        );
        put("r", self.r.into());
        put("lora_alpha", json_number(self.lora_alpha));
        put("lora_dropout", json_number(self.lora_dropout));
        let targets = match &self.target_modules {
            Some(ModuleSpec::List(v)) => {
                let mut v = v.clone();
                v.sort();
                v.dedup();
                Value::from(v)
            }
            Some(ModuleSpec::Regex(s)) => s.clone().into(),
            None => Value::Null,
        };
        put("target_modules", targets);
        put("use_rslora", self.use_rslora.into());
        put("bias", self.bias.clone().into());
        put("fan_in_fan_out", self.fan_in_fan_out.into());
        put("inference_mode", true.into());
        put(
            "init_lora_weights",
            serde_json::to_value(&self.init_lora_weights).unwrap_or(Value::Bool(true)),
        );
        if self.use_dora {
            put("use_dora", true.into());
        }
        put("rank_pattern", Value::Object(self.rank_pattern.clone()));
        put("alpha_pattern", Value::Object(self.alpha_pattern.clone()));
        put(
            "layers_to_transform",
            serde_json::to_value(&self.layers_to_transform).unwrap_or(Value::Null),
        );
        put(
            "layers_pattern",
            serde_json::to_value(&self.layers_pattern).unwrap_or(Value::Null),
        );
        put("modules_to_save", self.modules_to_save.clone().into());
        put("revision", Value::Null);
        if let Some(ex) = &self.exclude_modules {
            put(
                "exclude_modules",
                serde_json::to_value(ex).unwrap_or(Value::Null),
            );
        }
        Value::Object(m)
    }
}

/// Integral floats are written as integers, like Python's json for ints.
fn json_number(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        Value::from(x as i64)
    } else {
        Value::from(x)
    }
}

/// PEFT's `get_pattern_key`: a pattern applies to a module when it equals the whole path or
/// matches a `.`-separated tail of it; the first such pattern in file order wins.
fn pattern_value<'a>(patterns: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    patterns.iter().find_map(|(pat, v)| {
        if pat == path {
            return Some(v);
        }
        let re = regex::Regex::new(&format!(r"^(?:.*\.)?(?:{pat})$")).ok()?;
        re.is_match(path).then_some(v)
    })
}

/// Pulls the field name out of serde's "unknown field `x`" / "invalid type ... for key `x`".
fn field_of_serde_error(msg: &str) -> String {
    msg.split('`').nth(1).unwrap_or("(config)").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<(LoraConfig, Vec<String>)> {
        LoraConfig::from_peft_json(v, "adapter_config.json")
    }

    #[test]
    fn reads_peft_021_config_with_new_default_keys() {
        let (c, warnings) = parse(json!({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
            "target_modules": ["v_proj", "q_proj"], "use_dora": false, "lora_bias": false,
            "kasa_config": null, "qalora_group_size": 16, "megatron_core": "megatron.core",
            "some_future_key": null, "init_lora_weights": true, "layer_replication": null
        }))
        .unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(c.r, 4);
        assert_eq!(c.for_module("model.layers.0.self_attn.q_proj").scaling, 2.0);
    }

    #[test]
    fn unknown_key_with_a_value_is_reported() {
        let (_, w) =
            parse(json!({"r": 4, "target_modules": "all-linear", "new_thing": 3})).unwrap();
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("new_thing"));
    }

    #[test]
    fn switched_on_features_are_refused_by_key() {
        for (key, value) in [
            ("lora_bias", json!(true)),
            ("init_lora_weights", json!("corda")),
            ("init_lora_weights", json!("loftq")),
            ("init_lora_weights", json!("pissa_niter_x")),
            ("bias", json!("all")),
            ("peft_type", json!("IA3")),
        ] {
            let mut cfg = json!({"r": 4, "target_modules": ["q_proj"]});
            cfg[key] = value;
            let err = parse(cfg).unwrap_err().to_string();
            assert!(err.contains(key), "{err}");
            assert!(err.contains("adapter_config.json"), "{err}");
        }
    }

    #[test]
    fn variants_are_read_and_written_as_peft_names_them() {
        for (init, want) in [
            (json!(true), LoraInit::Default),
            (json!(false), LoraInit::OtherPlain),
            (json!("gaussian"), LoraInit::OtherPlain),
            (json!("pissa"), LoraInit::Pissa),
            (json!("pissa_niter_16"), LoraInit::PissaNiter(16)),
            (json!("olora"), LoraInit::Olora),
        ] {
            let (c, w) =
                parse(json!({"r": 4, "target_modules": ["q_proj"], "init_lora_weights": init}))
                    .unwrap();
            assert!(w.is_empty());
            assert_eq!(c.init(), want);
            let back = c.to_peft_json();
            assert_eq!(back["init_lora_weights"], init);
        }
        let (c, _) =
            parse(json!({"r": 4, "target_modules": ["q_proj"], "use_dora": true})).unwrap();
        assert_eq!(c.variant().name(), "dora");
        assert_eq!(c.to_peft_json()["use_dora"], json!(true));
        let err = parse(json!({"r": 4, "target_modules": ["q_proj"], "use_dora": true, "init_lora_weights": "pissa"}))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("init_lora_weights") && err.contains("use_dora"),
            "{err}"
        );
    }

    #[test]
    fn impossible_values_name_the_field() {
        let err = parse(json!({"r": 0, "target_modules": ["q_proj"]})).unwrap_err();
        assert!(err.to_string().contains("`r`"));
        let err = parse(json!({"r": "four", "target_modules": ["q_proj"]})).unwrap_err();
        assert!(err.to_string().contains("adapter_config.json"), "{err}");
        let err = parse(json!({"r": 4})).unwrap_err();
        assert!(err.to_string().contains("target_modules"));
    }

    #[test]
    fn rslora_and_patterns_set_rank_alpha_and_scaling() {
        let (c, _) = parse(json!({
            "r": 4, "lora_alpha": 8, "use_rslora": true, "target_modules": ["q_proj", "v_proj"],
            "rank_pattern": {"v_proj": 2, "layers.1.self_attn.q_proj": 6},
            "alpha_pattern": {"model.layers.0.self_attn.q_proj": 3}
        }))
        .unwrap();
        let q0 = c.for_module("model.layers.0.self_attn.q_proj");
        assert_eq!((q0.r, q0.alpha), (4, 3.0));
        assert!((q0.scaling - 3.0 / 2.0).abs() < 1e-12);
        let q1 = c.for_module("model.layers.1.self_attn.q_proj");
        assert_eq!((q1.r, q1.alpha), (6, 8.0));
        let v = c.for_module("model.layers.3.self_attn.v_proj");
        assert_eq!(v.r, 2);
        // a pattern must match a whole dotted tail, not a substring
        let c2 = LoraConfig {
            rank_pattern: json!({"proj": 2}).as_object().unwrap().clone(),
            ..c
        };
        assert_eq!(c2.for_module("model.layers.0.self_attn.q_proj").r, 4);
    }

    #[test]
    fn written_config_round_trips() {
        let (c, _) =
            parse(json!({"r": 4, "lora_alpha": 16, "target_modules": ["v_proj", "q_proj"]}))
                .unwrap();
        let v = c.to_peft_json();
        assert_eq!(v["target_modules"], json!(["q_proj", "v_proj"]));
        assert_eq!(v["lora_alpha"], json!(16));
        assert!(v.get("exclude_modules").is_none());
        let (back, w) = parse(v).unwrap();
        assert!(w.is_empty());
        assert_eq!(back.r, 4);
    }
}
