//! ONNX models (`.onnx`): every weight (graph initializers, `Constant` values, tensor attributes,
//! in subgraphs, training graphs and function bodies too) enters the catalogue where its bytes
//! are. `raw_data` and packed `float_data`/`double_data` stay in the model file, external data
//! in its files (inside the model's folder only); values stored as varints (`int32_data`...)
//! are decoded into memory, within [`walk::MAX_DECODED`] bytes. The model is scanned by
//! positional reads ([`wire`]), never loaded whole. Writing ONNX is not supported yet.

pub mod tensor;
pub mod walk;
pub mod wire;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use crate::catalogue::{Catalogue, InputKind, OnnxDoc, SourceFile, TensorEntry};
use crate::error::{Error, Result};
pub use walk::{scan, Place, Scanned};
use wire::FileAt;

/// Whether `path` names an ONNX model (`*.onnx`, any case).
pub fn is_onnx_name(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("onnx"))
}

/// Whether a file starting with `head` looks like a serialized `ModelProto`: `ir_version`
/// (field 1, a small varint) first, then another field of ModelProto with its wire type.
pub fn looks_like_model(head: &[u8]) -> bool {
    const NEXT: &[u8] = &[
        0x12, 0x1a, 0x22, 0x28, 0x32, 0x3a, 0x42, 0x72, 0xa2, 0xca, 0xd2,
    ];
    head.len() >= 3 && head[0] == 0x08 && (1..=32).contains(&head[1]) && NEXT.contains(&head[2])
}

/// Scans a model held in memory (no external data file is opened): what [`open`] reads.
pub fn scan_bytes(path: &Path, bytes: &[u8]) -> Result<Scanned> {
    scan(path, &bytes)
}

/// Opens the ONNX model `path` as a catalogue (no tensor data is read, except values stored
/// as varints, decoded into memory).
pub fn open(path: &Path) -> Result<Catalogue> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let scanned = scan(path, &FileAt { file, len })?;
    catalogue(path, len, scanned)
}

/// Values decoded into memory, read as one more input file.
#[derive(Debug)]
struct Decoded {
    label: PathBuf,
    bytes: Vec<u8>,
}

impl crate::remote::RangeRead for Decoded {
    fn len(&self) -> u64 {
        self.bytes.len() as u64
    }
    fn read_exact_at(&self, buf: &mut [u8], pos: u64) -> Result<()> {
        let src = usize::try_from(pos)
            .ok()
            .and_then(|p| self.bytes.get(p..p.checked_add(buf.len())?))
            .ok_or_else(|| {
                Error::invalid(
                    &self.label,
                    format!("read past the decoded values at {pos}"),
                )
            })?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn check_unchanged(&self) -> Result<()> {
        Ok(())
    }
}

/// The catalogue of a scanned model: the model file, each external file once, and the decoded
/// values last.
fn catalogue(path: &Path, len: u64, mut s: Scanned) -> Result<Catalogue> {
    let mut files = vec![SourceFile::local(path, len)];
    let mut external: HashMap<String, usize> = HashMap::new();
    let mut placed = Vec::with_capacity(s.found.len());
    for f in &s.found {
        let (file, offset, nbytes) = match &f.place {
            Place::Memory { offset, nbytes } => (usize::MAX, *offset, *nbytes),
            Place::Model { offset, nbytes } => (0, *offset, *nbytes),
            Place::External {
                location,
                offset,
                nbytes,
            } => {
                let i = match external.get(location) {
                    Some(&i) => i,
                    None => {
                        files.push(external_file(path, location, &f.name)?);
                        external.insert(location.clone(), files.len() - 1);
                        files.len() - 1
                    }
                };
                let flen = files[i].len;
                if offset.checked_add(*nbytes).is_none_or(|e| e > flen) {
                    return Err(Error::invalid(
                        &files[i].path,
                        format!(
                            "ONNX tensor `{}`: external data of {nbytes} bytes at offset {offset} \
                             runs past the end of the file ({flen} bytes)",
                            f.name
                        ),
                    ));
                }
                (i, *offset, *nbytes)
            }
        };
        placed.push((file, offset, nbytes));
    }
    let decoded_file = files.len();
    let has_decoded = placed.iter().any(|p| p.0 == usize::MAX);
    let tensors = s
        .found
        .iter()
        .zip(&placed)
        .map(|(f, &(file, offset, nbytes))| {
            let file = if file == usize::MAX {
                decoded_file
            } else {
                file
            };
            TensorEntry::new(
                f.name.clone(),
                f.dtype,
                f.shape.clone(),
                file,
                offset,
                nbytes,
            )
        })
        .collect();
    if has_decoded {
        files.push(decoded_source(path, std::mem::take(&mut s.decoded)));
    }
    let mut cat = Catalogue::new(path.to_path_buf(), InputKind::Onnx, files, tensors);
    cat.notes = notes(&s);
    cat.onnx = Some(Arc::new(OnnxDoc {
        ir_version: s.ir_version,
        producer: s.producer,
        opsets: s.opsets,
        classes: s
            .found
            .iter()
            .map(|f| format!("{}{}", crate::rules::ONNX_OPS, f.weight.ops.join(",")))
            .collect(),
        weights: s.found.into_iter().map(|f| f.weight).collect(),
    }));
    Ok(cat)
}

/// The decoded values as one more input file (read from memory).
fn decoded_source(path: &Path, bytes: Vec<u8>) -> SourceFile {
    let len = bytes.len() as u64;
    let bytes = Arc::new(Decoded {
        label: path.to_path_buf(),
        bytes,
    });
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    SourceFile {
        name: format!("{name} (values decoded from varint fields)"),
        remote: Some(bytes),
        ..SourceFile::local(path, len)
    }
}

/// What reading found worth telling: tensors left out.
fn notes(s: &Scanned) -> Vec<String> {
    let mut notes = vec![];
    if !s.skipped.is_empty() {
        notes.push(format!(
            "{} tensors are not read: {}",
            s.skipped.len(),
            crate::error::listed(&s.skipped, 5)
        ));
    }
    if s.sparse > 0 {
        notes.push(format!("{} sparse tensors are not read", s.sparse));
    }
    notes
}

/// The external data file `location` (relative to the model's folder): refused when it is
/// absolute, climbs out with `..`, or resolves (through symlinks) outside the folder.
fn external_file(model: &Path, location: &str, tensor: &str) -> Result<SourceFile> {
    let bad = |what: String| {
        Error::invalid(
            model,
            format!("ONNX tensor `{tensor}`: external data location `{location}` {what}"),
        )
    };
    let rel = Path::new(location);
    if rel.is_absolute() || location.starts_with('/') {
        return Err(bad(
            "is absolute (it must be relative to the model's folder)".into(),
        ));
    }
    if rel
        .components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(bad("leaves the model's folder (`..`)".into()));
    }
    let dir = match model.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let full = dir.join(rel);
    let real_dir = dir.canonicalize().map_err(|e| Error::io(&dir, e))?;
    let real = full
        .canonicalize()
        .map_err(|e| bad(format!("cannot be opened: {e}")))?;
    if !real.starts_with(&real_dir) {
        return Err(bad(format!(
            "leaves the model's folder through a symlink (to {})",
            real.display()
        )));
    }
    let meta = std::fs::metadata(&real).map_err(|e| Error::io(&full, e))?;
    if !meta.is_file() {
        return Err(bad("is not a file".into()));
    }
    Ok(SourceFile {
        name: location.to_string(),
        ..SourceFile::local(&full, meta.len())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;

    fn varint(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            out.push(if v == 0 { b } else { b | 0x80 });
            if v == 0 {
                return;
            }
        }
    }

    fn field(number: u32, bytes: &[u8]) -> Vec<u8> {
        let mut out = vec![];
        varint(u64::from(number) << 3 | 2, &mut out);
        varint(bytes.len() as u64, &mut out);
        out.extend_from_slice(bytes);
        out
    }

    fn int(number: u32, v: u64) -> Vec<u8> {
        let mut out = vec![];
        varint(u64::from(number) << 3, &mut out);
        varint(v, &mut out);
        out
    }

    /// A TensorProto named `name` of `data_type` and `dims`, with `data` (its fields) appended.
    fn tensor(name: &str, data_type: u64, dims: &[u64], data: &[u8]) -> Vec<u8> {
        let mut t = vec![];
        for &d in dims {
            t.extend(int(1, d));
        }
        t.extend(int(2, data_type));
        t.extend(field(8, name.as_bytes()));
        t.extend_from_slice(data);
        t
    }

    /// A model: ir_version 8, a graph with a raw_data, a packed float_data and an int32_data
    /// FLOAT16 initializer, and a Constant node whose value is an int64_data tensor.
    fn model() -> Vec<u8> {
        let raw: Vec<u8> = [1.0f32, 2.0, 3.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let mut graph = field(5, &tensor("raw", 1, &[3], &field(9, &raw)));
        graph.extend(field(
            5,
            &tensor("packed", 1, &[1, 2], &field(4, &raw[..8])),
        ));
        let mut halves = vec![];
        for h in [0x3c00u64, 0xc000] {
            varint(h, &mut halves);
        }
        graph.extend(field(5, &tensor("half", 10, &[2], &field(5, &halves))));
        let mut longs = vec![];
        for v in [u64::MAX, 7] {
            varint(v, &mut longs);
        }
        let value = tensor("", 7, &[2], &field(7, &longs));
        let mut attr = field(1, b"value");
        attr.extend(field(5, &value));
        let mut node = field(2, b"c");
        node.extend(field(4, b"Constant"));
        node.extend(field(5, &attr));
        graph.extend(field(1, &node));
        let mut mul = field(1, b"raw");
        mul.extend(field(1, b"c"));
        mul.extend(field(2, b"y"));
        mul.extend(field(4, b"Mul"));
        graph.extend(field(1, &mul));
        let mut m = int(1, 8);
        m.extend(field(7, &graph));
        m
    }

    #[test]
    fn reads_every_storage() {
        let b = model();
        assert!(looks_like_model(&b));
        let s = scan_bytes(Path::new("m.onnx"), &b).unwrap();
        let names: Vec<&str> = s.found.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["raw", "packed", "half", "c"]);
        let dtypes: Vec<DType> = s.found.iter().map(|f| f.dtype).collect();
        assert_eq!(dtypes, [DType::F32, DType::F32, DType::F16, DType::I64]);
        assert_eq!(s.found[1].shape, [1, 2]);
        let Place::Model { offset, nbytes: 12 } = s.found[0].place else {
            panic!("{:?}", s.found[0].place)
        };
        assert_eq!(&b[offset as usize..][..4], &1.0f32.to_le_bytes());
        assert!(matches!(s.found[1].place, Place::Model { nbytes: 8, .. }));
        let mut want = vec![0x00, 0x3c, 0x00, 0xc0];
        want.extend(u64::MAX.to_le_bytes());
        want.extend(7u64.to_le_bytes());
        assert_eq!(s.decoded, want);
        assert_eq!(
            s.found[3].weight.origin,
            crate::catalogue::OnnxOrigin::Constant
        );
        // raw_data one byte short
        let raw = tensor("raw", 1, &[4], &field(9, &[0; 15]));
        let g = field(5, &raw);
        let mut m = int(1, 8);
        m.extend(field(7, &g));
        let e = scan_bytes(Path::new("m.onnx"), &m).unwrap_err().to_string();
        assert!(
            e.contains("raw_data holds 15 bytes where dims [4] of FLOAT need 16"),
            "{e}"
        );
    }

    #[test]
    fn damaged_models_never_panic() {
        let b = model();
        for cut in 0..b.len() {
            let _ = scan_bytes(Path::new("m.onnx"), &b[..cut]);
        }
        for i in 0..b.len() {
            for x in [0x00, 0x01, 0x7f, 0x80, 0xff] {
                let mut m = b.clone();
                m[i] = x;
                let _ = scan_bytes(Path::new("m.onnx"), &m);
            }
        }
    }
}
