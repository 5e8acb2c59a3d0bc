//! GGUF (v2/v3) reader: header, metadata, tensor infos and tensor data.
//!
//! Layout of a GGUF file (all little-endian):
//! `"GGUF"`, `u32 version`, `u64 tensor_count`, `u64 metadata_kv_count`, then the
//! key/value pairs (`string key`, `u32 value_type`, value), then the tensor infos
//! (`string name`, `u32 n_dims`, `u64 dims[n_dims]`, `u32 ggml_type`, `u64 offset`),
//! padding up to `general.alignment` (32 unless set), and the tensor data; each
//! tensor's offset is relative to the start of that data section.
//! A string is a `u64` byte length followed by UTF-8 bytes.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::dequant::dequantize;
use crate::error::{GgufError, Result};
use crate::types::GgmlType;

const MAGIC: &[u8; 4] = b"GGUF";
/// Default `general.alignment`.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most this many dimensions.
const MAX_DIMS: u32 = 4;
/// Arrays of arrays are allowed by the format; deeper nesting than this is refused.
const MAX_NESTING: u32 = 8;

/// The type tag of a metadata value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
    String,
    Array,
    U64,
    I64,
    F64,
}

impl ValueType {
    fn from_u32(id: u32) -> Option<ValueType> {
        Some(match id {
            0 => ValueType::U8,
            1 => ValueType::I8,
            2 => ValueType::U16,
            3 => ValueType::I16,
            4 => ValueType::U32,
            5 => ValueType::I32,
            6 => ValueType::F32,
            7 => ValueType::Bool,
            8 => ValueType::String,
            9 => ValueType::Array,
            10 => ValueType::U64,
            11 => ValueType::I64,
            12 => ValueType::F64,
            _ => return None,
        })
    }

    /// The fewest bytes a value of this type takes in the file.
    fn min_size(self) -> u64 {
        match self {
            ValueType::U8 | ValueType::I8 | ValueType::Bool => 1,
            ValueType::U16 | ValueType::I16 => 2,
            ValueType::U32 | ValueType::I32 | ValueType::F32 => 4,
            ValueType::U64 | ValueType::I64 | ValueType::F64 | ValueType::String => 8,
            ValueType::Array => 12,
        }
    }
}

impl fmt::Display for ValueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            ValueType::U8 => "u8",
            ValueType::I8 => "i8",
            ValueType::U16 => "u16",
            ValueType::I16 => "i16",
            ValueType::U32 => "u32",
            ValueType::I32 => "i32",
            ValueType::F32 => "f32",
            ValueType::Bool => "bool",
            ValueType::String => "string",
            ValueType::Array => "array",
            ValueType::U64 => "u64",
            ValueType::I64 => "i64",
            ValueType::F64 => "f64",
        };
        f.write_str(name)
    }
}

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    /// Element type and elements (all of that type).
    Array(ValueType, Vec<Value>),
}

impl Value {
    /// The type tag of this value.
    pub fn value_type(&self) -> ValueType {
        match self {
            Value::U8(_) => ValueType::U8,
            Value::I8(_) => ValueType::I8,
            Value::U16(_) => ValueType::U16,
            Value::I16(_) => ValueType::I16,
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::U64(_) => ValueType::U64,
            Value::I64(_) => ValueType::I64,
            Value::F32(_) => ValueType::F32,
            Value::F64(_) => ValueType::F64,
            Value::Bool(_) => ValueType::Bool,
            Value::String(_) => ValueType::String,
            Value::Array(..) => ValueType::Array,
        }
    }

    /// Any integer value that fits in `i64`.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::I8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::U64(v) => i64::try_from(v).ok(),
            Value::I64(v) => Some(v),
            _ => None,
        }
    }

    /// Any non-negative integer value.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U64(v) => Some(v),
            _ => self.as_i64().and_then(|v| u64::try_from(v).ok()),
        }
    }

    /// A float, or an integer, as `f64`. An `f32` is widened through its shortest
    /// decimal form, so `1e-5f32` reads as `1e-5` rather than `9.99999974e-6`.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(format!("{v}").parse().unwrap_or(f64::from(v))),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(_, items) => Some(items),
            _ => None,
        }
    }

    /// A short human description (`u32 3`, `string "llama"`, `array of 49152 string`).
    pub fn describe(&self) -> String {
        match self {
            Value::String(s) if s.len() > 60 => {
                let cut: String = s.chars().take(60).collect();
                format!("string {cut:?}...")
            }
            Value::String(s) => format!("string {s:?}"),
            Value::Array(t, items) => format!("array of {} {t}", items.len()),
            Value::U8(v) => format!("u8 {v}"),
            Value::I8(v) => format!("i8 {v}"),
            Value::U16(v) => format!("u16 {v}"),
            Value::I16(v) => format!("i16 {v}"),
            Value::U32(v) => format!("u32 {v}"),
            Value::I32(v) => format!("i32 {v}"),
            Value::U64(v) => format!("u64 {v}"),
            Value::I64(v) => format!("i64 {v}"),
            Value::F32(v) => format!("f32 {v}"),
            Value::F64(v) => format!("f64 {v}"),
            Value::Bool(v) => format!("bool {v}"),
        }
    }
}

/// One tensor's entry in the file.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions as GGUF lists them: fastest-varying first (the reverse of torch).
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
    /// Bytes of data, when the type's layout is known.
    pub size: Option<u64>,
}

impl TensorInfo {
    /// Shape in torch / Hugging Face order (slowest-varying first).
    pub fn shape(&self) -> Vec<usize> {
        // Every dim was checked to fit in usize (and its product too) when the file was opened.
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    /// Number of elements.
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// An open GGUF file: the parsed header, metadata and tensor infos.
/// Tensor data is read from the file on demand.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    file: Mutex<File>,
    file_len: u64,
    version: u32,
    metadata: Vec<(String, Value)>,
    metadata_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    alignment: u64,
    data_offset: u64,
}

/// Counting, bounds-checked reader for the header part of the file.
struct HeaderReader<'a> {
    inner: BufReader<&'a File>,
    pos: u64,
    len: u64,
    path: &'a Path,
}

impl HeaderReader<'_> {
    fn remaining(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    fn bytes(&mut self, n: u64, what: &str) -> Result<Vec<u8>> {
        if n > self.remaining() {
            return Err(GgufError::format(
                self.path,
                format!(
                    "truncated: {what} needs {n} bytes at offset {} but the file has {} bytes",
                    self.pos, self.len
                ),
            ));
        }
        // n <= remaining <= file length, which fits in memory terms only if usize can hold it.
        let n_usize = usize::try_from(n)
            .map_err(|_| GgufError::format(self.path, format!("{what}: {n} bytes is too large")))?;
        let mut buf = vec![0u8; n_usize];
        self.inner
            .read_exact(&mut buf)
            .map_err(|e| GgufError::io(self.path, format!("reading {what}"), e))?;
        self.pos += n;
        Ok(buf)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let v = self.bytes(N as u64, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(&v);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.u64(what)?;
        let start = self.pos;
        let bytes = self.bytes(n, what)?;
        String::from_utf8(bytes).map_err(|_| {
            GgufError::format(
                self.path,
                format!("{what} at offset {start} is not valid UTF-8"),
            )
        })
    }

    fn value(&mut self, ty: ValueType, key: &str, depth: u32) -> Result<Value> {
        let what = &format!("value of '{key}'");
        Ok(match ty {
            ValueType::U8 => Value::U8(self.array::<1>(what)?[0]),
            ValueType::I8 => Value::I8(i8::from_le_bytes(self.array(what)?)),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            ValueType::U32 => Value::U32(self.u32(what)?),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            ValueType::U64 => Value::U64(self.u64(what)?),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            ValueType::Bool => match self.array::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => {
                    return Err(GgufError::format(
                        self.path,
                        format!("{what}: bool byte is {b}, expected 0 or 1"),
                    ))
                }
            },
            ValueType::String => Value::String(self.string(what)?),
            ValueType::Array => {
                if depth >= MAX_NESTING {
                    return Err(GgufError::format(
                        self.path,
                        format!("{what}: arrays nested deeper than {MAX_NESTING}"),
                    ));
                }
                let elem_id = self.u32(what)?;
                let elem = ValueType::from_u32(elem_id).ok_or_else(|| {
                    GgufError::format(
                        self.path,
                        format!("{what}: unknown array element type {elem_id}"),
                    )
                })?;
                let count = self.u64(what)?;
                // Refuse counts that cannot fit in the rest of the file before allocating.
                if count.saturating_mul(elem.min_size()) > self.remaining() {
                    return Err(GgufError::format(
                        self.path,
                        format!(
                            "truncated: {what} claims {count} elements of type {elem} \
                             but only {} bytes remain",
                            self.remaining()
                        ),
                    ));
                }
                let mut items = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    items.push(self.value(elem, key, depth + 1)?);
                }
                Value::Array(elem, items)
            }
        })
    }
}

impl GgufFile {
    /// Open and parse a GGUF file (v2 or v3). Reads the header, metadata and tensor
    /// infos, and checks that every tensor's data lies inside the file.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| GgufError::io(path, "cannot open", e))?;
        let file_len = file
            .metadata()
            .map_err(|e| GgufError::io(path, "cannot stat", e))?
            .len();
        let mut r = HeaderReader {
            inner: BufReader::with_capacity(1 << 20, &file),
            pos: 0,
            len: file_len,
            path,
        };

        if file_len < 4 {
            return Err(GgufError::format(
                path,
                format!("file is only {file_len} bytes long"),
            ));
        }
        let magic: [u8; 4] = r.array("magic")?;
        if &magic != MAGIC {
            return Err(GgufError::format(
                path,
                format!("bad magic {magic:02x?} (expected \"GGUF\")"),
            ));
        }
        let version = r.u32("version")?;
        match version {
            2 | 3 => {}
            1 => {
                return Err(GgufError::format(
                    path,
                    "GGUF version 1 is not supported (re-export the model with a newer llama.cpp)",
                ))
            }
            v if v.swap_bytes() == 2 || v.swap_bytes() == 3 => {
                return Err(GgufError::format(
                    path,
                    "big-endian GGUF files are not supported",
                ))
            }
            v => {
                return Err(GgufError::format(
                    path,
                    format!("unsupported GGUF version {v}"),
                ))
            }
        }
        let tensor_count = r.u64("tensor count")?;
        let kv_count = r.u64("metadata count")?;
        // Each key/value takes at least 8 (key length) + 4 (type) + 1 bytes; each tensor info
        // at least 8 + 4 + 4 + 8.
        if kv_count.saturating_mul(13) > r.remaining() {
            return Err(GgufError::format(
                path,
                format!("metadata count {kv_count} cannot fit in a {file_len}-byte file"),
            ));
        }
        if tensor_count.saturating_mul(24) > r.remaining() {
            return Err(GgufError::format(
                path,
                format!("tensor count {tensor_count} cannot fit in a {file_len}-byte file"),
            ));
        }

        let mut metadata = Vec::with_capacity(kv_count as usize);
        let mut metadata_index = HashMap::with_capacity(kv_count as usize);
        for i in 0..kv_count {
            let key = r.string(&format!("key of metadata entry {i}"))?;
            let ty_id = r.u32(&format!("type of '{key}'"))?;
            let ty = ValueType::from_u32(ty_id).ok_or_else(|| {
                GgufError::format(
                    path,
                    format!("metadata '{key}' has unknown value type {ty_id}"),
                )
            })?;
            let value = r.value(ty, &key, 0)?;
            if metadata_index.insert(key.clone(), metadata.len()).is_some() {
                return Err(GgufError::format(
                    path,
                    format!("metadata key '{key}' appears twice"),
                ));
            }
            metadata.push((key, value));
        }

        let alignment = match metadata_index
            .get("general.alignment")
            .map(|&i| &metadata[i].1)
        {
            None => DEFAULT_ALIGNMENT,
            Some(Value::U32(a)) if *a > 0 && a.is_power_of_two() => u64::from(*a),
            Some(v) => {
                return Err(GgufError::metadata(
                    path,
                    "general.alignment",
                    format!("expected a u32 power of two, found {}", v.describe()),
                ))
            }
        };

        let mut tensors = Vec::with_capacity(tensor_count as usize);
        let mut tensor_index = HashMap::with_capacity(tensor_count as usize);
        for i in 0..tensor_count {
            let name = r.string(&format!("name of tensor {i}"))?;
            let n_dims = r.u32(&format!("dimension count of tensor '{name}'"))?;
            if n_dims > MAX_DIMS {
                return Err(GgufError::format(
                    path,
                    format!("tensor '{name}' has {n_dims} dimensions (at most {MAX_DIMS} allowed)"),
                ));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(r.u64(&format!("dimensions of tensor '{name}'"))?);
            }
            let ggml_type = GgmlType(r.u32(&format!("type of tensor '{name}'"))?);
            let offset = r.u64(&format!("offset of tensor '{name}'"))?;

            let n_elements = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .filter(|&n| usize::try_from(n).is_ok())
                .ok_or_else(|| {
                    GgufError::format(
                        path,
                        format!("tensor '{name}' dimensions {dims:?} overflow"),
                    )
                })?;
            let size = match ggml_type.layout() {
                None => None,
                Some((block, _)) => {
                    let row = dims.first().copied().unwrap_or(1);
                    if row % block != 0 {
                        return Err(GgufError::format(
                            path,
                            format!(
                                "tensor '{name}' of type {ggml_type} has rows of {row} elements, \
                                 not a multiple of its block size {block}"
                            ),
                        ));
                    }
                    Some(ggml_type.storage_size(n_elements).ok_or_else(|| {
                        GgufError::format(path, format!("tensor '{name}' size overflows"))
                    })?)
                }
            };
            if offset % alignment != 0 {
                return Err(GgufError::format(
                    path,
                    format!("tensor '{name}' offset {offset} is not a multiple of the alignment {alignment}"),
                ));
            }
            if tensor_index.insert(name.clone(), tensors.len()).is_some() {
                return Err(GgufError::format(
                    path,
                    format!("tensor name '{name}' appears twice"),
                ));
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ggml_type,
                offset,
                size,
            });
        }

        let data_offset = r.pos.div_ceil(alignment) * alignment;
        for t in &tensors {
            let end = t
                .size
                .and_then(|s| data_offset.checked_add(t.offset)?.checked_add(s));
            match end {
                Some(end) if end > file_len => {
                    return Err(GgufError::format(
                        path,
                        format!(
                            "truncated: tensor '{}' ends at byte {end} but the file has {file_len} bytes",
                            t.name
                        ),
                    ))
                }
                None if t.size.is_some() => {
                    return Err(GgufError::format(path, format!("tensor '{}' offset overflows", t.name)))
                }
                _ => {}
            }
        }
        drop(r);

        Ok(GgufFile {
            path: path.to_path_buf(),
            file: Mutex::new(file),
            file_len,
            version,
            metadata,
            metadata_index,
            tensors,
            tensor_index,
            alignment,
            data_offset,
        })
    }

    /// The file this was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// GGUF format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Size of the file in bytes.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// `general.alignment`, or 32.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute offset of the tensor data section.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// All metadata, in file order.
    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    /// One metadata value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata_index.get(key).map(|&i| &self.metadata[i].1)
    }

    fn typed<'a, T>(
        &'a self,
        key: &str,
        want: &str,
        conv: impl FnOnce(&'a Value) -> Option<T>,
    ) -> Result<Option<T>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => conv(v).map(Some).ok_or_else(|| {
                GgufError::metadata(
                    &self.path,
                    key,
                    format!("expected {want}, found {}", v.describe()),
                )
            }),
        }
    }

    fn required<T>(&self, key: &str, v: Result<Option<T>>) -> Result<T> {
        v?.ok_or_else(|| GgufError::metadata(&self.path, key, "missing"))
    }

    /// A non-negative integer of any width; `Ok(None)` when absent, an error when of another type.
    pub fn get_u64(&self, key: &str) -> Result<Option<u64>> {
        self.typed(key, "a non-negative integer", Value::as_u64)
    }

    /// A float or integer (see [`Value::as_f64`]).
    pub fn get_f64(&self, key: &str) -> Result<Option<f64>> {
        self.typed(key, "a number", Value::as_f64)
    }

    pub fn get_bool(&self, key: &str) -> Result<Option<bool>> {
        self.typed(key, "a bool", Value::as_bool)
    }

    pub fn get_str(&self, key: &str) -> Result<Option<&str>> {
        self.typed(key, "a string", Value::as_str)
    }

    /// An array of strings.
    pub fn get_str_array(&self, key: &str) -> Result<Option<Vec<&str>>> {
        self.typed(key, "an array of strings", |v| {
            v.as_array()?.iter().map(Value::as_str).collect()
        })
    }

    /// An array of integers (any width).
    pub fn get_i64_array(&self, key: &str) -> Result<Option<Vec<i64>>> {
        self.typed(key, "an array of integers", |v| {
            v.as_array()?.iter().map(Value::as_i64).collect()
        })
    }

    /// Like [`GgufFile::get_u64`] but missing is an error.
    pub fn req_u64(&self, key: &str) -> Result<u64> {
        self.required(key, self.get_u64(key))
    }

    /// Like [`GgufFile::get_f64`] but missing is an error.
    pub fn req_f64(&self, key: &str) -> Result<f64> {
        self.required(key, self.get_f64(key))
    }

    /// Like [`GgufFile::get_str`] but missing is an error.
    pub fn req_str(&self, key: &str) -> Result<&str> {
        self.required(key, self.get_str(key))
    }

    /// `general.architecture` (`"llama"`, ...).
    pub fn architecture(&self) -> Result<&str> {
        self.req_str("general.architecture")
    }

    /// All tensor infos, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// One tensor's info.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    fn tensor_or_err(&self, name: &str) -> Result<&TensorInfo> {
        self.tensor(name).ok_or_else(|| GgufError::MissingTensor {
            path: self.path.clone(),
            name: name.to_string(),
        })
    }

    /// The raw stored bytes of a tensor.
    pub fn tensor_bytes(&self, name: &str) -> Result<Vec<u8>> {
        let info = self.tensor_or_err(name)?;
        let size = info.size.ok_or_else(|| GgufError::UnsupportedType {
            path: self.path.clone(),
            tensor: name.to_string(),
            ggml_type: info.ggml_type.name(),
        })?;
        // Checked at open: offset + size lies inside the file, so it fits in memory terms.
        let mut buf = vec![0u8; size as usize];
        let mut file = self
            .file
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let what = format!("reading tensor '{name}'");
        file.seek(SeekFrom::Start(self.data_offset + info.offset))
            .map_err(|e| GgufError::io(&self.path, what.clone(), e))?;
        file.read_exact(&mut buf)
            .map_err(|e| GgufError::io(&self.path, what, e))?;
        Ok(buf)
    }

    /// A tensor dequantized to f32, elements in storage order (row-major in
    /// [`TensorInfo::shape`] order).
    pub fn tensor_f32(&self, name: &str) -> Result<Vec<f32>> {
        let info = self.tensor_or_err(name)?;
        if !info.ggml_type.can_dequantize() {
            return Err(GgufError::UnsupportedType {
                path: self.path.clone(),
                tensor: name.to_string(),
                ggml_type: info.ggml_type.name(),
            });
        }
        let bytes = self.tensor_bytes(name)?;
        dequantize(info.ggml_type, &bytes, info.n_elements() as usize)
            .map_err(|e| GgufError::format(&self.path, format!("tensor '{name}': {e}")))
    }
}
