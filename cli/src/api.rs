//! The commands as functions returning their `--json` documents, for the Python package: the
//! same engine, the same documents and the same messages as the command line, nothing printed.
//! Warnings for the user come back in the document's `_warnings` list (the Python layer
//! issues and removes it).

use serde_json::{json, Value};
use weightcast::convert::{self, Progress};
use weightcast::job::{ConvertRequest, RuleArg};
use weightcast::{formats, Result};

use crate::commands;
use crate::report;

/// `inspect --json`.
pub fn inspect(path: &std::path::Path, key: Option<&str>) -> Result<Value> {
    let cat = formats::open_with(path, key)?;
    let mut v = report::inspect_json(&cat);
    v["_warnings"] = json!(cat.notes);
    Ok(v)
}

/// `convert --json` (with `--dry-run` when `dry_run`).
pub fn convert(req: &ConvertRequest, dry_run: bool, progress: &dyn Progress) -> Result<Value> {
    let mut req = req.clone();
    req.dry_run = dry_run;
    let p = req.prepare(progress)?;
    let mut v = if dry_run {
        let layout = convert::check(&p.cat, &p.plan, &req.output, &p.options)?;
        let mut v = report::plan_json(&p.cat, &p.plan, &layout);
        v["dry_run"] = json!(true);
        v["output"] = json!(req.output);
        v["replaces_existing"] = json!(commands::output_exists(&req.output));
        v
    } else {
        progress.phase("converting");
        let summary = convert::convert(&p.cat, &p.plan, &req.output, &p.options, progress)?;
        let mut v = commands::summary_json(&p.cat, &p.plan, &summary, &req.output);
        let mut warnings = p.warnings.clone();
        warnings.extend(summary.warnings.iter().cloned());
        v["_warnings"] = json!(warnings);
        return Ok(v);
    };
    v["_warnings"] = json!(p.warnings);
    Ok(v)
}

/// `analyze --json` (and the HTML report when `report` is given).
#[allow(clippy::too_many_arguments)]
pub fn analyze(
    input: &std::path::Path,
    to: Option<&str>,
    rules: &[RuleArg],
    key: Option<&str>,
    scale: Option<&str>,
    scale_format: &str,
    lossy_below: f64,
    report_path: Option<&std::path::Path>,
    progress: &dyn Progress,
) -> Result<Value> {
    let a = commands::analyze_run(
        input,
        key,
        to,
        rules,
        false,
        scale,
        scale_format,
        lossy_below,
        progress,
    )?;
    if let Some(path) = report_path {
        let page = crate::html::analysis_page(&a.cat, &a.plan, &a.analyses, &a.bounds);
        commands::write_atomic(path, page.as_bytes())?;
    }
    let mut v = report::analysis_json(&a.cat, &a.plan, &a.analyses, &a.bounds);
    v["_warnings"] = json!(a.warnings);
    Ok(v)
}

/// `diff --json`.
pub fn diff(a: &std::path::Path, b: &std::path::Path, tolerance: Option<f64>) -> Result<Value> {
    let ca = formats::open_with(a, None)?;
    let cb = formats::open_with(b, None)?;
    let d = weightcast::diff::diff(&ca, &cb)?;
    let failures = report::diff_failures(&d, tolerance);
    let mut v = report::diff_json(a, b, &d, tolerance, &failures);
    let mut warnings = ca.notes.clone();
    warnings.extend(cb.notes.iter().cloned());
    v["_warnings"] = json!(warnings);
    Ok(v)
}

/// `audit --json`.
pub fn audit(paths: &[std::path::PathBuf], strict: bool) -> Value {
    let (reports, nothing, code) = commands::audit_scan(paths, strict);
    commands::audit_json(&reports, &nothing, strict, code)
}
