//! What each subcommand does with the library.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use weightcast::convert::{self, Options, Progress};
use weightcast::output::parse_size;
use weightcast::plan::Scope;
use weightcast::rules::RuleSet;
use weightcast::{formats, DType, Error, Plan};

use weightcast::analysis;
use weightcast::convert::OnOverflow;
use weightcast::stats::Bounds;

use crate::cli::{AnalyzeArgs, Args, Command, ConvertArgs, DiffArgs, EvalArgs, RuleArg};
use crate::{html, report};

pub fn run(args: Args) -> Result<ExitCode> {
    match args.cli.command {
        Command::Inspect { path, key, json } => {
            let cat = open(&path, key.as_deref())?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report::inspect_json(&cat))?
                );
            } else {
                print!("{}", report::inspect_text(&cat));
            }
            Ok(ExitCode::SUCCESS)
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
        Command::Eval(e) => eval_cmd(e, &args.rule_order),
    }
}

/// A progress bar on stderr when it is a terminal and output is for a person.
fn bar(show: bool, what: &str) -> Bar {
    let bar = ProgressBar::hidden();
    if show && std::io::stderr().is_terminal() {
        bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(&format!(
                "{what} {{spinner}} [{{bar:30}}] {{bytes}}/{{total_bytes}} {{bytes_per_sec}} eta {{eta}}"
            ))
            .expect("template")
            .progress_chars("=> "),
        );
    }
    Bar(bar)
}

fn single_target(to: Option<&str>, file_to: Option<DType>) -> Result<DType, Error> {
    let target: DType = match (to, file_to) {
        (Some(t), _) if t.contains(',') => {
            return Err(Error::usage(format!(
                "--to {t}: a list of candidates needs --auto SNR_DB"
            )))
        }
        (Some(t), _) => t.parse()?,
        (None, Some(d)) => d,
        (None, None) => return Err(Error::usage("--to DTYPE is required (e.g. --to f16)")),
    };
    check_castable(target)?;
    Ok(target)
}

fn check_castable(target: DType) -> Result<(), Error> {
    if target.is_castable() {
        Ok(())
    } else {
        Err(Error::usage(format!(
            "cannot cast to {target}: choose f16, bf16, f32, f64, f8e4m3, f8e5m2, f8e4m3fnuz, f8e5m2fnuz or f8e8m0"
        )))
    }
}

fn analyze_cmd(a: AnalyzeArgs, order: &[RuleArg]) -> Result<ExitCode> {
    let (rules, file_to) = build_rules(order)?;
    let target = single_target(a.to.as_deref(), file_to)?;
    let mut cat = open(&a.input, a.key.as_deref())?;
    let mut plan = Plan::new(&cat, &rules, target);
    if let Some(scale) = &a.scale {
        use weightcast::quant::quantize::{plan_scaled, Format, Scheme};
        let scheme = Scheme::parse(scale, a.scale_format.parse::<Format>()?)?;
        if target != DType::F8E4M3 {
            return Err(Error::usage(format!(
                "--scale {scale} measures float8_e4m3fn weights: use it with --to f8e4m3"
            ))
            .into());
        }
        plan_scaled(&mut cat, &mut plan, &scheme)?;
    }
    plan_warnings(&plan, a.rules.strict_rules)?;
    let bounds = Bounds {
        lossy_below_db: a.lossy_below,
        ..Bounds::default()
    };
    let progress = bar(!a.json, "analyzing");
    let mut analyses = analysis::analyze(&cat, &plan, &bounds, &progress, None)?;
    progress.0.finish_and_clear();
    analysis::worst_first(&mut analyses);
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
    Ok(ExitCode::SUCCESS)
}

/// Writes a small file atomically (temp file beside it, then rename).
fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> Result<(), Error> {
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
    Ok(if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn warn(msg: &str) {
    eprintln!("weightcast: warning: {}", report::one_line(msg));
}

/// Opens an input and reports what reading it found (tensors left out, dangerous globals).
fn open(path: &std::path::Path, key: Option<&str>) -> Result<weightcast::Catalogue, Error> {
    let cat = formats::open_with(path, key)?;
    for n in &cat.notes {
        warn(n);
    }
    Ok(cat)
}

/// Prints the plan's warnings; with `--strict-rules`, a rule that matches nothing is an error.
fn plan_warnings(plan: &Plan, strict_rules: bool) -> Result<(), Error> {
    for w in &plan.warnings {
        warn(w);
    }
    if strict_rules && !plan.unmatched.is_empty() {
        return Err(Error::usage(format!(
            "--strict-rules: {} rule(s) match no tensor: {}",
            plan.unmatched.len(),
            plan.unmatched.join(", ")
        )));
    }
    Ok(())
}

/// What audit found in one file.
struct Audited {
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
    let mut reports = Vec::new();
    let mut nothing = Vec::new();
    for p in audit_files(paths) {
        let what = match formats::what_is(&p) {
            Ok(w) => w,
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
        // unknown) is read as the loaders that would open it read it.
        if matches!(
            what,
            "a safetensors file" | "a GGUF file" | "a JSON file" | "an empty file"
        ) || what.starts_with("a Git LFS pointer")
            || what.starts_with("not a pickle")
        {
            nothing.push((p, what));
            continue;
        }
        let scan = {
            use weightcast::formats::torch_container as tc;
            let head = std::fs::File::open(&p).ok().map(|f| {
                let mut b = Vec::with_capacity(16);
                let _ = std::io::Read::read_to_end(&mut std::io::Read::take(f, 16), &mut b);
                b
            });
            match head.as_deref().and_then(tc::compression) {
                Some(c) => tc::scan_compressed(&p, c),
                None => tc::scan(&p),
            }
            .map_err(|e| e.to_string())
        };
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
    match format {
        "json" => print_audit_json(&reports, &nothing, strict, code)?,
        "sarif" => print_audit_sarif(&reports, strict)?,
        _ => print_audit_text(&reports, &nothing),
    }
    Ok(ExitCode::from(code))
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

fn print_audit_json(
    reports: &[Audited],
    nothing: &[(std::path::PathBuf, &str)],
    strict: bool,
    code: u8,
) -> Result<()> {
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
    println!(
        "{}",
        serde_json::to_string_pretty(&json!({"files": v, "no_pickle": none,
            "dangerous": dangerous, "strict": strict, "failed": code == 1, "exit_code": code}))?
    );
    Ok(())
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

/// Builds the rule set in command-line order; returns it with a default target from a rules
/// file, if one set it.
pub fn build_rules(order: &[RuleArg]) -> Result<(RuleSet, Option<DType>), Error> {
    let mut rules = RuleSet::default();
    let mut file_to = None;
    for r in order {
        match r {
            RuleArg::Keep(p) => rules.keep(p, format!("--keep {p}"))?,
            RuleArg::Only(p) => rules.only(p, format!("--only {p}"))?,
            RuleArg::Rule(p) => rules.rule(p, format!("--rule {p}"))?,
            RuleArg::Rules(f) => file_to = rules.load_file(f)?.or(file_to),
            RuleArg::Preset(p) => rules.preset(p)?,
        }
    }
    Ok((rules, file_to))
}

struct Bar(ProgressBar);

impl Progress for Bar {
    fn begin(&self, bytes: u64, _tensors: usize) {
        self.0.set_length(bytes);
    }
    fn advance(&self, bytes: u64) {
        self.0.inc(bytes);
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
            Ok(code) if *code == ExitCode::SUCCESS => None,
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
    Ok(if failed > 0 || skipped > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn convert_one(c: &ConvertArgs, order: &[RuleArg], cancel: Arc<AtomicBool>) -> Result<ExitCode> {
    let (cat, plan, on_overflow, max_shard_size) = convert_plan(c, order)?;
    let pt_out = is_pt(c.output());
    let person = !c.quiet && !c.json;
    let opts = Options {
        force: c.force,
        max_shard_size,
        cancel: Some(cancel.clone()),
        sync: !c.no_sync,
        on_overflow,
        pt_export: weightcast::formats::torch_write::PtExport {
            inference: c.inference,
            strip_prefix: c.strip_prefix.clone(),
            strict: c.strict,
        },
    };
    if c.dry_run {
        let (_, layout) = convert::prepare(&cat, &plan, c.output(), &opts)?;
        if c.json {
            let mut v = report::plan_json(&cat, &plan, &layout);
            v["dry_run"] = json!(true);
            v["output"] = json!(c.output());
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
            println!("dry run: nothing written");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let progress = bar(person, "converting");
    let result = convert::convert(&cat, &plan, c.output(), &opts, &progress);
    progress.0.finish_and_clear();
    let summary = match result {
        Ok(s) => s,
        Err(Error::Interrupted) => {
            eprintln!("weightcast: interrupted: no output was written");
            return Ok(ExitCode::from(130));
        }
        Err(e) => return Err(e.into()),
    };
    print_summary(c, &cat, &plan, &summary)?;
    Ok(ExitCode::SUCCESS)
}

fn is_pt(out: &std::path::Path) -> bool {
    out.extension()
        .is_some_and(|e| e == "pt" || e == "pth" || e == "bin")
}

/// Reads the input and decides everything: the rules, the targets, the per-tensor checks
/// (--auto, --on-overflow keep, --max-underflow). What it returns is what is written.
fn convert_plan(
    c: &ConvertArgs,
    order: &[RuleArg],
) -> Result<(weightcast::Catalogue, Plan, OnOverflow, Option<u64>)> {
    let (rules, file_to) = build_rules(order)?;
    let on_overflow: OnOverflow = c.on_overflow.parse()?;
    if let Some(f) = c.max_underflow {
        if !(0.0..=1.0).contains(&f) {
            return Err(Error::usage(format!(
                "--max-underflow {f}: give a fraction between 0 and 1"
            ))
            .into());
        }
    }
    let candidates: Vec<DType> = match (c.auto, &c.to) {
        (Some(_), Some(list)) => list
            .split(',')
            .map(|t| {
                t.parse::<DType>()
                    .and_then(|d| check_castable(d).map(|_| d))
            })
            .collect::<Result<_, _>>()?,
        (Some(_), None) => {
            return Err(Error::usage(
                "--auto needs --to with candidates (e.g. --to f8e4m3,bf16,f16)",
            )
            .into())
        }
        (None, _) => vec![],
    };
    let auto_to = c.to.as_deref() == Some("auto");
    if auto_to && c.auto.is_some() {
        return Err(Error::usage("--to auto keeps the source precision: not with --auto").into());
    }
    let target = match candidates.first() {
        Some(&d) => d,
        None if auto_to => DType::F32, // decided from the tensors once they are read
        None => single_target(c.to.as_deref(), file_to)?,
    };
    let max_shard_size = c.max_shard_size.as_deref().map(parse_size).transpose()?;
    let pt_out = is_pt(c.output());
    if c.cast_optimizer && (!pt_out || c.inference) {
        return Err(Error::usage(
            "--cast-optimizer applies to a .pt output of a whole training checkpoint (not with --inference)",
        )
        .into());
    }
    let mut cat = open(c.input(), c.key.as_deref())?;
    if let Some(p) = &c.strip_prefix {
        let n = cat.strip_prefix(p)?;
        if n == 0 {
            warn(&format!(
                "--strip-prefix {p}: no tensor name starts with it"
            ));
        }
    }
    // A .pt output keeps the whole file (optimizer state too) unless --inference keeps only
    // the model's weights; the plan covers exactly what is written.
    let scope = if pt_out && !c.inference {
        Scope::WholeFile {
            cast_others: c.cast_optimizer,
        }
    } else {
        Scope::StateDict
    };
    let on_quantized: weightcast::quant::OnQuantized = c
        .on_quantized
        .parse()
        .map_err(|e| Error::usage(format!("--on-quantized {e}")))?;
    let target = if auto_to {
        Plan::auto_target(&cat).ok_or_else(|| {
            Error::usage(format!(
                "--to auto: {} has no floating tensor to take a precision from",
                c.input().display()
            ))
        })?
    } else {
        target
    };
    let mut plan = Plan::with_scope(&cat, &rules, target, scope);
    if auto_to {
        plan.keep_source_precision();
    }
    if on_quantized == weightcast::quant::OnQuantized::Keep {
        plan.keep_quantized(&cat);
    }
    if let Some(scale) = &c.scale {
        use weightcast::quant::quantize::{plan_scaled, Format, Scheme};
        let scheme = Scheme::parse(scale, c.scale_format.parse::<Format>()?)?;
        if target != DType::F8E4M3 || c.auto.is_some() {
            return Err(Error::usage(format!(
                "--scale {scale} writes float8_e4m3fn weights: use it with --to f8e4m3 (not --auto)"
            ))
            .into());
        }
        if pt_out {
            return Err(Error::usage(
                "--scale writes a safetensors model (a folder, or a .safetensors file): not .pt",
            )
            .into());
        }
        plan_scaled(&mut cat, &mut plan, &scheme)?;
        if cat.folder.is_none() {
            warn(
                "a single .safetensors file carries no quantization_config: loaders find the \
                  scheme in a model folder's config.json (convert the folder)",
            );
        }
    }
    plan_warnings(&plan, c.rules.strict_rules)?;
    if let (true, Some(doc)) = (c.inference, cat.torch.as_deref()) {
        if let Some(e) = &doc.entry {
            warn(&format!(
                "--inference kept the entry `{e}`; dropped {} ({} tensor bytes saved)",
                weightcast::formats::torch::describe_dropped(&plan.dropped),
                plan.dropped.iter().map(|d| d.2).sum::<u64>()
            ));
        }
    }
    let person = !c.quiet && !c.json;
    if let Some(snr) = c.auto {
        let progress = bar(person, "choosing");
        analysis::choose_auto(&cat, &mut plan, &candidates, snr, &progress, None)?;
        progress.0.finish_and_clear();
    }
    if on_overflow == OnOverflow::Keep || c.max_underflow.is_some() {
        let progress = bar(person, "checking");
        let analyses = analysis::analyze(&cat, &plan, &Bounds::default(), &progress, None)?;
        progress.0.finish_and_clear();
        if on_overflow == OnOverflow::Keep {
            let n = analysis::keep_overflowing(&cat, &mut plan, &analyses);
            if n > 0 {
                warn(&format!("{n} tensor(s) kept in their dtype: their values would overflow (--on-overflow keep)"));
            }
        }
        if let Some(f) = c.max_underflow {
            let n = analysis::keep_underflowing(&cat, &mut plan, &analyses, f);
            if n > 0 {
                warn(&format!("{n} tensor(s) kept in their dtype: more than {f} of their non-zero values would flush to zero"));
            }
        }
    }
    Ok((cat, plan, on_overflow, max_shard_size))
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
        let mut v = report::plan_json(cat, plan, &summary.layout);
        v["dry_run"] = json!(false);
        v["output"] = json!(c.output());
        v["written"] = json!(summary.files);
        v["files_copied"] = json!(summary.files_copied);
        v["config_dtype"] = json!(summary.config_dtype.map(|d| d.torch_name()));
        v["seconds"] = json!(secs);
        v["overflowed"] = json!(summary.overflowed);
        v["input_bytes_per_second"] = json!(rate);
        println!("{}", serde_json::to_string_pretty(&v)?);
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
            c.output().display()
        );
    }
    Ok(())
}

struct EvalRow {
    name: String,
    weight_bytes: u64,
    compute: DType,
    run: weightcast::eval::Run,
    metrics: weightcast::eval::metrics::EmbeddingMetrics,
    peak_rss: Option<u64>,
    note: Option<String>,
}

fn eval_cmd(e: EvalArgs, order: &[RuleArg]) -> Result<ExitCode> {
    use weightcast::eval::{embed, metrics, peak_rss, EvalModel, DEFAULT_INPUTS};
    let f32_compute = match e.compute.as_str() {
        "same" => false,
        "f32" => true,
        other => return Err(Error::usage(format!("--compute {other}: use same or f32")).into()),
    };
    let (rules, _) = build_rules(order)?;
    let what = formats::what_is(&e.model)?;
    if what != "a folder" {
        return Err(Error::usage(format!(
            "{}: eval needs a Hugging Face model folder (config.json, the weights, tokenizer.json); \
             this is {what}",
            e.model.display()
        ))
        .into());
    }
    let model = EvalModel::open(&e.model)?;
    let inputs: Vec<String> = match &e.inputs {
        Some(p) => std::fs::read_to_string(p)
            .map_err(|err| Error::io(p, err))?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect(),
        None => DEFAULT_INPUTS.iter().map(|s| s.to_string()).collect(),
    };
    if inputs.is_empty() {
        return Err(Error::usage("no inputs: the --inputs file has no non-empty line").into());
    }
    let cat = open(&e.model, None)?;
    if !matches!(model.arch, weightcast::eval::Arch::Bert(_)) {
        return eval_lm(&e, &rules, &model, &cat, &inputs);
    }
    // Candidates are opened and checked first, so that a bad one fails before any run.
    let candidates = eval_candidates(&e, &rules, &cat)?;
    // The reference: the model as its authors run it, in f32.
    let ref_plan = Plan::new(&cat, &RuleSet::default(), DType::F32);
    let Loaded {
        weights: w,
        bytes: ref_bytes,
        ..
    } = load_candidate(&model, &cat, Some(&ref_plan), true)?;
    let reference = embed(&model, w, DType::F32, &inputs, e.batch, e.runs)
        .map_err(|err| in_weights(&e.model, err))?;
    let mut rows = vec![EvalRow {
        name: "f32 (reference)".into(),
        weight_bytes: ref_bytes,
        compute: DType::F32,
        metrics: metrics::compare(&reference.embeddings, &reference.embeddings),
        peak_rss: peak_rss(),
        run: reference,
        note: None,
    }];
    if rows[0].metrics.non_finite {
        return Err(broken_reference(&e.model).into());
    }
    for (name, c, plan) in candidates {
        let Loaded {
            compute,
            note,
            weights: w,
            bytes,
        } = load_candidate(&model, &c, plan.as_ref(), f32_compute)?;
        let run = embed(&model, w, compute, &inputs, e.batch, e.runs)
            .map_err(|err| in_weights(&c.path, err))?;
        rows.push(EvalRow {
            name,
            weight_bytes: bytes,
            compute,
            metrics: metrics::compare(&rows[0].run.embeddings, &run.embeddings),
            peak_rss: peak_rss(),
            run,
            note,
        });
    }
    let ok = |r: &EvalRow| !r.metrics.non_finite && r.metrics.cosine_min >= e.min_cosine;
    let best = rows
        .iter()
        .skip(1)
        .filter(|r| ok(r))
        .min_by_key(|r| r.weight_bytes)
        .map(|r| r.name.clone());
    if e.json {
        let v = json!({
            "model": e.model,
            "inputs": inputs.len(),
            "compute": e.compute,
            "min_cosine": e.min_cosine,
            "candidates": rows.iter().map(|r| {
                let mut v = json!({
                    "name": r.name, "weight_bytes": r.weight_bytes, "compute": r.compute.torch_name(),
                    "cosine_min": r.metrics.cosine_min, "cosine_mean": r.metrics.cosine_mean,
                    "max_abs_diff": r.metrics.max_abs_diff, "neighbours_kept": r.metrics.neighbours_kept,
                    "non_finite": r.metrics.non_finite, "median_batch_seconds": r.run.median_batch_s,
                    "tokens_per_second": r.run.tokens_per_s, "peak_rss_bytes": r.peak_rss,
                    "passes": ok(r), "note": r.note,
                    "first_non_finite": r.run.first_non_finite,
                });
                if e.emit_embeddings {
                    v["embeddings"] = json!(r.run.embeddings);
                }
                v
            }).collect::<Vec<_>>(),
            "recommendation": best,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "{}: {} inputs, batch {}, compute {}, median of {} timed passes",
            e.model.display(),
            inputs.len(),
            e.batch,
            e.compute,
            e.runs
        );
        let w = rows.iter().map(|r| r.name.len()).max().unwrap_or(0).max(24);
        println!(
            "{:<w$} {:>10} {:>9} {:>10} {:>11} {:>11} {:>10} {:>10} {:>9} {:>9}  verdict",
            "candidate",
            "weights",
            "compute",
            "cos min",
            "cos mean",
            "max |diff|",
            "NN kept",
            "ms/batch",
            "tok/s",
            "peak RSS"
        );
        for r in &rows {
            let verdict = if r.metrics.non_finite {
                "NaN/inf!".to_string()
            } else if ok(r) {
                "ok".into()
            } else {
                format!("below {}", e.min_cosine)
            };
            println!(
                "{:<w$} {:>10} {:>9} {:>10.6} {:>11.6} {:>11.2e} {:>9.0}% {:>10.1} {:>9.0} {:>9}  {verdict}{}",
                r.name,
                report::bytes(r.weight_bytes),
                r.compute.torch_name(),
                r.metrics.cosine_min,
                r.metrics.cosine_mean,
                r.metrics.max_abs_diff,
                100.0 * r.metrics.neighbours_kept,
                1000.0 * r.run.median_batch_s,
                r.run.tokens_per_s,
                r.peak_rss.map(report::bytes).unwrap_or_else(|| "?".into()),
                r.note.as_deref().map(|n| format!(" ({n})")).unwrap_or_default()
            );
        }
        match &best {
            Some(b) => println!(
                "recommendation: {b}, the smallest candidate with cosine >= {} on every input",
                e.min_cosine
            ),
            None => println!(
                "recommendation: keep f32: no candidate keeps cosine >= {}",
                e.min_cosine
            ),
        }
        println!(
            "speed is this machine's CPU ({} threads): f16/bf16 matmuls may run slower than f32 here \
             even though they halve memory; on GPUs they are usually faster",
            weightcast::eval::thread_count()
        );
    }
    warn_non_finite(rows.iter().filter(|r| r.metrics.non_finite).map(|r| {
        (
            r.name.as_str(),
            r.compute,
            r.run.first_non_finite.as_deref(),
        )
    }));
    Ok(ExitCode::SUCCESS)
}

/// A candidate's weights loaded for a run: the dtype it computes in (and why, when not its
/// own), its tensors and their stored bytes.
struct Loaded {
    compute: DType,
    note: Option<String>,
    weights: std::collections::HashMap<String, candle_core::Tensor>,
    bytes: u64,
}

/// Loads a candidate for a run. The peak-memory mark is reset first, so that the run's peak
/// counts this candidate only.
fn load_candidate(
    model: &weightcast::eval::EvalModel,
    cat: &weightcast::Catalogue,
    plan: Option<&Plan>,
    f32_compute: bool,
) -> Result<Loaded> {
    let mix = weightcast::eval::float_mix(cat, plan);
    let (compute, note) = model.compute_dtype(&mix, f32_compute);
    weightcast::eval::reset_peak_rss();
    let (weights, bytes) = weightcast::eval::weights(cat, plan, compute)?;
    Ok(Loaded {
        compute,
        note,
        weights,
        bytes,
    })
}

/// The error when the f32 reference itself gives NaN or inf: nothing can be compared with it.
fn broken_reference(model: &std::path::Path) -> weightcast::Error {
    weightcast::Error::invalid(
        model,
        "the f32 reference gives NaN or inf outputs: its weights or config.json are broken, so \
         there is nothing to compare candidates with",
    )
}

/// Names, on stderr, each candidate whose outputs hold NaN or inf, with what it means.
fn warn_non_finite<'a>(bad: impl Iterator<Item = (&'a str, DType, Option<&'a str>)>) {
    for (name, compute, at) in bad {
        let at = at.map(|a| format!(" first in {a}")).unwrap_or_default();
        let why = if compute == DType::F32 {
            "its weights hold NaN/inf or values f32 arithmetic cannot carry".to_string()
        } else {
            format!(
                "activations overflow {} arithmetic (try bf16, which has f32's range; --compute \
                 f32 shows the storage loss alone)",
                compute.torch_name()
            )
        };
        warn(&format!("{name} produced NaN or inf outputs{at}: {why}"));
    }
}

/// `eval` for causal LMs: per-token KL, top-1 agreement and perplexity against the f32 reference.
fn eval_lm(
    e: &EvalArgs,
    rules: &RuleSet,
    model: &weightcast::eval::EvalModel,
    cat: &weightcast::Catalogue,
    inputs: &[String],
) -> Result<ExitCode> {
    use weightcast::eval::{metrics, peak_rss, run_lm, spill::RowSpill};
    let f32_compute = e.compute == "f32";
    let todo = eval_candidates(e, rules, cat)?;
    let ids = model.token_ids(inputs)?;
    let next = |s: usize, pos: usize| ids[s].get(pos + 1).copied();
    // The reference's logits go to a temporary file, one row per position; each candidate is
    // compared with them as its own rows come, so memory holds a row, not the input set.
    let mut spill = RowSpill::new()?;
    let mut ref_acc = metrics::LmAccumulator::default();
    let mut emitted: Vec<Vec<Vec<Vec<f32>>>> = Vec::new();
    let keep = |all: &mut Vec<Vec<Vec<Vec<f32>>>>, s: usize, row: &[f32]| {
        if e.emit_embeddings {
            if all.last().is_none_or(|c| c.len() <= s) {
                all.last_mut()
                    .expect("pushed before the run")
                    .push(Vec::new());
            }
            all.last_mut().expect("pushed before the run")[s].push(row.to_vec());
        }
    };
    let ref_plan = Plan::new(cat, &RuleSet::default(), DType::F32);
    let Loaded {
        weights: w,
        bytes: ref_bytes,
        ..
    } = load_candidate(model, cat, Some(&ref_plan), true)?;
    emitted.push(Vec::new());
    let reference = run_lm(model, w, DType::F32, &ids, e.runs, |s, pos, row| {
        ref_acc.add(row, row, next(s, pos));
        keep(&mut emitted, s, row);
        spill.push(row)
    })
    .map_err(|err| in_weights(&e.model, err))?;
    struct Row {
        name: String,
        bytes: u64,
        compute: DType,
        m: metrics::LmMetrics,
        run: weightcast::eval::LmRun,
        rss: Option<u64>,
        note: Option<String>,
    }
    let mut rows = vec![Row {
        name: "f32 (reference)".into(),
        bytes: ref_bytes,
        compute: DType::F32,
        m: ref_acc.finish(),
        run: reference,
        rss: peak_rss(),
        note: None,
    }];
    if rows[0].m.non_finite {
        return Err(broken_reference(&e.model).into());
    }
    for (name, c, plan) in todo {
        let Loaded {
            compute,
            note,
            weights: w,
            bytes,
        } = load_candidate(model, &c, plan.as_ref(), f32_compute)?;
        let mut reader = spill.reader()?;
        let mut ref_row = Vec::new();
        let mut acc = metrics::LmAccumulator::default();
        emitted.push(Vec::new());
        let run = run_lm(model, w, compute, &ids, e.runs, |s, pos, row| {
            reader.next_row(&mut ref_row)?;
            acc.add(&ref_row, row, next(s, pos));
            keep(&mut emitted, s, row);
            Ok(())
        })
        .map_err(|err| in_weights(&c.path, err))?;
        rows.push(Row {
            name,
            bytes,
            compute,
            m: acc.finish(),
            run,
            rss: peak_rss(),
            note,
        });
    }
    let ref_ppl = rows[0].m.perplexity;
    let ok = |r: &Row| !r.m.non_finite && r.m.top1_agreement >= e.min_top1;
    let best = rows
        .iter()
        .skip(1)
        .filter(|r| ok(r))
        .min_by_key(|r| r.bytes)
        .map(|r| r.name.clone());
    if e.json {
        let v = json!({
            "model": e.model, "inputs": inputs.len(), "compute": e.compute,
            "candidates": rows.iter().enumerate().map(|(i, r)| {
                let mut v = json!({
                    "name": r.name, "weight_bytes": r.bytes, "compute": r.compute.torch_name(),
                    "kl_mean": r.m.kl_mean, "kl_max": r.m.kl_max, "top1_agreement": r.m.top1_agreement,
                    "perplexity": r.m.perplexity, "perplexity_ratio": r.m.perplexity / ref_ppl,
                    "non_finite": r.m.non_finite, "median_token_seconds": r.run.median_token_s,
                    "tokens_per_second": r.run.tokens_per_s, "peak_rss_bytes": r.rss, "passes": ok(r),
                    "note": r.note,
                });
                if e.emit_embeddings {
                    v["logits"] = json!(emitted[i]);
                    v["ids"] = json!(ids);
                }
                v
            }).collect::<Vec<_>>(),
            "recommendation": best,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "{}: {} inputs, compute {}, causal LM",
            e.model.display(),
            inputs.len(),
            e.compute
        );
        let w = rows.iter().map(|r| r.name.len()).max().unwrap_or(0).max(24);
        println!(
            "{:<w$} {:>10} {:>9} {:>10} {:>10} {:>8} {:>10} {:>9} {:>10} {:>8} {:>9}  verdict",
            "candidate",
            "weights",
            "compute",
            "KL mean",
            "KL max",
            "top-1",
            "ppl",
            "ppl ratio",
            "ms/token",
            "tok/s",
            "peak RSS"
        );
        for r in &rows {
            println!(
                "{:<w$} {:>10} {:>9} {:>10.2e} {:>10.2e} {:>7.1}% {:>10.3} {:>9.4} {:>10.2} {:>8.0} {:>9}  {}{}",
                r.name,
                report::bytes(r.bytes),
                r.compute.torch_name(),
                r.m.kl_mean,
                r.m.kl_max,
                100.0 * r.m.top1_agreement,
                r.m.perplexity,
                r.m.perplexity / ref_ppl,
                1000.0 * r.run.median_token_s,
                r.run.tokens_per_s,
                r.rss.map(report::bytes).unwrap_or_else(|| "?".into()),
                if r.m.non_finite { "NaN/inf!" } else if ok(r) { "ok" } else { "below bound" },
                r.note.as_deref().map(|n| format!(" ({n})")).unwrap_or_default()
            );
        }
        match &best {
            Some(b) => println!(
                "recommendation: {b}, the smallest candidate with top-1 agreement >= {}",
                e.min_top1
            ),
            None => println!(
                "recommendation: keep f32: no candidate keeps top-1 agreement >= {}",
                e.min_top1
            ),
        }
        println!(
            "speed is this machine's CPU ({} threads), one token at a time with the KV cache: \
             f16/bf16 matmuls may run slower than f32 here even though they halve memory; on \
             GPUs they are usually faster",
            weightcast::eval::thread_count()
        );
    }
    warn_non_finite(
        rows.iter()
            .filter(|r| r.m.non_finite)
            .map(|r| (r.name.as_str(), r.compute, None)),
    );
    Ok(ExitCode::SUCCESS)
}

/// The candidates of `eval`: each `--dtypes` entry (MODEL converted on the fly with the rules,
/// labelled with them) and each `--candidate` path.
fn eval_candidates(
    e: &EvalArgs,
    rules: &RuleSet,
    cat: &weightcast::Catalogue,
) -> Result<Vec<(String, weightcast::Catalogue, Option<Plan>)>> {
    let mut out = Vec::new();
    for d in e.dtypes.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let d: DType = d.parse()?;
        check_castable(d)?;
        let label = if rules.rules.is_empty() {
            d.torch_name().to_string()
        } else {
            let origins: Vec<&str> = rules.rules.iter().map(|r| r.origin.as_str()).collect();
            format!("{} + {}", d.torch_name(), origins.join(", "))
        };
        out.push((label, cat.clone(), Some(Plan::new(cat, rules, d))));
    }
    for p in &e.candidate {
        let c = open(p, None)?;
        weightcast::eval::check_candidate(cat, &c)?;
        out.push((p.display().to_string(), c, None));
    }
    Ok(out)
}

/// An error while loading or running a model (the reference or a candidate), named by its
/// file: what is wrong is in its weights (a missing tensor, a shape the architecture does not
/// take), not in usage.
fn in_weights(path: &std::path::Path, e: weightcast::Error) -> weightcast::Error {
    match e {
        weightcast::Error::Usage(m) => weightcast::Error::invalid(path, m),
        other => other,
    }
}
