//! Reading tensor bytes from a catalogue's files with positional reads (no mmap: resident memory
//! stays bounded by the caller's buffers, whatever the file size).

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use crate::catalogue::quant::Decode;
use crate::catalogue::{Catalogue, Packed, Strided, TensorEntry};
use crate::error::{Error, Result};

/// Which slab of which packed weight a decoded slab is: its payload's file and offset, its
/// packing, the slab's number.
#[derive(PartialEq)]
struct SlabKey {
    file: std::path::PathBuf,
    offset: u64,
    packing: crate::cast::packed::Packing,
    slab: u64,
}

thread_local! {
    /// The last slab of a packed low-bit weight this thread decoded, as bytes of its dtype.
    static SLAB: std::cell::RefCell<(Option<SlabKey>, Vec<u8>)> = Default::default();
}

/// Tells the kernel a file is read from start to end (a larger read-ahead window for a cold
/// input; a hint only: errors are ignored).
fn advise_sequential(f: &File) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a plain system call on a file descriptor we hold open; advice only.
        unsafe {
            libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL);
        }
    }
}

/// Open handles to every weights file of a catalogue.
pub struct Sources<'a> {
    cat: &'a Catalogue,
    /// Open local files (`None` for a remote one, read through its [`SourceFile::remote`]).
    files: Vec<Option<File>>,
    /// Deflate-compressed records, inflated into unlinked temporary files on first read, by
    /// zip entry name.
    inflated: Mutex<HashMap<String, Arc<File>>>,
}

impl<'a> Sources<'a> {
    /// An error if a remote input changed since it was opened (see
    /// [`RangeRead::check_unchanged`](crate::remote::RangeRead::check_unchanged)); local
    /// inputs are never modified by us and are not checked.
    pub fn check_unchanged(&self) -> Result<()> {
        for f in &self.cat.files {
            if let Some(r) = &f.remote {
                r.check_unchanged()?;
            }
        }
        Ok(())
    }

    /// Opens every file of `cat` read-only. Compressed records a tensor lives in (a re-zipped
    /// torch archive) are inflated into temporary files when first read: streamed, so memory
    /// stays bounded; disk holds each such record once.
    pub fn open(cat: &'a Catalogue) -> Result<Sources<'a>> {
        let files = cat
            .files
            .iter()
            .map(|f| match f.remote {
                Some(_) => Ok(None),
                None => File::open(&f.path)
                    .map(Some)
                    .map_err(|e| Error::io(&f.path, e)),
            })
            .collect::<Result<Vec<_>>>()?;
        for f in files.iter().flatten() {
            advise_sequential(f);
        }
        Ok(Sources {
            cat,
            files,
            inflated: Mutex::new(HashMap::new()),
        })
    }

    /// The input file a tensor is read from (for messages).
    pub fn path_of(&self, t: &TensorEntry) -> &std::path::Path {
        &self.cat.files[t.file].path
    }

    /// Runs `f` on the file a tensor's `offset` is in: its source file, or its inflated record.
    fn with_file<R>(&self, t: &TensorEntry, f: impl FnOnce(&File) -> Result<R>) -> Result<R> {
        let local = |i: usize| -> Result<&File> {
            self.files[i].as_ref().ok_or_else(|| {
                Error::invalid(
                    &self.cat.files[i].path,
                    "a remote file holds no compressed records",
                )
            })
        };
        let Some(p) = &t.packed else {
            return f(local(t.file)?);
        };
        let file = {
            let mut map = self.inflated.lock().expect("inflated records");
            match map.get(&p.entry) {
                Some(file) => file.clone(),
                None => {
                    let file = Arc::new(inflate(&self.cat.files[t.file].path, local(t.file)?, p)?);
                    map.insert(p.entry.clone(), file.clone());
                    file
                }
            }
        };
        f(&file)
    }

    /// Fills `buf` with the tensor's bytes starting `pos` bytes into its data, little-endian
    /// (big-endian files are swapped element by element; `pos` must be element-aligned).
    pub fn read(&self, t: &TensorEntry, pos: u64, buf: &mut [u8]) -> Result<()> {
        let Some(order) = t.rows else {
            return self.read_stored(t, pos, buf);
        };
        // rows permuted: each stretch of a row read from the row it comes from
        let rows = t.shape.first().copied().unwrap_or(1).max(1);
        let row_bytes = (t.nbytes / rows).max(1);
        let mut done = 0usize;
        while done < buf.len() {
            let at = pos + done as u64;
            let (row, within) = (at / row_bytes, at % row_bytes);
            let n = ((row_bytes - within) as usize).min(buf.len() - done);
            let from = order.source_row(row, rows) * row_bytes + within;
            self.read_stored(t, from, &mut buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    /// Bytes `pos..pos + buf.len()` of tensor `t` in its stored row order.
    fn read_stored(&self, t: &TensorEntry, pos: u64, buf: &mut [u8]) -> Result<()> {
        if let Some(b) = &t.blocks {
            return self.dequantize(t, b, pos, buf);
        }
        if let Some(d) = &t.decode {
            return self.decode(t, d, pos, buf);
        }
        match &t.strided {
            None => self.read_raw(t, pos, buf)?,
            Some(s) => self.gather(t, s, pos, buf)?,
        }
        if self.cat.files[t.file].big_endian {
            swap_bytes(buf, t.dtype.bitsize() / 8);
        }
        Ok(())
    }

    /// The f32 values `pos..pos + buf.len()` (bytes) of a block-quantized tensor: the blocks
    /// that hold them are read and dequantized.
    fn dequantize(
        &self,
        t: &TensorEntry,
        b: &crate::catalogue::Blocks,
        pos: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        let (block, bytes) = (b.ggml.block, b.ggml.bytes);
        let (first, end) = (pos / 4, (pos + buf.len() as u64).div_ceil(4));
        let (b0, b1) = (first / block, end.div_ceil(block));
        if b1 * bytes > b.nbytes || pos % 4 != 0 || buf.len() % 4 != 0 {
            return Err(Error::invalid(
                &self.cat.files[t.file].path,
                format!("tensor `{}`: read past its blocks", t.name),
            ));
        }
        // `t.offset` is where its blocks start
        let mut raw = vec![0u8; ((b1 - b0) * bytes) as usize];
        self.read_raw(t, b0 * bytes, &mut raw)?;
        let mut vals = vec![0f32; ((b1 - b0) * block) as usize];
        if !crate::formats::gguf::ggml::dequantize(
            b.ggml.id,
            bytes as usize,
            block as usize,
            &raw,
            &mut vals,
        ) {
            return Err(Error::invalid(
                &self.cat.files[t.file].path,
                format!("tensor `{}`: {} is not dequantized", t.name, b.ggml.name),
            ));
        }
        let skip = (first - b0 * block) as usize;
        for (o, v) in buf.chunks_exact_mut(4).zip(&vals[skip..]) {
            o.copy_from_slice(&v.to_le_bytes());
        }
        Ok(())
    }

    /// Bytes `pos..pos + buf.len()` of a packed low-bit weight: the slabs that hold them are
    /// read from the weight's parts and dequantized (the last slab a thread decoded is kept,
    /// so reading a tensor chunk by chunk decodes each slab once).
    fn decode(&self, t: &TensorEntry, d: &Decode, pos: u64, buf: &mut [u8]) -> Result<()> {
        let es = (t.dtype.bitsize() / 8).max(1) as u64;
        if pos % es != 0 || buf.len() as u64 % es != 0 || pos + buf.len() as u64 > t.nbytes {
            return Err(Error::invalid(
                &self.cat.files[t.file].path,
                format!("tensor `{}`: read past its values", t.name),
            ));
        }
        let (first, n) = (pos / es, buf.len() as u64 / es);
        let mut done = 0u64;
        while done < n {
            let (k, within) = d.packing.locate(first + done);
            let take = (d.packing.slab_len(k) - within).min(n - done);
            let key = SlabKey {
                file: self.cat.files[d.parts[0].file].path.clone(),
                offset: d.parts[0].offset,
                packing: d.packing,
                slab: k,
            };
            let out = &mut buf[(done * es) as usize..((done + take) * es) as usize];
            SLAB.with(|cache| -> Result<()> {
                let mut cache = cache.borrow_mut();
                if cache.0.as_ref() != Some(&key) {
                    cache.0 = None;
                    self.decode_slab(t, d, k, &mut cache.1)?;
                    cache.0 = Some(key);
                }
                let at = (within * es) as usize;
                out.copy_from_slice(&cache.1[at..at + out.len()]);
                Ok(())
            })?;
            done += take;
        }
        Ok(())
    }

    /// Slab `k` of a packed weight, as bytes of the weight's dtype, into `into`.
    fn decode_slab(&self, t: &TensorEntry, d: &Decode, k: u64, into: &mut Vec<u8>) -> Result<()> {
        let mut parts = Vec::new();
        for w in d.packing.windows(k) {
            let part = &d.parts[w.part];
            let mut b = vec![0u8; (w.rows * w.bytes) as usize];
            if w.bytes == w.row_bytes {
                self.read(part, w.row0 * w.row_bytes, &mut b)?;
            } else {
                for (r, row) in b.chunks_exact_mut(w.bytes.max(1) as usize).enumerate() {
                    self.read(part, (w.row0 + r as u64) * w.row_bytes + w.byte0, row)?;
                }
            }
            parts.push(b);
        }
        let mut vals = vec![0f32; d.packing.slab_len(k) as usize];
        d.packing.decode(k, &parts, &mut vals).map_err(|why| {
            Error::invalid(
                &self.cat.files[d.parts[0].file].path,
                format!("tensor `{}`: {why}", t.name),
            )
        })?;
        into.resize(vals.len() * (t.dtype.bitsize() / 8).max(1), 0);
        crate::cast::encode_f32_slice(t.dtype, &vals, into);
        Ok(())
    }

    /// Reads the storage span of a non-contiguous view and copies out, in C order, the elements
    /// that `pos..pos + buf.len()` of the contiguous tensor hold.
    fn gather(&self, t: &TensorEntry, s: &Strided, pos: u64, buf: &mut [u8]) -> Result<()> {
        let es = (t.dtype.bitsize() / 8).max(1);
        // Bounded by the reader's gather limit, checked when the catalogue was made.
        let mut span = vec![0u8; s.span as usize];
        self.with_file(t, |f| {
            f.read_exact_at(&mut span, t.offset).map_err(|e| {
                Error::invalid(
                    &self.cat.files[t.file].path,
                    format!(
                        "tensor `{}`: cannot read its storage at byte {}: {e}",
                        t.name, t.offset
                    ),
                )
            })
        })?;
        let first = (pos / es as u64) as usize;
        let n = buf.len() / es;
        // The multi-index of element `first`.
        let mut idx = vec![0u64; t.shape.len()];
        let mut rem = first as u64;
        for d in (0..t.shape.len()).rev() {
            let dim = t.shape[d].max(1);
            idx[d] = rem % dim;
            rem /= dim;
        }
        for out in buf.chunks_exact_mut(es).take(n) {
            let at: u64 = idx
                .iter()
                .zip(&s.strides)
                .map(|(i, st)| i * st)
                .sum::<u64>()
                * es as u64;
            let at = at as usize;
            out.copy_from_slice(&span[at..at + es]);
            for d in (0..idx.len()).rev() {
                idx[d] += 1;
                if idx[d] < t.shape[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        Ok(())
    }

    fn read_raw(&self, t: &TensorEntry, pos: u64, buf: &mut [u8]) -> Result<()> {
        let at = t.offset + pos;
        if let Some(r) = &self.cat.files[t.file].remote {
            return r.read_exact_at(buf, at).map_err(|e| match e {
                Error::Invalid { path, what } => Error::Invalid {
                    path,
                    what: format!("tensor `{}`: {what}", t.name),
                },
                e => e,
            });
        }
        self.with_file(t, |f| {
            f.read_exact_at(buf, at).map_err(|e| {
                Error::invalid(
                    &self.cat.files[t.file].path,
                    format!(
                    "tensor `{}`: cannot read {} bytes at byte {at}: {e} (was the file changed \
                     while reading?)",
                    t.name,
                    buf.len()
                ),
                )
            })
        })
    }

    /// Calls `f` with consecutive chunks of the tensor's data, each a whole number of
    /// `align`-byte elements and at most about `chunk` bytes.
    pub fn for_each_chunk(
        &self,
        t: &TensorEntry,
        chunk: usize,
        align: usize,
        mut f: impl FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        let step = (chunk / align.max(1)).max(1) * align.max(1);
        let mut buf = vec![0u8; step.min(t.nbytes as usize)];
        let mut pos = 0u64;
        while pos < t.nbytes {
            let n = (step as u64).min(t.nbytes - pos) as usize;
            self.read(t, pos, &mut buf[..n])?;
            f(&buf[..n])?;
            pos += n as u64;
        }
        Ok(())
    }
}

/// Reverses the bytes of every `size`-byte element (big-endian <-> little-endian); complex
/// numbers swap each half.
pub fn swap_bytes(buf: &mut [u8], size: usize) {
    if size <= 1 {
        return;
    }
    for e in buf.chunks_exact_mut(size) {
        e.reverse();
    }
}

/// Inflates the zip entry `p` of `archive` (already open as `file`) into an unlinked temporary
/// file, checking that it inflates to the size the zip directory declares (the zip reader
/// checks its CRC at the end).
fn inflate(path: &std::path::Path, file: &File, p: &Packed) -> Result<File> {
    let bad = |what: String| Error::invalid(path, format!("record `{}`: {what}", p.entry));
    let handle = file.try_clone().map_err(|e| Error::io(path, e))?;
    let mut zip = zip::ZipArchive::new(handle).map_err(|e| bad(e.to_string()))?;
    let mut entry = zip.by_name(&p.entry).map_err(|e| bad(e.to_string()))?;
    let mut out = tempfile::tempfile().map_err(|e| Error::io(std::env::temp_dir(), e))?;
    // One byte more than declared, so that a record that inflates to more is caught.
    let n = std::io::copy(&mut (&mut entry).take(p.size + 1), &mut out)
        .map_err(|e| bad(format!("cannot inflate: {e}")))?;
    if n != p.size {
        return Err(bad(format!(
            "inflates to {n}{} bytes where the zip directory says {}",
            if n > p.size { "+" } else { "" },
            p.size
        )));
    }
    // Read to the end (nothing is left), so that the zip reader checks the CRC.
    let mut rest = [0u8; 1];
    entry
        .read(&mut rest)
        .map_err(|e| bad(format!("cannot inflate: {e}")))?;
    out.flush()
        .map_err(|e| Error::io(std::env::temp_dir(), e))?;
    Ok(out)
}
