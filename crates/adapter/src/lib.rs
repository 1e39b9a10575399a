//! lorakit-adapter: LoRA adapters as PEFT defines them — config, target selection, the
//! `LoraLinear` layer, the on-disk format and a merged-weights backend. Knows tensor names,
//! never architectures. The compute (LoRA matmuls, dropout, frozen products) is lorakit-ops'.
pub use lorakit_ops::compare;
pub mod builder;
pub mod card;
pub mod checkpoint;
pub mod combine;
pub mod config;
pub mod dora;
pub mod error;
pub mod fsutil;
pub mod lora_linear;
pub mod merged_backend;
pub mod olora;
pub mod output_guard;
pub mod peft_format;
pub mod pissa;
pub mod residual;
pub mod safetensors_writer;
pub mod target;
pub mod variant;

pub use builder::{Adapters, BuildReport, LayerBuilder, LinearInfo, QuantizedBase};
pub use checkpoint::{Checkpoint, ShapeOnly};
pub use config::{LoraConfig, ModuleLora, ModuleSpec};
pub use error::{AdapterError, Result};
pub use lora_linear::{without_adapters, LoraLinear, LowRank};
pub use lorakit_ops::dropout::StepSeed;
pub use lorakit_ops::quantized::{Frozen, QuantMatrix};
pub use merged_backend::MergedBackend;
pub use peft_format::{save_adapter, save_adapter_with, PeftAdapter};
pub use target::TargetSelector;
pub use variant::LoraVariant;
