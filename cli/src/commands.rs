//! What each subcommand does with the library.

use std::io::IsTerminal;
/// A process exit code.
pub(crate) type ExitCode = u8;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use weightcast::convert::{self, Progress};
use weightcast::output::parse_size;
use weightcast::plan::Scope;
use weightcast::{formats, DType, Error, Plan};

use weightcast::analysis;
use weightcast::stats::Bounds;

use crate::cli::{AnalyzeArgs, Args, Command, ConvertArgs, DiffArgs};
use crate::{html, report};
use weightcast::job::ConvertRequest;
pub(crate) use weightcast::job::{build_rules, is_pt, single_target, RuleArg};

pub fn run(args: Args) -> Result<ExitCode> {
    match args.cli.command {
        Command::Inspect { path, key, json } => {
            let cat = open(&path, key.as_deref())?;
            if let Some(n) = cat.torch.as_deref().and_then(formats::torch::tied_note) {
                warn(&n);
            }
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report::inspect_json(&cat))?
                );
            } else {
                print!("{}", report::inspect_text(&cat));
            }
            Ok(0)
        }
        Command::Audit {
            paths,
            strict,
            json,
            format,
        } => audit_cmd(&paths, strict, if json { "json" } else { &format }),
        Command::Convert(c) => convert_cmd(c, &args.rule_order),
        Command::Analyze(a) => analyze_cmd(a, &args.rule_order),
        Command::Diff(d) => diff_cmd(d),
        #[cfg(feature = "eval")]
        Command::Eval(e) => crate::eval_cmd::eval_cmd(e, &args.rule_order),
        #[cfg(not(feature = "eval"))]
        Command::Eval(_) => Err(Error::usage(
            "eval: this weightcast was built without the `eval` feature (candle)",
        )
        .into()),
    }
}

/// A progress bar on stderr when it is a terminal and output is for a person.
pub(crate) fn bar(show: bool, what: &str) -> Bar {
    let bar = ProgressBar::hidden();
    if show && std::io::stderr().is_terminal() {
        bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(
                "{msg} {spinner} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("template")
            .progress_chars("=> "),
        );
    }
    bar.set_message(what.to_string());
    Bar(bar)
}

/// What `analyze` measured, and what the user should be told.
pub(crate) struct Analyzed {
    pub cat: weightcast::Catalogue,
    pub plan: Plan,
    pub analyses: Vec<analysis::TensorAnalysis>,
    pub bounds: Bounds,
    pub warnings: Vec<String>,
}

/// Plans `input` as `analyze` does and measures every tensor's cast, worst first.
#[allow(clippy::too_many_arguments)]
pub(crate) fn analyze_run(
    input: &std::path::Path,
    key: Option<&str>,
    to: Option<&str>,
    order: &[RuleArg],
    strict_rules: bool,
    scale: Option<&str>,
    scale_format: &str,
    lossy_below: f64,
    progress: &dyn Progress,
) -> Result<Analyzed, Error> {
    let (rules, file_to) = build_rules(order)?;
    let target = single_target(to, file_to)?;
    let mut cat = formats::open_with(input, key)?;
    let mut warnings = cat.notes.clone();
    let mut plan = Plan::new(&cat, &rules, target);
    if let Some(scale) = scale {
        use weightcast::quant::quantize::{plan_scaled, Format, Scheme};
        let scheme = Scheme::parse(scale, scale_format.parse::<Format>()?)?;
        if target != DType::F8E4M3 {
            return Err(Error::usage(format!(
                "--scale {scale} measures float8_e4m3fn weights: use it with --to f8e4m3"
            )));
        }
        plan_scaled(&mut cat, &mut plan, &scheme)?;
    }
    warnings.extend(plan.warnings.iter().cloned());
    weightcast::job::check_unmatched(&plan, strict_rules)?;
    let bounds = Bounds {
        lossy_below_db: lossy_below,
        ..Bounds::default()
    };
    let mut analyses = analysis::analyze(&cat, &plan, &bounds, progress, None)?;
    analysis::worst_first(&mut analyses);
    Ok(Analyzed {
        cat,
        plan,
        analyses,
        bounds,
        warnings,
    })
}

fn analyze_cmd(a: AnalyzeArgs, order: &[RuleArg]) -> Result<ExitCode> {
    let progress = bar(!a.json, "analyzing");
    let r = analyze_run(
        &a.input,
        a.key.as_deref(),
        a.to.as_deref(),
        order,
        a.rules.strict_rules,
        a.scale.as_deref(),
        &a.scale_format,
        a.lossy_below,
        &progress,
    );
    progress.0.finish_and_clear();
    let Analyzed {
        cat,
        plan,
        analyses,
        bounds,
        warnings,
    } = r?;
    for w in &warnings {
        warn(w);
    }
    if let Some(path) = &a.report {
        let page = html::analysis_page(&cat, &plan, &analyses, &bounds);
        write_atomic(path, page.as_bytes())?;
    }
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report::analysis_json(&cat, &plan, &analyses, &bounds))?
        );
    } else {
        print!("{}", report::analysis_text(&cat, &plan, &analyses, a.all));
        if let Some(p) = &a.report {
            println!("report: {}", p.display());
        }
    }
    Ok(0)
}

/// Writes a small file atomically (temp file beside it, then rename).
pub(crate) fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> Result<(), Error> {
    use std::io::Write;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".weightcast-")
        .tempfile_in(dir)
        .map_err(|e| Error::io(dir, e))?;
    tmp.write_all(bytes).map_err(|e| Error::io(path, e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

fn diff_cmd(d: DiffArgs) -> Result<ExitCode> {
    let a = open(&d.a, None)?;
    let b = open(&d.b, None)?;
    let diff = weightcast::diff::diff(&a, &b)?;
    let failures = report::diff_failures(&diff, d.tolerance);
    if d.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report::diff_json(
                &d.a,
                &d.b,
                &diff,
                d.tolerance,
                &failures
            ))?
        );
    } else {
        print!(
            "{}",
            report::diff_text(&diff, d.tolerance, &failures, d.all)
        );
    }
    Ok(if failures.is_empty() { 0 } else { 1 })
}

pub(crate) fn warn(msg: &str) {
    eprintln!("weightcast: warning: {}", report::one_line(msg));
}

/// Opens an input and reports what reading it found (tensors left out, dangerous globals).
pub(crate) fn open(
    path: &std::path::Path,
    key: Option<&str>,
) -> Result<weightcast::Catalogue, Error> {
    let cat = formats::open_with(path, key)?;
    for n in &cat.notes {
        warn(n);
    }
    Ok(cat)
}

/// What audit found in one file.
pub(crate) struct Audited {
    path: std::path::PathBuf,
    /// The scan, or why the file could not be read.
    scan: Result<weightcast::formats::torch_container::Scan, String>,
    /// (shown name, class, the pickle it is in), worst first.
    globals: Vec<(String, weightcast::audit::Class, String)>,
}

impl Audited {
    /// dangerous (or ambiguous), unreadable, incomplete, other, clean.
    fn verdict(&self) -> &'static str {
        use weightcast::audit::Class;
        let dangerous = self.globals.iter().any(|g| g.1 == Class::Dangerous);
        match &self.scan {
            _ if dangerous => "dangerous",
            Ok(s) if !s.ambiguities.is_empty() => "dangerous",
            Err(_) => "unreadable",
            Ok(s) if s.incomplete.is_some() => "incomplete",
            _ if self.globals.iter().any(|g| g.1 == Class::Other) => "other",
            _ => "clean",
        }
    }
}

fn audit_cmd(paths: &[std::path::PathBuf], strict: bool, format: &str) -> Result<ExitCode> {
    if !matches!(format, "text" | "json" | "sarif") {
        return Err(Error::usage(format!("--format {format}: use text, json or sarif")).into());
    }
    let (reports, nothing, code) = audit_scan(paths, strict);
    match format {
        "json" => println!(
            "{}",
            serde_json::to_string_pretty(&audit_json(&reports, &nothing, strict, code))?
        ),
        "sarif" => print_audit_sarif(&reports, strict)?,
        _ => print_audit_text(&reports, &nothing),
    }
    Ok(code)
}

/// What `audit` found in each file (recursing into folders), the files without a pickle,
/// and the exit code.
#[allow(clippy::type_complexity)]
pub(crate) fn audit_scan(
    paths: &[std::path::PathBuf],
    strict: bool,
) -> (Vec<Audited>, Vec<(std::path::PathBuf, &'static str)>, u8) {
    let mut reports = Vec::new();
    let mut nothing = Vec::new();
    for p in audit_files(paths) {
        use weightcast::formats::sniff::Kind;
        use weightcast::formats::torch_container as tc;
        let kind = match weightcast::formats::sniff::sniff_path(&p) {
            Ok(k) => k,
            Err(e) => {
                reports.push(Audited {
                    path: p,
                    scan: Err(e.to_string()),
                    globals: vec![],
                });
                continue;
            }
        };
        // Formats without a pickle have nothing to run; anything else (zip, pickle, npy,
        // unknown) is read as the loaders that would open it read it. A safetensors file whose
        // first bytes also start a pickle, a zip or a tar is read as torch.load would read it
        // too: if that reading finds a global, the file is a polyglot and is judged by it.
        let scan = match kind {
            Kind::Safetensors => {
                let head = std::fs::File::open(&p).ok().map(|f| {
                    let mut b = Vec::with_capacity(weightcast::formats::sniff::HEAD);
                    let limit = weightcast::formats::sniff::HEAD as u64;
                    let _ = std::io::Read::read_to_end(&mut std::io::Read::take(f, limit), &mut b);
                    b
                });
                let torch_reads = head
                    .as_deref()
                    .is_some_and(|h| weightcast::formats::sniff::by_magic(h, 1).is_torch());
                match torch_reads.then(|| tc::scan(&p)) {
                    Some(Ok(s)) if s.pickles.iter().any(|pk| !pk.globals.is_empty()) => Ok(s),
                    _ => {
                        nothing.push((p, kind.describe()));
                        continue;
                    }
                }
            }
            k if k.runs_nothing() => {
                nothing.push((p, k.describe()));
                continue;
            }
            Kind::Compressed(c) => tc::scan_compressed(&p, c),
            _ => tc::scan(&p),
        }
        .map_err(|e| e.to_string());
        let mut globals: Vec<(String, weightcast::audit::Class, String)> = Vec::new();
        for pk in scan.iter().flat_map(|s| &s.pickles) {
            for (name, class) in pk.judged() {
                if !globals.iter().any(|g| g.0 == name) {
                    globals.push((name, class, pk.label.clone()));
                }
            }
        }
        globals.sort_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(&b.0)));
        reports.push(Audited {
            path: p,
            scan,
            globals,
        });
    }
    let verdicts: Vec<&str> = reports.iter().map(Audited::verdict).collect();
    // 1: something dangerous (with --strict: anything not allowlisted); 2: a file could not be
    // read to its end; 0: nothing to fear in what was read.
    let code = if verdicts
        .iter()
        .any(|v| *v == "dangerous" || (strict && *v == "other"))
    {
        1
    } else if verdicts
        .iter()
        .any(|v| matches!(*v, "unreadable" | "incomplete"))
    {
        2
    } else {
        0
    };
    (reports, nothing, code)
}

/// SARIF 2.1.0: one result per dangerous (error) or unlisted (warning; error with --strict)
/// global occurrence, with the file and the byte offset of the opcode that names it; one per
/// ambiguity (error) and per file not read to its end (warning).
fn print_audit_sarif(reports: &[Audited], strict: bool) -> Result<()> {
    use weightcast::audit::Class;
    let mut results = Vec::new();
    let loc = |path: &std::path::Path, offset: Option<u64>| {
        let mut l =
            json!({"physicalLocation": {"artifactLocation": {"uri": path.display().to_string()}}});
        if let Some(o) = offset {
            l["physicalLocation"]["region"] = json!({"byteOffset": o});
        }
        l
    };
    for r in reports {
        let scan = match &r.scan {
            Ok(s) => s,
            Err(e) => {
                results.push(json!({"ruleId": "unreadable", "level": "warning",
                    "message": {"text": e}, "locations": [loc(&r.path, None)]}));
                continue;
            }
        };
        for pk in &scan.pickles {
            for f in pk.findings() {
                let (rule, level) = match f.class {
                    Class::Dangerous => ("dangerous-global", "error"),
                    Class::Other if strict => ("unlisted-global", "error"),
                    Class::Other => ("unlisted-global", "warning"),
                    Class::Allowed => continue,
                };
                results.push(json!({"ruleId": rule, "level": level,
                    "message": {"text": format!("{} global `{}` ({} in {}{})", f.class.as_str(), f.name, f.opcode, pk.label,
                        if f.called { ", called" } else { ", named only" })},
                    "locations": [loc(&r.path, Some(f.offset))]}));
            }
        }
        for a in &scan.ambiguities {
            results.push(json!({"ruleId": "ambiguous-container", "level": "error",
                "message": {"text": a}, "locations": [loc(&r.path, None)]}));
        }
        if let Some(i) = &scan.incomplete {
            results.push(json!({"ruleId": "incomplete", "level": "warning",
                "message": {"text": i}, "locations": [loc(&r.path, None)]}));
        }
    }
    let rule = |id: &str, text: &str| json!({"id": id, "shortDescription": {"text": text}});
    let sarif = json!({
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {"name": "weightcast", "version": env!("CARGO_PKG_VERSION"),
                "rules": [
                    rule("dangerous-global", "A pickle names a global that runs code, touches files, processes or the network, or is not a Python name"),
                    rule("unlisted-global", "A pickle names a global outside torch's weights-only allowlist"),
                    rule("ambiguous-container", "The file reads differently in different readers"),
                    rule("incomplete", "The file could not be read to its end: never clean"),
                    rule("unreadable", "The file could not be read"),
                ]}},
            "results": results,
        }],
    });
    println!("{}", serde_json::to_string_pretty(&sarif)?);
    Ok(())
}

/// `audit --json`'s document.
pub(crate) fn audit_json(
    reports: &[Audited],
    nothing: &[(std::path::PathBuf, &str)],
    strict: bool,
    code: u8,
) -> serde_json::Value {
    use weightcast::audit::Class;
    let v: Vec<_> = reports
        .iter()
        .map(|r| {
            let of = |c: Class| {
                r.globals
                    .iter()
                    .filter(|x| x.1 == c)
                    .map(|x| x.0.clone())
                    .collect::<Vec<_>>()
            };
            let mut j = json!({
                "path": r.path, "verdict": r.verdict(),
                "dangerous": of(Class::Dangerous), "other": of(Class::Other),
                "allowed": of(Class::Allowed),
            });
            match &r.scan {
                Ok(scan) => {
                    j["findings"] = json!(scan.pickles.iter().flat_map(|k| k.findings().into_iter().map(move |f| json!({
                        "name": f.name, "class": f.class.as_str(), "offset": f.offset,
                        "opcode": f.opcode, "called": f.called, "pickle": k.label,
                    }))).collect::<Vec<_>>());
                    j["container"] = json!(scan.container);
                    j["pickles"] = json!(scan.pickles.iter().map(|k| json!({
                        "label": k.label, "offset": k.offset,
                        "globals": k.judged().into_iter().map(|(n, c)| json!({"name": n, "class": c.as_str()})).collect::<Vec<_>>(),
                    })).collect::<Vec<_>>());
                    j["stops"] = json!(scan.stops);
                    j["ambiguities"] = json!(scan.ambiguities);
                    j["incomplete"] = json!(scan.incomplete);
                }
                Err(e) => j["error"] = json!(e),
            }
            j
        })
        .collect();
    let none: Vec<_> = nothing
        .iter()
        .map(|(p, w)| json!({"path": p, "format": w, "verdict": "no pickle"}))
        .collect();
    let dangerous = reports.iter().any(|r| r.verdict() == "dangerous");
    json!({"files": v, "no_pickle": none,
        "dangerous": dangerous, "strict": strict, "failed": code == 1, "exit_code": code})
}

fn print_audit_text(reports: &[Audited], nothing: &[(std::path::PathBuf, &str)]) {
    use weightcast::audit::Class;
    for (p, what) in nothing {
        println!(
            "{}: {what}: no pickle, nothing to run",
            report::one_line(&p.display().to_string())
        );
    }
    for r in reports {
        let path = report::one_line(&r.path.display().to_string());
        let scan = match &r.scan {
            Ok(s) => s,
            Err(e) => {
                println!("{path}: unreadable: {}", report::one_line(e));
                continue;
            }
        };
        let d = r.globals.iter().filter(|x| x.1 == Class::Dangerous).count();
        println!(
            "{path}: {}: {}, {} pickle(s) a loader would unpickle; {} globals, {} dangerous{}",
            r.verdict(),
            scan.container,
            scan.pickles.len(),
            r.globals.len(),
            d,
            if scan.ambiguities.is_empty() {
                String::new()
            } else {
                format!(", {} ambiguities", scan.ambiguities.len())
            }
        );
        for a in &scan.ambiguities {
            println!("  ambiguous  {}", report::one_line(a));
        }
        for (name, c, label) in &r.globals {
            if *c == Class::Dangerous && scan.pickles.len() > 1 {
                println!("  {:<9}  {name}  (in {label})", c.as_str());
            } else {
                println!("  {:<9}  {name}", c.as_str());
            }
        }
        if let Some(s) = &scan.stops {
            println!("  note       {s}");
        }
        if let Some(s) = &scan.incomplete {
            println!("  incomplete {}", report::one_line(s));
        }
    }
}

/// The files to audit: each path given, and every file below a folder (recursively, links not
/// followed, `.git` skipped), in name order.
/// A path that cannot be read is kept, to be reported unreadable.
fn audit_files(paths: &[std::path::PathBuf]) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut todo: Vec<std::path::PathBuf> = paths.iter().rev().cloned().collect();
    let mut given = true;
    while let Some(p) = todo.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            out.push(p);
            continue;
        };
        let is_dir = if meta.file_type().is_symlink() {
            // Hugging Face cache snapshots are links to blobs: follow links to files.
            std::fs::metadata(&p).map(|m| m.is_dir()).unwrap_or(false) && given
        } else {
            meta.is_dir()
        };
        if is_dir {
            let Ok(dir) = std::fs::read_dir(&p) else {
                out.push(p);
                continue;
            };
            let mut entries: Vec<_> = dir
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|e| e.file_name().is_some_and(|n| n != ".git"))
                .collect();
            entries.sort();
            todo.extend(entries.into_iter().rev());
        } else {
            out.push(p);
        }
        given = todo.len() >= paths.len();
    }
    out
}

pub(crate) struct Bar(pub(crate) ProgressBar);

impl Progress for Bar {
    fn begin(&self, bytes: u64, _tensors: usize) {
        self.0.set_length(bytes);
    }
    fn advance(&self, bytes: u64) {
        self.0.inc(bytes);
    }
    fn phase(&self, what: &str) {
        self.0.set_message(what.to_string());
        self.0.set_position(0);
    }
}

fn convert_cmd(c: ConvertArgs, order: &[RuleArg]) -> Result<ExitCode> {
    let cancel = Arc::new(AtomicBool::new(false));
    {
        let cancel = cancel.clone();
        // A second Ctrl-C while cleaning up falls through to the default (exit).
        let _ = ctrlc::set_handler(move || {
            if cancel.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
        });
    }
    match &c.batch {
        Some(file) => batch_cmd(&c, file, order, cancel),
        None => convert_one(&c, order, cancel),
    }
}

/// `--batch FILE`: every `INPUT -> OUTPUT` line converted with the same options, in order; a
/// failed line is reported and the next one runs. A malformed file is a usage error before
/// anything runs.
fn batch_cmd(
    c: &ConvertArgs,
    file: &std::path::Path,
    order: &[RuleArg],
    cancel: Arc<AtomicBool>,
) -> Result<ExitCode> {
    let text = std::fs::read_to_string(file).map_err(|e| {
        Error::usage(format!(
            "{}: cannot read the batch file: {e}",
            file.display()
        ))
    })?;
    let mut jobs = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((i, o)) = line.split_once("->") else {
            return Err(Error::usage(format!(
                "{}:{}: expected `INPUT -> OUTPUT`, got `{line}`",
                file.display(),
                n + 1
            ))
            .into());
        };
        let (i, o) = (i.trim(), o.trim());
        if i.is_empty() || o.is_empty() {
            return Err(Error::usage(format!(
                "{}:{}: an input and an output are both needed",
                file.display(),
                n + 1
            ))
            .into());
        }
        jobs.push((std::path::PathBuf::from(i), std::path::PathBuf::from(o)));
    }
    if c.json && c.dry_run {
        return Err(Error::usage(
            "--batch with --dry-run --json: plan each line alone (one JSON plan per command)",
        )
        .into());
    }
    if jobs.is_empty() {
        return Err(Error::usage(format!("{}: no `INPUT -> OUTPUT` line", file.display())).into());
    }
    let mut results = Vec::new();
    for (i, (input, output)) in jobs.iter().enumerate() {
        if cancel.load(Ordering::SeqCst) {
            break;
        }
        let mut one = c.clone();
        one.batch = None;
        one.input = Some(input.clone());
        one.output = Some(output.clone());
        if c.json {
            // One JSON document for the whole batch, below: the lines run quietly.
            one.json = false;
            one.quiet = true;
        }
        if !c.quiet && !c.json {
            eprintln!(
                "weightcast: [{}/{}] {} -> {}",
                i + 1,
                jobs.len(),
                input.display(),
                output.display()
            );
        }
        let r = convert_one(&one, order, cancel.clone());
        let error = match &r {
            Ok(code) if *code == 0 => None,
            Ok(_) => Some("interrupted".to_string()),
            Err(e) => Some(report::one_line(&e.to_string())),
        };
        if let (Some(e), false) = (&error, c.json) {
            eprintln!("weightcast: error: {e}");
        }
        results.push((input, output, error));
    }
    let failed = results.iter().filter(|r| r.2.is_some()).count();
    let skipped = jobs.len() - results.len();
    if c.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "batch": file,
                "results": results.iter().map(|(i, o, e)| json!({
                    "input": i, "output": o, "ok": e.is_none(), "error": e,
                })).collect::<Vec<_>>(),
                "converted": results.len() - failed, "failed": failed, "skipped": skipped,
            }))?
        );
    } else if !c.quiet {
        println!(
            "weightcast: batch {}: {} converted, {failed} failed{}",
            file.display(),
            results.len() - failed,
            if skipped > 0 {
                format!(", {skipped} not run (interrupted)")
            } else {
                String::new()
            }
        );
    }
    Ok(if failed > 0 || skipped > 0 { 1 } else { 0 })
}

/// Whether a local output path exists already (a run with `--force` replaces it).
pub(crate) fn output_exists(out: &std::path::Path) -> bool {
    !weightcast::remote::is_url(out) && out.symlink_metadata().is_ok()
}

/// The library's request for one `convert` command line.
fn request(c: &ConvertArgs, order: &[RuleArg], cancel: Arc<AtomicBool>) -> Result<ConvertRequest> {
    let mut r = ConvertRequest::new(c.input(), c.output());
    r.to = c.to.clone();
    r.rules = order.to_vec();
    r.strict_rules = c.rules.strict_rules;
    r.on_overflow = c.on_overflow.parse()?;
    r.max_underflow = c.max_underflow;
    r.auto = c.auto;
    r.max_shard_size = c.max_shard_size.as_deref().map(parse_size).transpose()?;
    r.key = c.key.clone();
    r.inference = c.inference;
    r.cast_optimizer = c.cast_optimizer;
    r.strict = c.strict;
    r.strip_prefix = c.strip_prefix.clone();
    r.on_quantized = c
        .on_quantized
        .parse()
        .map_err(|e| Error::usage(format!("--on-quantized {e}")))?;
    r.scale = c.scale.clone();
    r.scale_format = c.scale_format.clone();
    r.force = c.force;
    r.sync = !c.no_sync;
    r.cancel = Some(cancel);
    r.part = c.part.as_deref().map(str::parse).transpose()?;
    Ok(r)
}

fn convert_one(c: &ConvertArgs, order: &[RuleArg], cancel: Arc<AtomicBool>) -> Result<ExitCode> {
    let pt_out = is_pt(c.output());
    let person = !c.quiet && !c.json;
    let mut req = request(c, order, cancel)?;
    req.dry_run = c.dry_run;
    let progress = bar(person, "checking");
    let prepared = req.prepare(&progress);
    progress.0.finish_and_clear();
    let weightcast::job::Prepared {
        cat,
        plan,
        options: opts,
        warnings,
    } = prepared?;
    for w in &warnings {
        warn(w);
    }
    if c.dry_run {
        let layout = convert::check(&cat, &plan, c.output(), &opts)?;
        let replaces = output_exists(c.output());
        if c.json {
            let mut v = report::plan_json(&cat, &plan, &layout);
            v["dry_run"] = json!(true);
            v["output"] = json!(c.output());
            v["replaces_existing"] = json!(replaces);
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            print!("{}", report::plan_text(&cat, &plan, &layout));
            if pt_out {
                println!(
                    "writes {}: a torch.save checkpoint with {} (views and tied tensors share one \
                     converted storage)",
                    c.output().display(),
                    if plan.scope == Scope::StateDict && !plan.dropped.is_empty() {
                        "the state dict alone"
                    } else {
                        "every other value of the input kept"
                    }
                );
            }
            if replaces {
                println!(
                    "{} exists: the run replaces it (--force)",
                    c.output().display()
                );
            }
            println!("dry run: nothing written");
        }
        return Ok(0);
    }
    let progress = bar(person, "converting");
    let result = convert::convert(&cat, &plan, c.output(), &opts, &progress);
    progress.0.finish_and_clear();
    let summary = match result {
        Ok(s) => s,
        Err(Error::Interrupted) => {
            eprintln!("weightcast: interrupted: no output was written");
            return Ok(130);
        }
        Err(e) => return Err(e.into()),
    };
    print_summary(c, &cat, &plan, &summary)?;
    Ok(0)
}

/// What the summary line names as written: the output when it is what was written (a file,
/// a folder, an object prefix), else (a file output sharded by --max-shard-size) its index and
/// how many shards.
fn written_name(out: &std::path::Path, summary: &convert::Summary) -> String {
    let index = summary.layout.index.as_ref();
    match (index, out.file_name().and_then(|n| n.to_str())) {
        (Some(i), Some(name)) if name.ends_with(".safetensors") && !name.ends_with(i) => {
            let dir = out.parent().unwrap_or(std::path::Path::new(""));
            format!(
                "{} ({} shards beside it)",
                dir.join(i).display(),
                summary.layout.files.len()
            )
        }
        _ => out.display().to_string(),
    }
}

/// `convert --json`'s document for a finished conversion.
pub(crate) fn summary_json(
    cat: &weightcast::Catalogue,
    plan: &Plan,
    summary: &convert::Summary,
    output: &std::path::Path,
) -> serde_json::Value {
    let secs = summary.elapsed.as_secs_f64();
    let mut v = report::plan_json(cat, plan, &summary.layout);
    v["dry_run"] = json!(false);
    v["output"] = json!(output);
    v["written"] = json!(summary.files);
    v["files_copied"] = json!(summary.files_copied);
    v["config_dtype"] = json!(summary.config_dtype.map(|d| d.torch_name()));
    v["seconds"] = json!(secs);
    v["overflowed"] = json!(summary.overflowed);
    v["input_bytes_per_second"] = json!(summary.bytes_in as f64 / secs.max(1e-9));
    v
}

/// The warnings, the clamp report and the summary line (or JSON) of a finished conversion.
fn print_summary(
    c: &ConvertArgs,
    cat: &weightcast::Catalogue,
    plan: &Plan,
    summary: &convert::Summary,
) -> Result<()> {
    for w in &summary.warnings {
        warn(w);
    }
    if !summary.overflowed.is_empty() {
        let total: u64 = summary.overflowed.iter().map(|t| t.1).sum();
        let what = "clamped to the largest finite value";
        warn(&format!(
            "{total} values in {} tensor(s) {what}: {}",
            summary.overflowed.len(),
            summary
                .overflowed
                .iter()
                .take(5)
                .map(|(n, c)| format!("`{n}` ({c})"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let secs = summary.elapsed.as_secs_f64();
    let rate = summary.bytes_in as f64 / secs.max(1e-9);
    if c.json {
        let v = summary_json(cat, plan, summary, c.output());
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else if !c.quiet && c.part.is_some() {
        let written: Vec<String> = summary
            .files
            .iter()
            .filter_map(|f| f.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        eprintln!(
            "weightcast: part {}: {} tensors, {} -> {} in {secs:.2} s; wrote {}",
            c.part.as_deref().unwrap_or_default(),
            summary.tensors_cast + summary.tensors_kept,
            report::bytes(summary.bytes_in),
            report::bytes(summary.bytes_out),
            if written.is_empty() {
                "nothing (no shard falls to this part)".to_string()
            } else {
                written.join(", ")
            }
        );
    } else if !c.quiet {
        let casts: Vec<String> = plan
            .cast_counts()
            .into_iter()
            .map(|(d, n)| format!("{n} cast to {}", d.torch_name()))
            .collect();
        let casts = if casts.is_empty() {
            "none cast".to_string()
        } else {
            casts.join(", ")
        };
        eprintln!(
            "weightcast: {} tensors ({casts}, {} kept), {} -> {} in {:.2} s ({}/s) -> {}",
            summary.tensors_cast + summary.tensors_kept,
            summary.tensors_kept,
            report::bytes(summary.bytes_in),
            report::bytes(summary.bytes_out),
            secs,
            report::bytes(rate as u64),
            written_name(c.output(), summary)
        );
    }
    Ok(())
}
