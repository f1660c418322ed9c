//! The `weightcast` command: a thin layer over the library that owns all output, progress bars,
//! `--json` and exit codes (0 success, 1 failure, 2 bad usage).

mod cli;
mod commands;
mod html;
mod report;

use std::process::ExitCode;

fn main() -> ExitCode {
    // Output piped into `head` ends quietly, as with other Unix tools, instead of panicking on
    // a write to a closed pipe. Safe: called once, before any thread exists, with a handler
    // (the default) that is always valid.
    // SAFETY: see above; `signal` with SIG_DFL has no memory effects.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let args = match cli::parse() {
        Ok(a) => a,
        Err(e) => {
            // clap prints --help/--version to stdout (exit 0) and usage errors to stderr (exit 2).
            let code = e.exit_code();
            let _ = e.print();
            return ExitCode::from(code as u8);
        }
    };
    if matches!(args.cli.command, cli::Command::Eval(_))
        && std::env::var_os("RAYON_NUM_THREADS").is_none()
    {
        // candle asks for its thread count on every CPU matmul and, unless RAYON_NUM_THREADS is
        // set, answers by reading /proc/cpuinfo each time: on a small model that is most of the
        // time per token (measured: 0.9 ms -> 0.28 ms per token). Its own answer, fixed once,
        // before any thread exists (so setting the variable races with no reader).
        std::env::set_var(
            "RAYON_NUM_THREADS",
            weightcast::eval::thread_count().to_string(),
        );
    }
    match commands::run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("weightcast: error: {}", report::one_line(&e.to_string()));
            if e.downcast_ref::<weightcast::Error>()
                .is_some_and(|e| e.is_usage())
            {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}
