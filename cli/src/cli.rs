//! Command-line arguments.

use std::path::PathBuf;

use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};

/// Change the precision of model weights (safetensors files, sharded sets, Hugging Face model
/// folders) without loading the model, with a plan before every write.
#[derive(Parser, Debug)]
#[command(name = "weightcast", version, about, max_term_width = 100)]
pub struct Cli {
    /// No progress bar, no notes and no summary line (results, warnings and errors are still
    /// printed). Accepted by every command, before or after it.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Show the tensors of a checkpoint: format, counts, bytes, dtypes and metadata.
    Inspect {
        /// A .safetensors file, a *.safetensors.index.json, a model folder, a .pt checkpoint or a
        /// .gguf file.
        path: PathBuf,
        /// For a PyTorch training checkpoint: the entry holding the state dict.
        #[arg(long, value_name = "PATH")]
        key: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Judge every pickle a Python loader would unpickle from these files or folders (torch.save
    /// zips, legacy and tar checkpoints, raw pickles, .npy/.npz, zips of pickles): every global
    /// is allowed (torch's weights_only list), other, an unknown call (called, on no allowlist)
    /// or dangerous. Exits 0 when nothing is dangerous, 1 when something is (or is an unknown
    /// call, or is ambiguous), 2 when a file could not be read to its end.
    Audit {
        /// Files or folders (read recursively).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Exit 1 on any global outside torch's weights-only allowlist, not only dangerous ones
        /// or unknown calls (`--allow` does not lift it).
        #[arg(long)]
        strict: bool,
        #[command(flatten)]
        allow: AllowArgs,
        /// Print JSON (the same as --format json).
        #[arg(long)]
        json: bool,
        /// Output format: text, json, or sarif (SARIF 2.1.0, for code-scanning CI).
        #[arg(long, value_name = "FORMAT", default_value = "text")]
        format: String,
    },
    /// Cast the floating-point tensors of a checkpoint to another dtype.
    #[command(
        after_help = convert_help(),
        override_usage = "weightcast convert <INPUT> -o <OUTPUT> --to <DTYPE> [OPTIONS]"
    )]
    Convert(Box<ConvertArgs>),
    /// Measure what a cast would do to every tensor (overflow, underflow, error) without
    /// writing anything.
    Analyze(AnalyzeArgs),
    /// Run a model at several precisions on real inputs: accuracy against the f32 reference,
    /// speed and memory, and a recommendation.
    #[command(after_help = EVAL_HELP)]
    Eval(EvalArgs),
    /// Profile a model in PyTorch, down to the layer that breaks, and search the modules to
    /// keep in f32: the Python package's `weightcast profile` (pip install weightcast, with
    /// torch and transformers) or `weightcast.profile` from Python.
    #[command(disable_help_flag = true)]
    Profile {
        /// What `weightcast profile` of the Python package takes.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Compare two checkpoints: missing tensors, dtype and shape changes, error per tensor.
    /// Exits 1 when a tensor is missing or below --tolerance.
    Diff(DiffArgs),
}

/// Casting rules, shared by convert and analyze (applied in command-line order).
#[derive(clap::Args, Debug, Clone)]
pub struct RuleFlags {
    /// Leave tensors matching PATTERN as they are.
    #[arg(long, value_name = "PATTERN")]
    pub keep: Vec<String>,
    /// Cast only tensors matching PATTERN (others are kept).
    #[arg(long, value_name = "PATTERN")]
    pub only: Vec<String>,
    /// Cast tensors matching PATTERN to DTYPE (or `keep`).
    #[arg(long, value_name = "PATTERN=DTYPE")]
    pub rule: Vec<String>,
    /// Read rules from a TOML file.
    #[arg(long, value_name = "FILE")]
    pub rules: Vec<PathBuf>,
    #[arg(long, value_name = "NAME", help = preset_help())]
    pub preset: Vec<String>,
    /// A rule that matches no tensor is an error (exit 2), not a warning.
    #[arg(long)]
    pub strict_rules: bool,
}

#[derive(clap::Args, Debug)]
pub struct AnalyzeArgs {
    /// A .safetensors file, a *.safetensors.index.json, a model folder, a .pt checkpoint or a
    /// .gguf file.
    pub input: PathBuf,
    /// For a PyTorch training checkpoint: the entry holding the state dict.
    #[arg(long, value_name = "PATH")]
    pub key: Option<String>,
    /// Target dtype to measure, or nvfp4 / mxfp4 (the linear weights convert --to nvfp4|mxfp4
    /// would quantize, each against its quantize-dequantize round trip).
    #[arg(long, value_name = "DTYPE")]
    pub to: Option<String>,
    /// With --to f8e4m3: measure scaled FP8 (tensor, channel, block or block:RxC), the
    /// weights convert --scale would quantize, each against its quantize-dequantize round trip.
    #[arg(long, value_name = "LAYOUT")]
    pub scale: Option<String>,
    /// With --scale: the format whose scale dtype is measured (compressed-tensors or fp8).
    #[arg(long, value_name = "FORMAT", default_value = "compressed-tensors")]
    pub scale_format: String,
    #[command(flatten)]
    pub rules: RuleFlags,
    /// SNR in dB under which a tensor is called lossy.
    #[arg(long, value_name = "DB", default_value_t = 40.0)]
    pub lossy_below: f64,
    /// Write a self-contained HTML report.
    #[arg(long, value_name = "FILE.html")]
    pub report: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Show every analysed tensor (default: the 25 worst).
    #[arg(long)]
    pub all: bool,
}

/// How `eval` recommends.
const EVAL_HELP: &str = "\
The recommendation is the candidate with the fewest weight bytes that meets every bound: no \
NaN/inf in its outputs and, for encoders, --min-cosine and --min-neighbours (defaults 0.999 \
and 0.99), for causal LMs --min-top1 (default 0.99). The output names the bounds applied and, \
for each candidate that misses one, which; when none meets them all it recommends keeping f32.";

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// A Hugging Face model folder (config.json, weights, tokenizer.json).
    pub model: PathBuf,
    /// A converted folder or weights file of the same architecture to compare (repeatable).
    #[arg(long, value_name = "PATH")]
    pub candidate: Vec<PathBuf>,
    /// Dtypes to convert MODEL to on the fly and compare (comma-separated), with the rules.
    #[arg(long, value_name = "LIST", default_value = "f16,bf16")]
    pub dtypes: String,
    #[command(flatten)]
    pub rules: RuleFlags,
    /// same: run each candidate in its weights' dtype (as torch does after model.half());
    /// f32: upcast weights on load, isolating storage precision.
    #[arg(long, value_name = "MODE", default_value = "same")]
    pub compute: String,
    /// One input per line (default: a built-in set of varied sentences).
    #[arg(long, value_name = "FILE")]
    pub inputs: Option<PathBuf>,
    /// Inputs per batch.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Timed passes over the inputs after one warm-up.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// For encoders: cosine similarity a candidate must keep (minimum over inputs) to be
    /// recommended.
    #[arg(long, value_name = "X", default_value_t = 0.999)]
    pub min_cosine: f64,
    /// For encoders: fraction of inputs whose nearest neighbour (the most similar other input)
    /// must stay the reference's for a candidate to be recommended; 0 turns the bound off.
    #[arg(long, value_name = "X", default_value_t = 0.99)]
    pub min_neighbours: f64,
    /// For causal LMs: top-1 agreement a candidate must keep to be recommended.
    #[arg(long, value_name = "X", default_value_t = 0.99)]
    pub min_top1: f64,
    /// Include every embedding (encoders) or every logit (causal LMs) in the JSON output.
    #[arg(long)]
    pub emit_embeddings: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct DiffArgs {
    /// The reference checkpoint.
    pub a: PathBuf,
    /// The checkpoint compared with it.
    pub b: PathBuf,
    /// Fail (exit 1) when a common tensor's SNR is below this many dB.
    #[arg(long, value_name = "SNR_DB")]
    pub tolerance: Option<f64>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Show every tensor (default: changed ones and the 25 worst).
    #[arg(long)]
    pub all: bool,
}

impl ConvertArgs {
    /// The input (set unless --batch, which sets it per line).
    pub fn input(&self) -> &std::path::Path {
        self.input
            .as_deref()
            .expect("clap requires INPUT without --batch")
    }

    /// The output (as [`ConvertArgs::input`]).
    pub fn output(&self) -> &std::path::Path {
        self.output
            .as_deref()
            .expect("clap requires -o without --batch")
    }
}

/// `convert --help`'s closing text, generated from the tables the code uses: pattern
/// syntaxes, rule kinds, presets, castable dtypes and output formats.
pub fn convert_help() -> String {
    use std::fmt::Write;
    let mut h = String::from(
        "Rules are applied in command-line order; the last rule that matches a tensor decides.\n\
         Integer and bool tensors are never cast.\n\nPATTERN is one of:\n",
    );
    for (p, what) in weightcast::rules::PATTERN_SYNTAX {
        let _ = writeln!(h, "  {p:<11} {what}");
    }
    h.push_str("\nKIND (kind:KIND):\n");
    for (k, what) in weightcast::rules::KINDS {
        let _ = writeln!(h, "  {k:<11} {what}");
    }
    h.push_str("\nPresets (--preset NAME):\n");
    for (p, what) in weightcast::rules::PRESETS {
        let _ = writeln!(h, "  {p:<18} {what}");
    }
    let _ = writeln!(
        h,
        "\nDTYPE (--to): {}, or auto",
        weightcast::dtype::castable_names()
    );
    h.push_str("\nOUTPUT (-o):\n");
    for (o, what) in weightcast::output::OUTPUT_FORMATS {
        let _ = writeln!(h, "  {o:<28} {what}");
    }
    h.push_str(
        "\nExamples:\n\
         \x20 weightcast convert model.safetensors -o model-f16.safetensors --to f16\n\
         \x20 weightcast convert ./llama -o ./llama-bf16 --to bf16 --preset keep-norms --max-shard-size 5GB\n\
         \x20 weightcast convert ./bert -o ./bert-f16 --to f16 --keep 're:pooler' --dry-run\n\
         \x20 weightcast convert ./qwen2 -o qwen2-q8_0.gguf --to q8_0    (llama.cpp's GGUF)",
    );
    h
}

/// `--preset`'s help: the preset names from the table.
fn preset_help() -> String {
    format!(
        "Apply a named set of rules: {} (convert --help describes them)",
        weightcast::rules::PRESETS
            .iter()
            .map(|p| p.0)
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// `--to`'s help: the castable dtypes from the table.
fn to_help() -> String {
    format!(
        "Target dtype: {}, or auto (keep the source precision, decided from the tensors: a \
         format move, or dequantizing FP8 to the checkpoint's own dtype). With --auto, a \
         comma-separated list of candidates in order of preference (e.g. f8e4m3,bf16,f16). A \
         .gguf output also takes q8_0. nvfp4 or mxfp4: linear layers' weights in \
         compressed-tensors' packed FP4 (NVFP4: E4M3 scales per 16 values and a global scale; \
         MXFP4: E8M0 exponents per 32), with the scales llm-compressor's NVFP4A16 / MXFP4A16 \
         presets compute; the rest keeps its dtype",
        weightcast::dtype::castable_names()
    )
}

/// `-o`'s help: the output formats from the table.
fn output_help() -> String {
    format!(
        "Output: {}; locally or under s3://BUCKET/PREFIX (.gguf: locally)",
        weightcast::output::OUTPUT_FORMATS
            .iter()
            .map(|o| o.0)
            .collect::<Vec<_>>()
            .join(", ")
    )
}

#[derive(clap::Args, Debug, Clone)]
pub struct ConvertArgs {
    /// A .safetensors file, a *.safetensors.index.json, a model folder, a .pt checkpoint or a
    /// .gguf file; or https://.../x.safetensors, hf://ORG/NAME[@REV], s3://BUCKET/PREFIX.
    #[arg(required_unless_present = "batch")]
    pub input: Option<PathBuf>,
    /// Convert every `INPUT -> OUTPUT` line of FILE (blank lines and `#` comments skipped) with
    /// the same options, one after the other; a failure is reported and the next line runs;
    /// exit 1 when any failed.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["input", "output"])]
    pub batch: Option<PathBuf>,
    /// For a PyTorch training checkpoint: the entry holding the state dict (e.g.
    /// model_state_dict); found automatically otherwise.
    #[arg(long, value_name = "PATH")]
    pub key: Option<String>,
    /// For inference: drop the training state (optimizer, LR scheduler, AMP scaler, RNG
    /// states, gradient buffers: recognised by structure, not only by name), keep the rest of
    /// a .pt checkpoint (vocabularies, class counts, config), clear requires_grad; a report
    /// lists both.
    #[arg(long)]
    pub inference: bool,
    /// Write the state dict alone (a .pt output of a training checkpoint drops every other
    /// entry; safetensors outputs always hold the state dict alone).
    #[arg(long)]
    pub state_dict_only: bool,
    /// For a .pt output of a training checkpoint: also cast the floating tensors outside the
    /// state dict (optimizer moments, EMA weights); 0-d tensors (step counters) stay. By
    /// default they keep their dtypes.
    #[arg(long)]
    pub cast_optimizer: bool,
    /// Refuse to write a .pt whose pickle references any global outside torch's weights-only
    /// allowlist (not only dangerous ones or unknown calls).
    #[arg(long)]
    pub strict: bool,
    #[command(flatten)]
    pub allow: AllowArgs,
    /// Remove PREFIX from tensor names (e.g. `module.` added by DataParallel).
    #[arg(long, value_name = "PREFIX")]
    pub strip_prefix: Option<String>,
    /// For a scaled FP8 input (DeepSeek/vLLM fp8, compressed-tensors, ModelOpt, fbgemm,
    /// ComfyUI): dequantize (each payload times its scale; scales and quantization_config
    /// leave) or keep (payloads and scales passed through untouched, the config kept).
    #[arg(long, value_name = "WHAT", default_value = "dequantize")]
    pub on_quantized: String,
    /// With --to f8e4m3: write scaled FP8, scales computed from the weights (tensor, channel,
    /// block = block:128x128, or block:RxC), for the 2-D weights of linear layers; embeddings,
    /// lm_head, norms, biases and MoE router gates keep their dtype (rules override).
    #[arg(long, value_name = "LAYOUT")]
    pub scale: Option<String>,
    /// With --scale: compressed-tensors (llm-compressor's format: `weight_scale` in the
    /// weight's dtype; transformers and vLLM load it) or fp8 (vLLM's/DeepSeek's
    /// `weight_scale_inv` f32 block scales). Default compressed-tensors.
    #[arg(long, value_name = "FORMAT")]
    pub scale_format: Option<String>,
    #[arg(short, long, required_unless_present = "batch", help = output_help())]
    pub output: Option<PathBuf>,
    #[arg(long, value_name = "DTYPE", help = to_help())]
    pub to: Option<String>,
    #[command(flatten)]
    pub rules: RuleFlags,
    /// When finite values would leave the target's range: error (stop, write nothing), keep
    /// (leave those tensors as they are), clamp (saturate), allow (cast as torch does, no
    /// check).
    #[arg(long, value_name = "POLICY", default_value = "error")]
    pub on_overflow: String,
    /// Keep tensors whose non-zero values would flush to zero above this fraction.
    #[arg(long, value_name = "FRACTION")]
    pub max_underflow: Option<f64>,
    /// Per tensor, pick the first --to candidate that keeps the SNR at or above SNR_DB and
    /// does not overflow.
    #[arg(long, value_name = "SNR_DB")]
    pub auto: Option<f64>,
    /// Split the output into shards of at most SIZE (5GB, 500MB, 2GiB), Hub layout.
    #[arg(long, value_name = "SIZE")]
    pub max_shard_size: Option<String>,
    /// Split the work by output shard across N processes or machines: part K/N writes only
    /// its shards (every part computes the same plan; give each the same options); a last
    /// call with `--part finish` checks them and writes the folder's other files and the
    /// index. The result is byte-identical to one run.
    #[arg(long, value_name = "K/N|finish", conflicts_with = "batch")]
    pub part: Option<String>,
    /// Print the plan and write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Replace an existing output.
    #[arg(long)]
    pub force: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// The global -q/--quiet (set by [`parse`]): no progress bar and no summary line.
    #[arg(skip)]
    pub quiet: bool,
    /// Do not fsync the output before renaming it into place.
    #[arg(long)]
    pub no_sync: bool,
}

pub use weightcast::commands::RuleArg;

/// Parsed arguments plus the rule flags in the order they were given.
#[derive(Debug)]
pub struct Args {
    pub cli: Cli,
    pub rule_order: Vec<RuleArg>,
}

pub fn parse<I, T>(argv: I) -> Result<Args, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let matches = Cli::command().try_get_matches_from(argv)?;
    let mut cli = Cli::from_arg_matches(&matches)?;
    if let Command::Convert(c) = &mut cli.command {
        c.quiet = cli.quiet;
    }
    let rule_order = matches
        .subcommand_matches("convert")
        .or_else(|| matches.subcommand_matches("analyze"))
        .or_else(|| matches.subcommand_matches("eval"))
        .map(ordered_rules)
        .unwrap_or_default();
    Ok(Args { cli, rule_order })
}

fn ordered_rules(m: &ArgMatches) -> Vec<RuleArg> {
    let mut all: Vec<(usize, RuleArg)> = Vec::new();
    let mut take = |id: &str, make: &dyn Fn(String) -> RuleArg| {
        if let (Some(idx), Some(vals)) = (m.indices_of(id), m.get_raw(id)) {
            for (i, v) in idx.zip(vals) {
                all.push((i, make(v.to_string_lossy().into_owned())));
            }
        }
    };
    take("keep", &RuleArg::Keep);
    take("only", &RuleArg::Only);
    take("rule", &RuleArg::Rule);
    take("rules", &|s| RuleArg::Rules(PathBuf::from(s)));
    take("preset", &RuleArg::Preset);
    all.sort_by_key(|(i, _)| *i);
    all.into_iter().map(|(_, r)| r).collect()
}

/// Globals accepted as calls: a user's own classes.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct AllowArgs {
    /// Accept calls to this global (`module.name`, or `module.*` for a module and those below
    /// it), e.g. your own model classes. Repeatable. A dangerous global stays dangerous.
    #[arg(long = "allow", value_name = "NAME")]
    pub names: Vec<String>,
    /// Accept the globals listed in FILE (one per line, `#` comments). Repeatable.
    #[arg(long = "allow-file", value_name = "FILE")]
    pub files: Vec<PathBuf>,
}

impl AllowArgs {
    /// The library's accepted globals.
    pub fn allow(&self) -> weightcast::Result<weightcast::audit::Allow> {
        weightcast::audit::Allow::with_files(self.names.iter().cloned(), &self.files)
    }
}
