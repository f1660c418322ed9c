//! The `weightcast` command: a thin layer over the library that owns all output, progress bars,
//! `--json` and exit codes (0 success, 1 failure, 2 bad usage, 130 interrupted).
//!
//! The binary calls [`main`] with the process's arguments; the Python wheel ships this binary
//! as its `weightcast` command, so both are the same program.

mod cli;
mod commands;
#[cfg(feature = "eval")]
mod eval_cmd;
mod report;
pub use weightcast::error::one_line;

/// Runs the command line `argv` (program name first) and returns the exit code.
pub fn main<I, T>(argv: I) -> u8
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let argv: Vec<std::ffi::OsString> = argv.into_iter().map(Into::into).collect();
    // With --json (or --format json), an error is a JSON document on stdout too, so that a
    // script reading stdout gets one whatever happened.
    let json = argv.iter().any(|a| a == "--json" || a == "--format=json")
        || argv
            .windows(2)
            .any(|w| w[0] == "--format" && w[1] == "json");
    let args = match cli::parse(argv) {
        Ok(a) => a,
        Err(e) => {
            // clap prints --help/--version to stdout (exit 0) and usage errors to stderr (exit 2).
            let code = e.exit_code();
            let _ = e.print();
            return code as u8;
        }
    };
    #[cfg(feature = "eval")]
    if matches!(args.cli.command, cli::Command::Eval(_))
        && std::env::var_os("RAYON_NUM_THREADS").is_none()
    {
        // candle asks for its thread count on every CPU matmul and, unless RAYON_NUM_THREADS is
        // set, answers by reading /proc/cpuinfo each time: on a small model that is most of the
        // time per token (measured: 0.9 ms -> 0.28 ms per token). Its own answer, fixed once,
        // before any thread of ours exists.
        std::env::set_var(
            "RAYON_NUM_THREADS",
            weightcast::eval::thread_count().to_string(),
        );
    }
    match commands::run(args) {
        Ok(code) => code,
        Err(e) => {
            let message = one_line(&e.to_string());
            eprintln!("weightcast: error: {message}");
            let code = if e
                .downcast_ref::<weightcast::Error>()
                .is_some_and(|e| e.is_usage())
            {
                2
            } else {
                1
            };
            if json {
                println!(
                    "{}",
                    serde_json::json!({"error": message, "exit_code": code})
                );
            }
            code
        }
    }
}
