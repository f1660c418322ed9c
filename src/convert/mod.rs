//! Executing a plan: every tensor streams from its input file through the cast kernels into the
//! output in bounded chunks. A reader thread, the casting thread (parallel kernels) and a writer
//! thread overlap, so memory is a handful of chunk buffers whatever the model's size.
//!
//! Outputs are written under temporary names beside their destination and renamed into place
//! only when everything succeeded: an error or an interruption leaves no partial file.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::cast;
use crate::catalogue::{Catalogue, TensorEntry};
use crate::dtype::DType;
use crate::error::{Caller, Error, Result};
use crate::formats::safetensors::{encode_header, OutTensor};
use crate::output::{check_target, index_json, layout, Layout, OutputFile, Target};
use crate::plan::{Plan, QuantPlan, ScaledOut, TensorPlan};
use crate::quant::ScaleTable;
use crate::source::Sources;

mod to_store;

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
    /// A new pass starts (`choosing`, `checking`, `converting`...): counts start again.
    fn phase(&self, _what: &str) {}
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
    /// What to do when finite values would leave the target's range.
    pub on_overflow: OnOverflow,
    /// Inference export for .pt outputs (`--inference`, `--key`, `--strip-prefix`).
    pub pt_export: crate::formats::torch_write::PtExport,
    /// One part of a conversion split across processes or machines (`--part K/N`), or the
    /// step that finishes it.
    pub part: Option<Part>,
    /// Who asked (the vocabulary of messages).
    pub caller: crate::error::Caller,
}

/// A conversion split by output shard across N independent processes (`--part K/N`), each
/// computing the same deterministic plan and layout and writing only its own shards, then
/// finished by one last call that checks them and writes the index and the folder's other
/// files. The result is byte-identical to one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Write the shards `i` (0-based, in the layout's order) with `i % n == k - 1`.
    Shards {
        /// This part, from 1.
        k: usize,
        /// How many parts.
        n: usize,
    },
    /// Check that every shard is there, as the plan lays it out, then write the folder's other
    /// files and, last, the index.
    Finish,
}

impl std::str::FromStr for Part {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        if s == "finish" {
            return Ok(Part::Finish);
        }
        let bad = || Error::usage(format!("--part {s}: give K/N (1 <= K <= N) or finish"));
        let (k, n) = s.split_once('/').ok_or_else(bad)?;
        let (k, n): (usize, usize) = (k.parse().map_err(|_| bad())?, n.parse().map_err(|_| bad())?);
        if k == 0 || k > n {
            return Err(bad());
        }
        Ok(Part::Shards { k, n })
    }
}

/// What to do when a cast would turn finite values into inf (or saturate fp8).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OnOverflow {
    /// Stop, list the tensors and write nothing.
    #[default]
    Error,
    /// Leave those tensors in their original dtype (decided before writing; see
    /// [`crate::analysis`]).
    Keep,
    /// Saturate to the largest finite value and report how many were clamped.
    Clamp,
    /// Cast exactly as torch does (inf, or saturation for f8e4m3fn), without checking.
    Allow,
}

impl std::str::FromStr for OnOverflow {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "error" => OnOverflow::Error,
            "keep" => OnOverflow::Keep,
            "clamp" => OnOverflow::Clamp,
            "allow" => OnOverflow::Allow,
            _ => {
                return Err(Error::usage(format!(
                    "--on-overflow `{s}`: use error, keep, clamp or allow"
                )))
            }
        })
    }
}

impl Options {
    fn range(&self) -> cast::Range {
        match self.on_overflow {
            OnOverflow::Clamp => cast::Range::Clamp,
            OnOverflow::Error | OnOverflow::Keep => cast::Range::Count,
            OnOverflow::Allow => cast::Range::Ignore,
        }
    }
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
    /// Tensors with values clamped by `--on-overflow clamp`, and how many.
    pub overflowed: Vec<(String, u64)>,
    /// Wall time.
    pub elapsed: Duration,
    /// The files written and the tensors each holds.
    pub layout: Layout,
}

impl Summary {
    /// The summary of a whole conversion before it runs (progress told its size).
    fn whole(plan: &Plan, layout: Layout, progress: &dyn Progress) -> Summary {
        let totals = plan.totals();
        progress.begin(totals.bytes_in, plan.tensors.len() + plan.others.len());
        Summary {
            files: vec![],
            tensors_cast: totals.cast,
            tensors_kept: totals.kept,
            bytes_in: totals.bytes_in,
            bytes_out: totals.bytes_out,
            files_copied: 0,
            config_dtype: None,
            warnings: vec![],
            overflowed: vec![],
            elapsed: Duration::ZERO,
            layout,
        }
    }

    /// The summary of one part (the tensors of the files `mine`) before it runs.
    fn part(
        plan: &Plan,
        mine: &[&OutputFile],
        layout: &Layout,
        progress: &dyn Progress,
    ) -> Summary {
        let ts = || {
            mine.iter()
                .flat_map(|f| &f.tensors)
                .map(|&i| &plan.tensors[i])
        };
        let (cast, count) = (ts().filter(|p| p.is_cast()).count(), ts().count());
        let bytes_in = ts().map(|p| p.bytes_in).sum();
        progress.begin(bytes_in, count);
        Summary {
            files: vec![],
            tensors_cast: cast,
            tensors_kept: count - cast,
            bytes_in,
            bytes_out: ts().map(|p| p.bytes_out).sum(),
            files_copied: 0,
            config_dtype: None,
            warnings: vec![],
            overflowed: vec![],
            elapsed: Duration::ZERO,
            layout: layout.clone(),
        }
    }
}

impl Part {
    /// The weights files this part writes: shards `i` with `i % n == k - 1`; none for finish.
    fn files(self, layout: &Layout) -> Vec<&OutputFile> {
        match self {
            Part::Shards { k, n } => layout
                .files
                .iter()
                .enumerate()
                .filter(|(i, _)| i % n == k - 1)
                .map(|(_, f)| f)
                .collect(),
            Part::Finish => vec![],
        }
    }
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

/// Converts `cat` according to `plan` into `out`. Missing parent folders of the output are
/// created (as `save_pretrained` does) and removed again if the conversion fails.
pub fn convert(
    cat: &Catalogue,
    plan: &Plan,
    out: &Path,
    opts: &Options,
    progress: &dyn Progress,
) -> Result<Summary> {
    let start = Instant::now();
    check_request(cat, plan, out)?;
    if crate::remote::store::is_store_url(out) {
        let mut summary = to_store::convert_to_store(cat, plan, out, opts, progress)?;
        summary.elapsed = start.elapsed();
        return Ok(summary);
    }
    if let Some(part) = opts.part {
        let mut summary = convert_part(cat, plan, out, opts, progress, part)?;
        summary.elapsed = start.elapsed();
        return Ok(summary);
    }
    let (target, layout) = prepare(cat, plan, out, opts)?;
    check_target(cat, &target, &layout, opts.force)?;
    let parent = match &target {
        Target::Folder(p) => parent_of(p),
        t => parent_of(t.path()),
    };
    let created = make_parents(&parent)?;
    let result = execute(cat, plan, &target, layout, opts, progress);
    if result.is_err() {
        remove_created(created, &parent);
    }
    let mut summary = result?;
    summary.elapsed = start.elapsed();
    Ok(summary)
}

/// The refusals [`convert`] makes before it reads any tensor: an input quantized in a way
/// weightcast cannot dequantize, an output URL that is no object store.
fn check_request(cat: &Catalogue, plan: &Plan, out: &Path) -> Result<()> {
    if let QuantPlan::Unsupported(why) = &plan.quant {
        let q = cat.quant.as_deref().expect("a quantized input");
        return Err(Error::Refused(format!(
            "{}: quantized ({}, from {}) in a way weightcast cannot dequantize: {why}; nothing \
             was written (--on-quantized keep passes its tensors through untouched)",
            cat.path.display(),
            q.scheme,
            q.found_in
        )));
    }
    if crate::remote::is_url(out) && !crate::remote::store::is_store_url(out) {
        return Err(Error::usage(format!(
            "{}: outputs go to local paths or object stores (s3://BUCKET/PREFIX), not to \
             http(s):// or hf:// URLs",
            out.display()
        )));
    }
    Ok(())
}

/// Everything [`convert`] checks before it writes, without writing: the request's refusals,
/// then (for a local output) the target: an existing output without `force`, the input as its
/// own output. Returns the layout the run would write. `--dry-run` runs it.
pub fn check(cat: &Catalogue, plan: &Plan, out: &Path, opts: &Options) -> Result<Layout> {
    check_request(cat, plan, out)?;
    let (target, layout) = prepare(cat, plan, out, opts)?;
    if !crate::remote::is_url(out) {
        // A part checks its own shards (and protects the input) as it writes them.
        check_target(cat, &target, &layout, opts.force || opts.part.is_some())?;
    }
    Ok(layout)
}

/// The refusal of `--on-overflow error`: `named` lists the tensors (name, target, count) whose
/// finite values would leave the target's range.
pub fn overflow_refusal(input: &Path, named: &[(String, DType, u64)], caller: Caller) -> Error {
    let total: u64 = named.iter().map(|t| t.2).sum();
    let list: Vec<String> = named
        .iter()
        .map(|(n, d, c)| format!("`{n}` ({c} values beyond {d})"))
        .collect();
    Error::Refused(format!(
        "{}: {total} finite values in {} tensor(s) would overflow: {}; nothing was \
         written ({} leaves them in their dtype, clamp saturates them, allow casts them as \
         torch does)",
        input.display(),
        named.len(),
        crate::error::listed(&list, 10),
        caller.given("on-overflow", "keep")
    ))
}

/// The warning for tensors a cast turns into all zeros (every non-zero value flushed to
/// zero), if `names` lists any.
pub fn flushed_warning(names: &[String], caller: Caller) -> Option<String> {
    if names.is_empty() {
        return None;
    }
    Some(format!(
        "{} tensor(s) became all zeros: every non-zero value flushed to zero in the cast: \
         {} ({} keeps the tensors that would lose more than that fraction in their dtype)",
        names.len(),
        crate::error::names(names),
        match caller {
            Caller::Cli => "--max-underflow FRACTION".to_string(),
            Caller::Python => "max_underflow=FRACTION".to_string(),
        }
    ))
}

/// Writes the output of a resolved target.
fn execute(
    cat: &Catalogue,
    plan: &Plan,
    target: &Target,
    layout: Layout,
    opts: &Options,
    progress: &dyn Progress,
) -> Result<Summary> {
    let sources = Sources::open(cat)?;
    let mut summary = Summary::whole(plan, layout, progress);
    let job = Job::new(cat, plan, &sources, opts, progress);
    match target {
        Target::File(p) | Target::Index(p) => job.write_files(p, &mut summary)?,
        Target::Pt(dest) => job.write_pt(dest, &mut summary)?,
        Target::Folder(dest) => job.write_folder(dest, &mut summary)?,
    }
    summary.warnings.extend(job.flushed_warning());
    Ok(summary)
}

/// Converts `plan`'s tensors into memory: `bufs[i]` (allocated by the caller, exactly
/// `mem.buffers[i].nbytes` long) receives buffer `i` of `mem` (see [`crate::load`]). The same
/// executor, casts and overflow policy as a file output; returns the clamp report.
pub fn convert_into(
    cat: &Catalogue,
    plan: &Plan,
    mem: &crate::load::MemoryLayout,
    bufs: &mut [&mut [u8]],
    opts: &Options,
    progress: &dyn Progress,
) -> Result<Vec<(String, u64)>> {
    use crate::load::BufferSource;
    if let QuantPlan::Unsupported(why) = &plan.quant {
        return Err(Error::Refused(format!(
            "{}: quantized in a way weightcast cannot dequantize: {why}",
            cat.path.display()
        )));
    }
    if bufs.len() != mem.buffers.len()
        || bufs
            .iter()
            .zip(&mem.buffers)
            .any(|(b, m)| b.len() as u64 != m.nbytes)
    {
        return Err(Error::usage(
            "convert_into: the buffers do not match the memory layout",
        ));
    }
    let sources = Sources::open(cat)?;
    let job = Job::new(cat, plan, &sources, opts, progress);
    let storage_entries: Vec<Option<TensorEntry>> = mem
        .buffers
        .iter()
        .map(|b| match b.source {
            BufferSource::Storage { s, .. } => Some(cat.storages[s].as_tensor()),
            BufferSource::Tensor(_) => None,
        })
        .collect();
    let tensors: Vec<usize> = mem
        .buffers
        .iter()
        .filter_map(|b| match b.source {
            BufferSource::Tensor(i) => Some(i),
            BufferSource::Storage { .. } => None,
        })
        .collect();
    job.precompute_scales(&tensors)?;
    let pieces: Vec<Piece<'_>> = mem
        .buffers
        .iter()
        .zip(&storage_entries)
        .map(|(b, e)| match (&b.source, e) {
            (BufferSource::Tensor(i), _) => job.piece(&plan.tensors[*i]),
            (&BufferSource::Storage { from, to, .. }, Some(entry)) => Ok(Piece {
                entry,
                from,
                to,
                how: How::Cast,
            }),
            _ => unreachable!("a storage buffer has its entry"),
        })
        .collect::<Result<_>>()?;
    progress.begin(pieces.iter().map(|p| p.entry.nbytes).sum(), pieces.len());
    let counts = job.exec().run_into(&pieces, bufs)?;
    job.check_cancel()?;
    let named: Vec<(String, DType, u64)> = counts
        .into_iter()
        .map(|(k, n)| {
            let name = match mem.buffers[k].source {
                BufferSource::Tensor(i) => cat.tensors[plan.tensors[i].tensor].name.clone(),
                BufferSource::Storage { s, .. } => format!("storage data/{}", cat.storages[s].key),
            };
            (name, pieces[k].to, n)
        })
        .collect();
    job.written(named)
}

/// One part of a split conversion (see [`Part`]).
fn convert_part(
    cat: &Catalogue,
    plan: &Plan,
    out: &Path,
    opts: &Options,
    progress: &dyn Progress,
    part: Part,
) -> Result<Summary> {
    let (target, layout) = prepare(cat, plan, out, opts)?;
    let dir = match &target {
        Target::Folder(d) => d.clone(),
        Target::Index(p) | Target::File(p) if layout.index.is_some() => parent_of(p),
        _ => {
            return Err(Error::usage(
                "--part splits a sharded output by shard: write a model folder or an index \
                 (*.safetensors.index.json, or a .safetensors with --max-shard-size), not one \
                 file",
            ))
        }
    };
    // The input is protected as in one run; existing shards are checked one by one below.
    check_target(cat, &target, &layout, true)?;
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let sources = Sources::open(cat)?;
    let job = Job::new(cat, plan, &sources, opts, progress);
    let mine = part.files(&layout);
    let mut summary = Summary::part(plan, &mine, &layout, progress);
    if let Part::Shards { .. } = part {
        for f in mine {
            let dest = dir.join(&f.name);
            if !opts.force && dest.symlink_metadata().is_ok() {
                return Err(Error::usage(format!(
                    "{}: already exists (use --force to replace it)",
                    dest.display()
                )));
            }
            let tmp = temp_file(&dir, &f.name)?;
            let overflow = job.write_file(tmp.as_file(), tmp.path(), f)?;
            summary
                .overflowed
                .extend(job.written(job.named(&overflow))?);
            tmp.persist(&dest).map_err(|e| Error::io(&dest, e.error))?;
            summary.files.push(dest);
        }
        summary.warnings.extend(job.flushed_warning());
        return Ok(summary);
    }
    // Finish: every shard as this plan lays it out (size and header), then the rest.
    for (i, f) in layout.files.iter().enumerate() {
        let path = dir.join(&f.name);
        let header = job.header(f)?;
        let missing = || {
            Error::Refused(format!(
                "{}: missing; run the part that writes shard {} first (nothing was finished)",
                path.display(),
                i + 1
            ))
        };
        let meta = std::fs::metadata(&path).map_err(|_| missing())?;
        let mut head = vec![0u8; header.len()];
        let same = meta.len() == header.len() as u64 + f.bytes
            && File::open(&path)
                .and_then(|h| std::os::unix::fs::FileExt::read_exact_at(&h, &mut head, 0))
                .is_ok()
            && head == header;
        if !same {
            return Err(Error::Refused(format!(
                "{}: not the shard this plan writes (another input, options or weightcast \
                 version?); nothing was finished",
                path.display()
            )));
        }
    }
    if let Target::Folder(dest) = &target {
        job.copy_others(dest, &mut summary)?;
    }
    if let Some(index) = &layout.index {
        let mut tmp = temp_file(&dir, index)?;
        tmp.write_all(index_json(cat, plan, &layout).as_bytes())
            .map_err(|e| Error::io(tmp.path(), e))?;
        job.finish(tmp.as_file(), tmp.path())?;
        let dest = dir.join(index);
        tmp.persist(&dest).map_err(|e| Error::io(&dest, e.error))?;
        summary.files.push(dest);
    }
    Ok(summary)
}

/// Maps in the pages of a fresh destination range with one call (MADV_POPULATE_WRITE)
/// instead of a page fault per 4 KiB as the cast first writes them: measured about half the
/// kernel time per page. Where the kernel does not know the advice (before Linux 5.14), the
/// writes fault the pages in as usual.
fn prefault(dst: &mut [u8]) {
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096;
        let p = dst.as_mut_ptr() as usize;
        let (start, end) = (p.div_ceil(PAGE) * PAGE, (p + dst.len()) / PAGE * PAGE);
        if end > start {
            // SAFETY: the range lies inside `dst`, which we hold exclusively and are about to
            // overwrite; populating only maps pages in (contents of already-mapped pages are
            // unchanged), so no Rust-visible memory changes.
            unsafe {
                libc::madvise(
                    start as *mut libc::c_void,
                    end - start,
                    libc::MADV_POPULATE_WRITE,
                );
            }
        }
    }
}

/// Creates `dir` and its missing ancestors; returns the topmost folder it created.
fn make_parents(dir: &Path) -> Result<Option<PathBuf>> {
    let mut top = None;
    let mut p = dir;
    while !p.as_os_str().is_empty() && p.symlink_metadata().is_err() {
        top = Some(p.to_path_buf());
        match p.parent() {
            Some(q) => p = q,
            None => break,
        }
    }
    if top.is_some() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    Ok(top)
}

/// Removes the folders [`make_parents`] created, innermost first, if they are still empty.
fn remove_created(top: Option<PathBuf>, dir: &Path) {
    let Some(top) = top else { return };
    let mut p = dir.to_path_buf();
    loop {
        if std::fs::remove_dir(&p).is_err() || p == top {
            break;
        }
        match p.parent() {
            Some(q) => p = q.to_path_buf(),
            None => break,
        }
    }
}

/// Sets `torch_dtype` (and `dtype`, where present) in a config.json to `dtype`, keeping key
/// order. Returns `None` when the file is not a JSON object.
fn update_config(
    path: &Path,
    dtype: Option<DType>,
    dequantized: bool,
    quant_config: Option<&serde_json::Value>,
) -> Result<Option<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let Ok(serde_json::Value::Object(mut map)) = serde_json::from_str::<serde_json::Value>(&text)
    else {
        return Ok(None);
    };
    if dequantized {
        map.remove("quantization_config");
    }
    if let Some(q) = quant_config {
        map.insert("quantization_config".into(), q.clone());
    }
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

impl Job<'_> {
    /// A `.safetensors` file, or a set of shards and their index, beside each other.
    fn write_files(&self, p: &Path, summary: &mut Summary) -> Result<()> {
        let (cat, plan, layout) = (self.cat, self.plan, summary.layout.clone());
        let mut overflow: Vec<(usize, u64)> = Vec::new();
        let dir = parent_of(p);
        let mut staged = Vec::new();
        for f in &layout.files {
            let tmp = temp_file(&dir, &f.name)?;
            overflow.extend(self.write_file(tmp.as_file(), tmp.path(), f)?);
            staged.push((tmp, dir.join(&f.name)));
        }
        summary.overflowed = self.written(self.named(&overflow))?;
        if let Some(index) = &layout.index {
            let mut tmp = temp_file(&dir, index)?;
            let text = index_json(cat, plan, &layout);
            tmp.write_all(text.as_bytes())
                .map_err(|e| Error::io(tmp.path(), e))?;
            self.finish(tmp.as_file(), tmp.path())?;
            staged.push((tmp, dir.join(index)));
        }
        for (tmp, dest) in staged {
            tmp.persist(&dest).map_err(|e| Error::io(&dest, e.error))?;
            summary.files.push(dest);
        }
        Ok(())
    }

    /// A `torch.save` checkpoint.
    fn write_pt(&self, dest: &Path, summary: &mut Summary) -> Result<()> {
        let (cat, plan, opts) = (self.cat, self.plan, self.opts);
        let pt = if cat.kind.is_torch() {
            crate::formats::torch_write::from_torch(cat, plan, &opts.pt_export)?
        } else {
            crate::formats::torch_write::from_tensors(cat, plan)?
        };
        let dir = parent_of(dest);
        let name = dest
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let tmp = temp_file(&dir, &name)?;
        let stem = dest
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("archive");
        let mut zip = crate::formats::torch_write::PtZip::new(tmp.as_file(), stem, &pt.data_pkl)?;
        let pieces: Vec<Piece<'_>> = pt
            .records
            .iter()
            .map(|r| {
                let how = match r.dequant {
                    Some((payload, d)) => {
                        How::Dequantize(Arc::new(d.table(cat, self.sources, payload)?))
                    }
                    None => How::Cast,
                };
                Ok(Piece {
                    entry: &r.source,
                    from: r.from,
                    to: r.to,
                    how,
                })
            })
            .collect::<Result<_>>()?;
        let mut sink = ZipSink {
            zip: &mut zip,
            records: &pt.records,
        };
        let counts = self.exec().run(&pieces, &mut sink)?;
        zip.finish()?;
        let named: Vec<(String, DType, u64)> = counts
            .iter()
            .map(|&(i, n)| (pt.records[i].label.clone(), pt.records[i].to, n))
            .collect();
        summary.overflowed = self.written(named)?;
        self.finish(tmp.as_file(), tmp.path())?;
        tmp.persist(dest).map_err(|e| Error::io(dest, e.error))?;
        summary.files.push(dest.to_path_buf());
        Ok(())
    }

    /// A model folder: weights, index, every other file, config.json's dtype updated.
    fn write_folder(&self, dest: &Path, summary: &mut Summary) -> Result<()> {
        let (cat, plan, layout) = (self.cat, self.plan, summary.layout.clone());
        let mut overflow: Vec<(usize, u64)> = Vec::new();
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
            overflow.extend(self.write_file(&file, &path, f)?);
            summary.files.push(dest.join(&f.name));
        }
        summary.overflowed = self.written(self.named(&overflow))?;
        if let Some(index) = &layout.index {
            let path = staging.path().join(index);
            std::fs::write(&path, index_json(cat, plan, &layout))
                .map_err(|e| Error::io(&path, e))?;
            summary.files.push(dest.join(index));
        }
        self.copy_others(staging.path(), summary)?;
        self.check_cancel()?;
        replace_folder(staging, dest)?;
        Ok(())
    }

    /// Copies the input folder's other files into `into` (config.json with its dtype and
    /// quantization updated; ModelOpt's hf_quant_config.json left out of a dequantized
    /// output).
    fn copy_others(&self, into: &Path, summary: &mut Summary) -> Result<()> {
        let (cat, plan) = (self.cat, self.plan);
        let dominant = plan.dominant_float(cat);
        let dequantized = plan.quant == QuantPlan::Dequantize;
        let folder = cat.folder.as_ref().expect("folder input");
        for rel in &folder.other_files {
            self.check_cancel()?;
            if dequantized && rel == Path::new("hf_quant_config.json") {
                // ModelOpt's declaration of the scheme: the output is no longer quantized.
                continue;
            }
            let from = folder.dir.join(rel);
            let to = into.join(rel);
            if let Some(p) = to.parent() {
                std::fs::create_dir_all(p).map_err(|e| Error::io(p, e))?;
            }
            // Each file appears whole (a temporary beside it, renamed): `--part finish` writes
            // into the live output folder.
            let dir = parent_of(&to);
            let name = to.file_name().unwrap_or_default().to_string_lossy();
            let tmp = temp_file(&dir, &name)?;
            let text = if rel == Path::new("config.json") {
                update_config(&from, dominant, dequantized, plan.quant_config.as_ref())?
            } else {
                None
            };
            match text {
                Some(text) => {
                    std::fs::write(tmp.path(), text).map_err(|e| Error::io(&to, e))?;
                    summary.config_dtype = dominant;
                }
                None => {
                    if rel == Path::new("config.json") {
                        summary.warnings.push(format!(
                            "{}: not a JSON object; copied unchanged, its dtype may be stale",
                            from.display()
                        ));
                    }
                    std::fs::copy(&from, tmp.path()).map_err(|e| Error::io(&from, e))?;
                }
            }
            tmp.persist(&to).map_err(|e| Error::io(&to, e.error))?;
            summary.files_copied += 1;
        }
        Ok(())
    }
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

struct Job<'a> {
    cat: &'a Catalogue,
    plan: &'a Plan,
    sources: &'a Sources<'a>,
    opts: &'a Options,
    progress: &'a dyn Progress,
    /// Scales computed for a scaled FP8 output, by payload.
    scales: Mutex<std::collections::HashMap<usize, Arc<ScaleTable>>>,
    /// Per cast tensor (by name): whether any input value and any output value was non-zero.
    nonzero: Nonzero,
}

/// Per cast tensor (by name): whether any input value, and any output value, was non-zero.
type Nonzero = Mutex<std::collections::HashMap<String, (bool, bool)>>;

impl<'a> Job<'a> {
    fn new(
        cat: &'a Catalogue,
        plan: &'a Plan,
        sources: &'a Sources<'a>,
        opts: &'a Options,
        progress: &'a dyn Progress,
    ) -> Job<'a> {
        Job {
            cat,
            plan,
            sources,
            opts,
            progress,
            scales: Mutex::new(Default::default()),
            nonzero: Mutex::new(Default::default()),
        }
    }

    /// The warning for tensors the cast turned into all zeros (every non-zero value flushed),
    /// in plan order, if any.
    fn flushed_warning(&self) -> Option<String> {
        let seen = self.nonzero.lock().expect("nonzero");
        let names: Vec<String> = self
            .plan
            .tensors
            .iter()
            .map(|p| &self.cat.tensors[p.tensor].name)
            .filter(|n| seen.get(*n).is_some_and(|&(i, o)| i && !o))
            .cloned()
            .collect();
        flushed_warning(&names, self.opts.caller)
    }

    fn check_cancel(&self) -> Result<()> {
        match &self.opts.cancel {
            Some(c) if c.load(Ordering::Relaxed) => Err(Error::Interrupted),
            _ => Ok(()),
        }
    }

    /// The overflow counts of plan entries, named.
    fn named(&self, counts: &[(usize, u64)]) -> Vec<(String, DType, u64)> {
        counts
            .iter()
            .map(|&(i, n)| {
                let p = &self.plan.tensors[i];
                (self.cat.tensors[p.tensor].name.clone(), p.to, n)
            })
            .collect()
    }

    /// Once every tensor is written and before anything is committed: a remote input that
    /// changed meanwhile is an error, then the overflow counts become an error or the clamp
    /// report ([`Job::check_overflow`]).
    fn written(&self, named: Vec<(String, DType, u64)>) -> Result<Vec<(String, u64)>> {
        self.sources.check_unchanged()?;
        self.check_overflow(named)
    }

    /// Turns the overflow counts of the written tensors (or storages) into an error
    /// (`--on-overflow error`) or the clamp report.
    fn check_overflow(&self, named: Vec<(String, DType, u64)>) -> Result<Vec<(String, u64)>> {
        match self.opts.on_overflow {
            OnOverflow::Clamp | OnOverflow::Allow => {
                // `allow` counts nothing (Range::Ignore), so this is the clamp report.
                Ok(named.into_iter().map(|(n, _, c)| (n, c)).collect())
            }
            _ if named.is_empty() => Ok(vec![]),
            _ => Err(overflow_refusal(&self.cat.path, &named, self.opts.caller)),
        }
    }

    /// Flushes a written output file to disk (unless `--no-sync`); an error names it.
    fn finish(&self, file: &File, path: &Path) -> Result<()> {
        if self.opts.sync {
            file.sync_all().map_err(|e| Error::io(path, e))?;
        }
        Ok(())
    }

    /// The safetensors header of one output file.
    fn header(&self, of: &OutputFile) -> Result<Vec<u8>> {
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
        if self.plan.quant == QuantPlan::Dequantize {
            metadata.retain(|(k, _)| k != "_quantization_metadata");
        }
        if !metadata.iter().any(|(k, _)| k == "format") {
            metadata.insert(0, ("format".into(), "pt".into()));
        }
        encode_header(&metadata, &names)
    }

    /// Writes one safetensors file: header, then every tensor streamed through the cast.
    /// Returns, per plan entry with any, the count of values that left the target's range.
    fn write_file(
        &self,
        dst: &File,
        dst_path: &Path,
        of: &OutputFile,
    ) -> Result<Vec<(usize, u64)>> {
        let header = self.header(of)?;
        dst.set_len(header.len() as u64 + of.bytes)
            .map_err(|e| Error::io(dst_path, e))?;
        (&*dst)
            .write_all(&header)
            .map_err(|e| Error::io(dst_path, e))?;

        self.precompute_scales(&of.tensors)?;
        let pieces: Vec<Piece<'_>> = of
            .tensors
            .iter()
            .map(|&i| self.piece(&self.plan.tensors[i]))
            .collect::<Result<_>>()?;
        let counts = self.exec().run(
            &pieces,
            &mut FileSink::new(dst, dst_path, self.opts.sync, header.len() as u64),
        )?;
        self.check_cancel()?;
        self.finish(dst, dst_path)?;
        // Piece k is plan entry of.tensors[k].
        Ok(counts
            .into_iter()
            .map(|(k, n)| (of.tensors[k], n))
            .collect())
    }

    /// The piece that writes plan entry `p` (its scale loaded when it is dequantized).
    fn piece(&self, p: &TensorPlan) -> Result<Piece<'_>> {
        let cat = self.cat;
        let how = match (p.dequant, p.scaled) {
            (Some(d), _) => How::Dequantize(Arc::new(d.table(cat, self.sources, p.tensor)?)),
            (None, Some(ScaledOut::Payload { .. })) => How::Quantize(self.scales_of(p.tensor)?),
            (None, Some(ScaledOut::Scale { payload })) => {
                How::Fill(Arc::new(self.scales_of(payload)?.bytes()))
            }
            (None, None) => How::Cast,
        };
        Ok(Piece {
            entry: &cat.tensors[p.tensor],
            from: p.from,
            to: p.to,
            how,
        })
    }

    /// Computes, in parallel, the scales of the weights quantized among plan entries `entries`
    /// (a pass over each of them before the write).
    fn precompute_scales(&self, entries: &[usize]) -> Result<()> {
        use rayon::prelude::*;
        let todo: Vec<usize> = entries
            .iter()
            .filter_map(|&i| {
                let p = &self.plan.tensors[i];
                match p.scaled {
                    Some(ScaledOut::Payload { .. }) => Some(p.tensor),
                    Some(ScaledOut::Scale { payload }) => Some(payload),
                    None => None,
                }
            })
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .filter(|i| !self.scales.lock().expect("scales").contains_key(i))
            .collect();
        todo.par_iter()
            .try_for_each(|&i| self.scales_of(i).map(|_| ()))
    }

    /// The scales computed from weight `payload` (once per conversion: its payload and its
    /// scale tensor use the same).
    fn scales_of(&self, payload: usize) -> Result<Arc<ScaleTable>> {
        if let Some(t) = self.scales.lock().expect("scales").get(&payload) {
            return Ok(t.clone());
        }
        let (layout, compute) = self
            .plan
            .tensors
            .iter()
            .find_map(|p| match p.scaled {
                Some(ScaledOut::Payload {
                    layout, compute, ..
                }) if p.tensor == payload => Some((layout, compute)),
                _ => None,
            })
            .expect("a scale's payload is planned");
        let table = Arc::new(crate::quant::quantize::compute_scales(
            self.cat,
            self.sources,
            payload,
            layout,
            compute,
        )?);
        self.scales
            .lock()
            .expect("scales")
            .insert(payload, table.clone());
        Ok(table)
    }

    fn exec(&self) -> Executor<'_> {
        Executor {
            sources: self.sources,
            opts: self.opts,
            progress: self.progress,
            nonzero: Some(&self.nonzero),
        }
    }
}

/// One stretch of an output: a tensor (or a whole storage) read from the input and cast from
/// `from` to `to` (copied when they are equal).
pub struct Piece<'a> {
    /// Where its bytes are.
    pub entry: &'a TensorEntry,
    /// Stored dtype.
    pub from: DType,
    /// Written dtype.
    pub to: DType,
    /// What happens to its bytes on the way.
    pub how: How,
}

/// What the executor does to a piece's bytes.
#[derive(Clone)]
pub enum How {
    /// Cast from `from` to `to` (copied when they are equal).
    Cast,
    /// A scaled FP8 payload: multiplied by its scale, then cast.
    Dequantize(Arc<ScaleTable>),
    /// A weight quantized to f8e4m3fn with its (precomputed) scale.
    Quantize(Arc<ScaleTable>),
    /// Bytes computed before the run (a scale): written as they are.
    Fill(Arc<Vec<u8>>),
}

/// Where the executor's bytes go: pieces in order, each begun before its bytes (empty ones
/// too).
pub trait Sink {
    /// Piece `i` starts.
    fn begin(&mut self, i: usize) -> Result<()>;
    /// Bytes of the current piece.
    fn write(&mut self, bytes: &[u8]) -> Result<()>;
}

/// A safetensors file after its header: pieces are laid end to end. With `sync`, write-back
/// of every finished stretch starts while the next ones are cast (`sync_file_range`), so the
/// fsync at the end waits for the last stretch only instead of the whole file.
struct FileSink<'a> {
    file: &'a File,
    path: &'a Path,
    sync: bool,
    /// Bytes written so far (from the start of the file) and where write-back was last
    /// started.
    written: u64,
    flushed: u64,
}

/// Bytes written between two write-back kicks.
const WRITEBACK_STEP: u64 = 32 << 20;

impl FileSink<'_> {
    fn new<'a>(file: &'a File, path: &'a Path, sync: bool, start: u64) -> FileSink<'a> {
        FileSink {
            file,
            path,
            sync,
            written: start,
            flushed: 0,
        }
    }

    /// Starts write-back of what was written since the last kick (asynchronous: returns at
    /// once; a file system without it ignores the hint).
    fn kick(&mut self) {
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            // SAFETY: a plain system call on a file descriptor we hold open, with a range of
            // it; it only schedules write-back of dirty pages.
            unsafe {
                libc::sync_file_range(
                    self.file.as_raw_fd(),
                    self.flushed as libc::off64_t,
                    (self.written - self.flushed) as libc::off64_t,
                    libc::SYNC_FILE_RANGE_WRITE,
                );
            }
        }
        self.flushed = self.written;
    }
}

impl Sink for FileSink<'_> {
    fn begin(&mut self, _i: usize) -> Result<()> {
        Ok(())
    }
    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let mut f = self.file;
        f.write_all(bytes).map_err(|e| Error::io(self.path, e))?;
        self.written += bytes.len() as u64;
        if self.sync && self.written - self.flushed >= WRITEBACK_STEP {
            self.kick();
        }
        Ok(())
    }
}

/// A `.pt` zip: each piece is a storage record.
struct ZipSink<'a, 'z> {
    zip: &'a mut crate::formats::torch_write::PtZip<'z>,
    records: &'a [crate::formats::torch_write::PtRecord],
}

impl Sink for ZipSink<'_, '_> {
    fn begin(&mut self, i: usize) -> Result<()> {
        let r = &self.records[i];
        self.zip.start(&r.name, r.bytes_out)
    }
    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.zip.write(bytes)
    }
}

/// The streaming executor: K workers read and cast chunks of the pieces in parallel, one writer
/// takes them back in order into the sink. Memory is a few chunk buffers per worker, whatever
/// the model's size.
pub struct Executor<'a> {
    sources: &'a Sources<'a>,
    opts: &'a Options,
    progress: &'a dyn Progress,
    /// Where casts record whether their input and output held a non-zero value.
    nonzero: Option<&'a Nonzero>,
}

impl Executor<'_> {
    fn check_cancel(&self) -> Result<()> {
        match &self.opts.cancel {
            Some(c) if c.load(Ordering::Relaxed) => Err(Error::Interrupted),
            _ => Ok(()),
        }
    }

    /// Input bytes per chunk of a piece: whole elements, at most [`CHUNK_BYTES`] on either
    /// side.
    fn chunk_in(p: &Piece<'_>) -> u64 {
        if p.from == p.to && matches!(p.how, How::Cast | How::Fill(_)) {
            return CHUNK_BYTES as u64;
        }
        let (isz, osz) = (p.from.bitsize() / 8, p.to.bitsize() / 8);
        let csz = match &p.how {
            How::Dequantize(s) => s.compute.bitsize() / 8,
            _ => 0,
        };
        (CHUNK_BYTES / isz.max(osz).max(csz) * isz) as u64
    }

    /// Streams every piece into `sink`; returns, per piece with any, the count of values that
    /// left the target's range.
    pub fn run(&self, pieces: &[Piece<'_>], sink: &mut dyn Sink) -> Result<Vec<(usize, u64)>> {
        // Chunks in output order. Worker w reads and casts chunks w, w+K, ...; the writer takes
        // them back in order, so K workers and one writer overlap reading, casting and writing
        // without any thread waiting on a shared pool.
        let mut chunks: Vec<(usize, u64, u64)> = Vec::new();
        for (i, p) in pieces.iter().enumerate() {
            let nbytes = p.entry.nbytes;
            let step = Self::chunk_in(p);
            let mut pos = 0;
            while pos < nbytes {
                let n = step.min(nbytes - pos);
                chunks.push((i, pos, n));
                pos += n;
            }
        }
        let workers = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .clamp(1, 8);
        let pool = Pool(Mutex::new(Vec::new()));
        let stop = AtomicBool::new(false);
        let chunks = &chunks;
        std::thread::scope(|s| -> Result<Vec<(usize, u64)>> {
            let mut receivers = Vec::with_capacity(workers);
            for w in 0..workers {
                let (tx, rx) = sync_channel::<Result<(Vec<u8>, u64)>>(DEPTH);
                receivers.push(rx);
                let (pool, stop) = (&pool, &stop);
                s.spawn(move || {
                    for &(i, pos, n) in chunks.iter().skip(w).step_by(workers) {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        let r = self.read_cast(pool, &pieces[i], pos, n);
                        let failed = r.is_err();
                        if tx.send(r).is_err() || failed {
                            return;
                        }
                    }
                });
            }
            let mut overflow: Vec<(usize, u64)> = Vec::new();
            let result = (|| -> Result<()> {
                let mut begun = 0;
                for (j, &(i, _, n)) in chunks.iter().enumerate() {
                    self.check_cancel()?;
                    while begun <= i {
                        sink.begin(begun)?;
                        begun += 1;
                    }
                    let (buf, count) = receivers[j % workers]
                        .recv()
                        .expect("a worker sends every chunk or an error")?;
                    sink.write(&buf)?;
                    pool.put(buf);
                    if count > 0 {
                        match overflow.last_mut() {
                            Some((last, c)) if *last == i => *c += count,
                            _ => overflow.push((i, count)),
                        }
                    }
                    self.progress.advance(n);
                }
                while begun < pieces.len() {
                    sink.begin(begun)?;
                    begun += 1;
                }
                Ok(())
            })();
            if result.is_err() {
                stop.store(true, Ordering::Relaxed);
                // Unblock workers waiting to send.
                drop(receivers);
            }
            result.map(|_| overflow)
        })
    }

    /// Reads `n` bytes at `pos` of piece `p` and casts them; returns the output bytes and the
    /// count of values that left the target's range.
    fn read_cast(&self, pool: &Pool, p: &Piece<'_>, pos: u64, n: u64) -> Result<(Vec<u8>, u64)> {
        let mut out = pool.get(Self::out_len(p, n));
        let mut scratch = pool.get(0);
        let r = self.read_cast_into(p, pos, n, &mut scratch, &mut out);
        pool.put(scratch);
        r.map(|count| (out, count))
    }

    /// Output bytes of `n` input bytes of piece `p`.
    fn out_len(p: &Piece<'_>, n: u64) -> usize {
        if matches!(p.how, How::Fill(_)) || (p.from == p.to && matches!(p.how, How::Cast)) {
            return n as usize;
        }
        (n as usize) / (p.from.bitsize() / 8) * (p.to.bitsize() / 8)
    }

    /// Reads `n` bytes at `pos` of piece `p` and casts them into `out` (exactly
    /// [`Self::out_len`] bytes), through `scratch` when the bytes change; returns the count of
    /// values that left the target's range.
    fn read_cast_into(
        &self,
        p: &Piece<'_>,
        pos: u64,
        n: u64,
        scratch: &mut Vec<u8>,
        out: &mut [u8],
    ) -> Result<u64> {
        let t = p.entry;
        if let How::Fill(bytes) = &p.how {
            out.copy_from_slice(&bytes[pos as usize..(pos + n) as usize]);
            return Ok(0);
        }
        if p.from == p.to && matches!(p.how, How::Cast) {
            self.sources.read(t, pos, out)?;
            return Ok(0);
        }
        scratch.resize(n as usize, 0);
        self.sources.read(t, pos, scratch)?;
        self.cast_bytes(p, pos, scratch, out)
    }

    /// Casts input bytes of piece `p` that start `pos` bytes into it into `out`.
    fn cast_bytes(&self, p: &Piece<'_>, pos: u64, scratch: &[u8], out: &mut [u8]) -> Result<u64> {
        let t = p.entry;
        let isz = p.from.bitsize() / 8;
        if let How::Quantize(s) = &p.how {
            s.quantize(p.from, scratch, pos / isz as u64, out);
            return Ok(0);
        }
        match &p.how {
            How::Dequantize(s) => s.dequantize_to(
                p.from,
                scratch,
                pos / isz as u64,
                p.to,
                out,
                self.opts.range(),
            ),
            _ => cast::cast_checked(p.from, p.to, scratch, out, self.opts.range()),
        }
        .map_err(|e| Error::invalid(self.sources.path_of(t), format!("tensor `{}`: {e}", t.name)))
        .inspect(|_| {
            let Some(seen) = self.nonzero.filter(|_| p.from != p.to) else {
                return;
            };
            let (i, o) = (
                cast::any_nonzero(p.from, scratch),
                cast::any_nonzero(p.to, out),
            );
            let mut seen = seen.lock().expect("nonzero");
            let e = seen.entry(t.name.clone()).or_default();
            *e = (e.0 | i, e.1 | o);
        })
    }

    /// Converts every piece straight into its own buffer (`bufs[i]` holds piece `i`'s output),
    /// chunks in parallel and in any order: no writer, no chunk copies. Returns, per piece with
    /// any, the count of values that left the target's range.
    pub fn run_into(
        &self,
        pieces: &[Piece<'_>],
        bufs: &mut [&mut [u8]],
    ) -> Result<Vec<(usize, u64)>> {
        use rayon::prelude::*;
        /// Input bytes per chunk: small enough that the scratch copy stays in cache.
        const STEP: usize = 1 << 20;
        let mut work: Vec<(usize, u64, u64, &mut [u8])> = Vec::new();
        for (i, (p, buf)) in pieces.iter().zip(bufs.iter_mut()).enumerate() {
            let isz = p.from.bitsize() / 8;
            let osz = match &p.how {
                How::Dequantize(s) => (p.to.bitsize() / 8).max(s.compute.bitsize() / 8),
                _ => p.to.bitsize() / 8,
            };
            let step = (STEP / isz.max(osz).max(1) * isz.max(1)) as u64;
            let mut rest: &mut [u8] = buf;
            let mut pos = 0;
            while pos < p.entry.nbytes {
                let n = step.min(p.entry.nbytes - pos);
                let (head, tail) = std::mem::take(&mut rest).split_at_mut(Self::out_len(p, n));
                work.push((i, pos, n, head));
                rest = tail;
                pos += n;
            }
        }
        let counts: Vec<(usize, u64)> = work
            .into_par_iter()
            .map_init(Vec::new, |scratch, (i, pos, n, dst)| {
                self.check_cancel()?;
                prefault(dst);
                let c = self.read_cast_into(&pieces[i], pos, n, scratch, dst)?;
                self.progress.advance(n);
                Ok((i, c))
            })
            .collect::<Result<_>>()?;
        let mut per: Vec<(usize, u64)> = Vec::new();
        for (i, c) in counts {
            if c == 0 {
                continue;
            }
            match per.iter_mut().find(|x| x.0 == i) {
                Some(x) => x.1 += c,
                None => per.push((i, c)),
            }
        }
        per.sort_unstable();
        Ok(per)
    }
}
