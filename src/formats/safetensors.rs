//! The safetensors format: header reading with the reference crate's validation rules (and error
//! messages that name the file, the tensor and the byte offset), and header writing.
//!
//! Layout: `u64` little-endian header length `N`, `N` bytes of UTF-8 JSON, then the data buffer
//! that the tensors' `data_offsets` tile exactly, with no gap, overlap or trailing byte.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::Value;

use crate::dtype::DType;
use crate::error::{Error, Result};

/// The largest header the reference crate accepts (and so the largest weightcast writes).
pub const MAX_HEADER_SIZE: u64 = 100_000_000;

/// One tensor as declared in a header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// The tensor's name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Dimensions (empty for a scalar).
    pub shape: Vec<u64>,
    /// Start within the data buffer.
    pub begin: u64,
    /// End (exclusive) within the data buffer.
    pub end: u64,
}

/// A validated header.
#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    /// The `__metadata__` map, in file order, if the file has one.
    pub metadata: Option<Vec<(String, String)>>,
    /// Tensors in data-offset order.
    pub tensors: Vec<TensorInfo>,
    /// Absolute offset of the data buffer (8 + N).
    pub data_start: u64,
}

/// The first bytes of a Git LFS pointer file.
const LFS_PREFIX: &[u8] = b"version https://git-lfs";

/// True when `head` (the start of a file) looks like a Git LFS pointer rather than weights.
pub fn is_lfs_pointer(head: &[u8]) -> bool {
    head.starts_with(LFS_PREFIX)
}

/// Reads and validates the header of the safetensors file `file` (of length `file_len`) at `path`.
pub fn read_header(path: &Path, file: &File, file_len: u64) -> Result<Header> {
    read_header_with(path, file_len, |buf, pos| {
        file.read_exact_at(buf, pos).map_err(|e| Error::io(path, e))
    })
}

/// [`read_header`] through any positional reader (a local file, a remote one).
pub fn read_header_with(
    path: &Path,
    file_len: u64,
    read_at: impl Fn(&mut [u8], u64) -> Result<()>,
) -> Result<Header> {
    let mut head = [0u8; 64];
    let n = (file_len.min(64)) as usize;
    read_at(&mut head[..n], 0)?;
    if is_lfs_pointer(&head[..n]) {
        return Err(Error::invalid(
            path,
            "is a Git LFS pointer file, not the weights: fetch the real file (`git lfs pull`) first",
        ));
    }
    if file_len < 8 {
        return Err(Error::invalid(
            path,
            format!("file is {file_len} bytes, too short for a safetensors header (truncated?)"),
        ));
    }
    let header_len = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
    if header_len > MAX_HEADER_SIZE {
        return Err(Error::invalid(
            path,
            format!(
                "header length {header_len} at byte 0 exceeds the {MAX_HEADER_SIZE}-byte limit \
                 (not a safetensors file, or a corrupt one)"
            ),
        ));
    }
    let data_start = 8 + header_len;
    if data_start > file_len {
        return Err(Error::invalid(
            path,
            format!(
                "header length {header_len} at byte 0 runs past the end of the file \
                 ({file_len} bytes): truncated download?"
            ),
        ));
    }
    // Bounded by MAX_HEADER_SIZE and by the file's real length, checked above.
    let mut buf = vec![0u8; header_len as usize];
    read_at(&mut buf, 8)?;
    parse_header(path, &buf, file_len)
}

/// Parses and validates header JSON bytes `buf` of a file of length `file_len`.
pub fn parse_header(path: &Path, buf: &[u8], file_len: u64) -> Result<Header> {
    let data_start = 8 + buf.len() as u64;
    let text = std::str::from_utf8(buf).map_err(|e| {
        Error::invalid(
            path,
            format!("header is not UTF-8 (byte {})", 8 + e.valid_up_to() as u64),
        )
    })?;
    if !text.trim_start().starts_with('{') {
        return Err(Error::invalid(path, "header is not a JSON object (byte 8)"));
    }
    let entries: Entries = serde_json::from_str(text).map_err(|e| {
        Error::invalid(
            path,
            format!("header is not valid JSON: {e} (header starts at byte 8)"),
        )
    })?;
    if let Some(dup) = entries.duplicate {
        return Err(Error::invalid(path, format!("header names `{dup}` twice")));
    }
    let mut metadata = None;
    let mut tensors = Vec::with_capacity(entries.items.len());
    for (name, value) in entries.items {
        if name == "__metadata__" {
            metadata = Some(parse_metadata(path, value)?);
        } else {
            tensors.push(parse_tensor(path, name, value)?);
        }
    }
    tensors.sort_by_key(|t| (t.begin, t.end));
    let expected = check_offsets(path, &tensors, data_start)?;
    let needed = data_start
        .checked_add(expected)
        .ok_or_else(|| Error::invalid(path, "tensor offsets overflow"))?;
    if needed > file_len {
        return Err(Error::invalid(
            path,
            format!(
                "file is truncated: its tensors end at byte {needed} but the file has {file_len} \
                 bytes{}",
                tensors
                    .iter()
                    .find(|t| data_start + t.end > file_len)
                    .map(|t| format!(" (tensor `{}` is cut off)", t.name))
                    .unwrap_or_default()
            ),
        ));
    }
    if needed < file_len {
        return Err(Error::invalid(
            path,
            format!(
                "{} unexpected bytes after the last tensor (from byte {needed}): the data buffer \
                 must be fully covered",
                file_len - needed
            ),
        ));
    }
    Ok(Header {
        metadata,
        tensors,
        data_start,
    })
}

/// Checks that the tensors (sorted by offset) tile the data buffer from 0 without a gap or an
/// overlap, each holding exactly its shape's bytes; returns where the last one ends.
fn check_offsets(path: &Path, tensors: &[TensorInfo], data_start: u64) -> Result<u64> {
    let mut expected = 0u64;
    for t in tensors {
        if t.begin != expected || t.end < t.begin {
            let what = if t.begin < expected {
                "overlaps the previous tensor"
            } else if t.end < t.begin {
                "ends before it begins"
            } else {
                "leaves a gap after the previous tensor"
            };
            return Err(Error::invalid(
                path,
                format!(
                    "tensor `{}`: data_offsets [{}, {}] {what} (expected to start at {expected}, \
                     byte {} of the file)",
                    t.name,
                    t.begin,
                    t.end,
                    data_start.saturating_add(expected)
                ),
            ));
        }
        let numel = t
            .shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| {
                Error::invalid(
                    path,
                    format!("tensor `{}`: shape {:?} overflows", t.name, t.shape),
                )
            })?;
        let nbytes = t.dtype.bytes_for(numel).ok_or_else(|| {
            Error::invalid(
                path,
                format!(
                    "tensor `{}`: {numel} elements of {} do not fill whole bytes",
                    t.name, t.dtype
                ),
            )
        })?;
        if t.end - t.begin != nbytes {
            return Err(Error::invalid(
                path,
                format!(
                    "tensor `{}`: shape {:?} of {} needs {nbytes} bytes but data_offsets [{}, {}] \
                     hold {}",
                    t.name,
                    t.shape,
                    t.dtype,
                    t.begin,
                    t.end,
                    t.end - t.begin
                ),
            ));
        }
        expected = t.end;
    }
    Ok(expected)
}

fn parse_metadata(path: &Path, value: Value) -> Result<Vec<(String, String)>> {
    let Value::Object(map) = value else {
        return Err(Error::invalid(
            path,
            "`__metadata__` must be a map of strings",
        ));
    };
    map.into_iter()
        .map(|(k, v)| match v {
            Value::String(s) => Ok((k, s)),
            _ => Err(Error::invalid(
                path,
                format!("`__metadata__` value for `{k}` is not a string"),
            )),
        })
        .collect()
}

fn parse_tensor(path: &Path, name: String, value: Value) -> Result<TensorInfo> {
    let bad = |what: &str| Error::invalid(path, format!("tensor `{name}`: {what}"));
    let Value::Object(map) = value else {
        return Err(bad("entry is not an object"));
    };
    let dtype_name = map
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("missing `dtype`"))?;
    let dtype = DType::from_safetensors_name(dtype_name)
        .ok_or_else(|| bad(&format!("unknown dtype `{dtype_name}`")))?;
    let shape = map
        .get("shape")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("missing `shape`"))?
        .iter()
        .map(|d| {
            d.as_u64()
                .ok_or_else(|| bad("shape entries must be non-negative integers"))
        })
        .collect::<Result<Vec<u64>>>()?;
    let offsets = map
        .get("data_offsets")
        .and_then(Value::as_array)
        .filter(|a| a.len() == 2)
        .ok_or_else(|| bad("`data_offsets` must be [begin, end]"))?;
    let begin = offsets[0]
        .as_u64()
        .ok_or_else(|| bad("data_offsets must be non-negative integers"))?;
    let end = offsets[1]
        .as_u64()
        .ok_or_else(|| bad("data_offsets must be non-negative integers"))?;
    Ok(TensorInfo {
        name,
        dtype,
        shape,
        begin,
        end,
    })
}

/// Header entries in file order, with the first duplicate key seen.
struct Entries {
    items: Vec<(String, Value)>,
    duplicate: Option<String>,
}

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<Entries, A::Error> {
                let mut items = Vec::new();
                let mut seen = std::collections::HashSet::new();
                let mut duplicate = None;
                while let Some((k, v)) = m.next_entry::<String, Value>()? {
                    if !seen.insert(k.clone()) && duplicate.is_none() {
                        duplicate = Some(k.clone());
                    }
                    items.push((k, v));
                }
                Ok(Entries { items, duplicate })
            }
        }
        d.deserialize_map(V)
    }
}

/// A tensor to declare in a header being written.
#[derive(Debug, Clone)]
pub struct OutTensor<'a> {
    /// Name.
    pub name: &'a str,
    /// Element type.
    pub dtype: DType,
    /// Dimensions.
    pub shape: &'a [u64],
    /// Bytes of data.
    pub nbytes: u64,
}

/// Builds the 8-byte length plus JSON header (padded with spaces to a multiple of 8, as the
/// reference writer does) for tensors laid out in the given order.
pub fn encode_header(metadata: &[(String, String)], tensors: &[OutTensor<'_>]) -> Result<Vec<u8>> {
    let mut root = serde_json::Map::new();
    if !metadata.is_empty() {
        let m: serde_json::Map<String, Value> = metadata
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        root.insert("__metadata__".into(), Value::Object(m));
    }
    let mut offset = 0u64;
    for t in tensors {
        let mut e = serde_json::Map::new();
        e.insert(
            "dtype".into(),
            Value::String(t.dtype.safetensors_name().into()),
        );
        e.insert("shape".into(), Value::from(t.shape.to_vec()));
        e.insert(
            "data_offsets".into(),
            Value::from(vec![offset, offset + t.nbytes]),
        );
        if root.insert(t.name.to_string(), Value::Object(e)).is_some() {
            return Err(Error::usage(format!(
                "tensor `{}` would be written twice",
                t.name
            )));
        }
        offset += t.nbytes;
    }
    let mut json = serde_json::to_vec(&Value::Object(root)).expect("JSON of strings and numbers");
    let pad = (8 - json.len() % 8) % 8;
    json.extend(std::iter::repeat_n(b' ', pad));
    if json.len() as u64 > MAX_HEADER_SIZE {
        return Err(Error::usage(format!(
            "the header would be {} bytes, over the {MAX_HEADER_SIZE}-byte limit readers accept",
            json.len()
        )));
    }
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_of(header: &str, data: usize) -> Vec<u8> {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.extend(std::iter::repeat_n(0u8, data));
        v
    }

    fn parse(bytes: &[u8]) -> Result<Header> {
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        parse_header(
            Path::new("x.safetensors"),
            &bytes[8..8 + n],
            bytes.len() as u64,
        )
    }

    #[test]
    fn valid_header_sorted_by_offset() {
        let h = r#"{"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]},"__metadata__":{"format":"pt"},"a":{"dtype":"F16","shape":[2],"data_offsets":[0,4]}}"#;
        let hdr = parse(&file_of(h, 12)).unwrap();
        assert_eq!(hdr.tensors[0].name, "a");
        assert_eq!(hdr.tensors[1].name, "b");
        assert_eq!(hdr.metadata.unwrap(), vec![("format".into(), "pt".into())]);
    }

    #[test]
    fn errors_name_the_tensor() {
        let cases = [
            (
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#,
                4,
                "needs 8 bytes",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[2,6]}}"#,
                6,
                "overlaps",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
                8,
                "gap",
            ),
            (
                r#"{"a":{"dtype":"Q4","shape":[1],"data_offsets":[0,4]}}"#,
                4,
                "unknown dtype `Q4`",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
                2,
                "truncated",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
                9,
                "5 unexpected bytes",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
                4,
                "twice",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#,
                4,
                "non-negative",
            ),
            (r#"{"__metadata__":{"x":1}}"#, 0, "not a string"),
            (
                r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,4]}}"#,
                4,
                "overflows",
            ),
        ];
        for (h, data, want) in cases {
            let err = parse(&file_of(h, data)).unwrap_err().to_string();
            assert!(err.contains(want), "{h}: {err}");
            assert!(err.starts_with("x.safetensors: "), "{err}");
        }
    }

    #[test]
    fn invalid_json_and_utf8() {
        let err = parse(&file_of("{\"a\":", 0)).unwrap_err().to_string();
        assert!(err.contains("not valid JSON"), "{err}");
        let mut f = file_of("{\"a\":1}", 0);
        f[10] = 0xFF;
        let err = parse(&f).unwrap_err().to_string();
        assert!(err.contains("not UTF-8"), "{err}");
        let err = parse(&file_of("[1]", 0)).unwrap_err().to_string();
        assert!(err.contains("not a JSON object"), "{err}");
    }

    #[test]
    fn encode_then_parse() {
        let shape = [2u64, 3];
        let t = [
            OutTensor {
                name: "w",
                dtype: DType::F16,
                shape: &shape,
                nbytes: 12,
            },
            OutTensor {
                name: "b",
                dtype: DType::F32,
                shape: &[],
                nbytes: 4,
            },
        ];
        let meta = vec![("format".to_string(), "pt".to_string())];
        let mut bytes = encode_header(&meta, &t).unwrap();
        assert_eq!((bytes.len() - 8) % 8, 0);
        bytes.extend(std::iter::repeat_n(0, 16));
        let h = parse(&bytes).unwrap();
        assert_eq!(h.tensors.len(), 2);
        assert_eq!(h.tensors[1].shape, Vec::<u64>::new());
        assert_eq!(h.metadata.unwrap(), meta);
    }

    #[test]
    fn empty_and_scalar_tensors_are_valid() {
        let h = r#"{"e":{"dtype":"F32","shape":[0,3],"data_offsets":[0,0]},"s":{"dtype":"F64","shape":[],"data_offsets":[0,8]}}"#;
        assert_eq!(parse(&file_of(h, 8)).unwrap().tensors.len(), 2);
        assert!(parse(&file_of("{}", 0)).unwrap().tensors.is_empty());
    }
}
