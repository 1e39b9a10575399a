//! A GGUF (version 3) writer that takes one tensor at a time: the header is written from the
//! tensors' names, shapes and types, then each tensor's bytes as the caller produces them, so a
//! merged model is never held whole in memory. Written under a temporary name in the
//! destination's directory and renamed into place only when complete.
use crate::error::{ExportError, Result};
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Tensor;
use std::io::Write;
use std::path::Path;

const ALIGN: u64 = 32;

/// One tensor of the file: name, shape (candle order, outermost first) and type.
#[derive(Clone, Debug)]
pub struct TensorSpec {
    pub name: String,
    pub dims: Vec<usize>,
    pub dtype: GgmlDType,
}

impl TensorSpec {
    pub fn bytes(&self) -> u64 {
        let elems: usize = self.dims.iter().product();
        (elems / self.dtype.block_size() * self.dtype.type_size()) as u64
    }
}

/// Whether rows of `cols` values can be stored as `dtype` (block types need whole blocks).
pub fn fits(dtype: GgmlDType, cols: usize) -> bool {
    cols.is_multiple_of(dtype.block_size())
}

/// The bytes of `t` (f32 values in any float dtype) stored as `dtype`.
pub fn encode(t: &Tensor, dtype: GgmlDType) -> Result<Vec<u8>> {
    let q = QTensor::quantize(&t.to_dtype(candle_core::DType::F32)?.contiguous()?, dtype)?;
    Ok(q.data()?.into_owned())
}

/// The type id GGUF files store for `dtype` (ggml's `enum ggml_type`).
pub fn ggml_type_id(dtype: GgmlDType) -> u32 {
    match dtype {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

fn value_type(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(*x as u8),
        Value::String(s) => put_string(out, s),
        Value::Array(items) => {
            // an empty array's item type is not recorded by candle; strings are the usual case
            let item = items.first().map(value_type).unwrap_or(8);
            out.extend_from_slice(&item.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for i in items {
                put_value(out, i);
            }
        }
    }
}

/// The header: magic, version, counts, metadata, tensor table, padding to the data section.
fn header(metadata: &[(String, Value)], tensors: &[TensorSpec]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(b"GGUF");
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        put_string(&mut out, k);
        out.extend_from_slice(&value_type(v).to_le_bytes());
        put_value(&mut out, v);
    }
    let mut offset = 0u64;
    for t in tensors {
        put_string(&mut out, &t.name);
        out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in t.dims.iter().rev() {
            out.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        out.extend_from_slice(&ggml_type_id(t.dtype).to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        offset += t.bytes().div_ceil(ALIGN) * ALIGN;
    }
    out.resize(
        (out.len() as u64).div_ceil(ALIGN) as usize * ALIGN as usize,
        0,
    );
    out
}

/// Writes `path`: `metadata`, then `tensors` in order, tensor `i`'s bytes from `data(i)`
/// (checked against its shape and type). Returns the file size.
pub fn write(
    path: &Path,
    metadata: &[(String, Value)],
    tensors: &[TensorSpec],
    mut data: impl FnMut(usize) -> Result<Vec<u8>>,
) -> Result<u64> {
    // a sibling temporary file, created as any new file is (the user's umask: a file to share,
    // not 0600), removed if anything fails before the rename
    let tmp = lorakit_adapter::fsutil::sibling_temp(path, "partial");
    struct Cleanup<'a>(&'a Path, bool);
    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            if !self.1 {
                let _ = std::fs::remove_file(self.0);
            }
        }
    }
    let mut cleanup = Cleanup(&tmp, false);
    let io = |e: std::io::Error| ExportError::io(path, e);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|e| ExportError::io(&tmp, e))?;
    let head = header(metadata, tensors);
    let mut written = head.len() as u64;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    w.write_all(&head).map_err(io)?;
    for (i, t) in tensors.iter().enumerate() {
        let bytes = data(i)?;
        if bytes.len() as u64 != t.bytes() {
            return Err(ExportError::Unsupported(format!(
                "internal: tensor `{}` produced {} bytes, its shape {:?} as {:?} takes {}",
                t.name,
                bytes.len(),
                t.dims,
                t.dtype,
                t.bytes()
            )));
        }
        w.write_all(&bytes).map_err(io)?;
        let pad = t.bytes().div_ceil(ALIGN) * ALIGN - t.bytes();
        w.write_all(&vec![0u8; pad as usize]).map_err(io)?;
        written += t.bytes() + pad;
    }
    let file = w.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    cleanup.1 = true;
    lorakit_adapter::fsutil::sync_dir(path.parent());
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use lorakit_models::gguf::{GgufHeader, Value as Read};

    #[test]
    fn lorakits_reader_and_candles_read_back_what_was_written() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("x.gguf");
        let a = Tensor::arange(0f32, 64., &Device::Cpu)
            .unwrap()
            .reshape((2, 32))
            .unwrap();
        let b = Tensor::new(&[1.5f32, -2.0, 3.25], &Device::Cpu).unwrap();
        let specs = vec![
            TensorSpec {
                name: "a".into(),
                dims: vec![2, 32],
                dtype: GgmlDType::Q8_0,
            },
            TensorSpec {
                name: "b".into(),
                dims: vec![3],
                dtype: GgmlDType::F32,
            },
        ];
        let meta = vec![
            (
                "general.architecture".to_string(),
                Value::String("llama".into()),
            ),
            ("adapter.lora.alpha".to_string(), Value::F32(16.0)),
            (
                "list".to_string(),
                Value::Array(vec![Value::I32(-1), Value::I32(7)]),
            ),
        ];
        let tensors = [a.clone(), b.clone()];
        write(&path, &meta, &specs, |i| {
            encode(&tensors[i], specs[i].dtype)
        })
        .unwrap();
        let h = GgufHeader::from_file(&path).unwrap();
        assert_eq!(h.metadata["adapter.lora.alpha"], Read::F64(16.0));
        assert_eq!(h.tensor_dims("a"), Some(&[32u64, 2][..]));
        let mut f = std::fs::File::open(&path).unwrap();
        let c = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
        assert!(matches!(c.metadata["adapter.lora.alpha"], Value::F32(v) if v == 16.0));
        let back = c
            .tensor(&mut f, "a", &Device::Cpu)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap();
        let err = lorakit_adapter::compare::max_abs_diff(&back, &a).unwrap();
        assert!(err < 63.0 / 127.0, "{err}"); // q8_0: half a step of max/127
        let back = c
            .tensor(&mut f, "b", &Device::Cpu)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap();
        assert_eq!(back.to_vec1::<f32>().unwrap(), [1.5, -2.0, 3.25]);
        // no temporary file left behind, and the file is as readable as any new file
        assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 1);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            let created = {
                let probe = t.path().join("probe");
                std::fs::write(&probe, b"").unwrap();
                let m = std::fs::metadata(&probe).unwrap().permissions().mode() & 0o777;
                std::fs::remove_file(probe).unwrap();
                m
            };
            assert_eq!(mode, created);
        }
        // a failing tensor leaves nothing behind and the destination as it was
        let err = write(&path, &meta, &specs, |_| {
            Err(ExportError::Unsupported("boom".into()))
        });
        assert!(err.is_err());
        assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 1);
        assert!(GgufHeader::from_file(&path).is_ok());
    }
}
