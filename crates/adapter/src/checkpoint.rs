//! Read-only access to safetensors checkpoints (one file, or shards named by an index json),
//! memory-mapped, with every header and byte range validated before any tensor is touched.
use crate::error::{AdapterError, Result};
use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The index file transformers writes next to sharded checkpoints.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// The single-file checkpoint name.
pub const SINGLE_FILE: &str = "model.safetensors";

/// A file's bytes: memory-mapped from disk, or owned (bytes handed over in memory).
enum Bytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

struct StFile {
    path: PathBuf,
    mmap: Bytes,
    data_start: usize,
    meta: Metadata,
}

/// A set of safetensors files seen as one name → tensor map.
pub struct Checkpoint {
    files: Vec<StFile>,
    index: BTreeMap<String, usize>,
}

/// What a checkpoint says about one tensor without reading it.
#[derive(Clone, Debug)]
pub struct TensorMeta {
    pub dtype: DType,
    pub shape: Vec<usize>,
}

/// Maps a safetensors dtype onto candle's, or fails naming the file and tensor.
pub fn candle_dtype(dtype: Dtype, file: &Path, name: &str) -> Result<DType> {
    Ok(match dtype {
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::F64 => DType::F64,
        Dtype::I64 => DType::I64,
        Dtype::I32 => DType::I32,
        Dtype::I16 => DType::I16,
        Dtype::U32 => DType::U32,
        Dtype::U8 | Dtype::BOOL => DType::U8,
        Dtype::F8_E4M3 => DType::F8E4M3,
        other => {
            return Err(AdapterError::BadTensor {
                file: file.display().to_string(),
                name: name.into(),
                message: format!(
                    "dtype {other:?} is not supported (expected F32, BF16, F16, F64 or an integer type)"
                ),
            })
        }
    })
}

impl Checkpoint {
    /// Opens `dir/model.safetensors.index.json` and its shards, or `dir/model.safetensors`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let index = dir.join(INDEX_FILE);
        if index.is_file() {
            return Self::open_index(&index);
        }
        let single = dir.join(SINGLE_FILE);
        if single.is_file() {
            return Self::open_files(&[single]);
        }
        Err(AdapterError::io(
            dir,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no {SINGLE_FILE} or {INDEX_FILE} in this directory"),
            ),
        ))
    }

    /// Opens the shards listed in a transformers index json and checks that each tensor it
    /// names is in the shard it names.
    pub fn open_index(index: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(index).map_err(|e| AdapterError::io(index, e))?;
        let json_err = |message: String| AdapterError::Json {
            path: index.to_path_buf(),
            message,
        };
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| json_err(e.to_string()))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| json_err("missing object `weight_map`".into()))?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut shard_names: Vec<String> = Vec::new();
        let mut wanted: Vec<(String, String)> = Vec::new();
        for (tensor, file) in map {
            let file = file
                .as_str()
                .ok_or_else(|| json_err(format!("`weight_map.{tensor}` is not a file name")))?;
            if file.contains('/') || file.contains('\\') || file.starts_with('.') {
                return Err(json_err(format!(
                    "`weight_map.{tensor}` = {file:?}: shard names must be plain file names"
                )));
            }
            if !shard_names.iter().any(|s| s == file) {
                shard_names.push(file.to_string());
            }
            wanted.push((tensor.clone(), file.to_string()));
        }
        shard_names.sort();
        let paths: Vec<PathBuf> = shard_names.iter().map(|s| dir.join(s)).collect();
        let ckpt = Self::open_files(&paths)?;
        for (tensor, file) in wanted {
            match ckpt.index.get(&tensor) {
                Some(&i) if ckpt.files[i].path.file_name() == Some(file.as_ref()) => {}
                _ => {
                    return Err(json_err(format!(
                        "`weight_map` puts `{tensor}` in {file}, but that shard does not hold it"
                    )))
                }
            }
        }
        Ok(ckpt)
    }

    /// Opens and validates the given safetensors files. A tensor name in two files is an error.
    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut index = BTreeMap::new();
        for path in paths {
            let file = std::fs::File::open(path).map_err(|e| AdapterError::io(path, e))?;
            // SAFETY: the map is read-only; a file truncated underneath us while mapped is the
            // one case mmap cannot guard against, as for every mmap-based loader.
            let mmap =
                unsafe { memmap2::Mmap::map(&file) }.map_err(|e| AdapterError::io(path, e))?;
            Self::add_file(&mut files, &mut index, path.clone(), Bytes::Mapped(mmap))?;
        }
        Ok(Checkpoint { files, index })
    }

    /// A checkpoint from bytes in memory; `name` stands for the file in messages.
    pub fn from_bytes(name: &str, bytes: Vec<u8>) -> Result<Self> {
        let mut files = Vec::new();
        let mut index = BTreeMap::new();
        Self::add_file(
            &mut files,
            &mut index,
            PathBuf::from(name),
            Bytes::Owned(bytes),
        )?;
        Ok(Checkpoint { files, index })
    }

    /// Validates one file's header and ranges and adds its tensors to the index.
    fn add_file(
        files: &mut Vec<StFile>,
        index: &mut BTreeMap<String, usize>,
        path: PathBuf,
        mmap: Bytes,
    ) -> Result<()> {
        let (header_len, meta) =
            SafeTensors::read_metadata(&mmap).map_err(|e| AdapterError::Safetensors {
                file: path.display().to_string(),
                message: describe_st_error(&e),
            })?;
        for name in meta.tensors().keys() {
            if index.insert(name.clone(), files.len()).is_some() {
                return Err(AdapterError::BadTensor {
                    file: path.display().to_string(),
                    name: name.clone(),
                    message: "appears in more than one file of the checkpoint".into(),
                });
            }
        }
        files.push(StFile {
            path,
            mmap,
            data_start: 8 + header_len,
            meta,
        });
        Ok(())
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The files of the checkpoint, in order, with the names each holds (in file order).
    pub fn files(&self) -> Vec<(&Path, Vec<String>)> {
        self.files
            .iter()
            .map(|f| (f.path.as_path(), f.meta.offset_keys()))
            .collect()
    }

    /// The `__metadata__` of the file holding `name`'s shard (or of the first file).
    pub fn user_metadata(&self, file_index: usize) -> HashMap<String, String> {
        self.files
            .get(file_index)
            .and_then(|f| f.meta.metadata().clone())
            .unwrap_or_default()
    }

    fn entry(&self, name: &str) -> Option<(&StFile, &TensorInfo)> {
        let f = &self.files[*self.index.get(name)?];
        Some((f, f.meta.info(name)?))
    }

    /// The file that holds `name`.
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.entry(name).map(|(f, _)| f.path.as_path())
    }

    /// dtype and shape of `name`.
    pub fn meta(&self, name: &str) -> Result<TensorMeta> {
        let (f, info) = self.entry(name).ok_or_else(|| self.missing(name))?;
        Ok(TensorMeta {
            dtype: candle_dtype(info.dtype, &f.path, name)?,
            shape: info.shape.clone(),
        })
    }

    /// The raw little-endian bytes of `name`.
    pub fn bytes(&self, name: &str) -> Result<&[u8]> {
        let (f, info) = self.entry(name).ok_or_else(|| self.missing(name))?;
        let (s, e) = info.data_offsets;
        // read_metadata already checked the ranges against the file length.
        f.mmap
            .get(f.data_start + s..f.data_start + e)
            .ok_or_else(|| AdapterError::BadTensor {
                file: f.path.display().to_string(),
                name: name.into(),
                message: "byte range lies outside the file".into(),
            })
    }

    /// Loads `name` in its stored dtype.
    pub fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
        let meta = self.meta(name)?;
        Ok(Tensor::from_raw_buffer(
            self.bytes(name)?,
            meta.dtype,
            &meta.shape,
            device,
        )?)
    }

    fn missing(&self, name: &str) -> AdapterError {
        AdapterError::MissingTensor {
            file: self.describe(),
            name: name.into(),
            why: "the model needs it".into(),
        }
    }

    /// The checkpoint's file(s), for messages.
    pub fn describe(&self) -> String {
        match self.files.as_slice() {
            [one] => one.path.display().to_string(),
            [first, ..] => format!(
                "{} (and {} more shards)",
                first.path.display(),
                self.files.len() - 1
            ),
            [] => "(empty checkpoint)".into(),
        }
    }

    /// An integer tensor where the model wants float weights would be converted silently.
    fn check_float(&self, name: &str, stored: DType, wanted: DType) -> candle_core::Result<()> {
        if wanted.is_float() && !stored.is_float() {
            let file = self
                .file_of(name)
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            return Err(candle_core::Error::Msg(format!(
                "{file}: tensor `{name}` is stored as {stored:?}; model weights must be F32, BF16 or F16"
            )));
        }
        Ok(())
    }

    /// The error for a tensor whose stored shape is not what config.json implies.
    fn config_shape_error(
        &self,
        name: &str,
        expected: &[usize],
        got: &[usize],
    ) -> candle_core::Error {
        let file = self
            .file_of(name)
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        candle_core::Error::Msg(
            AdapterError::ShapeMismatch {
                file,
                name: name.into(),
                expected: expected.to_vec(),
                got: got.to_vec(),
                why: "the model's config.json implies this shape".into(),
            }
            .to_string(),
        )
    }

    /// Total number of elements over all tensors.
    pub fn parameter_count(&self) -> usize {
        self.files
            .iter()
            .flat_map(|f| f.meta.tensors().into_values())
            .map(|i| i.shape.iter().product::<usize>())
            .sum()
    }
}

/// safetensors' error texts are terse; say what the file looks like instead.
fn describe_st_error(e: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::HeaderTooSmall => {
            "shorter than the 8-byte header length (empty or truncated file)".into()
        }
        E::HeaderTooLarge => {
            "header length exceeds the 100 MB limit (corrupt or not safetensors)".into()
        }
        E::InvalidHeaderLength => {
            "header length points past the end of the file (truncated?)".into()
        }
        E::MetadataIncompleteBuffer => {
            "tensor data does not end where the file ends (truncated or trailing bytes)".into()
        }
        other => other.to_string(),
    }
}

/// Lets candle's `VarBuilder` read base weights from a checkpoint, converting to the requested
/// dtype and checking shapes with messages that name the file.
impl candle_nn::var_builder::SimpleBackend for Checkpoint {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.shape() != &s {
            return Err(self.config_shape_error(name, s.dims(), t.dims()));
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self
            .load(name, dev)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        self.check_float(name, t.dtype(), dtype)?;
        t.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.contains(name)
    }
}

/// A backend that checks names and shapes against a checkpoint's headers but reads no data:
/// every tensor is a zero-sized broadcast. Used to walk a model's structure (`inspect`) at no
/// memory cost.
pub struct ShapeOnly(pub Checkpoint);

impl candle_nn::var_builder::SimpleBackend for ShapeOnly {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let meta = self
            .0
            .meta(name)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        if meta.shape != s.dims() {
            return Err(self.0.config_shape_error(name, s.dims(), &meta.shape));
        }
        self.0.check_float(name, meta.dtype, dtype)?;
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let meta = self
            .0
            .meta(name)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        Tensor::zeros((), dtype, dev)?.broadcast_as(meta.shape)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, tensors: &[(&str, Tensor)]) -> PathBuf {
        let p = dir.join(name);
        candle_core::safetensors::save(
            &tensors
                .iter()
                .map(|(n, t)| (n.to_string(), t.clone()))
                .collect::<HashMap<_, _>>(),
            &p,
        )
        .unwrap();
        p
    }

    #[test]
    fn reads_single_and_sharded_checkpoints() {
        let d = tempfile::tempdir().unwrap();
        let dev = Device::Cpu;
        let a = Tensor::arange(0f32, 6., &dev)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        let b = Tensor::ones(4, DType::BF16, &dev).unwrap();
        write(
            d.path(),
            "model-00001-of-00002.safetensors",
            &[("a", a.clone())],
        );
        write(d.path(), "model-00002-of-00002.safetensors", &[("b", b)]);
        std::fs::write(
            d.path().join(INDEX_FILE),
            r#"{"metadata":{},"weight_map":{"a":"model-00001-of-00002.safetensors","b":"model-00002-of-00002.safetensors"}}"#,
        )
        .unwrap();
        let c = Checkpoint::open_dir(d.path()).unwrap();
        assert_eq!(c.names().collect::<Vec<_>>(), vec!["a", "b"]);
        assert_eq!(c.meta("b").unwrap().dtype, DType::BF16);
        assert_eq!(
            c.load("a", &dev).unwrap().to_vec2::<f32>().unwrap(),
            a.to_vec2::<f32>().unwrap()
        );
        assert_eq!(c.parameter_count(), 10);
    }

    #[test]
    fn broken_files_and_indexes_are_named() {
        let d = tempfile::tempdir().unwrap();
        let dev = Device::Cpu;
        let p = write(
            d.path(),
            "model.safetensors",
            &[("a", Tensor::ones(8, DType::F32, &dev).unwrap())],
        );
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 4]).unwrap();
        let err = Checkpoint::open_dir(d.path()).err().unwrap().to_string();
        assert!(
            err.contains("model.safetensors") && err.contains("truncated"),
            "{err}"
        );
        std::fs::write(&p, [0xffu8; 8]).unwrap();
        let err = Checkpoint::open_dir(d.path()).err().unwrap().to_string();
        assert!(err.contains("header"), "{err}");

        write(
            d.path(),
            "s1.safetensors",
            &[("a", Tensor::ones(2, DType::F32, &dev).unwrap())],
        );
        std::fs::write(
            d.path().join(INDEX_FILE),
            r#"{"weight_map":{"a":"s1.safetensors","b":"s1.safetensors"}}"#,
        )
        .unwrap();
        let err = Checkpoint::open_dir(d.path()).err().unwrap().to_string();
        assert!(err.contains(INDEX_FILE) && err.contains("`b`"), "{err}");
        std::fs::write(
            d.path().join(INDEX_FILE),
            r#"{"weight_map":{"a":"../s1.safetensors"}}"#,
        )
        .unwrap();
        assert!(Checkpoint::open_dir(d.path()).is_err());
    }
}
