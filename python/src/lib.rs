//! `weightcast._weightcast`: the Rust side of the Python package. Each function releases the
//! GIL while it works, watches for Ctrl-C (KeyboardInterrupt cancels the work, which leaves no
//! output) and reports progress to a Python callable from the calling thread. The commands
//! return their `--json` documents as text; the Python layer turns them into objects.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyKeyboardInterrupt};
use pyo3::prelude::*;
use pyo3::types::PyByteArray;

use weightcast::commands::analyze::AnalyzeRequest;
use weightcast::commands::audit::AuditRequest;
use weightcast::commands::diff::DiffRequest;
use weightcast::commands::load::LoadRequest;
use weightcast::commands::{Caller, ConvertRequest, RuleArg};
use weightcast::convert::{OnOverflow, Options, Progress};
use weightcast::Error;

create_exception!(
    _weightcast,
    WeightcastError,
    PyException,
    "Base class of weightcast's errors."
);
create_exception!(
    _weightcast,
    InvalidFileError,
    WeightcastError,
    "A file is not what its format requires, or cannot be read."
);
create_exception!(
    _weightcast,
    RefusedError,
    WeightcastError,
    "weightcast refuses: a dangerous pickle, values that would overflow, an unsupported scheme."
);
create_exception!(
    _weightcast,
    UsageError,
    WeightcastError,
    "The request cannot be carried out as given (bad option, output exists, ...)."
);

/// The Python exception for a library error, with the command line's one-line message.
fn to_py(e: Error) -> PyErr {
    let msg = weightcast::error::one_line(&e.to_string());
    match e {
        Error::Usage(_) => UsageError::new_err(msg),
        Error::Refused(_) => RefusedError::new_err(msg),
        Error::Interrupted => PyKeyboardInterrupt::new_err(msg),
        _ => InvalidFileError::new_err(msg),
    }
}

/// Progress counted in atomics by the worker, read by the calling thread.
#[derive(Default)]
struct Counter {
    total: AtomicU64,
    done: AtomicU64,
}

impl Progress for Counter {
    fn begin(&self, bytes: u64, _tensors: usize) {
        self.total.store(bytes, Ordering::Relaxed);
        self.done.store(0, Ordering::Relaxed);
    }
    fn advance(&self, bytes: u64) {
        self.done.fetch_add(bytes, Ordering::Relaxed);
    }
    fn phase(&self, _what: &str) {
        self.done.store(0, Ordering::Relaxed);
    }
}

/// Runs `work` on another thread without the GIL; meanwhile the calling thread checks for
/// signals (Ctrl-C sets the cancel flag; the work stops and cleans up, then
/// KeyboardInterrupt is raised) and calls `progress(done, total)` every 25 ms.
fn run<T: Send>(
    py: Python<'_>,
    progress: Option<&Bound<'_, PyAny>>,
    work: impl FnOnce(&Arc<AtomicBool>, &Counter) -> Result<T, Error> + Send,
) -> PyResult<T> {
    let cancel = Arc::new(AtomicBool::new(false));
    let counter = Counter::default();
    std::thread::scope(|s| {
        let (cancel_w, counter_w) = (&cancel, &counter);
        let handle = s.spawn(move || work(cancel_w, counter_w));
        let mut interrupted: Option<PyErr> = None;
        loop {
            let finished = py.detach(|| {
                for _ in 0..5 {
                    if handle.is_finished() {
                        return true;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                handle.is_finished()
            });
            if interrupted.is_none() {
                if let Err(e) = py.check_signals() {
                    cancel.store(true, Ordering::SeqCst);
                    interrupted = Some(e);
                }
            }
            if let (Some(cb), None) = (progress, &interrupted) {
                let done = counter.done.load(Ordering::Relaxed);
                let total = counter.total.load(Ordering::Relaxed);
                if let Err(e) = cb.call1((done, total)) {
                    cancel.store(true, Ordering::SeqCst);
                    interrupted = Some(e);
                }
            }
            if finished {
                break;
            }
        }
        let result = py.detach(|| handle.join());
        let result = match result {
            Ok(r) => r,
            Err(_) => {
                return Err(WeightcastError::new_err(
                    "internal error: the conversion thread panicked",
                ))
            }
        };
        // The rule at the commit point: an interruption the work saw before it committed
        // (renamed its output into place) stopped it, and nothing was written. One that came
        // after the work had finished cannot undo it: it is still raised, saying so.
        match (interrupted, result) {
            (Some(e), Ok(_)) if e.is_instance_of::<PyKeyboardInterrupt>(py) => {
                Err(PyKeyboardInterrupt::new_err(
                    "interrupted after the work had finished: its output, if any, was written \
                     completely",
                ))
            }
            (Some(e), _) => Err(e),
            (None, r) => r.map_err(to_py),
        }
    })
}

/// Rules as (kind, value) pairs in order: keep, only, rule, rules (a file), preset.
fn rule_args(rules: Vec<(String, String)>) -> PyResult<Vec<RuleArg>> {
    rules
        .into_iter()
        .map(|(k, v)| {
            Ok(match k.as_str() {
                "keep" => RuleArg::Keep(v),
                "only" => RuleArg::Only(v),
                "rule" => RuleArg::Rule(v),
                "rules" => RuleArg::Rules(PathBuf::from(v)),
                "preset" => RuleArg::Preset(v),
                _ => return Err(UsageError::new_err(format!("unknown rule kind `{k}`"))),
            })
        })
        .collect()
}

/// `max_shard_size=` as bytes (`"5GB"`, `"500MB"`, a number).
fn shard_size(s: Option<String>) -> PyResult<Option<u64>> {
    s.as_deref()
        .map(weightcast::output::parse_size)
        .transpose()
        .map_err(to_py)
}

fn parse_overflow(s: &str) -> PyResult<OnOverflow> {
    s.parse::<OnOverflow>().map_err(|_| {
        UsageError::new_err(format!(
            "on_overflow={s:?}: use error, keep, clamp or allow"
        ))
    })
}

/// The torch name of a dtype as `convert` spells it (`f16`, `float16`, `bf16`, ...): one parser
/// for every front end.
#[pyfunction]
fn torch_dtype_name(text: &str) -> PyResult<&'static str> {
    let d: weightcast::DType = text.parse().map_err(to_py)?;
    Ok(d.torch_name())
}

/// A document as JSON text, with the warnings for the user in its `_warnings` list (the
/// Python layer issues and removes it).
fn with_warnings(doc: &impl serde::Serialize, warnings: &[String]) -> Result<String, Error> {
    let mut v = serde_json::to_value(doc)
        .map_err(|e| Error::Usage(format!("the result cannot be written as JSON: {e}")))?;
    v["_warnings"] = serde_json::json!(warnings);
    Ok(v.to_string())
}

/// `inspect --json` as text.
#[pyfunction]
#[pyo3(signature = (path, key=None))]
fn inspect(py: Python<'_>, path: PathBuf, key: Option<String>) -> PyResult<String> {
    run(py, None, |_, _| {
        let cat = weightcast::formats::open_with(&path, key.as_deref())?;
        with_warnings(&weightcast::commands::inspect::inspect(&cat), &cat.notes)
    })
}

/// `convert --json` (`--dry-run` when `dry_run`) as text.
#[pyfunction]
#[pyo3(signature = (src, dst, to, rules, on_overflow, max_underflow, auto, max_shard_size,
    key, inference, strip_prefix, dry_run, force, progress, cast_optimizer, strict,
    on_quantized, scale, scale_format, sync, strict_rules, part=None, state_dict_only=false,
    allow=Vec::new(), allow_files=Vec::new()))]
#[allow(clippy::too_many_arguments)]
fn convert(
    py: Python<'_>,
    src: PathBuf,
    dst: PathBuf,
    to: Option<String>,
    rules: Vec<(String, String)>,
    on_overflow: &str,
    max_underflow: Option<f64>,
    auto: Option<f64>,
    max_shard_size: Option<String>,
    key: Option<String>,
    inference: bool,
    strip_prefix: Option<String>,
    dry_run: bool,
    force: bool,
    progress: Option<Bound<'_, PyAny>>,
    cast_optimizer: bool,
    strict: bool,
    on_quantized: &str,
    scale: Option<String>,
    scale_format: Option<&str>,
    sync: bool,
    strict_rules: bool,
    part: Option<String>,
    state_dict_only: bool,
    allow: Vec<String>,
    allow_files: Vec<PathBuf>,
) -> PyResult<String> {
    let mut req = ConvertRequest::new(src, dst);
    req.allow = weightcast::audit::Allow::with_files(allow, &allow_files).map_err(to_py)?;
    req.caller = Caller::Python;
    req.dry_run = dry_run;
    req.to = to;
    req.rules = rule_args(rules)?;
    req.strict_rules = strict_rules;
    req.on_overflow = parse_overflow(on_overflow)?;
    req.max_underflow = max_underflow;
    req.auto = auto;
    req.max_shard_size = shard_size(max_shard_size)?;
    req.key = key;
    req.inference = inference;
    req.state_dict_only = state_dict_only;
    req.strip_prefix = strip_prefix;
    req.force = force;
    req.cast_optimizer = cast_optimizer;
    req.strict = strict;
    req.on_quantized = on_quantized
        .parse()
        .map_err(|e| UsageError::new_err(format!("on_quantized: {e}")))?;
    req.scale = scale;
    req.scale_format = scale_format.map(str::to_string);
    req.sync = sync;
    req.part = part
        .as_deref()
        .map(str::parse::<weightcast::convert::Part>)
        .transpose()
        .map_err(to_py)?;
    run(py, progress.as_ref(), move |cancel, counter| {
        req.cancel = Some(cancel.clone());
        let (doc, warnings) = req.run(counter)?;
        with_warnings(&doc, &warnings)
    })
}

/// `analyze --json` as text (the HTML report written when `report` is given).
#[pyfunction]
#[pyo3(signature = (path, to, rules, key, scale, scale_format, lossy_below, report, progress))]
#[allow(clippy::too_many_arguments)]
fn analyze(
    py: Python<'_>,
    path: PathBuf,
    to: Option<String>,
    rules: Vec<(String, String)>,
    key: Option<String>,
    scale: Option<String>,
    scale_format: &str,
    lossy_below: f64,
    report: Option<PathBuf>,
    progress: Option<Bound<'_, PyAny>>,
) -> PyResult<String> {
    let req = AnalyzeRequest {
        input: path,
        to,
        rules: rule_args(rules)?,
        strict_rules: false,
        key,
        scale,
        scale_format: scale_format.to_string(),
        lossy_below,
        report,
        caller: Caller::Python,
    };
    run(py, progress.as_ref(), move |_, counter| {
        let a = req.run(counter)?;
        with_warnings(&a.doc(), &a.warnings)
    })
}

/// `diff --json` as text.
#[pyfunction]
#[pyo3(signature = (a, b, tolerance=None))]
fn diff(py: Python<'_>, a: PathBuf, b: PathBuf, tolerance: Option<f64>) -> PyResult<String> {
    let req = DiffRequest { a, b, tolerance };
    run(py, None, move |_, _| {
        let d = req.run()?;
        with_warnings(&req.doc(&d), &d.warnings)
    })
}

/// `audit --json` as text.
#[pyfunction]
#[pyo3(signature = (paths, strict=false, allow=Vec::new(), allow_files=Vec::new()))]
fn audit(
    py: Python<'_>,
    paths: Vec<PathBuf>,
    strict: bool,
    allow: Vec<String>,
    allow_files: Vec<PathBuf>,
) -> PyResult<String> {
    let allow = weightcast::audit::Allow::with_files(allow, &allow_files).map_err(to_py)?;
    let req = AuditRequest {
        paths,
        strict,
        allow,
    };
    run(py, None, move |_, _| {
        let doc = req.run().doc();
        serde_json::to_string(&doc)
            .map_err(|e| Error::Usage(format!("the result cannot be written as JSON: {e}")))
    })
}

/// A state dict read and planned for loading into memory: call [`Loader::fill`] to get its
/// buffers, [`Loader::views`] for the tensors on them.
#[pyclass(module = "weightcast._weightcast")]
struct Loader {
    cat: weightcast::Catalogue,
    plan: weightcast::Plan,
    mem: weightcast::load::MemoryLayout,
    on_overflow: OnOverflow,
    warnings: Vec<String>,
}

/// A new bytearray of `n` bytes left uninitialised: every byte is written by the conversion
/// before Python sees it (`PyByteArray::new_with` would zero it first: a second pass over
/// the whole model, measured at a third of `load`'s time).
fn uninit_bytearray(py: Python<'_>, n: isize) -> PyResult<Bound<'_, PyByteArray>> {
    // SAFETY: a NULL source with a length asks CPython for a fresh, uninitialised buffer of
    // that length; the result is a new reference (or NULL with an exception set), which
    // `assume_owned_or_err` takes over.
    unsafe {
        let ptr = pyo3::ffi::PyByteArray_FromStringAndSize(std::ptr::null(), n);
        Ok(Bound::from_owned_ptr_or_err(py, ptr)?.cast_into_unchecked())
    }
}

/// Raw pointers into bytearrays the calling thread keeps alive while the work runs.
struct Dest(Vec<(*mut u8, usize)>);
// SAFETY: the bytearrays outlive the work (the caller holds them until `run` returns) and
// nothing else writes to them meanwhile: they were created here and not yet handed out.
unsafe impl Send for Dest {}

#[pymethods]
impl Loader {
    /// Opens `path` and plans it: `dtype` None keeps every tensor as stored.
    #[new]
    #[pyo3(signature = (path, dtype, rules, key, on_overflow, strip_prefix))]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        dtype: Option<String>,
        rules: Vec<(String, String)>,
        key: Option<String>,
        on_overflow: &str,
        strip_prefix: Option<String>,
    ) -> PyResult<Loader> {
        let req = LoadRequest {
            input: path,
            dtype,
            rules: rule_args(rules)?,
            key,
            on_overflow: parse_overflow(on_overflow)?,
            strip_prefix,
            caller: Caller::Python,
        };
        run(py, None, move |_, _| {
            let l = req.prepare()?;
            Ok(Loader {
                cat: l.cat,
                plan: l.plan,
                mem: l.mem,
                on_overflow: req.on_overflow,
                warnings: l.warnings,
            })
        })
    }

    /// Warnings for the user.
    #[getter]
    fn warnings(&self) -> Vec<String> {
        self.warnings.clone()
    }

    /// The tensors: (name, buffer, dtype, shape, strides, offset in elements).
    #[allow(clippy::type_complexity)]
    fn views(&self) -> Vec<(String, usize, &'static str, Vec<u64>, Vec<u64>, u64)> {
        self.mem
            .views
            .iter()
            .map(|v| {
                (
                    v.name.clone(),
                    v.buffer,
                    v.dtype.safetensors_name(),
                    v.shape.clone(),
                    v.strides.clone(),
                    v.offset,
                )
            })
            .collect()
    }

    /// Converts every buffer into a new bytearray; returns them (index = view's buffer) and
    /// the clamp report.
    #[pyo3(signature = (progress=None))]
    #[allow(clippy::type_complexity)]
    fn fill<'py>(
        &self,
        py: Python<'py>,
        progress: Option<Bound<'py, PyAny>>,
    ) -> PyResult<(Vec<Bound<'py, PyByteArray>>, Vec<(String, u64)>)> {
        let arrays: Vec<Bound<'py, PyByteArray>> = self
            .mem
            .buffers
            .iter()
            .map(|b| {
                let n = isize::try_from(b.nbytes)
                    .map_err(|_| UsageError::new_err("a tensor too large for this machine"))?;
                uninit_bytearray(py, n)
            })
            .collect::<PyResult<_>>()?;
        let dest = Dest(
            arrays
                .iter()
                // SAFETY: a fresh bytearray of its length; only this call writes to it.
                .map(|a| (a.data(), a.len()))
                .collect(),
        );

        let clamped = run(py, progress.as_ref(), |cancel, counter| {
            let dest = dest;
            let mut bufs: Vec<&mut [u8]> = dest
                .0
                .iter()
                // SAFETY: see `Dest`: distinct live bytearrays of these lengths.
                .map(|&(p, n)| unsafe {
                    if n == 0 {
                        &mut [][..]
                    } else {
                        std::slice::from_raw_parts_mut(p, n)
                    }
                })
                .collect();
            let opts = Options {
                cancel: Some(cancel.clone()),
                on_overflow: self.on_overflow,
                ..Options::default()
            };
            weightcast::convert::convert_into(
                &self.cat, &self.plan, &self.mem, &mut bufs, &opts, counter,
            )
        })?;
        Ok((arrays, clamped))
    }
}

/// The bytes of the tensors `weightcast.save` was given, one after another, read where they
/// are: raw pointers into buffers that the calling frame holds (and nothing writes) until the
/// work returns.
#[derive(Debug)]
struct Borrowed {
    /// (address, length) of each tensor's bytes, in order.
    parts: Vec<(usize, usize)>,
    /// Where each part starts in the virtual file.
    starts: Vec<u64>,
    len: u64,
}

impl weightcast::remote::RangeRead for Borrowed {
    fn len(&self) -> u64 {
        self.len
    }
    fn read_exact_at(&self, buf: &mut [u8], pos: u64) -> Result<(), Error> {
        let end = pos
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.len)
            .ok_or_else(|| Error::usage("a read past the tensors given"))?;
        let mut i = self.starts.partition_point(|&s| s <= pos).saturating_sub(1);
        let mut at = pos;
        while at < end {
            let (addr, n) = self.parts[i];
            let off = (at - self.starts[i]) as usize;
            let take = (n - off).min((end - at) as usize);
            let dst = (at - pos) as usize;
            // SAFETY: `addr..addr + n` is a live buffer of `n` bytes (see `Borrowed`), and
            // `off + take <= n`.
            let src = unsafe { std::slice::from_raw_parts((addr as *const u8).add(off), take) };
            buf[dst..dst + take].copy_from_slice(src);
            at += take as u64;
            i += 1;
        }
        Ok(())
    }
    fn check_unchanged(&self) -> Result<(), Error> {
        Ok(())
    }
}

/// A tensor given to `save`: (name, dtype, shape, address, byte length, owner).
type GivenTensor<'py> = (String, String, Vec<u64>, usize, usize, Bound<'py, PyAny>);

/// The tensors given, described for the core, with their bytes as one [`Borrowed`] file, and
/// their owners (to hold until the work is over).
#[allow(clippy::type_complexity)]
fn borrow<'py>(
    tensors: Vec<GivenTensor<'py>>,
) -> PyResult<(
    Vec<Bound<'py, PyAny>>,
    Vec<weightcast::formats::memory::MemoryTensor>,
    std::sync::Arc<Borrowed>,
)> {
    let mut held = Vec::with_capacity(tensors.len());
    let mut described = Vec::with_capacity(tensors.len());
    let (mut parts, mut starts, mut len) = (Vec::new(), Vec::new(), 0u64);
    for (name, dtype, shape, addr, n, owner) in tensors {
        if addr == 0 && n > 0 {
            return Err(UsageError::new_err(format!("`{name}`: no data address")));
        }
        described.push(weightcast::formats::memory::MemoryTensor {
            name,
            dtype: dtype.parse().map_err(to_py)?,
            shape,
            nbytes: n as u64,
        });
        parts.push((addr, n));
        starts.push(len);
        len += n as u64;
        held.push(owner);
    }
    Ok((
        held,
        described,
        std::sync::Arc::new(Borrowed { parts, starts, len }),
    ))
}

/// The plan of tensors in memory (a module's state dict): `convert --dry-run --json`'s
/// document for them, with the data checks of a dry run (the overflow refusal, the tensors
/// `on_overflow="keep"` keeps). `classes[i]` is the class of the module holding tensor `i`,
/// for `class:` and `kind:` rules. A rules file's factors are in the rows (`scale`, `form`)
/// and its `config.json` edits in `config`, for the caller to apply.
#[pyfunction]
#[pyo3(signature = (tensors, classes, to, rules, on_overflow))]
fn plan_memory(
    py: Python<'_>,
    tensors: Vec<GivenTensor<'_>>,
    classes: Vec<Option<String>>,
    to: Option<String>,
    rules: Vec<(String, String)>,
    on_overflow: &str,
) -> PyResult<String> {
    use weightcast::formats::memory::catalogue;
    let (held, described, bytes) = borrow(tensors)?;
    let mut req = ConvertRequest::new(
        PathBuf::from("<module>"),
        PathBuf::from("module.safetensors"),
    );
    req.caller = Caller::Python;
    req.to = to;
    req.rules = rule_args(rules)?;
    req.on_overflow = parse_overflow(on_overflow)?;
    req.dry_run = true;
    // the module's config is edited in memory, by the caller, from the plan's `config`
    req.memory = true;
    let label = req.input.clone();
    let result = run(py, None, move |_, counter| {
        let mut cat = catalogue(&label, &described, vec![], bytes)?;
        for (t, c) in cat.tensors.iter_mut().zip(classes) {
            t.module_class = c;
        }
        let p = req.prepare_from(Some(cat), counter)?;
        let doc = weightcast::commands::document::PlanDoc::new(
            &p.cat,
            &p.plan,
            &weightcast::output::Layout::default(),
        );
        with_warnings(&doc, &p.warnings)
    });
    drop(held);
    result
}

/// `weightcast.save`: tensors given as (name, dtype, shape, address, byte length, owner)
/// streamed from their memory through the cast into `dst` (a `convert` whose input is the
/// tensors). `owner` is the object whose memory `address` points into (a contiguous CPU
/// tensor or array): held here until the work is over.
#[pyfunction]
#[pyo3(signature = (dst, tensors, metadata, to, rules, on_overflow, max_shard_size, force,
    progress))]
#[allow(clippy::too_many_arguments)]
fn save(
    py: Python<'_>,
    dst: PathBuf,
    tensors: Vec<GivenTensor<'_>>,
    metadata: Vec<(String, String)>,
    to: Option<String>,
    rules: Vec<(String, String)>,
    on_overflow: &str,
    max_shard_size: Option<String>,
    force: bool,
    progress: Option<Bound<'_, PyAny>>,
) -> PyResult<String> {
    use weightcast::formats::memory::catalogue;
    let (held, described, bytes) = borrow(tensors)?;
    let mut req = ConvertRequest::new(PathBuf::from("<tensors given to weightcast.save>"), dst);
    req.caller = Caller::Python;
    req.to = to;
    req.rules = rule_args(rules)?;
    req.on_overflow = parse_overflow(on_overflow)?;
    req.max_shard_size = shard_size(max_shard_size)?;
    req.force = force;
    let label = req.input.clone();
    let result = run(py, progress.as_ref(), move |cancel, counter| {
        req.cancel = Some(cancel.clone());
        let cat = catalogue(&label, &described, metadata, bytes)?;
        let (doc, warnings) = req.run_from(Some(cat), counter)?;
        with_warnings(&doc, &warnings)
    });
    // The buffers are released only now that the work (and every read of them) is over.
    drop(held);
    result
}

/// The `weightcast` command line (`argv`, program name first), run in this process: the same
/// library the `weightcast` binary runs, with its output, progress bars and exit code. The GIL
/// is released throughout; the command installs its own Ctrl-C handler, as the binary does.
#[pyfunction]
fn cli_main(py: Python<'_>, argv: Vec<std::ffi::OsString>) -> u8 {
    py.detach(|| weightcast_cli::main(argv))
}

#[pymodule]
fn _weightcast(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("Error", py.get_type::<WeightcastError>())?;
    m.add("InvalidFileError", py.get_type::<InvalidFileError>())?;
    m.add("RefusedError", py.get_type::<RefusedError>())?;
    m.add("UsageError", py.get_type::<UsageError>())?;
    m.add_function(wrap_pyfunction!(inspect, m)?)?;
    m.add_function(wrap_pyfunction!(convert, m)?)?;
    m.add_function(wrap_pyfunction!(analyze, m)?)?;
    m.add_function(wrap_pyfunction!(diff, m)?)?;
    m.add_function(wrap_pyfunction!(audit, m)?)?;
    m.add_function(wrap_pyfunction!(save, m)?)?;
    m.add_function(wrap_pyfunction!(plan_memory, m)?)?;
    m.add_function(wrap_pyfunction!(torch_dtype_name, m)?)?;
    m.add_function(wrap_pyfunction!(cli_main, m)?)?;
    m.add_class::<Loader>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
