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
use crate::rules::Factor;
use crate::source::Sources;

mod executor;
mod job;
mod part;
mod to_local;
mod to_store;

pub use executor::{Executor, How, Piece, Sink};
use job::Job;
use to_local::{convert_part, execute, make_parents, parent_of, remove_created};

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
    pub pt_export: crate::formats::torch::write::PtExport,
    /// One part of a conversion split across processes or machines (`--part K/N`), or the
    /// step that finishes it.
    pub part: Option<Part>,
    /// Who asked (the vocabulary of messages).
    pub caller: crate::error::Caller,
    /// A GGUF output: llama.cpp's `general.file_type` (`llama_ftype`) it declares.
    pub gguf_ftype: Option<u64>,
    /// The output is the caller's memory (`cast_module`), which applies the plan's
    /// `config.json` edits itself: no output file needs a `config.json` for them.
    pub config_in_memory: bool,
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
    /// A `.pt` output: what its pickle asks of `torch.load`.
    pub pickle: Option<crate::formats::torch::write::PickleReport>,
}

impl Summary {
    /// The summary of a whole conversion before it runs (progress told its size).
    fn whole(plan: &Plan, layout: Layout, progress: &dyn Progress) -> Summary {
        let totals = plan.totals();
        progress.begin(totals.bytes_in, plan.tensors().len() + plan.others().len());
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
            pickle: None,
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
                .map(|&i| &plan.tensors()[i])
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
            pickle: None,
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

/// A conversion's output, decided before anything is written: the one resolution of the output
/// path that every later step uses (its target, the files it gets, the `.pt` writer's plan) and
/// the checks it passed. What `--dry-run` shows is this; [`write`] writes exactly this.
pub struct Output {
    /// The path (or object-store URL) the user named.
    pub path: PathBuf,
    /// What it is.
    pub target: Target,
    /// The files it gets and the tensors each holds.
    pub layout: Layout,
    /// A `.pt` output: the pickle to write and the storage records to stream (what its pickle
    /// asks of `torch.load` is `pt.report`).
    pub pt: Option<crate::formats::torch::write::PtOutput>,
    /// An existing local output the run replaces (with `force`).
    pub replaces_existing: bool,
}

/// Decides the output of converting `cat` with `plan` to `out`, with every check made before a
/// write: the request's refusals, then (for a local output) an existing output without `force`
/// and the input as its own output. `--dry-run` stops here.
pub fn plan_output(cat: &Catalogue, plan: &Plan, out: &Path, opts: &Options) -> Result<Output> {
    check_request(cat, plan, out)?;
    let target = Target::resolve(cat, out)?;
    if !opts.config_in_memory {
        config_fits(cat, plan, &target)?;
    }
    let layout = layout(cat, plan, &target, opts.max_shard_size);
    if !crate::remote::is_url(out) {
        // A part checks its own shards (and protects the input) as it writes them.
        check_target(cat, &target, &layout, opts.force || opts.part.is_some())?;
    }
    let pt = match target {
        Target::Pt(_) if cat.kind.is_torch() => Some(crate::formats::torch::write::from_torch(
            cat,
            plan,
            &opts.pt_export,
        )?),
        Target::Pt(_) => Some(crate::formats::torch::write::from_tensors(cat, plan)?),
        _ => None,
    };
    Ok(Output {
        path: out.to_path_buf(),
        target,
        layout,
        pt,
        replaces_existing: crate::output::output_exists(out),
    })
}

/// Converts `cat` according to `plan` into `out`: [`plan_output`], then [`write`].
pub fn convert(
    cat: &Catalogue,
    plan: &Plan,
    out: &Path,
    opts: &Options,
    progress: &dyn Progress,
) -> Result<Summary> {
    write(
        cat,
        plan,
        &plan_output(cat, plan, out, opts)?,
        opts,
        progress,
    )
}

/// Writes the decided `output`. Missing parent folders of a local output are created (as
/// `save_pretrained` does) and removed again if the conversion fails.
pub fn write(
    cat: &Catalogue,
    plan: &Plan,
    output: &Output,
    opts: &Options,
    progress: &dyn Progress,
) -> Result<Summary> {
    let start = Instant::now();
    let mut summary = if crate::remote::store::is_store_url(&output.path) {
        to_store::convert_to_store(cat, plan, output, opts, progress)?
    } else if let Some(part) = opts.part {
        convert_part(cat, plan, output, opts, progress, part)?
    } else {
        let parent = match &output.target {
            Target::Folder(p) => parent_of(p),
            t => parent_of(t.path()),
        };
        let created = make_parents(&parent)?;
        let result = execute(cat, plan, output, opts, progress);
        if result.is_err() {
            remove_created(created, &parent);
        }
        result?
    };
    summary.elapsed = start.elapsed();
    Ok(summary)
}

/// Refuses `config.json` edits (a rules file's `[config]`) that the output `out` cannot carry
/// (see [`plan_output`], which checks them too): for a caller that refuses before it reads
/// any tensor.
pub fn check_config(cat: &Catalogue, plan: &Plan, out: &Path) -> Result<()> {
    if plan.config.is_empty() {
        return Ok(());
    }
    config_fits(cat, plan, &Target::resolve(cat, out)?)
}

/// Refuses `config.json` edits (a rules file's `[config]`) that the output cannot carry: an
/// output without a `config.json` (a single file, a `.pt`, a GGUF file of a GGUF input, a
/// folder whose input has none), or a key the input's `config.json` does not have.
fn config_fits(cat: &Catalogue, plan: &Plan, target: &Target) -> Result<()> {
    if plan.config.is_empty() {
        return Ok(());
    }
    let keys: Vec<&str> = plan.config.iter().map(|e| e.key.as_str()).collect();
    let has_config = cat
        .folder
        .as_ref()
        .is_some_and(|f| f.other_files.iter().any(|p| p == Path::new("config.json")));
    let carried = match target {
        Target::Folder(_) => has_config,
        // a GGUF file written from a model folder: its metadata comes from config.json
        Target::Gguf(_) => plan.gguf_hf.is_some() && has_config,
        Target::File(_) | Target::Index(_) | Target::Pt(_) => false,
    };
    if !carried {
        let why = if has_config {
            "this output has no config.json (write a model folder)"
        } else {
            "the input has no config.json to edit"
        };
        return Err(Error::usage(format!(
            "{}: the rules set config.json keys ({}) but {why}; nothing was written",
            target.path().display(),
            keys.join(", ")
        )));
    }
    if let Some(e) = plan.config.iter().find(|e| e.old.is_none()) {
        let dir = &cat.folder.as_ref().expect("checked").dir;
        return Err(Error::usage(format!(
            "{}: no key `{}` (a rules file's [config] sets keys the config already has)",
            dir.join("config.json").display(),
            e.key
        )));
    }
    Ok(())
}

/// The refusals [`plan_output`] makes before it reads any tensor: an input quantized in a way
/// weightcast cannot dequantize, factors that cannot be applied, an output URL that is no
/// object store.
fn check_request(cat: &Catalogue, plan: &Plan, out: &Path) -> Result<()> {
    plan.check_factors(cat)?;
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
    plan.check_factors(cat)?;
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
            (BufferSource::Tensor(i), _) => job.piece(&plan.tensors()[*i]),
            (
                &BufferSource::Storage {
                    from, to, factor, ..
                },
                Some(entry),
            ) => Ok(Piece {
                entry,
                from,
                to,
                how: How::Cast,
                factor,
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
                BufferSource::Tensor(i) => cat.tensors[plan.tensors()[i].tensor].name.clone(),
                BufferSource::Storage { s, .. } => format!("storage data/{}", cat.storages[s].key),
            };
            (name, pieces[k].to, n)
        })
        .collect();
    job.written(named)
}
