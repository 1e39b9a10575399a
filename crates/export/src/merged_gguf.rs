//! A LoRA adapter folded into a GGUF base model, written as a GGUF model llama.cpp runs:
//! metadata (architecture, tokenizer, chat template) carried over with its types as they are,
//! each adapted weight dequantised, `W + s·B·A` added in f32 (rows in llama.cpp's order) and
//! stored as the requested type; 1-D tensors stay F32, as llama.cpp's quantizer keeps them.
//! One tensor in memory at a time.
use crate::adapter_gguf::Base;
use crate::error::{ExportError, Result};
use crate::gguf_writer::{self, TensorSpec};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use lorakit_adapter::PeftAdapter;
use lorakit_models::gguf::GgufHeader;
use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// The type of the merged model's 2-D weights; `None` in [`merge_to_gguf`] keeps each base
/// tensor's own type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quantize {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    Q4K,
    Q5K,
    Q6K,
}

impl Quantize {
    pub(crate) fn ggml(self) -> GgmlDType {
        match self {
            Quantize::F32 => GgmlDType::F32,
            Quantize::F16 => GgmlDType::F16,
            Quantize::BF16 => GgmlDType::BF16,
            Quantize::Q8_0 => GgmlDType::Q8_0,
            Quantize::Q4_0 => GgmlDType::Q4_0,
            Quantize::Q4K => GgmlDType::Q4K,
            Quantize::Q5K => GgmlDType::Q5K,
            Quantize::Q6K => GgmlDType::Q6K,
        }
    }

    /// llama.cpp's `general.file_type` (`enum llama_ftype`) for a file of mostly this type.
    pub(crate) fn file_type(self) -> u32 {
        match self {
            Quantize::F32 => 0,
            Quantize::F16 => 1,
            Quantize::Q4_0 => 2,
            Quantize::Q8_0 => 7,
            Quantize::Q4K => 15,
            Quantize::Q5K => 17,
            Quantize::Q6K => 18,
            Quantize::BF16 => 32,
        }
    }
}

/// What [`merge_to_gguf`] wrote.
#[derive(Clone, Debug)]
pub struct MergedGguf {
    pub merged: usize,
    pub tensors: usize,
    pub bytes: u64,
    /// Tensors stored in a fallback type (rows not whole blocks of the requested one).
    pub fell_back: usize,
}

/// The type a 2-D tensor of `cols` columns takes when `want` is asked for: `want` if its rows
/// are whole blocks, else the nearest that fits (Q8_0, then F16), as llama.cpp's quantizer does.
pub(crate) fn fitting(want: GgmlDType, cols: usize) -> GgmlDType {
    [want, GgmlDType::Q8_0, GgmlDType::F16]
        .into_iter()
        .find(|t| gguf_writer::fits(*t, cols))
        .unwrap_or(GgmlDType::F32)
}

/// The type a GGUF file's type id names, among those candle encodes.
fn from_id(id: u32) -> Option<GgmlDType> {
    use GgmlDType::*;
    [
        F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2K, Q3K, Q4K, Q5K, Q6K,
    ]
    .into_iter()
    .find(|t| gguf_writer::ggml_type_id(*t) == id)
}

/// `w + delta`, refused (naming `name`) when the sum holds NaN or infinite values.
pub(crate) fn add_finite(w: &Tensor, delta: &Tensor, name: &str) -> Result<Tensor> {
    let sum = (w + delta)?;
    if !sum.abs()?.max_all()?.to_scalar::<f32>()?.is_finite() {
        return Err(ExportError::Unsupported(format!(
            "merged tensor `{name}` would hold NaN or infinite values; refusing to write it"
        )));
    }
    Ok(sum)
}

/// Writes `base` (a GGUF file) with `adapter` folded in to `out`, its 2-D weights as `quantize`
/// (each base tensor's own type when `None`; untouched tensors already of the output type are
/// copied byte for byte).
pub fn merge_to_gguf(
    adapter: &PeftAdapter,
    base: &Base,
    out: &Path,
    quantize: Option<Quantize>,
) -> Result<MergedGguf> {
    let path = base.model.path.as_path();
    if !lorakit_models::is_gguf(path) {
        return Err(ExportError::Unsupported(format!(
            "{}: a merged GGUF is written from a GGUF base (its tokenizer and metadata are carried over); pass the base model as .gguf, or merge into a Hugging Face directory (--out DIR) and convert that with llama.cpp's convert_hf_to_gguf.py",
            path.display()
        )));
    }
    adapter.check_pairs_only("a merged GGUF model")?;
    let header = GgufHeader::from_file(path)?;
    let mut file = std::fs::File::open(path).map_err(|e| ExportError::io(path, e))?;
    let content = Content::read(&mut file)
        .map_err(|e| ExportError::invalid(path, "GGUF header", e.to_string()))?;
    // llama.cpp weight name → adapted module
    let mut modules: BTreeMap<String, &str> = BTreeMap::new();
    for m in adapter.modules() {
        let name = base.layout.gguf_weight(m).ok_or_else(|| {
            ExportError::Unsupported(format!(
                "{}: module `{m}` has no llama.cpp counterpart in a {} model",
                adapter.weights_file(),
                base.layout.arch
            ))
        })?;
        if header.tensor_dims(&name).is_none() {
            return Err(ExportError::Unsupported(format!(
                "{}: module `{m}`: the base {} has no tensor `{name}`",
                adapter.weights_file(),
                path.display()
            )));
        }
        modules.insert(name, m);
    }
    let mut specs = Vec::with_capacity(header.tensors.len());
    let mut fell_back = 0;
    for t in &header.tensors {
        let dims: Vec<usize> = t.dims.iter().rev().map(|d| *d as usize).collect();
        let own = from_id(t.ggml_type).ok_or_else(|| {
            ExportError::invalid(
                path,
                &t.name,
                format!("ggml type {} cannot be re-encoded", t.ggml_type),
            )
        })?;
        let dtype = if dims.len() < 2 {
            GgmlDType::F32
        } else {
            let want = quantize.map(Quantize::ggml).unwrap_or(own);
            let got = fitting(want, t.dims[0] as usize);
            if got != want {
                fell_back += 1;
            }
            got
        };
        specs.push(TensorSpec {
            name: t.name.clone(),
            dims,
            dtype,
        });
    }
    let mut metadata: Vec<(String, Value)> = content
        .metadata
        .iter()
        // the file type is the new one's; the alignment is the writer's (32)
        .filter(|(k, _)| !["general.file_type", "general.alignment"].contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if let Some(q) = quantize {
        metadata.push(("general.file_type".into(), Value::U32(q.file_type())));
        metadata.retain(|(k, _)| k != "general.quantization_version");
        metadata.push(("general.quantization_version".into(), Value::U32(2)));
    } else if let Some(v) = content.metadata.get("general.file_type") {
        metadata.push(("general.file_type".into(), v.clone()));
    }
    metadata.sort_by(|a, b| a.0.cmp(&b.0));
    let mut merged = 0;
    let bytes = gguf_writer::write(out, &metadata, &specs, |i| {
        let info = &header.tensors[i];
        let spec = &specs[i];
        let own = from_id(info.ggml_type);
        let module = modules.get(&info.name);
        if module.is_none() && own == Some(spec.dtype) {
            let mut raw = vec![0u8; info.bytes as usize];
            file.seek(SeekFrom::Start(header.data_start + info.offset))
                .and_then(|_| file.read_exact(&mut raw))
                .map_err(|e| ExportError::io(path, e))?;
            return Ok(raw);
        }
        let w = content
            .tensor(&mut file, &info.name, &Device::Cpu)
            .map_err(|e| ExportError::invalid(path, &info.name, e.to_string()))?
            .dequantize(&Device::Cpu)?;
        let w = match module {
            Some(m) => {
                let delta = adapter.delta(m)?.ok_or_else(|| {
                    ExportError::Unsupported(format!("internal: module `{m}` has no LoRA pair"))
                })?;
                let delta = base.layout.rows_to_gguf(m, &delta)?;
                if delta.dims() != w.dims() {
                    return Err(ExportError::Unsupported(format!(
                        "{}: module `{m}` is {:?}, the base's `{}` is {:?}",
                        adapter.weights_file(),
                        delta.dims(),
                        info.name,
                        w.dims()
                    )));
                }
                merged += 1;
                add_finite(&w, &delta, &info.name)?
            }
            None => w,
        };
        gguf_writer::encode(&w, spec.dtype)
    })?;
    Ok(MergedGguf {
        merged,
        tensors: specs.len(),
        bytes,
        fell_back,
    })
}
