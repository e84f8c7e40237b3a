//! Named pause points for crash tests (test-only): with `GRAFT_TEST_PAUSE_AT=<point>` set, graft
//! stops for good when it reaches that point, so that a test can kill it there with SIGKILL and
//! check what the files on disk look like.
//!
//! The points are the moments between the steps of an output's commit, for example
//! `data-committed:<model file>` (an external-data file is in place, its model not yet) or
//! `folder-staged:<folder>` (a folder output is complete in its staging folder). The variable is
//! meant for tests only; it has no effect unless it names a point exactly.

use std::sync::OnceLock;

/// The environment variable naming the point to pause at.
pub const PAUSE_VARIABLE: &str = "GRAFT_TEST_PAUSE_AT";

/// The line written to stderr when graft pauses, followed by a space and the point's name.
pub const PAUSED_MARKER: &str = "GRAFT_TEST_PAUSED";

/// Pauses forever, after writing `GRAFT_TEST_PAUSED <point>` to stderr, when
/// `GRAFT_TEST_PAUSE_AT` equals `point`; returns at once otherwise.
pub fn point(point: &str) {
    static WANTED: OnceLock<Option<String>> = OnceLock::new();
    let wanted = WANTED.get_or_init(|| std::env::var(PAUSE_VARIABLE).ok());
    if wanted.as_deref() != Some(point) {
        return;
    }
    eprintln!("{PAUSED_MARKER} {point}");
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
