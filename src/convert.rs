//! Executing a plan: every tensor streams from its input file through the cast kernels into the
//! output in bounded chunks. A reader thread, the casting thread (parallel kernels) and a writer
//! thread overlap, so memory is a handful of chunk buffers whatever the model's size.
//!
//! Outputs are written under temporary names beside their destination and renamed into place
//! only when everything succeeded: an error or an interruption leaves no partial file.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::cast;
use crate::catalogue::Catalogue;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::formats::safetensors::{encode_header, OutTensor};
use crate::output::{check_target, index_json, layout, Layout, OutputFile, Target};
use crate::plan::Plan;

/// Bytes per chunk buffer (input or output side).
const CHUNK_BYTES: usize = 8 << 20;
/// Chunks in flight between stages.
const DEPTH: usize = 3;

/// Receives progress; implemented by the binary (a progress bar), never printing here.
pub trait Progress: Sync {
    /// Conversion starts: `bytes` of tensor data in `tensors` tensors will be read.
    fn begin(&self, _bytes: u64, _tensors: usize) {}
    /// `bytes` more input bytes were converted.
    fn advance(&self, _bytes: u64) {}
}

/// A [`Progress`] that ignores everything.
pub struct NoProgress;
impl Progress for NoProgress {}

/// How to convert.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Replace an existing output.
    pub force: bool,
    /// Split the output into shards of at most this many bytes.
    pub max_shard_size: Option<u64>,
    /// Set to stop early (Ctrl-C); the conversion then fails with [`Error::Interrupted`].
    pub cancel: Option<Arc<AtomicBool>>,
    /// Flush outputs to disk (fsync) before renaming them into place.
    pub sync: bool,
}

/// What a conversion did.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Files written (final paths).
    pub files: Vec<PathBuf>,
    /// Tensors whose dtype changed.
    pub tensors_cast: usize,
    /// Tensors written as they were.
    pub tensors_kept: usize,
    /// Tensor bytes read.
    pub bytes_in: u64,
    /// Tensor bytes written.
    pub bytes_out: u64,
    /// Other files copied from a model folder.
    pub files_copied: usize,
    /// The dtype written into `config.json`, if one was updated.
    pub config_dtype: Option<DType>,
    /// Things the user should know (unparseable config.json, ...).
    pub warnings: Vec<String>,
    /// Wall time.
    pub elapsed: Duration,
}

/// Resolves the output of converting `cat` with `plan` to `out`: the target and its files.
pub fn prepare(
    cat: &Catalogue,
    plan: &Plan,
    out: &Path,
    opts: &Options,
) -> Result<(Target, Layout)> {
    let target = Target::resolve(cat, out)?;
    let layout = layout(cat, plan, &target, opts.max_shard_size);
    Ok((target, layout))
}

/// Converts `cat` according to `plan` into `out`.
pub fn convert(
    cat: &Catalogue,
    plan: &Plan,
    out: &Path,
    opts: &Options,
    progress: &dyn Progress,
) -> Result<Summary> {
    let start = Instant::now();
    let (target, layout) = prepare(cat, plan, out, opts)?;
    check_target(cat, &target, &layout, opts.force)?;
    let sources = cat
        .files
        .iter()
        .map(|f| File::open(&f.path).map_err(|e| Error::io(&f.path, e)))
        .collect::<Result<Vec<_>>>()?;
    let totals = plan.totals();
    progress.begin(totals.bytes_in, plan.tensors.len());
    let mut summary = Summary {
        files: vec![],
        tensors_cast: totals.cast,
        tensors_kept: totals.kept,
        bytes_in: totals.bytes_in,
        bytes_out: totals.bytes_out,
        files_copied: 0,
        config_dtype: None,
        warnings: vec![],
        elapsed: Duration::ZERO,
    };
    let job = Job {
        cat,
        plan,
        sources: &sources,
        opts,
        progress,
    };
    match &target {
        Target::File(p) | Target::Index(p) => {
            let dir = parent_of(p);
            let mut staged = Vec::new();
            for f in &layout.files {
                let tmp = temp_file(&dir, &f.name)?;
                job.write_file(tmp.as_file(), tmp.path(), f)?;
                staged.push((tmp, dir.join(&f.name)));
            }
            if let Some(index) = &layout.index {
                let mut tmp = temp_file(&dir, index)?;
                let text = index_json(cat, plan, &layout);
                tmp.write_all(text.as_bytes())
                    .map_err(|e| Error::io(tmp.path(), e))?;
                job.finish(tmp.as_file())?;
                staged.push((tmp, dir.join(index)));
            }
            for (tmp, dest) in staged {
                tmp.persist(&dest).map_err(|e| Error::io(&dest, e.error))?;
                summary.files.push(dest);
            }
        }
        Target::Folder(dest) => {
            let parent = parent_of(dest);
            let name = dest
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            let staging = tempfile::Builder::new()
                .prefix(&format!(".{name}.weightcast-"))
                .permissions(std::fs::Permissions::from_mode(0o777))
                .tempdir_in(&parent)
                .map_err(|e| Error::io(&parent, e))?;
            for f in &layout.files {
                let path = staging.path().join(&f.name);
                let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
                job.write_file(&file, &path, f)?;
                summary.files.push(dest.join(&f.name));
            }
            if let Some(index) = &layout.index {
                let path = staging.path().join(index);
                std::fs::write(&path, index_json(cat, plan, &layout))
                    .map_err(|e| Error::io(&path, e))?;
                summary.files.push(dest.join(index));
            }
            let dominant = plan.dominant_float(cat);
            let folder = cat.folder.as_ref().expect("folder input");
            for rel in &folder.other_files {
                job.check_cancel()?;
                let from = folder.dir.join(rel);
                let to = staging.path().join(rel);
                if let Some(p) = to.parent() {
                    std::fs::create_dir_all(p).map_err(|e| Error::io(p, e))?;
                }
                if rel == Path::new("config.json") {
                    match update_config(&from, dominant)? {
                        Some(text) => {
                            std::fs::write(&to, text).map_err(|e| Error::io(&to, e))?;
                            summary.config_dtype = dominant;
                        }
                        None => {
                            summary.warnings.push(format!(
                                "{}: not a JSON object; copied unchanged, its dtype may be stale",
                                from.display()
                            ));
                            std::fs::copy(&from, &to).map_err(|e| Error::io(&from, e))?;
                        }
                    }
                } else {
                    std::fs::copy(&from, &to).map_err(|e| Error::io(&from, e))?;
                }
                summary.files_copied += 1;
            }
            job.check_cancel()?;
            replace_folder(staging, dest)?;
        }
    }
    summary.elapsed = start.elapsed();
    Ok(summary)
}

/// Sets `torch_dtype` (and `dtype`, where present) in a config.json to `dtype`, keeping key
/// order. Returns `None` when the file is not a JSON object.
fn update_config(path: &Path, dtype: Option<DType>) -> Result<Option<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let Ok(serde_json::Value::Object(mut map)) = serde_json::from_str::<serde_json::Value>(&text)
    else {
        return Ok(None);
    };
    if let Some(d) = dtype {
        let v = serde_json::Value::String(d.torch_name().to_string());
        let has_dtype = map.contains_key("dtype");
        if map.contains_key("torch_dtype") || !has_dtype {
            map.insert("torch_dtype".into(), v.clone());
        }
        if has_dtype {
            map.insert("dtype".into(), v);
        }
    }
    let mut s = serde_json::to_string_pretty(&serde_json::Value::Object(map)).expect("JSON");
    s.push('\n');
    Ok(Some(s))
}

/// Moves the finished staging folder to `dest`, replacing what is there (checked by
/// `check_target` against `--force`).
fn replace_folder(staging: tempfile::TempDir, dest: &Path) -> Result<()> {
    let staged = staging.keep();
    if dest.symlink_metadata().is_ok() {
        let parent = parent_of(dest);
        let old = tempfile::Builder::new()
            .prefix(".weightcast-old-")
            .tempdir_in(&parent)
            .map_err(|e| Error::io(&parent, e))?;
        let aside = old.path().join("old");
        std::fs::rename(dest, &aside).map_err(|e| Error::io(dest, e))?;
        if let Err(e) = std::fs::rename(&staged, dest) {
            let _ = std::fs::rename(&aside, dest);
            let _ = std::fs::remove_dir_all(&staged);
            return Err(Error::io(dest, e));
        }
        // `old` removes the previous output when dropped.
        return Ok(());
    }
    std::fs::rename(&staged, dest).map_err(|e| {
        let _ = std::fs::remove_dir_all(&staged);
        Error::io(dest, e)
    })
}

fn parent_of(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn temp_file(dir: &Path, name: &str) -> Result<tempfile::NamedTempFile> {
    // Ordinary permissions (0666 less the umask), not the 0600 of a private temp file.
    tempfile::Builder::new()
        .prefix(&format!(".{name}.weightcast-"))
        .permissions(std::fs::Permissions::from_mode(0o666))
        .tempfile_in(dir)
        .map_err(|e| Error::invalid(dir, format!("cannot create the output here: {e}")))
}

/// A buffer pool shared by the three stages.
struct Pool(Mutex<Vec<Vec<u8>>>);

impl Pool {
    fn get(&self, len: usize) -> Vec<u8> {
        let mut b = self.0.lock().expect("pool").pop().unwrap_or_default();
        if b.len() < len {
            b.resize(len, 0);
        } else {
            b.truncate(len);
        }
        b
    }

    fn put(&self, b: Vec<u8>) {
        let mut p = self.0.lock().expect("pool");
        if p.len() < 2 * DEPTH + 2 {
            p.push(b);
        }
    }
}

/// One chunk read from the input.
struct Chunk {
    plan_index: usize,
    data: Vec<u8>,
}

struct Job<'a> {
    cat: &'a Catalogue,
    plan: &'a Plan,
    sources: &'a [File],
    opts: &'a Options,
    progress: &'a dyn Progress,
}

impl Job<'_> {
    fn check_cancel(&self) -> Result<()> {
        match &self.opts.cancel {
            Some(c) if c.load(Ordering::Relaxed) => Err(Error::Interrupted),
            _ => Ok(()),
        }
    }

    fn finish(&self, file: &File) -> Result<()> {
        if self.opts.sync {
            file.sync_all().map_err(|e| Error::io("output", e))?;
        }
        Ok(())
    }

    /// Input bytes per chunk for a plan entry: whole elements, at most [`CHUNK_BYTES`] on
    /// either side.
    fn chunk_in(&self, i: usize) -> u64 {
        let p = &self.plan.tensors[i];
        if !p.is_cast() {
            return CHUNK_BYTES as u64;
        }
        let (isz, osz) = (p.from.bitsize() / 8, p.to.bitsize() / 8);
        (CHUNK_BYTES / isz.max(osz) * isz) as u64
    }

    /// Writes one safetensors file: header, then every tensor streamed through the cast.
    fn write_file(&self, dst: &File, dst_path: &Path, of: &OutputFile) -> Result<()> {
        let cat = self.cat;
        let names: Vec<OutTensor<'_>> = of
            .tensors
            .iter()
            .map(|&i| {
                let p = &self.plan.tensors[i];
                let t = &cat.tensors[p.tensor];
                OutTensor {
                    name: &t.name,
                    dtype: p.to,
                    shape: &t.shape,
                    nbytes: p.bytes_out,
                }
            })
            .collect();
        let mut metadata = of
            .tensors
            .first()
            .and_then(|&i| {
                cat.files[cat.tensors[self.plan.tensors[i].tensor].file]
                    .metadata
                    .clone()
            })
            .unwrap_or_else(|| cat.metadata());
        if !metadata.iter().any(|(k, _)| k == "format") {
            metadata.insert(0, ("format".into(), "pt".into()));
        }
        let header = encode_header(&metadata, &names)?;
        dst.set_len(header.len() as u64 + of.bytes)
            .map_err(|e| Error::io(dst_path, e))?;
        (&*dst)
            .write_all(&header)
            .map_err(|e| Error::io(dst_path, e))?;

        let pool = Pool(Mutex::new(Vec::new()));
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| -> Result<()> {
            let (read_tx, read_rx) = sync_channel::<Result<Chunk>>(DEPTH);
            let (write_tx, write_rx) = sync_channel::<Vec<u8>>(DEPTH);
            let pool = &pool;
            let stop = &stop;
            s.spawn(move || {
                for &i in &of.tensors {
                    let p = &self.plan.tensors[i];
                    let t = &cat.tensors[p.tensor];
                    let step = self.chunk_in(i);
                    let mut pos = 0u64;
                    while pos < t.nbytes {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        let n = step.min(t.nbytes - pos);
                        let mut buf = pool.get(n as usize);
                        let src = &cat.files[t.file];
                        let r = self.sources[t.file]
                            .read_exact_at(&mut buf, t.offset + pos)
                            .map_err(|e| {
                                Error::invalid(
                                    &src.path,
                                    format!(
                                        "tensor `{}`: cannot read {n} bytes at byte {}: {e} \
                                         (was the file changed while converting?)",
                                        t.name,
                                        t.offset + pos
                                    ),
                                )
                            })
                            .map(|_| Chunk {
                                plan_index: i,
                                data: buf,
                            });
                        let failed = r.is_err();
                        if read_tx.send(r).is_err() || failed {
                            return;
                        }
                        pos += n;
                    }
                }
            });
            let writer = s.spawn(move || -> Result<()> {
                let mut out: &File = dst;
                for buf in write_rx {
                    if let Err(e) = out.write_all(&buf) {
                        stop.store(true, Ordering::Relaxed);
                        return Err(Error::io(dst_path, e));
                    }
                    pool.put(buf);
                }
                Ok(())
            });
            let result = (|| -> Result<()> {
                for chunk in read_rx {
                    let chunk = chunk?;
                    self.check_cancel()?;
                    let p = &self.plan.tensors[chunk.plan_index];
                    let n = chunk.data.len() as u64;
                    let out = if p.is_cast() {
                        let isz = p.from.bitsize() / 8;
                        let osz = p.to.bitsize() / 8;
                        let mut out = pool.get(chunk.data.len() / isz * osz);
                        cast::cast_par(p.from, p.to, &chunk.data, &mut out).map_err(|e| {
                            Error::invalid(
                                &cat.files[cat.tensors[p.tensor].file].path,
                                format!("tensor `{}`: {e}", cat.tensors[p.tensor].name),
                            )
                        })?;
                        pool.put(chunk.data);
                        out
                    } else {
                        chunk.data
                    };
                    if write_tx.send(out).is_err() {
                        break;
                    }
                    self.progress.advance(n);
                }
                Ok(())
            })();
            if result.is_err() {
                stop.store(true, Ordering::Relaxed);
            }
            drop(write_tx);
            let written = writer.join().expect("writer thread");
            result?;
            written
        })?;
        self.check_cancel()?;
        self.finish(dst)
    }
}
