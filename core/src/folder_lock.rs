//! Exclusive use of an output folder by one graft process: an advisory `flock` on the folder
//! itself, held as long as the [`FolderLock`] lives and released by the kernel when the process
//! exits, however it exits (so a killed run never leaves a stale lock behind).

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// An exclusive lock on a folder, released on drop.
pub struct FolderLock {
    _handle: File,
    path: PathBuf,
}

impl FolderLock {
    /// Locks the existing folder `dir`, or fails at once with [`Error::Config`] naming it when
    /// another process holds the lock; `what` says what the folder is, for the message (for
    /// example "run folder").
    pub fn acquire(dir: &Path, what: &str) -> Result<FolderLock> {
        let handle = File::open(dir).map_err(|e| Error::io(dir, e))?;
        // SAFETY: flock on a descriptor this function owns.
        let status = unsafe { libc::flock(handle.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if status != 0 {
            let error = std::io::Error::last_os_error();
            if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(Error::Config(format!(
                    "{}: this {what} is in use by another graft process; wait for it to finish \
                     or choose another folder",
                    dir.display()
                )));
            }
            return Err(Error::io(dir, error));
        }
        Ok(FolderLock {
            _handle: handle,
            path: dir.to_path_buf(),
        })
    }

    /// The locked folder.
    pub fn path(&self) -> &Path {
        &self.path
    }
}
