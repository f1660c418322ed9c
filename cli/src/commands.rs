//! What each subcommand does with the library.

use std::io::IsTerminal;
/// A process exit code.
pub(crate) type ExitCode = u8;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use weightcast::commands::analyze::AnalyzeRequest;
use weightcast::commands::audit::{AuditReport, AuditRequest};
use weightcast::commands::convert::ConvertDoc;
use weightcast::commands::diff::DiffRequest;
use weightcast::commands::ConvertRequest;
use weightcast::convert::{self, Progress};
use weightcast::error::one_line;
use weightcast::output::parse_size;
use weightcast::plan::Scope;
use weightcast::{formats, Error, Plan};

use crate::cli::{AnalyzeArgs, Args, Command, ConvertArgs, DiffArgs};
use crate::report;
pub(crate) use weightcast::commands::RuleArg;

pub fn run(args: Args) -> Result<ExitCode> {
    let quiet = args.cli.quiet;
    match args.cli.command {
        Command::Inspect { path, key, json } => {
            let cat = open(&path, key.as_deref())?;
            if let Some(n) = cat.torch.as_deref().and_then(formats::torch::tied_note) {
                warn(&n);
            }
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&weightcast::commands::inspect::inspect(&cat))?
                );
            } else {
                print!("{}", report::inspect_text(&cat));
            }
            Ok(0)
        }
        Command::Audit {
            paths,
            strict,
            allow,
            json,
            format,
        } => audit_cmd(
            &paths,
            strict,
            allow.allow()?,
            if json { "json" } else { &format },
        ),
        Command::Convert(c) => convert_cmd(*c, &args.rule_order),
        Command::Analyze(a) => analyze_cmd(a, &args.rule_order, quiet),
        Command::Diff(d) => diff_cmd(d),
        #[cfg(feature = "eval")]
        Command::Eval(e) => crate::eval_cmd::eval_cmd(e, &args.rule_order),
        #[cfg(not(feature = "eval"))]
        Command::Eval(_) => Err(Error::usage(
            "eval: this weightcast was built without the `eval` feature (candle)",
        )
        .into()),
        Command::Profile { .. } => Err(Error::usage(
            "profile runs models in PyTorch: it is the Python package's command (pip install \
             weightcast torch transformers, then `weightcast profile FOLDER`, or \
             weightcast.profile from Python); `weightcast eval` runs BERT and Llama-family \
             folders without Python",
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

fn analyze_cmd(a: AnalyzeArgs, order: &[RuleArg], quiet: bool) -> Result<ExitCode> {
    let progress = bar(!a.json && !quiet, "analyzing");
    let req = AnalyzeRequest {
        input: a.input.clone(),
        to: a.to.clone(),
        rules: order.to_vec(),
        strict_rules: a.rules.strict_rules,
        key: a.key.clone(),
        scale: a.scale.clone(),
        scale_format: a.scale_format.clone(),
        lossy_below: a.lossy_below,
        report: a.report.clone(),
        caller: weightcast::commands::Caller::Cli,
    };
    let r = req.run(&progress);
    progress.0.finish_and_clear();
    let an = r?;
    for w in &an.warnings {
        warn(w);
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&an.doc())?);
    } else {
        print!("{}", report::analysis_text(&an, a.all));
        if let (Some(p), false) = (&a.report, quiet) {
            println!("report: {}", p.display());
        }
    }
    Ok(0)
}

fn diff_cmd(d: DiffArgs) -> Result<ExitCode> {
    let req = DiffRequest {
        a: d.a.clone(),
        b: d.b.clone(),
        tolerance: d.tolerance,
    };
    let r = req.run()?;
    for w in &r.warnings {
        warn(w);
    }
    if d.json {
        println!("{}", serde_json::to_string_pretty(&req.doc(&r))?);
    } else {
        print!(
            "{}",
            report::diff_text(&r.diff, d.tolerance, &r.failures, d.all)
        );
    }
    Ok(if r.failures.is_empty() { 0 } else { 1 })
}

pub(crate) fn warn(msg: &str) {
    eprintln!("weightcast: warning: {}", one_line(msg));
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

fn audit_cmd(
    paths: &[std::path::PathBuf],
    strict: bool,
    allow: weightcast::audit::Allow,
    format: &str,
) -> Result<ExitCode> {
    if !matches!(format, "text" | "json" | "sarif") {
        return Err(Error::usage(format!("--format {format}: use text, json or sarif")).into());
    }
    let req = AuditRequest {
        paths: paths.to_vec(),
        strict,
        allow,
    };
    let r = req.run();
    match format {
        "json" => println!("{}", serde_json::to_string_pretty(&r.doc())?),
        "sarif" => print_audit_sarif(&r)?,
        _ => print_audit_text(&r),
    }
    Ok(r.exit_code())
}

/// SARIF 2.1.0: one result per dangerous (error) or unlisted (warning; error with --strict)
/// global occurrence, with the file and the byte offset of the opcode that names it; one per
/// ambiguity (error) and per file not read to its end (warning).
fn print_audit_sarif(report: &AuditReport) -> Result<()> {
    use weightcast::audit::{Class, Use};
    let strict = report.strict;
    let mut results = Vec::new();
    let loc = |path: &std::path::Path, offset: Option<u64>| {
        let mut l =
            json!({"physicalLocation": {"artifactLocation": {"uri": path.display().to_string()}}});
        if let Some(o) = offset {
            l["physicalLocation"]["region"] = json!({"byteOffset": o});
        }
        l
    };
    for r in &report.files {
        let scan = match &r.scan {
            Ok(s) => s,
            Err(e) => {
                results.push(json!({"ruleId": "unreadable", "level": "warning",
                    "message": {"text": e}, "locations": [loc(&r.path, None)]}));
                continue;
            }
        };
        for pk in &scan.pickles {
            for f in pk.findings(&report.allow) {
                let (rule, level) = match f.class {
                    Class::Dangerous => ("dangerous-global", "error"),
                    Class::UnknownCall => ("unknown-call", "error"),
                    Class::Other if strict => ("unlisted-global", "error"),
                    Class::Other => ("unlisted-global", "warning"),
                    Class::Allowed => continue,
                };
                results.push(json!({"ruleId": rule, "level": level,
                    "message": {"text": format!("{} global `{}` ({} in {}{})", f.class.as_str(), f.name, f.opcode, pk.label,
                        match f.how { Use::Named => ", named only", Use::Instantiated => ", instantiated", Use::Called => ", called" })},
                    "locations": [loc(&r.path, Some(f.offset))]}));
            }
        }
        for a in &scan.all_ambiguities() {
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
                    rule("unknown-call", "A pickle calls a global that no allowlist names: what it runs is unknown"),
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

fn print_audit_text(report: &AuditReport) {
    use weightcast::audit::Class;
    for (p, kind) in &report.no_pickle {
        println!(
            "{}: {}: no pickle, nothing to run",
            one_line(&p.display().to_string()),
            kind.describe()
        );
    }
    for r in &report.files {
        let path = one_line(&r.path.display().to_string());
        let scan = match &r.scan {
            Ok(s) => s,
            Err(e) => {
                println!("{path}: unreadable: {}", one_line(e));
                continue;
            }
        };
        let count = |c: Class| r.globals.iter().filter(|x| x.class == c).count();
        let unknown = match count(Class::UnknownCall) {
            0 => String::new(),
            n => format!(", {n} unknown calls"),
        };
        println!(
            "{path}: {}: {}, {} pickle(s) a loader would unpickle; {} globals, {} dangerous{unknown}{}",
            r.verdict().as_str(),
            scan.container,
            scan.pickles.len(),
            r.globals.len(),
            count(Class::Dangerous),
            if scan.all_ambiguities().is_empty() {
                String::new()
            } else {
                format!(", {} ambiguities", scan.all_ambiguities().len())
            }
        );
        for a in &scan.all_ambiguities() {
            println!("  ambiguous  {}", one_line(a));
        }
        for g in &r.globals {
            if g.class <= Class::UnknownCall && scan.pickles.len() > 1 {
                println!("  {:<9}  {}  (in {})", g.class.as_str(), g.name, g.pickle);
            } else {
                println!("  {:<9}  {}", g.class.as_str(), g.name);
            }
        }
        if let Some(s) = &scan.stops {
            println!("  note       {s}");
        }
        if let Some(s) = &scan.incomplete {
            println!("  incomplete {}", one_line(s));
        }
    }
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
            Err(e) => Some(one_line(&e.to_string())),
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
    r.state_dict_only = c.state_dict_only;
    r.cast_optimizer = c.cast_optimizer;
    r.strict = c.strict;
    r.allow = c.allow.allow()?;
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
    let person = !c.quiet && !c.json;
    let mut req = request(c, order, cancel)?;
    req.dry_run = c.dry_run;
    let progress = bar(person, "checking");
    let prepared = req.prepare(&progress);
    progress.0.finish_and_clear();
    let prepared = prepared?;
    for w in &prepared.warnings {
        warn(w);
    }
    if c.dry_run {
        if c.json {
            let doc = ConvertDoc::planned(&prepared);
            println!("{}", serde_json::to_string_pretty(&doc)?);
        } else {
            print!("{}", dry_run_text(&prepared));
        }
        return Ok(0);
    }
    let progress = bar(person, "converting");
    let result = prepared.execute(&progress);
    progress.0.finish_and_clear();
    let summary = match result {
        Ok(s) => s,
        Err(Error::Interrupted) => {
            eprintln!("weightcast: interrupted: no output was written");
            return Ok(130);
        }
        Err(e) => return Err(e.into()),
    };
    print_summary(c, &prepared.cat, &prepared.plan, &summary)?;
    Ok(0)
}

/// A dry run in words: the plan, what a `.pt` output holds, whether the output is replaced.
fn dry_run_text(p: &weightcast::commands::Prepared) -> String {
    use std::fmt::Write;
    let (cat, plan, output) = (&p.cat, &p.plan, &p.output);
    let mut s = report::plan_text(cat, plan, &output.layout);
    if output.pt.is_some() {
        let _ = writeln!(
            s,
            "writes {}: a torch.save checkpoint with {} (views and tied tensors share one \
             converted storage)",
            output.path.display(),
            match plan.scope {
                Scope::StateDict if !plan.dropped.is_empty() => "the state dict alone",
                Scope::Inference if !plan.dropped.is_empty() =>
                    "the checkpoint without its training state",
                _ => "every other value of the input kept",
            }
        );
    }
    if output.replaces_existing {
        let _ = writeln!(
            s,
            "{} exists: the run replaces it (--force)",
            output.path.display()
        );
    }
    s.push_str("dry run: nothing written\n");
    s
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
        let v = ConvertDoc::finished(cat, plan, summary, c.output());
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
            weightcast::commands::document::bytes(summary.bytes_in),
            weightcast::commands::document::bytes(summary.bytes_out),
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
            weightcast::commands::document::bytes(summary.bytes_in),
            weightcast::commands::document::bytes(summary.bytes_out),
            secs,
            weightcast::commands::document::bytes(rate as u64),
            written_name(c.output(), summary)
        );
        match &summary.pickle {
            Some(p) if p.loads_with_weights_only => {
                eprintln!("weightcast: the .pt loads with torch.load(weights_only=True)")
            }
            Some(p) => eprintln!(
                "weightcast: the .pt needs torch.load(weights_only=False): it carries {}",
                one_line(&p.outside_weights_only.join(", "))
            ),
            None => {}
        }
    }
    Ok(())
}
