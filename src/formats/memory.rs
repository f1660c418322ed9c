//! Tensors in the caller's memory as an input (`weightcast.save`): laid out one after another
//! as one virtual file that the executor reads by ranges, as it reads a remote file, so that
//! they stream through the cast kernels into the output without a copy or a temporary file.

use std::path::Path;
use std::sync::Arc;

use crate::catalogue::{Catalogue, InputKind, SourceFile, TensorEntry};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::remote::RangeRead;

/// One tensor in memory: its name, dtype, shape and byte length (its bytes are the
/// [`RangeRead`]'s, in the order given).
#[derive(Debug, Clone)]
pub struct MemoryTensor {
    /// Its name.
    pub name: String,
    /// Its dtype.
    pub dtype: DType,
    /// Its shape.
    pub shape: Vec<u64>,
    /// Its bytes (contiguous, little-endian).
    pub nbytes: u64,
}

/// The catalogue of `tensors`, whose bytes `bytes` holds one tensor after another. `label`
/// names them in messages; `metadata` is the output's safetensors metadata.
pub fn catalogue(
    label: &Path,
    tensors: &[MemoryTensor],
    metadata: Vec<(String, String)>,
    bytes: Arc<dyn RangeRead>,
) -> Result<Catalogue> {
    let mut entries = Vec::with_capacity(tensors.len());
    let mut offset = 0u64;
    let mut seen = std::collections::HashSet::new();
    for t in tensors {
        if !seen.insert(t.name.as_str()) {
            return Err(Error::usage(format!("two tensors are named `{}`", t.name)));
        }
        let numel = t
            .shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .ok_or_else(|| Error::usage(format!("`{}`: shape {:?} overflows", t.name, t.shape)))?;
        if t.dtype.bytes_for(numel) != Some(t.nbytes) {
            return Err(Error::usage(format!(
                "`{}`: {} bytes given for shape {:?} of {}",
                t.name, t.nbytes, t.shape, t.dtype
            )));
        }
        entries.push(TensorEntry::new(
            t.name.clone(),
            t.dtype,
            t.shape.clone(),
            0,
            offset,
            t.nbytes,
        ));
        offset += t.nbytes;
    }
    if offset != bytes.len() {
        return Err(Error::usage(format!(
            "the tensors hold {offset} bytes but {} were given",
            bytes.len()
        )));
    }
    let file = SourceFile {
        path: label.to_path_buf(),
        name: label.display().to_string(),
        len: offset,
        metadata: (!metadata.is_empty()).then_some(metadata),
        big_endian: false,
        remote: Some(bytes),
    };
    Ok(Catalogue::new(
        label.to_path_buf(),
        InputKind::Memory,
        vec![file],
        entries,
    ))
}
