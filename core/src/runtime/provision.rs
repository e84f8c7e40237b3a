//! Finding the ONNX Runtime shared library, and fetching it from the Python package index when a
//! machine has none, so that nothing needs installing by hand.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Error, Result};

/// The ONNX Runtime release graft is built against (the `ort` crate's `api-31`).
pub const ORT_VERSION: &str = "1.31.1";

/// The library's file name inside the `onnxruntime` wheel.
fn library_file_name() -> String {
    if cfg!(target_os = "macos") {
        format!("libonnxruntime.{ORT_VERSION}.dylib")
    } else if cfg!(target_os = "windows") {
        "onnxruntime.dll".to_owned()
    } else {
        format!("libonnxruntime.so.{ORT_VERSION}")
    }
}

/// The folder graft caches downloaded runtimes in: `$GRAFT_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/graft`, else `~/.cache/graft`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("GRAFT_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("graft");
    }
    let home = std::env::var_os("HOME").map_or_else(std::env::temp_dir, PathBuf::from);
    home.join(".cache").join("graft")
}

/// The ONNX Runtime library to load: `$ORT_DYLIB_PATH` if set, else the cached copy, else one
/// fetched now from the `onnxruntime` wheel on the Python package index (`python3 -m pip
/// download`, no install) and cached.
pub fn library_path() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("ORT_DYLIB_PATH") {
        let path = PathBuf::from(path);
        if !path.is_file() {
            return Err(Error::Runtime(format!(
                "ORT_DYLIB_PATH={} is not a file",
                path.display()
            )));
        }
        return Ok(path);
    }
    let dir = cache_dir().join(format!("onnxruntime-{ORT_VERSION}"));
    let library = dir.join(library_file_name());
    if library.is_file() {
        return Ok(library);
    }
    fetch_from_wheel(&dir, &library)?;
    Ok(library)
}

fn fetch_from_wheel(dir: &Path, library: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let download_dir = dir.join(format!("download-{}", std::process::id()));
    eprintln!(
        "graft: fetching ONNX Runtime {ORT_VERSION} from the Python package index into {}",
        dir.display()
    );
    let wheel = download_wheel(&format!("onnxruntime=={ORT_VERSION}"), &download_dir).map_err(
        |reason| {
            Error::Runtime(format!(
                "{reason}; set ORT_DYLIB_PATH to libonnxruntime {ORT_VERSION} instead"
            ))
        },
    )?;
    let wheel_file = std::fs::File::open(&wheel).map_err(|e| Error::io(&wheel, e))?;
    let mut archive = zip::ZipArchive::new(wheel_file)
        .map_err(|e| Error::Runtime(format!("{}: {e}", wheel.display())))?;
    let member = format!("onnxruntime/capi/{}", library_file_name());
    let mut entry = archive
        .by_name(&member)
        .map_err(|e| Error::Runtime(format!("{}: no {member}: {e}", wheel.display())))?;
    let temp = library.with_extension(format!("partial{}", std::process::id()));
    let mut out = std::fs::File::create(&temp).map_err(|e| Error::io(&temp, e))?;
    std::io::copy(&mut entry, &mut out).map_err(|e| Error::io(&temp, e))?;
    drop(out);
    std::fs::rename(&temp, library).map_err(|e| Error::io(library, e))?;
    let _ = std::fs::remove_dir_all(&download_dir);
    Ok(())
}

/// The OpenVINO execution-provider plugin graft uses (`onnxruntime-ep-openvino` on the Python
/// package index; it bundles OpenVINO and works with ONNX Runtime 1.23 and later).
pub const OPENVINO_EP_VERSION: &str = "1.8.1";

/// The plugin's library file name inside the wheel.
const OPENVINO_PLUGIN_FILE: &str = "libonnxruntime_providers_openvino_plugin.so";

/// The OpenVINO execution-provider plugin library: `$GRAFT_OPENVINO_EP_PATH` if set, else the
/// cached copy, else one fetched now from the `onnxruntime-ep-openvino` wheel and cached with the
/// OpenVINO libraries it loads beside it (the GPU and NPU device plugins are left out).
pub fn openvino_plugin_path() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("GRAFT_OPENVINO_EP_PATH") {
        let path = PathBuf::from(path);
        if !path.is_file() {
            return Err(Error::Runtime(format!(
                "GRAFT_OPENVINO_EP_PATH={} is not a file",
                path.display()
            )));
        }
        return Ok(path);
    }
    if !cfg!(all(target_os = "linux", target_arch = "x86_64")) {
        return Err(Error::Runtime(format!(
            "the OpenVINO execution provider is published for Linux x86-64 only \
             (onnxruntime-ep-openvino {OPENVINO_EP_VERSION}); set GRAFT_OPENVINO_EP_PATH to a \
             build of the plugin, or use --device cpu"
        )));
    }
    let dir = cache_dir().join(format!("openvino-ep-{OPENVINO_EP_VERSION}"));
    let library = dir.join(OPENVINO_PLUGIN_FILE);
    if library.is_file() {
        return Ok(library);
    }
    eprintln!(
        "graft: fetching the OpenVINO execution provider {OPENVINO_EP_VERSION} from the Python \
         package index into {}",
        dir.display()
    );
    let requirement = format!("onnxruntime-ep-openvino=={OPENVINO_EP_VERSION}");
    fetch_wheel_folder(&requirement, &dir, openvino_members).map_err(|reason| {
        Error::Runtime(format!(
            "{reason}; set GRAFT_OPENVINO_EP_PATH to the plugin library instead, or use --device cpu"
        ))
    })?;
    Ok(library)
}

/// The shared libraries of the OpenVINO wheel, side by side: the plugin once (the wheel has
/// copies under versioned names), OpenVINO, its CPU plugin and frontends, TBB and hwloc (no
/// device plugins but the CPU's).
fn openvino_members(names: &[String]) -> std::result::Result<Vec<(String, String)>, String> {
    let members: Vec<(String, String)> = (names.iter())
        .filter_map(|member| {
            let name = member.strip_prefix("onnxruntime_ep_openvino/")?;
            let versioned_plugin = name.starts_with("libonnxruntime_providers_openvino")
                && name != OPENVINO_PLUGIN_FILE;
            let other_device = name.contains("intel_gpu") || name.contains("intel_npu");
            let wanted =
                name.contains(".so") && !name.contains('/') && !versioned_plugin && !other_device;
            wanted.then(|| (member.clone(), name.to_owned()))
        })
        .collect();
    if !members.iter().any(|(_, name)| name == OPENVINO_PLUGIN_FILE) {
        return Err(format!(
            "the wheel has no onnxruntime_ep_openvino/{OPENVINO_PLUGIN_FILE}"
        ));
    }
    Ok(members)
}

/// The wheel of `requirement` fetched ([`download_wheel`]) and the members `pick` chooses
/// extracted into the folder `dir`, which appears whole or not at all (extracted beside it,
/// then renamed; when another process put `dir` in place first, theirs is kept). `pick` sees
/// every member name and returns (member, path relative to `dir`) pairs. The error says what
/// failed, for the caller to word.
pub(crate) fn fetch_wheel_folder(
    requirement: &str,
    dir: &Path,
    pick: impl FnOnce(&[String]) -> std::result::Result<Vec<(String, String)>, String>,
) -> std::result::Result<(), String> {
    let root = crate::atomic_file::parent_dir(dir);
    let tag = format!(
        "{}-{}",
        std::process::id(),
        dir.file_name().map_or("".into(), |n| n.to_string_lossy())
    );
    let download = root.join(format!("download-{tag}"));
    let partial = root.join(format!("partial-{tag}"));
    let extracted = download_wheel(requirement, &download)
        .and_then(|wheel| extract_wheel(&wheel, &partial, pick));
    let _ = std::fs::remove_dir_all(&download);
    extracted?;
    if let Err(e) = std::fs::rename(&partial, dir) {
        let _ = std::fs::remove_dir_all(&partial);
        if !dir.is_dir() {
            return Err(format!("cannot put {} in place: {e}", dir.display()));
        }
    }
    Ok(())
}

/// Extracts the members of `wheel` that `pick` chooses (see [`fetch_wheel_folder`]) into the
/// new folder `into`; a relative path that would leave it is refused, not followed.
pub(crate) fn extract_wheel(
    wheel: &Path,
    into: &Path,
    pick: impl FnOnce(&[String]) -> std::result::Result<Vec<(String, String)>, String>,
) -> std::result::Result<(), String> {
    let fail = |reason: String| format!("{}: {reason}", wheel.display());
    let file = std::fs::File::open(wheel).map_err(|e| fail(e.to_string()))?;
    let mut archive = zip::ZipArchive::new(file).map_err(|e| fail(format!("not a wheel: {e}")))?;
    let names: Vec<String> = archive.file_names().map(str::to_owned).collect();
    let members = pick(&names).map_err(fail)?;
    let _ = std::fs::remove_dir_all(into);
    for (member, relative) in members {
        let safe = Path::new(&relative)
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
        if !safe {
            return Err(fail(format!("member {member:?} leaves its folder")));
        }
        let mut entry = archive
            .by_name(&member)
            .map_err(|e| fail(format!("{member}: {e}")))?;
        let target = into.join(&relative);
        let write = |entry: &mut zip::read::ZipFile<'_, std::fs::File>| -> std::io::Result<()> {
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::io::copy(entry, &mut std::fs::File::create(&target)?).map(drop)
        };
        write(&mut entry).map_err(|e| format!("{}: {e}", target.display()))?;
    }
    Ok(())
}

/// Downloads the wheel of `requirement` (`name==version`) with `python3 -m pip download` (no
/// dependencies, no install; `$PYTHON` names another interpreter) into `download_dir`, which it
/// creates, and returns the wheel's path. The error says what failed, for the caller to word.
pub fn download_wheel(
    requirement: &str,
    download_dir: &Path,
) -> std::result::Result<PathBuf, String> {
    std::fs::create_dir_all(download_dir)
        .map_err(|e| format!("cannot create {}: {e}", download_dir.display()))?;
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let status = Command::new(&python)
        .args(["-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"])
        .arg(requirement)
        .arg("-d")
        .arg(download_dir)
        .status()
        .map_err(|e| {
            format!("cannot run `{python} -m pip` to fetch {requirement} ({e}); install Python 3 with pip")
        })?;
    if !status.success() {
        return Err(format!(
            "`{python} -m pip download {requirement}` failed ({status})"
        ));
    }
    std::fs::read_dir(download_dir)
        .map_err(|e| format!("cannot read {}: {e}", download_dir.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|ext| ext == "whl"))
        .ok_or_else(|| format!("pip left no wheel in {}", download_dir.display()))
}
