//! Opening the files graft reads (models, external data, configs, data, adapters): regular
//! files only. A FIFO would block graft forever and a device such as `/dev/zero` would be read
//! until memory runs out, so both are refused by name before a byte is read.

use std::fs::{File, FileType};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;

use crate::{Error, Result};

/// Opens `path` for reading; fails with [`Error::NotRegularFile`] unless it is a regular file
/// (a symbolic link to one is followed). Opening never blocks, even on a FIFO.
pub fn open(path: &Path) -> Result<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    check_regular(&file, path)?;
    // SAFETY: F_GETFL/F_SETFL on a file descriptor this function owns.
    unsafe {
        let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
    }
    Ok(file)
}

/// Fails with [`Error::NotRegularFile`] unless the open `file` (named `path` in the message)
/// is a regular file; a folder gives the system's "Is a directory" error.
pub fn check_regular(file: &File, path: &Path) -> Result<()> {
    let kind = file.metadata().map_err(|e| Error::io(path, e))?.file_type();
    if kind.is_dir() {
        return Err(Error::io(
            path,
            std::io::Error::from_raw_os_error(libc::EISDIR),
        ));
    }
    if !kind.is_file() {
        return Err(Error::NotRegularFile {
            path: path.to_path_buf(),
            kind: describe(kind),
        });
    }
    Ok(())
}

/// The whole of the regular file `path`.
pub fn read(path: &Path) -> Result<Vec<u8>> {
    let mut file = open(path)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    Ok(bytes)
}

/// The whole of the regular file `path` as UTF-8 text (a leading byte-order mark is dropped).
pub fn read_to_string(path: &Path) -> Result<String> {
    let bytes = read(path)?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let line = 1 + e.as_bytes()[..e.utf8_error().valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        Error::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("line {line}: not valid UTF-8"),
            ),
        )
    })?;
    Ok(match text.strip_prefix('\u{feff}') {
        Some(rest) => rest.to_owned(),
        None => text,
    })
}

fn describe(kind: FileType) -> String {
    if kind.is_fifo() {
        "FIFO (named pipe)"
    } else if kind.is_char_device() {
        "character device"
    } else if kind.is_block_device() {
        "block device"
    } else if kind.is_socket() {
        "socket"
    } else {
        "special file"
    }
    .into()
}

/// Opens the file at `relative` (plain components only) beneath the open folder `dir` for
/// reading, resolving it in one step so that nothing can be swapped in between: no component
/// may be a symbolic link (`ELOOP`) and the path may not leave `dir` (`EXDEV`). Uses `openat2`
/// with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS` where the kernel has it, and otherwise opens
/// component by component with `O_NOFOLLOW`. Opening never blocks, even on a FIFO; the caller
/// checks the kind of file ([`check_regular`]).
pub fn open_beneath(dir: &File, relative: &Path) -> std::io::Result<File> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::io::FromRawFd;
    let flags = libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC;
    let path = CString::new(relative.as_os_str().as_bytes())?;
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = flags as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS;
    // SAFETY: `path` and `how` outlive the call; the size passed is `how`'s.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            path.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd >= 0 {
        // SAFETY: the kernel returned a fresh descriptor that nothing else owns.
        return Ok(unsafe { File::from_raw_fd(fd as i32) });
    }
    let error = std::io::Error::last_os_error();
    if !matches!(
        error.raw_os_error(),
        Some(libc::ENOSYS) | Some(libc::EPERM) | Some(libc::E2BIG)
    ) {
        return Err(error);
    }
    let components: Vec<CString> = relative
        .components()
        .filter_map(|c| match c {
            std::path::Component::Normal(name) => Some(CString::new(name.as_bytes())),
            _ => None,
        })
        .collect::<Result<_, _>>()?;
    let Some((last, folders)) = components.split_last() else {
        return Err(std::io::Error::from_raw_os_error(libc::ENOENT));
    };
    let mut current: Option<File> = None;
    for folder in folders {
        let parent = current.as_ref().unwrap_or(dir).as_raw_fd();
        // SAFETY: `folder` is a valid NUL-terminated name; the descriptor is owned below.
        let fd = unsafe {
            libc::openat(
                parent,
                folder.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(not_followed(parent, folder));
        }
        // SAFETY: a fresh descriptor that nothing else owns.
        current = Some(unsafe { File::from_raw_fd(fd) });
    }
    let parent = current.as_ref().unwrap_or(dir).as_raw_fd();
    // SAFETY: `last` is a valid NUL-terminated name; the descriptor is owned below.
    let fd = unsafe { libc::openat(parent, last.as_ptr(), flags | libc::O_NOFOLLOW) };
    if fd < 0 {
        return Err(not_followed(parent, last));
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// The error of a failed `openat` of `name` in `parent`, reported as `ELOOP` when `name` is a
/// symbolic link (which `O_NOFOLLOW` refuses with `ELOOP` or `ENOTDIR`).
fn not_followed(parent: i32, name: &std::ffi::CStr) -> std::io::Error {
    let error = std::io::Error::last_os_error();
    let mut status: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `name` is a valid NUL-terminated name and `status` a writable stat buffer.
    let found = unsafe {
        libc::fstatat(
            parent,
            name.as_ptr(),
            &mut status,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if found == 0 && status.st_mode & libc::S_IFMT == libc::S_IFLNK {
        std::io::Error::from_raw_os_error(libc::ELOOP)
    } else {
        error
    }
}
