//! `--quantized` and `--quantize`: how eval and generate hold a base's frozen weights, as a
//! recipe's `model.quantized` and `model.quantize` do for training.
use anyhow::{bail, Result};
use lorakit_models::{Quantization, QUANTIZE_TYPES};

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum QuantizedArg {
    Keep,
    Dequantize,
}

#[derive(clap::Args, Clone, Debug)]
pub struct QuantArgs {
    /// A GGUF base's quantized weights: kept in their GGML blocks and dequantized just in time
    /// for each product (keep), or dequantized at load (dequantize).
    #[arg(long, value_enum, default_value = "keep")]
    pub quantized: QuantizedArg,
    /// Quantize the frozen linear weights at load: q8_0, q4_0, q4_k, q5_k or q6_k.
    #[arg(long)]
    pub quantize: Option<String>,
}

impl QuantArgs {
    pub fn quantization(&self) -> Result<Quantization> {
        let quantize = match &self.quantize {
            None => None,
            Some(name) => match lorakit_train::recipe::quantize_type(name) {
                Some(t) => Some(t),
                None => {
                    let names: Vec<&str> = QUANTIZE_TYPES.iter().map(|(n, _)| *n).collect();
                    bail!("--quantize {name:?} is not one of {}", names.join(", "))
                }
            },
        };
        Ok(Quantization {
            keep: matches!(self.quantized, QuantizedArg::Keep),
            quantize,
        })
    }
}
