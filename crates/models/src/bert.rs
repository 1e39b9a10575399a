//! BERT encoders (all-MiniLM-L6-v2, bert-base, ...) with a sequence-classification head, as
//! transformers' `BertForSequenceClassification`: embeddings → post-LayerNorm encoder → pooler
//! (tanh dense on [CLS]) → `classifier`. Module paths follow that class (`bert.encoder.layer.0.
//! attention.self.query`, `classifier`) so adapters are interchangeable with PEFT's `SEQ_CLS`;
//! checkpoints of a bare `BertModel` (no `bert.` prefix, no head) are read too. Dropout of the
//! base model is off: only LoRA dropout applies.
use crate::error::{ModelError, Result};
use crate::model::{Dimensions, Model, ModelConfig, SequenceClassifier, Task};
use crate::registry::Architecture;
use candle_core::{DType, Tensor};
use lorakit_adapter::{Adapters, Frozen, LayerBuilder, LoraLinear};
use lorakit_ops::attention::{self, AttnMask};
use lorakit_ops::layers::layer_norm;
use serde_json::Value;
use std::path::Path;

/// The registry entry of BERT.
pub struct Bert;

impl Architecture for Bert {
    fn model_types(&self) -> &'static [&'static str] {
        &["bert"]
    }

    fn parse_config(&self, json: Value, file: &Path) -> Result<Box<dyn ModelConfig>> {
        Ok(Box::new(BertConfig::from_json(&json, file)?))
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Activation {
    /// erf-based GELU (`gelu`).
    Gelu,
    /// tanh approximation (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    Relu,
}

#[derive(Clone, Debug, PartialEq)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub hidden_act: Activation,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    /// Classes of the checkpoint's own head (`id2label`, else `num_labels`, else 2).
    pub num_labels: usize,
}

impl BertConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_json(&crate::registry::read_json(path)?, path)
    }

    pub fn from_json(v: &Value, file: &Path) -> Result<Self> {
        let err = |key: &str, message: String| ModelError::Config {
            file: file.to_path_buf(),
            key: key.into(),
            message,
        };
        let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
        if model_type != "bert" {
            return Err(err(
                "model_type",
                format!("{model_type:?}: expected \"bert\""),
            ));
        }
        let num = |k: &str| -> Result<usize> {
            match v.get(k).and_then(Value::as_u64) {
                Some(n) if n > 0 => Ok(n as usize),
                _ => Err(err(k, "missing or not a positive integer".into())),
            }
        };
        let hidden_act = match v
            .get("hidden_act")
            .and_then(Value::as_str)
            .unwrap_or("gelu")
        {
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            other => {
                return Err(err(
                    "hidden_act",
                    format!("{other:?} is not supported (gelu, gelu_new, relu)"),
                ))
            }
        };
        if let Some(p) = v.get("position_embedding_type").and_then(Value::as_str) {
            if p != "absolute" {
                return Err(err(
                    "position_embedding_type",
                    format!("{p:?} is not supported (absolute)"),
                ));
            }
        }
        let cfg = BertConfig {
            vocab_size: num("vocab_size")?,
            hidden_size: num("hidden_size")?,
            num_hidden_layers: num("num_hidden_layers")?,
            num_attention_heads: num("num_attention_heads")?,
            intermediate_size: num("intermediate_size")?,
            hidden_act,
            max_position_embeddings: num("max_position_embeddings")?,
            type_vocab_size: num("type_vocab_size").unwrap_or(2),
            layer_norm_eps: v
                .get("layer_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-12),
            num_labels: v
                .get("id2label")
                .and_then(Value::as_object)
                .map(|m| m.len())
                .or_else(|| {
                    v.get("num_labels")
                        .and_then(Value::as_u64)
                        .map(|n| n as usize)
                })
                .filter(|n| *n > 0)
                .unwrap_or(2),
        };
        if !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads) {
            return Err(err(
                "num_attention_heads",
                format!(
                    "{} does not divide hidden_size {}",
                    cfg.num_attention_heads, cfg.hidden_size
                ),
            ));
        }
        Ok(cfg)
    }
}

impl ModelConfig for BertConfig {
    fn model_type(&self) -> &'static str {
        "bert"
    }

    fn dimensions(&self) -> Dimensions {
        Dimensions {
            layers: self.num_hidden_layers,
            hidden: self.hidden_size,
            heads: self.num_attention_heads,
            kv_heads: self.num_attention_heads,
            head_dim: self.hidden_size / self.num_attention_heads,
            vocab: self.vocab_size,
            tied_embeddings: false,
        }
    }

    fn declared_dtype(&self) -> Option<DType> {
        None
    }

    fn default_task(&self) -> Task {
        Task::SequenceClassification {
            num_labels: self.num_labels,
        }
    }

    fn build(&self, lb: &LayerBuilder, task: Task) -> Result<Model> {
        match task {
            Task::SequenceClassification { num_labels } => Ok(Model::Classifier(Box::new(
                BertClassifier::new(self, num_labels, lb)?,
            ))),
            other => Err(ModelError::Input(format!(
                "a bert model is built for sequence_classification, not {}",
                other.name()
            ))),
        }
    }

    /// Position ids, and the heads of other tasks (pretraining `cls.`, a classifier the
    /// task does not use).
    fn may_leave_unused(&self, name: &str) -> bool {
        name.ends_with("position_ids")
            || name.starts_with("classifier.")
            || name.starts_with("cls.")
    }

    fn optional_prefix(&self) -> Option<&'static str> {
        Some("bert.")
    }
}

struct Norm {
    weight: Tensor,
    bias: Tensor,
}

impl Norm {
    fn new(lb: &LayerBuilder, n: usize) -> Result<Self> {
        Ok(Norm {
            weight: lb.tensor(n, "weight")?,
            bias: lb.tensor(n, "bias")?,
        })
    }
}

struct Layer {
    query: LoraLinear,
    key: LoraLinear,
    value: LoraLinear,
    attn_out: LoraLinear,
    attn_norm: Norm,
    intermediate: LoraLinear,
    output: LoraLinear,
    out_norm: Norm,
}

/// A BERT encoder with a sequence-classification head.
pub struct BertClassifier {
    cfg: BertConfig,
    word: Frozen,
    position: Tensor,
    token_type: Tensor,
    emb_norm: Norm,
    layers: Vec<Layer>,
    pooler: LoraLinear,
    /// `None` for a bare encoder with no head from the base or an adapter (encode only).
    classifier: Option<LoraLinear>,
    num_labels: usize,
}

impl BertClassifier {
    pub fn new(cfg: &BertConfig, num_labels: usize, lb: &LayerBuilder) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let bert = lb.pp("bert");
        let e = bert.pp("embeddings");
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for n in 0..cfg.num_hidden_layers {
            let l = bert.pp("encoder").pp("layer").pp(n);
            let a = l.pp("attention");
            layers.push(Layer {
                query: a.pp("self").pp("query").linear(h, h, true)?,
                key: a.pp("self").pp("key").linear(h, h, true)?,
                value: a.pp("self").pp("value").linear(h, h, true)?,
                attn_out: a.pp("output").pp("dense").linear(h, h, true)?,
                attn_norm: Norm::new(&a.pp("output").pp("LayerNorm"), h)?,
                intermediate: l.pp("intermediate").pp("dense").linear(h, i, true)?,
                output: l.pp("output").pp("dense").linear(i, h, true)?,
                out_norm: Norm::new(&l.pp("output").pp("LayerNorm"), h)?,
            });
        }
        Ok(BertClassifier {
            cfg: cfg.clone(),
            word: e.pp("word_embeddings").embedding(cfg.vocab_size, h)?,
            position: e
                .pp("position_embeddings")
                .tensor((cfg.max_position_embeddings, h), "weight")?,
            token_type: e
                .pp("token_type_embeddings")
                .tensor((cfg.type_vocab_size, h), "weight")?,
            emb_norm: Norm::new(&e.pp("LayerNorm"), h)?,
            layers,
            pooler: bert.pp("pooler").pp("dense").linear(h, h, true)?,
            classifier: match lb.adapters() {
                Adapters::None if !lb.pp("classifier").contains_tensor("weight") => None,
                _ => Some(lb.pp("classifier").saved_linear(h, num_labels)?),
            },
            num_labels,
        })
    }

    pub fn bert_config(&self) -> &BertConfig {
        &self.cfg
    }
}

impl SequenceClassifier for BertClassifier {
    fn config(&self) -> &dyn ModelConfig {
        &self.cfg
    }

    fn num_labels(&self) -> usize {
        self.num_labels
    }

    /// The encoder's last hidden states `[b, s, hidden]` (`attention_mask`: 1 = token, 0 = pad).
    fn encode(&self, input_ids: &Tensor, attention_mask: &Tensor, train: bool) -> Result<Tensor> {
        let (b, s) = input_ids.dims2()?;
        if attention_mask.dims() != [b, s] {
            return Err(ModelError::Input(format!(
                "attention mask has shape {:?}, input ids {:?}",
                attention_mask.dims(),
                [b, s]
            )));
        }
        if s == 0 || s > self.cfg.max_position_embeddings {
            return Err(ModelError::Input(format!(
                "sequence length {s} is outside 1..={}",
                self.cfg.max_position_embeddings
            )));
        }
        let ids = input_ids.to_dtype(DType::U32)?.flatten_all()?;
        let max_id = ids.max(0)?.to_scalar::<u32>()? as usize;
        if max_id >= self.cfg.vocab_size {
            return Err(ModelError::Input(format!(
                "token id {max_id} is outside the vocabulary of {}",
                self.cfg.vocab_size
            )));
        }
        let h = self.cfg.hidden_size;
        let x = self
            .word
            .rows(&ids, self.position.dtype())?
            .reshape((b, s, h))?;
        let x = x.broadcast_add(&self.position.narrow(0, 0, s)?.unsqueeze(0)?)?;
        let x = x.broadcast_add(&self.token_type.narrow(0, 0, 1)?.unsqueeze(0)?)?;
        let eps = self.cfg.layer_norm_eps;
        let mut x = layer_norm(&x, &self.emb_norm.weight, &self.emb_norm.bias, eps)?;
        // padding keys are hidden from every query row
        let mask = AttnMask::bidirectional(&lorakit_ops::layers::mask_segments(attention_mask)?)?;
        let heads = self.cfg.num_attention_heads;
        for l in &self.layers {
            let q = l.query.forward_t(&x, train)?;
            let k = l.key.forward_t(&x, train)?;
            let v = l.value.forward_t(&x, train)?;
            let ctx = attention::attention_heads_last(&q, &k, &v, &mask, heads, heads)?;
            let a = (l.attn_out.forward_t(&ctx, train)? + &x)?;
            x = layer_norm(&a, &l.attn_norm.weight, &l.attn_norm.bias, eps)?;
            let inter = l.intermediate.forward_t(&x, train)?;
            let inter = match self.cfg.hidden_act {
                Activation::Gelu => inter.gelu_erf()?,
                Activation::GeluTanh => inter.gelu()?,
                Activation::Relu => inter.relu()?,
            };
            let o = (l.output.forward_t(&inter, train)? + &x)?;
            x = layer_norm(&o, &l.out_norm.weight, &l.out_norm.bias, eps)?;
        }
        Ok(x)
    }

    /// Class logits `[b, num_labels]` (f32) from the pooled [CLS] state.
    fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor, train: bool) -> Result<Tensor> {
        let x = self.encode(input_ids, attention_mask, train)?;
        let cls = x.narrow(1, 0, 1)?.squeeze(1)?;
        let pooled = self.pooler.forward_t(&cls, train)?.tanh()?;
        let head = self.classifier.as_ref().ok_or_else(|| {
            ModelError::Input("the base model has no `classifier` head and no adapter provides one (train one with task: sequence_classification, or pass --adapter)".into())
        })?;
        Ok(head.forward_t(&pooled, train)?.to_dtype(DType::F32)?)
    }
}
