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
use weightcast::rules::RuleSet;
use weightcast::{formats, DType, Error, Plan};

use crate::cli::{Args, Command, ConvertArgs, RuleArg};
use crate::report;

pub fn run(args: Args) -> Result<ExitCode> {
    match args.cli.command {
        Command::Inspect { path, json } => {
            let cat = formats::open(&path)?;
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
        Command::Convert(c) => convert_cmd(c, &args.rule_order),
    }
}

fn warn(msg: &str) {
    eprintln!("weightcast: warning: {msg}");
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
    let (rules, file_to) = build_rules(order)?;
    let target: DType = match (&c.to, file_to) {
        (Some(t), _) => t.parse()?,
        (None, Some(d)) => d,
        (None, None) => return Err(Error::usage("--to DTYPE is required (e.g. --to f16)").into()),
    };
    if !target.is_castable() {
        return Err(Error::usage(format!(
            "cannot cast to {target}: choose f16, bf16, f32, f64, f8e4m3 or f8e5m2"
        ))
        .into());
    }
    let max_shard_size = c.max_shard_size.as_deref().map(parse_size).transpose()?;
    let cat = formats::open(&c.input)?;
    let plan = Plan::new(&cat, &rules, target);
    for w in &plan.warnings {
        warn(w);
    }
    let cancel = Arc::new(AtomicBool::new(false));
    let opts = Options {
        force: c.force,
        max_shard_size,
        cancel: Some(cancel.clone()),
        sync: !c.no_sync,
    };
    if c.dry_run {
        let (_, layout) = convert::prepare(&cat, &plan, &c.output, &opts)?;
        if c.json {
            let mut v = report::plan_json(&cat, &plan, &layout);
            v["dry_run"] = json!(true);
            v["output"] = json!(c.output);
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            print!("{}", report::plan_text(&cat, &plan, &layout));
            println!("dry run: nothing written");
        }
        return Ok(ExitCode::SUCCESS);
    }
    {
        let cancel = cancel.clone();
        // A second Ctrl-C while cleaning up falls through to the default (exit).
        let _ = ctrlc::set_handler(move || {
            if cancel.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
        });
    }
    let show_bar = !c.quiet && !c.json && std::io::stderr().is_terminal();
    let bar = ProgressBar::hidden();
    if show_bar {
        bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("template")
            .progress_chars("=> "),
        );
    }
    let progress = Bar(bar);
    let result = convert::convert(&cat, &plan, &c.output, &opts, &progress);
    progress.0.finish_and_clear();
    let summary = match result {
        Ok(s) => s,
        Err(Error::Interrupted) => {
            eprintln!("weightcast: interrupted: no output was written");
            return Ok(ExitCode::from(130));
        }
        Err(e) => return Err(e.into()),
    };
    for w in &summary.warnings {
        warn(w);
    }
    let secs = summary.elapsed.as_secs_f64();
    let rate = summary.bytes_in as f64 / secs.max(1e-9);
    if c.json {
        let mut v = report::plan_json(
            &cat,
            &plan,
            &convert::prepare(&cat, &plan, &c.output, &opts)?.1,
        );
        v["dry_run"] = json!(false);
        v["output"] = json!(c.output);
        v["written"] = json!(summary.files);
        v["files_copied"] = json!(summary.files_copied);
        v["config_dtype"] = json!(summary.config_dtype.map(|d| d.torch_name()));
        v["seconds"] = json!(secs);
        v["input_bytes_per_second"] = json!(rate);
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else if !c.quiet {
        eprintln!(
            "weightcast: {} tensors ({} cast to {}, {} kept), {} -> {} in {:.2} s ({}/s) -> {}",
            summary.tensors_cast + summary.tensors_kept,
            summary.tensors_cast,
            target.torch_name(),
            summary.tensors_kept,
            report::bytes(summary.bytes_in),
            report::bytes(summary.bytes_out),
            secs,
            report::bytes(rate as u64),
            c.output.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}
