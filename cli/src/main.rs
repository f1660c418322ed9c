//! The `weightcast` binary: everything is in the library ([`weightcast_cli::main`]).

use std::process::ExitCode;

fn main() -> ExitCode {
    // Output piped into `head` ends quietly, as with other Unix tools, instead of panicking on
    // a write to a closed pipe.
    // SAFETY: called once, before any thread exists, with the default handler (always valid);
    // `signal` with SIG_DFL has no memory effects.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    ExitCode::from(weightcast_cli::main(std::env::args_os()))
}
