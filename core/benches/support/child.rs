//! Running a child process and measuring its peak RSS (from `wait4`'s rusage).
#![allow(dead_code)] // each benchmark reads its own subset of `Measured`

use std::process::Command;

/// What a finished child reported.
pub struct Measured {
    /// Peak resident set size of the child, in KiB.
    pub peak_rss_kib: u64,
    /// Captured standard output.
    pub stdout: String,
}

/// Runs `command` to completion with stdout captured and stderr inherited, panicking with the
/// command line if it fails.
// The child is reaped by `wait4` (which also reports its peak RSS), not by `Child::wait`.
#[allow(clippy::zombie_processes)]
pub fn run_measured(command: &mut Command) -> Measured {
    use std::io::Read;
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
    let mut stdout = String::new();
    if let Some(mut pipe) = child.stdout.take() {
        let _ = pipe.read_to_string(&mut stdout);
    }
    let mut status = 0;
    // SAFETY: rusage is plain data that wait4 fills in; the pid is our own unwaited child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as libc::pid_t, "wait4 failed");
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{command:?} failed with status {status}:\n{stdout}"
    );
    Measured {
        peak_rss_kib: usage.ru_maxrss as u64,
        stdout,
    }
}
