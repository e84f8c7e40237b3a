//! The `graft` command line: one subcommand per stage of the data path.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // Rust ignores SIGPIPE, which turns a closed pipe (`graft inspect MODEL | head -1`) into a
    // panic in `println!`; the default action ends graft quietly, as it does other Unix tools.
    // SAFETY: restoring a signal's default action before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // A model can make ONNX Runtime's integer kernels trap (INT64_MIN / -1, a division by
    // zero); the fault cannot be recovered from, but it is reported as graft's error.
    // SAFETY: installing a handler that only calls async-signal-safe functions.
    unsafe {
        libc::signal(
            libc::SIGFPE,
            arithmetic_fault as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(2)
        }
    }
}

/// Ends graft with exit status 2 after an arithmetic fault (SIGFPE) in the model's kernels.
extern "C" fn arithmetic_fault(_signal: libc::c_int) {
    const MESSAGE: &[u8] = b"error: the model made ONNX Runtime hit an arithmetic fault \
        (SIGFPE: an integer division by zero or INT64_MIN / -1); the model is broken or \
        hostile\n";
    // SAFETY: write and _exit are async-signal-safe; MESSAGE is static.
    unsafe {
        libc::write(2, MESSAGE.as_ptr().cast(), MESSAGE.len());
        libc::_exit(2);
    }
}
