//! A streaming safetensors writer: the header is computed from dtypes and shapes up front, then
//! tensors are written one at a time, so memory stays at one tensor. Header keys keep their
//! order, so the same tensors always give the same bytes.
use crate::error::{AdapterError, Result};
use crate::fsutil::{sibling_temp, sync_dir};

fn other(path: impl AsRef<Path>, msg: impl std::fmt::Display) -> AdapterError {
    AdapterError::io(path.as_ref(), std::io::Error::other(msg.to_string()))
}
use candle_core::{DType, Tensor};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

/// Name, dtype and shape of one tensor to be written, in file order.
pub struct Planned {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

fn st_dtype(d: DType) -> &'static str {
    match d {
        DType::F32 => "F32",
        DType::F16 => "F16",
        DType::BF16 => "BF16",
        DType::F64 => "F64",
        DType::I64 => "I64",
        DType::I32 => "I32",
        DType::I16 => "I16",
        DType::U32 => "U32",
        DType::U8 => "U8",
        DType::F8E4M3 => "F8_E4M3",
        _ => "UNKNOWN",
    }
}

/// Streams tensors into one safetensors file, checking each against the plan.
pub struct StreamWriter {
    out: std::io::BufWriter<std::fs::File>,
    plan: Vec<Planned>,
    next: usize,
    path: std::path::PathBuf,
}

impl StreamWriter {
    /// Starts `path` with `format: pt` plus `metadata` (in the given order) in the header.
    pub fn create(path: &Path, plan: Vec<Planned>, metadata: &[(String, String)]) -> Result<Self> {
        let mut header = serde_json::Map::new();
        let mut meta = serde_json::Map::new();
        meta.insert("format".into(), "pt".into());
        for (k, v) in metadata {
            meta.insert(k.clone(), v.clone().into());
        }
        header.insert("__metadata__".into(), serde_json::Value::Object(meta));
        let mut offset = 0usize;
        for p in &plan {
            let len = p.shape.iter().product::<usize>() * p.dtype.size_in_bytes();
            let mut e = serde_json::Map::new();
            e.insert("dtype".into(), st_dtype(p.dtype).into());
            e.insert(
                "shape".into(),
                serde_json::to_value(&p.shape).unwrap_or_default(),
            );
            e.insert(
                "data_offsets".into(),
                serde_json::json!([offset, offset + len]),
            );
            header.insert(p.name.clone(), serde_json::Value::Object(e));
            offset += len;
        }
        let mut json = serde_json::to_vec(&header).map_err(|e| other(path, e))?;
        // pad the header so tensor data starts 8-byte aligned, as the reference writer does
        while (json.len() + 8) % 8 != 0 {
            json.push(b' ');
        }
        let file = std::fs::File::create(path).map_err(|e| AdapterError::io(path, e))?;
        let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
        out.write_all(&(json.len() as u64).to_le_bytes())
            .and_then(|_| out.write_all(&json))
            .map_err(|e| AdapterError::io(path, e))?;
        Ok(StreamWriter {
            out,
            plan,
            next: 0,
            path: path.to_path_buf(),
        })
    }

    /// Writes the next tensor's raw little-endian bytes.
    pub fn write_raw(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let p = self
            .plan
            .get(self.next)
            .ok_or_else(|| other(&self.path, format!("unplanned tensor {name}")))?;
        let len = p.shape.iter().product::<usize>() * p.dtype.size_in_bytes();
        if p.name != name || bytes.len() != len {
            return Err(other(
                &self.path,
                format!(
                    "tensor {name}: {} bytes, planned {} ({len} bytes)",
                    bytes.len(),
                    p.name
                ),
            ));
        }
        self.out
            .write_all(bytes)
            .map_err(|e| AdapterError::io(&self.path, e))?;
        self.next += 1;
        Ok(())
    }

    /// Writes the next tensor, converting it to the planned dtype.
    pub fn write_tensor(&mut self, name: &str, t: &Tensor) -> Result<()> {
        let dtype = self
            .plan
            .get(self.next)
            .map(|p| p.dtype)
            .unwrap_or(t.dtype());
        let bytes = tensor_bytes(&t.to_dtype(dtype)?)?;
        self.write_raw(name, &bytes)
    }

    /// Flushes and syncs; fails if a planned tensor was not written.
    pub fn finish(mut self) -> Result<()> {
        if self.next != self.plan.len() {
            return Err(other(&self.path, "not every planned tensor was written"));
        }
        self.out
            .flush()
            .map_err(|e| AdapterError::io(&self.path, e))?;
        self.out
            .get_ref()
            .sync_all()
            .map_err(|e| AdapterError::io(&self.path, e))
    }
}

/// Little-endian bytes of a tensor.
pub fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let t = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => t
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::F64 => t
            .to_vec1::<f64>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::BF16 => t
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|v| v.to_bits().to_le_bytes())
            .collect(),
        DType::F16 => t
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|v| v.to_bits().to_le_bytes())
            .collect(),
        DType::I64 => t
            .to_vec1::<i64>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::U32 => t
            .to_vec1::<u32>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::U8 => t.to_vec1::<u8>()?,
        unsupported => {
            return Err(other(
                "(tensor)",
                format!("cannot write dtype {unsupported:?}"),
            ))
        }
    })
}

/// The `weight_map` index transformers reads for sharded checkpoints.
pub fn index_json(weight_map: &BTreeMap<String, String>, total_size: usize) -> serde_json::Value {
    serde_json::json!({
        "metadata": {"total_size": total_size},
        "weight_map": weight_map,
    })
}

/// Writes `tensors` (in the given order) to `path` atomically: a sibling temporary file, synced,
/// then renamed.
pub fn write_atomic(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: &[(String, String)],
) -> Result<()> {
    let tmp = sibling_temp(path, "tmp");
    let result = (|| {
        let plan = tensors
            .iter()
            .map(|(n, t)| Planned {
                name: n.clone(),
                dtype: t.dtype(),
                shape: t.dims().to_vec(),
            })
            .collect();
        let mut w = StreamWriter::create(&tmp, plan, metadata)?;
        for (n, t) in tensors {
            w.write_tensor(n, t)?;
        }
        w.finish()?;
        std::fs::rename(&tmp, path).map_err(|e| AdapterError::io(path, e))?;
        sync_dir(path.parent());
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
