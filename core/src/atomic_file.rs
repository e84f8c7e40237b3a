//! Output files that appear whole or not at all: written under a temporary name, renamed into place.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// A file written under a temporary name and renamed into place by [`AtomicFile::commit`];
/// dropped without commit, the temporary file is removed.
pub struct AtomicFile {
    target: PathBuf,
    temp: PathBuf,
    file: Option<std::io::BufWriter<std::fs::File>>,
}

impl AtomicFile {
    /// Opens a temporary file beside `target`.
    pub fn create(target: &Path) -> Result<Self> {
        let dir = target
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = target.file_name().and_then(|n| n.to_str()).unwrap_or("out");
        let temp = dir.join(format!(".{name}.tmp{}", std::process::id()));
        let file = std::fs::File::create(&temp).map_err(|e| Error::io(&temp, e))?;
        Ok(AtomicFile {
            target: target.to_path_buf(),
            temp,
            file: Some(std::io::BufWriter::with_capacity(1 << 20, file)),
        })
    }

    /// Appends bytes.
    pub fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        let file = self
            .file
            .as_mut()
            .expect("an AtomicFile is writable until committed");
        file.write_all(bytes).map_err(|e| Error::io(&self.temp, e))
    }

    /// Flushes and renames the temporary file over the target.
    pub fn commit(mut self) -> Result<()> {
        let file = self.file.take().expect("an AtomicFile is committed once");
        file.into_inner()
            .map_err(|e| Error::io(&self.temp, e.into_error()))?
            .sync_all()
            .map_err(|e| Error::io(&self.temp, e))?;
        std::fs::rename(&self.temp, &self.target).map_err(|e| Error::io(&self.target, e))
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

/// Writes `bytes` to `path` atomically.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = AtomicFile::create(path)?;
    file.write_all(bytes)?;
    file.commit()
}
