//! What a file is, from its content: the one sniffer every command and the Python package use.
//!
//! Structure before guesses: a safetensors header is *validated* (an 8-byte length that fits
//! the file and the 100 MB limit, then that many bytes that parse as a JSON object) and wins
//! before any magic-byte guess, because a valid header length can itself start with a pickle's
//! `80 02`..`80 05` (lengths 0x280-0x580), a zip's `PK\x03\x04`, or put `ustar` at byte 257.
//! The other kinds follow in the order `torch.load` tries them (zip, tar, then the stacked
//! pickles), then the formats we only name.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{Error, Result};
use crate::formats::safetensors::{is_lfs_pointer, MAX_HEADER_SIZE};
use crate::formats::torch::scan::{compression, is_tar, is_zip, Compression};

/// Bytes of a file's start the magic-byte checks look at (a tar header is 512).
pub const HEAD: usize = 512;

/// What a file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A folder.
    Folder,
    /// Zero bytes.
    Empty,
    /// A safetensors file: its header length fits and the header parses as a JSON object.
    Safetensors,
    /// A Git LFS pointer where the weights should be.
    LfsPointer,
    /// Starts with a zip local header (torch's `_is_zipfile`): `torch.save`'s format.
    Zip,
    /// A tar header (torch's legacy loader tries it first).
    Tar,
    /// A pickle (PROTO 2..5 first): a legacy `torch.save` file is a stack of them.
    Pickle,
    /// llama.cpp's GGUF.
    Gguf,
    /// A NumPy `.npy` array.
    Npy,
    /// An ONNX model (a protobuf `ModelProto`: `ir_version` first).
    Onnx,
    /// A JSON document.
    Json,
    /// A compressed stream joblib decompresses before unpickling.
    Compressed(Compression),
    /// A first byte that is no pickle opcode: any unpickler stops there.
    NotPickle,
    /// Anything else.
    Unknown,
}

impl Kind {
    /// What a file of this kind is, in words (for messages that say what a command got).
    pub fn describe(self) -> &'static str {
        match self {
            Kind::Folder => "a folder",
            Kind::Empty => "an empty file",
            Kind::Safetensors => "a safetensors file",
            Kind::LfsPointer => "a Git LFS pointer (the weights themselves were not downloaded)",
            Kind::Zip => "a zip archive (a torch.save checkpoint is one)",
            Kind::Tar => "a tar archive (the oldest torch.save format is one)",
            Kind::Pickle => "a pickle (a legacy torch.save checkpoint is one)",
            Kind::Gguf => "a GGUF file",
            Kind::Npy => "a NumPy array file",
            Kind::Onnx => "an ONNX model",
            Kind::Json => "a JSON file",
            Kind::Compressed(c) => c.describe(),
            Kind::NotPickle => {
                "not a pickle (its first byte is no pickle opcode: an unpickler stops there)"
            }
            Kind::Unknown => "a file of unknown format",
        }
    }

    /// Whether `torch.load` reads this kind of file (a zip, a tar, or stacked pickles).
    pub fn is_torch(self) -> bool {
        matches!(self, Kind::Zip | Kind::Tar | Kind::Pickle)
    }

    /// Whether the file holds no pickle for any loader to run.
    pub fn runs_nothing(self) -> bool {
        matches!(
            self,
            Kind::Folder
                | Kind::Empty
                | Kind::Safetensors
                | Kind::LfsPointer
                | Kind::Gguf
                | Kind::Onnx
                | Kind::Json
                | Kind::NotPickle
        )
    }
}

/// What the file or folder at `path` is.
pub fn sniff_path(path: &Path) -> Result<Kind> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        return Ok(Kind::Folder);
    }
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    sniff_file(path, &file, meta.len())
}

/// What the open file `file` (of length `len`) is.
pub fn sniff_file(path: &Path, file: &File, len: u64) -> Result<Kind> {
    let mut head = vec![0u8; (HEAD as u64).min(len) as usize];
    file.read_exact_at(&mut head, 0)
        .map_err(|e| Error::io(path, e))?;
    if is_safetensors(&head, len, |buf, pos| {
        file.read_exact_at(buf, pos).map_err(|e| Error::io(path, e))
    })? {
        return Ok(Kind::Safetensors);
    }
    Ok(by_magic(&head, len))
}

/// The other format a file is, when its first bytes name one (a zip, tar or pickle that
/// `torch.load` reads; GGUF, NumPy, a compressed stream) and it is no valid safetensors file.
/// `None` for anything else, without reading the header unless the magic bytes need the veto:
/// the cheap check readers make before they open a file as safetensors or as a PyTorch file.
pub fn foreign(path: &Path, file: &File, len: u64) -> Result<Option<Kind>> {
    let mut head = vec![0u8; (HEAD as u64).min(len) as usize];
    file.read_exact_at(&mut head, 0)
        .map_err(|e| Error::io(path, e))?;
    let kind = by_magic(&head, len);
    let named = kind.is_torch()
        || matches!(
            kind,
            Kind::Gguf | Kind::Onnx | Kind::Npy | Kind::Compressed(_)
        );
    if !named
        || is_safetensors(&head, len, |buf, pos| {
            file.read_exact_at(buf, pos).map_err(|e| Error::io(path, e))
        })?
    {
        return Ok(None);
    }
    Ok(Some(kind))
}

/// Whether a file that starts with `head` (its first bytes, at least 8 where the file has
/// them) and is `len` bytes long is a safetensors file: its header length fits the file and the
/// limit, and the header parses as a JSON object. `read_at` reads the header (at most
/// [`MAX_HEADER_SIZE`] bytes, and never more than the file holds).
pub fn is_safetensors(
    head: &[u8],
    len: u64,
    read_at: impl Fn(&mut [u8], u64) -> Result<()>,
) -> Result<bool> {
    if head.len() < 9 {
        return Ok(false);
    }
    let n = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
    if !(2..=MAX_HEADER_SIZE).contains(&n) || n > len - 8 {
        return Ok(false);
    }
    // A JSON object starts with `{` after optional whitespace: cheap to rule out first.
    match head[8..].iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => {}
        Some(_) => return Ok(false),
        None if (head.len() as u64) >= 8 + n => return Ok(false),
        None => {}
    }
    let header: std::borrow::Cow<[u8]> = if (head.len() as u64) >= 8 + n {
        head[8..8 + n as usize].into()
    } else {
        // Bounded by MAX_HEADER_SIZE and by the file's real length, checked above.
        let mut buf = vec![0u8; n as usize];
        read_at(&mut buf, 8)?;
        buf.into()
    };
    Ok(serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&header).is_ok())
}

/// What a file that is not safetensors is, from its first bytes (`head`, up to [`HEAD`]).
pub fn by_magic(head: &[u8], len: u64) -> Kind {
    if len == 0 {
        Kind::Empty
    } else if is_lfs_pointer(head) {
        Kind::LfsPointer
    } else if is_zip(head) {
        Kind::Zip
    } else if is_tar(head) {
        Kind::Tar
    } else if is_pickle(head) {
        Kind::Pickle
    } else if head.starts_with(b"GGUF") {
        Kind::Gguf
    } else if head.starts_with(b"\x93NUMPY") {
        Kind::Npy
    } else if head.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{') {
        Kind::Json
    } else if let Some(c) = compression(head) {
        Kind::Compressed(c)
    } else if crate::formats::onnx::looks_like_model(head) {
        Kind::Onnx
    } else if !crate::formats::pickle::is_opcode(head[0]) {
        Kind::NotPickle
    } else {
        Kind::Unknown
    }
}

/// Whether the file starts like a pickle of protocol 2 to 5 (PROTO first), as a legacy
/// `torch.save` file does.
pub fn is_pickle(head: &[u8]) -> bool {
    head.len() >= 3 && head[0] == 0x80 && (2..=5).contains(&head[1])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind_of(bytes: &[u8]) -> Kind {
        let head = &bytes[..bytes.len().min(HEAD)];
        if is_safetensors(head, bytes.len() as u64, |buf, pos| {
            buf.copy_from_slice(&bytes[pos as usize..pos as usize + buf.len()]);
            Ok(())
        })
        .unwrap()
        {
            Kind::Safetensors
        } else {
            by_magic(head, bytes.len() as u64)
        }
    }

    /// A safetensors file with one F32 scalar, its header padded with spaces to exactly `n`
    /// bytes (for `n` below the smallest header, a header of `{}` padded, or too short).
    fn safetensors_with_header(n: usize) -> Vec<u8> {
        let json = r#"{"t":{"dtype":"F32","shape":[],"data_offsets":[0,4]}}"#;
        let body: &str = if n >= json.len() { json } else { "{}" };
        let mut header = body.as_bytes().to_vec();
        header.resize(n.max(body.len()), b' ');
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&header);
        if body == json {
            out.extend_from_slice(&1.0f32.to_le_bytes());
        }
        out
    }

    #[test]
    fn every_header_length_up_to_64k_is_safetensors() {
        for n in 2..=65536 {
            let f = safetensors_with_header(n);
            assert_eq!(kind_of(&f), Kind::Safetensors, "header length {n}");
        }
    }

    #[test]
    fn pickles_zips_and_tars_are_not_safetensors() {
        assert_eq!(
            kind_of(&[0x80, 2, 0x8a, 0x0a, 0, 0, 0, 0, 0, b'.']),
            Kind::Pickle
        );
        // A header length that runs past the file is no safetensors file.
        let mut p = vec![0x80, 2, b'}', b'q', 0, 0, 0, 0, b'{'];
        p.resize(100, 0);
        assert_eq!(kind_of(&p), Kind::Pickle);
        assert_eq!(kind_of(b"PK\x03\x04\x14\0\0\0\0\0"), Kind::Zip);
        let mut tar = vec![b'a'; 100];
        tar.resize(512, 0);
        tar[257..262].copy_from_slice(b"ustar");
        assert_eq!(kind_of(&tar), Kind::Tar);
        // A valid header whose tensor name puts `ustar` at byte 257 stays safetensors.
        let name = format!("{}ustar", "x".repeat(257 - 8 - 2));
        let json = format!(r#"{{"{name}":{{"dtype":"F32","shape":[],"data_offsets":[0,4]}}}}"#);
        let mut f = (json.len() as u64).to_le_bytes().to_vec();
        f.extend_from_slice(json.as_bytes());
        f.extend_from_slice(&[0; 4]);
        assert_eq!(&f[257..262], b"ustar");
        assert_eq!(kind_of(&f), Kind::Safetensors);
        assert_eq!(kind_of(b""), Kind::Empty);
        assert_eq!(kind_of(b"GGUF\x03\0\0\0"), Kind::Gguf);
        assert_eq!(kind_of(b"  {\"a\": 1}"), Kind::Json);
        // ir_version 8, then producer_name
        assert_eq!(kind_of(b"\x08\x08\x12\x07pytorch"), Kind::Onnx);
    }
}
