//! Opening any input: what `path` is decides the reader (a URL, a PyTorch file by its bytes, a
//! folder, an index, a safetensors file), then the quantization scheme is detected. The one
//! entry point every command reads through.

use std::fs::File;
use std::path::Path;

use super::folder::{open_file, open_folder, open_index, open_remote};
use crate::catalogue::Catalogue;
use crate::error::{Error, Result};

/// Opens `path` (a `.safetensors` file, a `*.safetensors.index.json`, a model folder, a
/// `torch.save` checkpoint, a GGUF file or an ONNX model) and reads every header. No tensor data is read.
pub fn open(path: &Path) -> Result<Catalogue> {
    open_with(path, None)
}

/// Like [`open`]; `key` picks the entry of a PyTorch training checkpoint that holds the state
/// dict (dotted path, e.g. `model_state_dict`).
pub fn open_with(path: &Path, key: Option<&str>) -> Result<Catalogue> {
    let mut cat = open_any(path, key)?;
    cat.quant = crate::quant::detect(&mut cat).map(std::sync::Arc::new);
    Ok(cat)
}

fn open_any(path: &Path, key: Option<&str>) -> Result<Catalogue> {
    if crate::remote::is_url(path) {
        if key.is_some_and(|k| !k.is_empty()) {
            return Err(Error::usage(format!(
                "{}: --key applies to PyTorch checkpoints only",
                path.display()
            )));
        }
        let bare = path.to_str().unwrap_or_default().split(['?', '#']).next();
        if bare.is_some_and(|b| super::onnx::is_onnx_name(Path::new(b))) {
            return Err(Error::usage(format!(
                "{}: ONNX models are read from local files only (download it first)",
                path.display()
            )));
        }
        return open_remote(path);
    }
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_file() {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        match crate::formats::sniff::foreign(path, &file, meta.len())? {
            Some(k) if k.is_torch() => return super::torch::open(path, key),
            Some(crate::formats::sniff::Kind::Gguf) if key.is_none_or(str::is_empty) => {
                return super::gguf::open(path)
            }
            Some(crate::formats::sniff::Kind::Onnx) if key.is_none_or(str::is_empty) => {
                return super::onnx::open(path)
            }
            // named `.onnx`: read as ONNX (its errors say what is wrong), unless it is in fact
            // a safetensors file
            None if super::onnx::is_onnx_name(path)
                && key.is_none_or(str::is_empty)
                && crate::formats::sniff::sniff_file(path, &file, meta.len())?
                    != crate::formats::sniff::Kind::Safetensors =>
            {
                return super::onnx::open(path)
            }
            _ => {}
        }
    }
    if key.is_some_and(|k| !k.is_empty()) {
        return Err(Error::usage(format!(
            "{}: --key applies to PyTorch checkpoints only",
            path.display()
        )));
    }
    if meta.is_dir() {
        return open_folder(path);
    }
    if is_index_name(path) {
        let mut cat = open_index(path)?;
        cat.path = path.to_path_buf();
        return Ok(cat);
    }
    open_file(path)
}

fn is_index_name(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.ends_with(".index.json"))
}

/// What `path` is, from its content (for messages that say what a command got and what it
/// wants): a folder, safetensors, a PyTorch file, a pickle, a zip, GGUF, NumPy, a Git LFS
/// pointer, JSON, empty, or unknown.
pub fn what_is(path: &Path) -> Result<&'static str> {
    Ok(crate::formats::sniff::sniff_path(path)?.describe())
}
