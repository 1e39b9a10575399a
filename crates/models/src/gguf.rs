//! A bounds-checked reader for GGUF headers (llama.cpp's format): metadata and tensor table.
//! Every count and length is checked against the bytes that remain before anything is
//! allocated, and every tensor's byte range against the file size, so a hostile or truncated
//! file gives an error, never a huge allocation or a read past the end. What the tensors mean
//! (names, layout, config) is the architecture's business (`registry::Architecture`).
use crate::error::{ModelError, Result};
use crate::registry::{self, Architecture};
use std::collections::BTreeMap;
use std::path::Path;

const MAGIC: &[u8; 4] = b"GGUF";
/// Longest single string accepted (a chat template or a token is far shorter).
const MAX_STRING: u64 = 16 << 20;
const MAX_DIMS: u32 = 8;

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U64(u64),
    I64(i64),
    F64(f64),
    Bool(bool),
    Str(String),
    Array(Array),
}

/// A metadata array, stored about as compactly as in the file: fixed-size items as their raw
/// little-endian bytes (a 50 MB `u8` array takes 50 MB, not 32 bytes an item), strings as
/// strings, nested arrays as values.
#[derive(Clone, Debug, PartialEq)]
pub enum Array {
    /// GGUF item type (0–7, 10–12) and the items' bytes.
    Scalars {
        item: u32,
        raw: Vec<u8>,
    },
    Strings(Vec<String>),
    Nested(Vec<Value>),
}

/// Bytes per item of a fixed-size GGUF value type.
fn scalar_size(ty: u32) -> Option<u64> {
    Some(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        10..=12 => 8,
        _ => return None,
    })
}

/// One fixed-size value from its little-endian bytes.
fn decode_scalar(ty: u32, b: &[u8]) -> Value {
    let mut a = [0u8; 8];
    a[..b.len()].copy_from_slice(b);
    let bits = u64::from_le_bytes(a);
    match ty {
        1 => Value::I64(bits as u8 as i8 as i64),
        3 => Value::I64(bits as u16 as i16 as i64),
        5 => Value::I64(bits as u32 as i32 as i64),
        6 => Value::F64(f32::from_bits(bits as u32) as f64),
        7 => Value::Bool(bits != 0),
        11 => Value::I64(bits as i64),
        12 => Value::F64(f64::from_bits(bits)),
        _ => Value::U64(bits),
    }
}

impl Array {
    pub fn len(&self) -> usize {
        match self {
            Array::Scalars { item, raw } => {
                raw.len() / scalar_size(*item).unwrap_or(1).max(1) as usize
            }
            Array::Strings(v) => v.len(),
            Array::Nested(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The items as values (scalars decoded one at a time).
    pub fn iter(&self) -> Box<dyn Iterator<Item = Value> + '_> {
        match self {
            Array::Scalars { item, raw } => {
                let size = scalar_size(*item).unwrap_or(1).max(1) as usize;
                Box::new(raw.chunks_exact(size).map(|b| decode_scalar(*item, b)))
            }
            Array::Strings(v) => Box::new(v.iter().cloned().map(Value::Str)),
            Array::Nested(v) => Box::new(v.iter().cloned()),
        }
    }

    /// The items, when this is an array of strings.
    pub fn strings(&self) -> Option<&[String]> {
        match self {
            Array::Strings(v) => Some(v),
            _ => None,
        }
    }
}

impl Value {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Value::U64(v) => Some(*v),
            Value::I64(v) if *v >= 0 => Some(*v as u64),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// GGUF order: `dims[0]` is the innermost (input) dimension.
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    /// Byte offset from the start of the data section.
    pub offset: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug)]
pub struct GgufHeader {
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    /// Absolute file offset of the tensor data.
    pub data_start: u64,
}

/// (block size in elements, bytes per block) of the ggml types lorakit reads.
fn block(ggml_type: u32) -> Option<(u64, u64)> {
    Some(match ggml_type {
        0 => (1, 4),      // F32
        1 => (1, 2),      // F16
        2 => (32, 18),    // Q4_0
        3 => (32, 20),    // Q4_1
        6 => (32, 22),    // Q5_0
        7 => (32, 24),    // Q5_1
        8 => (32, 34),    // Q8_0
        9 => (32, 36),    // Q8_1
        10 => (256, 84),  // Q2_K
        11 => (256, 110), // Q3_K
        12 => (256, 144), // Q4_K
        13 => (256, 176), // Q5_K
        14 => (256, 210), // Q6_K
        15 => (256, 292), // Q8_K
        30 => (1, 2),     // BF16
        _ => return None,
    })
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64, what: &str) -> std::result::Result<&'a [u8], String> {
        let remaining = (self.buf.len() - self.pos) as u64;
        if n > remaining {
            return Err(format!(
                "truncated: {what} needs {n} bytes at offset {}, only {remaining} remain",
                self.pos
            ));
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }
    fn u32(&mut self, what: &str) -> std::result::Result<u32, String> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self, what: &str) -> std::result::Result<u64, String> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }
    fn string(&mut self, what: &str) -> std::result::Result<String, String> {
        let n = self.u64(what)?;
        if n > MAX_STRING {
            return Err(format!(
                "{what}: string of {n} bytes exceeds the {MAX_STRING}-byte limit"
            ));
        }
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| format!("{what}: not valid UTF-8"))
    }
    fn value(&mut self, ty: u32, what: &str, depth: u32) -> std::result::Result<Value, String> {
        let scalar = |r: &mut Self, n: u64| -> std::result::Result<u64, String> {
            let b = r.take(n, what)?;
            let mut a = [0u8; 8];
            a[..n as usize].copy_from_slice(b);
            Ok(u64::from_le_bytes(a))
        };
        Ok(match ty {
            0 => Value::U64(scalar(self, 1)?),
            1 => Value::I64(scalar(self, 1)? as u8 as i8 as i64),
            2 => Value::U64(scalar(self, 2)?),
            3 => Value::I64(scalar(self, 2)? as u16 as i16 as i64),
            4 => Value::U64(scalar(self, 4)?),
            5 => Value::I64(scalar(self, 4)? as u32 as i32 as i64),
            6 => Value::F64(f32::from_bits(scalar(self, 4)? as u32) as f64),
            7 => Value::Bool(scalar(self, 1)? != 0),
            8 => Value::Str(self.string(what)?),
            9 => {
                if depth > 2 {
                    return Err(format!("{what}: arrays nested too deeply"));
                }
                let item = self.u32(what)?;
                let count = self.u64(what)?;
                // every item takes at least one byte: a count beyond the bytes left is a lie
                if count > self.remaining() {
                    return Err(format!(
                        "{what}: array of {count} items in {} remaining bytes",
                        self.remaining()
                    ));
                }
                if let Some(size) = scalar_size(item) {
                    let raw = self.take(count.saturating_mul(size), what)?.to_vec();
                    return Ok(Value::Array(Array::Scalars { item, raw }));
                }
                if item == 8 {
                    let mut v = Vec::with_capacity(count.min(1 << 20) as usize);
                    for _ in 0..count {
                        v.push(self.string(what)?);
                    }
                    return Ok(Value::Array(Array::Strings(v)));
                }
                let mut v = Vec::with_capacity(count.min(1 << 16) as usize);
                for _ in 0..count {
                    v.push(self.value(item, what, depth + 1)?);
                }
                Value::Array(Array::Nested(v))
            }
            10 => Value::U64(scalar(self, 8)?),
            11 => Value::I64(scalar(self, 8)? as i64),
            12 => Value::F64(f64::from_bits(scalar(self, 8)?)),
            other => return Err(format!("{what}: unknown value type {other}")),
        })
    }
}

impl GgufHeader {
    pub fn from_file(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        // SAFETY: read-only map; see lorakit_adapter::checkpoint for the one caveat of mmap.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&map).map_err(|message| ModelError::Config {
            file: path.to_path_buf(),
            key: "GGUF header".into(),
            message,
        })
    }

    /// Parses a whole GGUF file held in `buf`.
    pub fn parse(buf: &[u8]) -> std::result::Result<Self, String> {
        let mut r = Reader { buf, pos: 0 };
        if r.take(4, "magic")
            .map_err(|_| "not a GGUF file (shorter than its magic number)".to_string())?
            != MAGIC
        {
            return Err("not a GGUF file (bad magic number)".into());
        }
        let version = r.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(format!("GGUF version {version} is not supported (2 or 3)"));
        }
        let n_tensors = r.u64("tensor count")?;
        let n_kv = r.u64("metadata count")?;
        // a tensor entry takes at least 24 bytes, a metadata entry at least 12
        if n_tensors > r.remaining() / 24 || n_kv > r.remaining() / 12 {
            return Err(format!(
                "header claims {n_tensors} tensors and {n_kv} metadata entries, more than the remaining {} bytes can hold (truncated or corrupt)",
                r.remaining()
            ));
        }
        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = r.string(&format!("metadata key {i}"))?;
            let ty = r.u32(&key)?;
            let v = r.value(ty, &key, 0)?;
            metadata.insert(key, v);
        }
        let mut tensors = Vec::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            let name = r.string(&format!("tensor name {i}"))?;
            let n_dims = r.u32(&name)?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(format!(
                    "tensor `{name}`: {n_dims} dimensions (1 to {MAX_DIMS} allowed)"
                ));
            }
            let dims = (0..n_dims)
                .map(|_| r.u64(&name))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            let ggml_type = r.u32(&name)?;
            let offset = r.u64(&name)?;
            let (bs, bb) = block(ggml_type).ok_or_else(|| {
                format!("tensor `{name}`: ggml type {ggml_type} is not supported")
            })?;
            let elems = dims
                .iter()
                .try_fold(1u64, |a, d| a.checked_mul(*d))
                .ok_or_else(|| format!("tensor `{name}`: element count overflows"))?;
            if elems == 0 {
                // no model or adapter has an empty tensor; candle's reader would build a slice
                // from a dangling pointer for one
                return Err(format!("tensor `{name}`: a dimension is 0 (dims {dims:?})"));
            }
            if elems % bs != 0 {
                return Err(format!("tensor `{name}`: {elems} elements is not a multiple of the type's block of {bs}"));
            }
            let bytes = (elems / bs)
                .checked_mul(bb)
                .ok_or_else(|| format!("tensor `{name}`: size overflows"))?;
            tensors.push(TensorInfo {
                name,
                dims,
                ggml_type,
                offset,
                bytes,
            });
        }
        let align = metadata
            .get("general.alignment")
            .and_then(Value::as_u64)
            .unwrap_or(32);
        if align == 0 || !align.is_power_of_two() || align > 1 << 20 {
            return Err(format!("general.alignment = {align} is not a power of two"));
        }
        let data_start = (r.pos as u64).div_ceil(align) * align;
        let file_len = buf.len() as u64;
        for t in &tensors {
            let end = data_start
                .checked_add(t.offset)
                .and_then(|s| s.checked_add(t.bytes));
            match end {
                Some(e) if e <= file_len && t.offset % align == 0 => {}
                _ => {
                    return Err(format!(
                        "tensor `{}`: bytes {}..+{} lie outside the file ({} bytes; truncated?)",
                        t.name, t.offset, t.bytes, file_len
                    ))
                }
            }
        }
        Ok(GgufHeader {
            version,
            metadata,
            tensors,
            data_start,
        })
    }

    /// `general.architecture`, checked against what lorakit can build.
    pub fn architecture(&self) -> std::result::Result<&str, String> {
        self.family().map(|(name, _)| name)
    }

    /// `general.architecture` and the architecture that reads it.
    pub fn family(&self) -> std::result::Result<(&str, &'static dyn Architecture), String> {
        let arch = self
            .metadata
            .get("general.architecture")
            .and_then(Value::as_str)
            .ok_or("missing `general.architecture`")?;
        let family = registry::by_gguf_architecture(arch).ok_or_else(|| {
            format!(
                "general.architecture = {arch:?} is not supported (supported: {})",
                registry::gguf_architectures().join(", ")
            )
        })?;
        Ok((arch, family))
    }

    /// The Hugging Face name of a tensor of this file's architecture.
    pub fn hf_name(&self, gguf_name: &str) -> Option<String> {
        self.family().ok()?.1.hf_tensor_name(gguf_name)
    }

    /// `<general.architecture>.<key>` as an integer; an error naming the key (and `path`) when
    /// it is missing or not an integer.
    pub fn arch_u64(&self, key: &str, path: &Path) -> Result<u64> {
        let full = format!("{}.{key}", self.arch_prefix());
        self.metadata
            .get(&full)
            .and_then(Value::as_u64)
            .ok_or_else(|| ModelError::Config {
                file: path.to_path_buf(),
                key: full,
                message: "missing or not an integer".into(),
            })
    }

    /// `<general.architecture>.<key>` as a float, if present.
    pub fn arch_f64(&self, key: &str) -> Option<f64> {
        match self.metadata.get(&format!("{}.{key}", self.arch_prefix())) {
            Some(Value::F64(v)) => Some(*v),
            _ => None,
        }
    }

    /// `<general.architecture>.<key>` as a string, if present.
    pub fn arch_str(&self, key: &str) -> Option<&str> {
        self.metadata
            .get(&format!("{}.{key}", self.arch_prefix()))
            .and_then(Value::as_str)
    }

    fn arch_prefix(&self) -> &str {
        self.metadata
            .get("general.architecture")
            .and_then(Value::as_str)
            .unwrap_or("")
    }

    /// The shape of tensor `name` in GGUF order (innermost first), if the file has it.
    pub fn tensor_dims(&self, name: &str) -> Option<&[u64]> {
        self.tensors
            .iter()
            .find(|t| t.name == name)
            .map(|t| t.dims.as_slice())
    }
}

/// config.json, as transformers writes it, of the model in a GGUF file.
pub fn hf_config_json(header: &GgufHeader, path: &Path) -> Result<serde_json::Value> {
    let (_, family) = header.family().map_err(|m| ModelError::Config {
        file: path.to_path_buf(),
        key: "general.architecture".into(),
        message: m,
    })?;
    family.gguf_config_json(header, path)
}

/// A GGUF model as a Hugging Face one: its config.json and its tensors, dequantised, under their
/// Hugging Face names and in the Hugging Face layout, so that adapters trained on it apply to
/// the Hugging Face release of the same model.
pub fn load_hf(
    path: &Path,
    device: &candle_core::Device,
) -> Result<(
    serde_json::Value,
    std::collections::HashMap<String, candle_core::Tensor>,
)> {
    let (config, dense, _) = read_hf(path, device, false)?;
    Ok((config, dense))
}

/// [`load_hf`] keeping block-quantized 2-D weights as they are stored (QLoRA): those whose
/// Hugging Face layout differs from llama.cpp's at most by a row order get their blocks
/// reordered; every other tensor is dequantized as by [`load_hf`]. Returns the config, the dense
/// tensors and the kept ones, by Hugging Face name.
#[allow(clippy::type_complexity)]
pub fn load_hf_kept(
    path: &Path,
    device: &candle_core::Device,
) -> Result<(
    serde_json::Value,
    std::collections::HashMap<String, candle_core::Tensor>,
    std::collections::HashMap<String, lorakit_adapter::QuantMatrix>,
)> {
    read_hf(path, device, true)
}

#[allow(clippy::type_complexity)]
fn read_hf(
    path: &Path,
    device: &candle_core::Device,
    keep: bool,
) -> Result<(
    serde_json::Value,
    std::collections::HashMap<String, candle_core::Tensor>,
    std::collections::HashMap<String, lorakit_adapter::QuantMatrix>,
)> {
    use lorakit_adapter::QuantMatrix;
    use lorakit_ops::quantized::KEPT_TYPES;
    let header = GgufHeader::from_file(path)?;
    let err = |key: &str, message: String| ModelError::Config {
        file: path.to_path_buf(),
        key: key.into(),
        message,
    };
    let config = hf_config_json(&header, path)?;
    let (_, family) = header
        .family()
        .map_err(|m| err("general.architecture", m))?;
    // Our header check has bounded every count and range; candle's reader does the rest.
    let mut file = std::fs::File::open(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let content = candle_core::quantized::gguf_file::Content::read(&mut file)
        .map_err(|e| err("GGUF header", e.to_string()))?;
    let cpu = candle_core::Device::Cpu;
    let (mut dense, mut kept) = (
        std::collections::HashMap::new(),
        std::collections::HashMap::new(),
    );
    for info in &header.tensors {
        let name = family.hf_tensor_name(&info.name).ok_or_else(|| {
            err(
                &info.name,
                "not a tensor lorakit knows for this architecture".into(),
            )
        })?;
        let q = content
            .tensor(&mut file, &info.name, &cpu)
            .map_err(|e| err(&info.name, e.to_string()))?;
        let order = match q.shape().dims() {
            [rows, _] if keep && KEPT_TYPES.contains(&q.dtype()) => {
                row_order(family, &name, *rows, &config)?
            }
            _ => None,
        };
        match order {
            Some(order) => {
                let m = QuantMatrix::new(q).map_err(|e| err(&info.name, e.to_string()))?;
                let identity = order.iter().enumerate().all(|(i, &r)| i == r);
                let m = if identity { m } else { m.permute_rows(&order)? };
                kept.insert(name, m.to_device(device)?);
            }
            None => {
                let t = family.gguf_tensor_to_hf(&name, q.dequantize(&cpu)?, &config)?;
                dense.insert(name, t.to_device(device)?);
            }
        }
    }
    Ok((config, dense, kept))
}

/// The row order the architecture's llama.cpp → Hugging Face conversion applies to a `rows`-row
/// matrix, found by converting a column of row numbers; `None` when the conversion is not a row
/// permutation (it changes values or the shape), so the tensor must be dequantized.
fn row_order(
    family: &dyn crate::registry::Architecture,
    hf_name: &str,
    rows: usize,
    config: &serde_json::Value,
) -> Result<Option<Vec<usize>>> {
    if rows >= 1 << 24 {
        return Ok(None); // row numbers beyond f32's exact integers
    }
    let probe = candle_core::Tensor::arange(0f32, rows as f32, &candle_core::Device::Cpu)?
        .reshape((rows, 1))?;
    let out = family.gguf_tensor_to_hf(hf_name, probe, config)?;
    if out.dims() != [rows, 1] {
        return Ok(None);
    }
    let values = out.flatten_all()?.to_vec1::<f32>()?;
    let mut seen = vec![false; rows];
    let mut order = Vec::with_capacity(rows);
    for v in values {
        let i = v as usize;
        if v.fract() != 0.0 || v < 0.0 || i >= rows || std::mem::replace(&mut seen[i], true) {
            return Ok(None);
        }
        order.push(i);
    }
    Ok(Some(order))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal GGUF: metadata `general.architecture` and one F32 tensor `[in=4, out=2]`.
    pub fn tiny_gguf(arch: &str) -> Vec<u8> {
        let mut b = Vec::new();
        let s = |b: &mut Vec<u8>, t: &str| {
            b.extend((t.len() as u64).to_le_bytes());
            b.extend(t.as_bytes());
        };
        b.extend(MAGIC);
        b.extend(3u32.to_le_bytes());
        b.extend(1u64.to_le_bytes()); // tensors
        b.extend(2u64.to_le_bytes()); // kv
        s(&mut b, "general.architecture");
        b.extend(8u32.to_le_bytes());
        s(&mut b, arch);
        s(&mut b, "llama.block_count");
        b.extend(4u32.to_le_bytes());
        b.extend(1u32.to_le_bytes());
        s(&mut b, "blk.0.attn_q.weight");
        b.extend(2u32.to_le_bytes());
        b.extend(4u64.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        b.extend(0u32.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        while b.len() % 32 != 0 {
            b.push(0);
        }
        b.extend([0u8; 32]);
        b
    }

    #[test]
    fn reads_a_well_formed_header() {
        let h = GgufHeader::parse(&tiny_gguf("llama")).unwrap();
        assert_eq!(h.architecture().unwrap(), "llama");
        assert_eq!(h.metadata["llama.block_count"], Value::U64(1));
        assert_eq!(h.tensors[0].dims, vec![4, 2]);
        assert_eq!(h.tensors[0].bytes, 32);
        assert_eq!(
            h.hf_name(&h.tensors[0].name).unwrap(),
            "model.layers.0.self_attn.q_proj.weight"
        );
    }

    #[test]
    fn every_truncation_is_an_error_and_hostile_counts_do_not_allocate() {
        let full = tiny_gguf("llama");
        for n in 0..full.len() {
            assert!(
                GgufHeader::parse(&full[..n]).is_err(),
                "prefix of {n} bytes accepted"
            );
        }
        let mut huge = full.clone();
        huge[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(GgufHeader::parse(&huge)
            .unwrap_err()
            .contains("truncated or corrupt"));
        let mut long = full.clone();
        long[24..32].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(GgufHeader::parse(&long).is_err());
        assert!(GgufHeader::parse(&tiny_gguf("gpt2"))
            .unwrap()
            .architecture()
            .unwrap_err()
            .contains("gpt2"));
    }

    /// Found by the `gguf_adapter` fuzz target: candle reads an empty tensor through a dangling
    /// pointer; the header refuses it first.
    #[test]
    fn an_empty_tensor_is_refused() {
        let mut b = tiny_gguf("llama");
        let name = b"blk.0.attn_q.weight";
        let at = b.windows(name.len()).position(|w| w == name).unwrap() + name.len() + 4;
        b[at..at + 8].copy_from_slice(&0u64.to_le_bytes()); // dims [0, 2]
        let e = GgufHeader::parse(&b).unwrap_err();
        assert!(
            e.contains("blk.0.attn_q.weight") && e.contains("dimension is 0"),
            "{e}"
        );
    }
}
