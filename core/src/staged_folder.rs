//! Outputs made of several files (a PEFT folder, an ONNX Runtime adapter with its graph, an
//! exported graph with its external data) that appear as a set or not at all.
//!
//! The files are written into a hidden staging folder beside the destination
//! (`.<name>.tmp<pid>.<n>`); [`StagedFolder::commit`] then puts the whole set in place with one
//! rename, or, when the destination exists, with one atomic exchange of the two folders
//! (`renameat2(RENAME_EXCHANGE)`), after which the old folder is removed. Entries of the old
//! folder that the new set does not contain are hard-linked into the staging folder first, so a
//! commit replaces exactly the staged entries and keeps the rest. A process killed at any point
//! leaves the destination either as it was or complete; a staging folder it leaves behind is
//! removed by the next commit to the same destination.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::atomic_file::{parent_dir, remove_stale_temporaries, sync_dir, temporary_name};
use crate::{Error, Result};

/// A folder output being written; see the module documentation. Dropped without a commit, the
/// staging folder and everything in it is removed and the destination is untouched.
pub struct StagedFolder {
    target: PathBuf,
    staging: PathBuf,
    committed: bool,
}

impl StagedFolder {
    /// Creates an empty staging folder for the folder `target` (whose parent folders are
    /// created if needed). Fails when `target` exists and is not a folder.
    pub fn create(target: &Path) -> Result<StagedFolder> {
        let target = if target.exists() || target.file_name().is_none() {
            target.canonicalize().map_err(|e| Error::io(target, e))?
        } else {
            target.to_path_buf()
        };
        if target.exists() && !target.is_dir() {
            return Err(Error::Config(format!(
                "{}: exists and is not a folder; the output is a folder of files",
                target.display()
            )));
        }
        let parent = parent_dir(&target).to_path_buf();
        std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
        let name = folder_name(&target);
        remove_stale_temporaries(&parent, &name);
        let staging = parent.join(temporary_name(&name));
        std::fs::create_dir(&staging).map_err(|e| Error::io(&staging, e))?;
        Ok(StagedFolder {
            target,
            staging,
            committed: false,
        })
    }

    /// The staging folder, where the output's files are to be written.
    pub fn path(&self) -> &Path {
        &self.staging
    }

    /// The destination folder.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Maps a path inside the staging folder to where it will be after the commit.
    pub fn final_path(&self, staged: &Path) -> PathBuf {
        match staged.strip_prefix(&self.staging) {
            Ok(relative) => self.target.join(relative),
            Err(_) => staged.to_path_buf(),
        }
    }

    /// Puts the staged files in place as one set (see the module documentation).
    pub fn commit(mut self) -> Result<()> {
        sync_dir(&self.staging);
        let name = folder_name(&self.target);
        crate::pause::point(&format!("folder-staged:{name}"));
        if !self.target.exists() {
            match std::fs::rename(&self.staging, &self.target) {
                Ok(()) => {
                    self.committed = true;
                    sync_dir(parent_dir(&self.target));
                    return Ok(());
                }
                // Another process created the destination meanwhile: exchange with it instead.
                Err(e) if self.target.is_dir() => drop(e),
                Err(e) => return Err(Error::io(&self.target, e)),
            }
        }
        carry_over(&self.target, &self.staging)?;
        if let Ok(metadata) = std::fs::metadata(&self.target) {
            let mode = metadata.permissions().mode();
            let _ = std::fs::set_permissions(
                &self.staging,
                std::fs::Permissions::from_mode(mode & 0o7777),
            );
        }
        exchange(&self.staging, &self.target)?;
        self.committed = true;
        sync_dir(parent_dir(&self.target));
        crate::pause::point(&format!("folder-exchanged:{name}"));
        // The staging path now holds the previous folder.
        let _ = std::fs::remove_dir_all(&self.staging);
        Ok(())
    }
}

impl Drop for StagedFolder {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.staging);
        }
    }
}

fn folder_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into())
}

/// Hard-links every entry of `from` that `into` lacks into `into` (folders recreated and filled
/// the same way), so that replacing `from` by `into` keeps them.
fn carry_over(from: &Path, into: &Path) -> Result<()> {
    let entries = std::fs::read_dir(from).map_err(|e| Error::io(from, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(from, e))?;
        let source = entry.path();
        let destination = into.join(entry.file_name());
        if destination.symlink_metadata().is_ok() {
            continue;
        }
        let kind = entry.file_type().map_err(|e| Error::io(&source, e))?;
        if kind.is_dir() {
            std::fs::create_dir(&destination).map_err(|e| Error::io(&destination, e))?;
            carry_over(&source, &destination)?;
        } else {
            // A hard link of a symbolic link is a link to the same symbolic link (not followed).
            std::fs::hard_link(&source, &destination).map_err(|e| Error::io(&source, e))?;
        }
    }
    Ok(())
}

/// Swaps the folders `a` and `b` atomically; where the file system cannot, moves `b` aside and
/// `a` in its place (a short moment without `b`), moving `b` back if the second rename fails.
/// Afterwards `a` holds what `b` held.
pub(crate) fn exchange(a: &Path, b: &Path) -> Result<()> {
    let source = std::ffi::CString::new(a.as_os_str().as_bytes())
        .map_err(|e| Error::io(a, std::io::Error::other(e)))?;
    let destination = std::ffi::CString::new(b.as_os_str().as_bytes())
        .map_err(|e| Error::io(b, std::io::Error::other(e)))?;
    // SAFETY: both paths are valid NUL-terminated strings for the duration of the call.
    let status = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            source.as_ptr(),
            libc::AT_FDCWD,
            destination.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if status == 0 {
        return Ok(());
    }
    let error = std::io::Error::last_os_error();
    if !matches!(
        error.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP)
    ) {
        return Err(Error::io(b, error));
    }
    let aside = parent_dir(b).join(temporary_name(&folder_name(b)));
    std::fs::rename(b, &aside).map_err(|e| Error::io(b, e))?;
    if let Err(e) = std::fs::rename(a, b) {
        let _ = std::fs::rename(&aside, b);
        return Err(Error::io(b, e));
    }
    std::fs::rename(&aside, a).map_err(|e| Error::io(a, e))
}
