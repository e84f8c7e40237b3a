//! Output files that appear whole or not at all: written to a temporary file in the destination
//! folder, then renamed over the destination ([`AtomicFile::commit`]) or linked to a name that
//! must not exist yet ([`AtomicFile::link_new`]).
//!
//! The temporary file is unnamed where the file system allows it (`O_TMPFILE`), so a process
//! killed while writing leaves nothing behind; elsewhere it is a hidden file
//! `.<name>.tmp<pid>.<n>` beside the destination, removed when the writer is dropped and, after
//! a kill, by the next writer of the same destination once that process is gone.

use std::ffi::CString;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{Error, Result};

/// A file written under a temporary name and put in place by [`AtomicFile::commit`] or
/// [`AtomicFile::link_new`]; dropped before that, it leaves no file behind. A write error (a
/// full disk) or a failed commit also leaves none.
pub struct AtomicFile {
    target: PathBuf,
    dir: PathBuf,
    file: BufWriter<File>,
    temporary: Temporary,
    synced: bool,
}

/// Where the bytes wait until they are committed.
enum Temporary {
    /// An `O_TMPFILE` file: it has no name, and the kernel frees it when graft exits.
    Unnamed,
    /// A hidden file beside the target (file systems without `O_TMPFILE`).
    Named(PathBuf),
}

/// What [`AtomicFile::link_new`] found at the name it was given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NewFile {
    /// The name was free; the file is now there.
    Created,
    /// A file was there already with exactly these bytes; it was left as it is.
    Identical,
    /// A file was there already with other bytes; it was left as it is and nothing was written.
    Differs,
}

impl AtomicFile {
    /// Opens a temporary file in `target`'s folder, which must exist.
    pub fn create(target: &Path) -> Result<Self> {
        let dir = parent_dir(target).to_path_buf();
        let name = file_name(target);
        remove_stale_temporaries(&dir, &name);
        let unnamed = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .mode(0o666)
            .custom_flags(libc::O_TMPFILE)
            .open(&dir);
        let (file, temporary) = match unnamed {
            Ok(file) => (file, Temporary::Unnamed),
            Err(_) => {
                let temp = dir.join(temporary_name(&name));
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&temp)
                    .map_err(|e| Error::io(&temp, e))?;
                (file, Temporary::Named(temp))
            }
        };
        Ok(AtomicFile {
            target: target.to_path_buf(),
            dir,
            file: BufWriter::with_capacity(1 << 20, file),
            temporary,
            synced: false,
        })
    }

    /// Appends bytes.
    pub fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        self.synced = false;
        self.file
            .write_all(bytes)
            .map_err(|e| Error::io(&self.target, e))
    }

    /// Flushes the bytes to disk and renames the file over the target, replacing what was
    /// there.
    pub fn commit(mut self) -> Result<()> {
        self.sync()?;
        let target = self.target.clone();
        let fail = |e| Error::io(&target, e);
        match &self.temporary {
            Temporary::Named(temp) => std::fs::rename(temp, &target).map_err(fail)?,
            Temporary::Unnamed => match self.link_to(&target) {
                Ok(()) => {}
                // Replacing a file needs a name to rename from: a kill between the link and
                // the rename leaves that hidden name, which the next write removes.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let linked = self.dir.join(temporary_name(&file_name(&target)));
                    self.link_to(&linked).map_err(fail)?;
                    if let Err(e) = std::fs::rename(&linked, &target) {
                        let _ = std::fs::remove_file(&linked);
                        return Err(fail(e));
                    }
                }
                Err(e) => return Err(fail(e)),
            },
        }
        sync_dir(&self.dir);
        Ok(())
    }

    /// Flushes the bytes to disk and gives them the name `file_name` in the target's folder,
    /// unless a file of that name exists: then nothing is replaced, and the result says whether
    /// that file holds the same bytes. After [`NewFile::Created`] the writer is spent (dropping
    /// it keeps the new file); otherwise it may try another name.
    pub fn link_new(&mut self, file_name: &str) -> Result<NewFile> {
        self.sync()?;
        let destination = self.dir.join(file_name);
        match self.link_to(&destination) {
            Ok(()) => {
                if let Temporary::Named(temp) = &self.temporary {
                    let _ = std::fs::remove_file(temp);
                }
                sync_dir(&self.dir);
                Ok(NewFile::Created)
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                match self.same_bytes_as(&destination) {
                    Ok(true) => Ok(NewFile::Identical),
                    Ok(false) => Ok(NewFile::Differs),
                    Err(e) => Err(Error::io(&destination, e)),
                }
            }
            Err(e) => Err(Error::io(&destination, e)),
        }
    }

    fn sync(&mut self) -> Result<()> {
        if !self.synced {
            self.file.flush().map_err(|e| Error::io(&self.target, e))?;
            self.file
                .get_ref()
                .sync_all()
                .map_err(|e| Error::io(&self.target, e))?;
            self.synced = true;
        }
        Ok(())
    }

    /// Gives the temporary file the name `destination` (a hard link; fails if it exists).
    fn link_to(&self, destination: &Path) -> std::io::Result<()> {
        match &self.temporary {
            Temporary::Named(temp) => std::fs::hard_link(temp, destination),
            Temporary::Unnamed => {
                let fd = self.file.get_ref().as_raw_fd();
                let source = CString::new(format!("/proc/self/fd/{fd}"))?;
                let destination = CString::new(destination.as_os_str().as_bytes())?;
                // SAFETY: both paths are valid NUL-terminated strings for the duration of the call.
                let status = unsafe {
                    libc::linkat(
                        libc::AT_FDCWD,
                        source.as_ptr(),
                        libc::AT_FDCWD,
                        destination.as_ptr(),
                        libc::AT_SYMLINK_FOLLOW,
                    )
                };
                if status == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            }
        }
    }

    fn same_bytes_as(&self, other: &Path) -> std::io::Result<bool> {
        let mine = self.file.get_ref();
        let mut theirs = crate::input_file::open(other).map_err(std::io::Error::other)?;
        let length = mine.metadata()?.len();
        if theirs.metadata()?.len() != length {
            return Ok(false);
        }
        let mut a = vec![0u8; 1 << 20];
        let mut b = vec![0u8; 1 << 20];
        let mut offset = 0u64;
        while offset < length {
            let n = ((length - offset) as usize).min(a.len());
            mine.read_exact_at(&mut a[..n], offset)?;
            theirs.read_exact(&mut b[..n])?;
            if a[..n] != b[..n] {
                return Ok(false);
            }
            offset += n as u64;
        }
        Ok(true)
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        // After a commit the hidden name is gone (renamed, or removed once linked); before, it
        // is the only trace of the writer.
        if let Temporary::Named(temp) = &self.temporary {
            let _ = std::fs::remove_file(temp);
        }
    }
}

/// Writes `bytes` to `path` atomically.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = AtomicFile::create(path)?;
    file.write_all(bytes)?;
    file.commit()
}

/// The folder a path's file lives in (`.` for a bare file name).
pub fn parent_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Flushes a folder's entries to disk (after a rename or link in it); best effort.
pub(crate) fn sync_dir(dir: &Path) {
    if let Ok(handle) = File::open(dir) {
        let _ = handle.sync_all();
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into())
}

/// A fresh hidden name for a temporary beside `name`: `.<name>.tmp<pid>.<n>`.
pub(crate) fn temporary_name(name: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!(".{name}.tmp{}.{n}", std::process::id())
}

/// Removes the temporaries of `name` in `dir` that processes no longer running left behind
/// (`.<name>.tmp<pid>` and `.<name>.tmp<pid>.<n>`, files or folders).
pub(crate) fn remove_stale_temporaries(dir: &Path, name: &str) {
    let prefix = format!(".{name}.tmp");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let entry_name = entry.file_name();
        let Some(rest) = entry_name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
            continue;
        };
        let digits = rest.split('.').next().unwrap_or("");
        let Ok(pid) = digits.parse::<libc::pid_t>() else {
            continue;
        };
        if pid <= 0 || pid as u32 == std::process::id() || process_is_alive(pid) {
            continue;
        }
        let path = entry.path();
        match entry.file_type() {
            Ok(kind) if kind.is_dir() => {
                let _ = std::fs::remove_dir_all(&path);
            }
            _ => {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
}

fn process_is_alive(pid: libc::pid_t) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    let status = unsafe { libc::kill(pid, 0) };
    status == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}
