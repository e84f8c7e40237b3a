//! HF PEFT files for methods that declare their own layout ([`PeftFiles`] in the patch):
//! AdaLoRA today. The plugin knows PEFT's config keys and tensor names; this module only
//! writes and reads what it declared.

use std::path::Path;

use graft_plugin_sdk::{AppliedMethod, Fold, PeftFiles};

use super::export::write_files;
use super::keys::KEY_PREFIX;
use super::transpose;
use crate::ir::Model;
use crate::{Error, Result};

/// The one method of `model` that declared PEFT files, if any; two are an error (a PEFT
/// adapter folder holds one adapter), and so are another method's LoRA branches beside it,
/// which its files would leave out.
pub(super) fn declared(model: &Model) -> Result<Option<(AppliedMethod, PeftFiles)>> {
    let record = crate::patch::read_record(model)?;
    if let Some(method) = record.methods.iter().find(|m| m.training.peft.is_some()) {
        let foreign_lora = record.folds.iter().any(|f| match f {
            Fold::LowRank { a, .. } => !method.parameters.contains(a),
            _ => false,
        });
        if foreign_lora {
            return Err(Error::Config(format!(
                "the model has LoRA branches and method {}'s HF PEFT files; a PEFT adapter holds one of them: export each method's model separately, or use `graft merge` or `--format onnx`",
                method.method
            )));
        }
    }
    let mut found = record
        .methods
        .into_iter()
        .filter_map(|m| m.training.peft.clone().map(|files| (m, files)));
    let first = found.next();
    if let (Some((a, _)), Some((b, _))) = (&first, found.next()) {
        return Err(Error::Config(format!(
            "methods {} and {} both have HF PEFT files; a PEFT adapter holds one of them",
            a.method, b.method
        )));
    }
    Ok(first)
}

/// Writes the declared files into `dir`; `false` (nothing written) when no method declared
/// any.
pub(super) fn export(model: &Model, dir: &Path) -> Result<bool> {
    let Some((_, files)) = declared(model)? else {
        return Ok(false);
    };
    let prefix = if files.bare_keys { "" } else { KEY_PREFIX };
    let tensors = declared_tensors(model, &files, prefix)?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    write_files(dir, &files.config, &tensors)?;
    Ok(true)
}

/// A tensor of an adapter file: key, shape and little-endian float32 bytes.
pub(crate) type KeyedBytes = (String, Vec<usize>, Vec<u8>);

/// The float32 bytes of every tensor `files` declares, keyed `<key_prefix><key>` and
/// transposed where declared, as `(key, shape, bytes)`.
pub(crate) fn declared_tensors(
    model: &Model,
    files: &PeftFiles,
    key_prefix: &str,
) -> Result<Vec<KeyedBytes>> {
    let record = crate::patch::read_record(model)?;
    let mut tensors = Vec::new();
    for mapping in &files.tensors {
        let tensor = match model.graph.initializer(&mapping.tensor) {
            Some(tensor) => tensor.clone(),
            // A value the method computes (a P-Tuning prompt encoder's output): baked now.
            None => match record.folds.iter().find_map(|fold| match fold {
                Fold::Bake { value, nodes, .. } if *value == mapping.tensor => Some(nodes),
                _ => None,
            }) {
                Some(nodes) => crate::merge::bake(model, &mapping.tensor, nodes)?,
                None => {
                    return Err(Error::Tensor {
                        name: mapping.tensor.clone(),
                        reason: "a method declared it for its adapter files, but the model \
                                 lacks it"
                            .into(),
                    })
                }
            },
        };
        let mut values = tensor.float_values()?;
        if mapping.transpose {
            let [rows, cols] = matrix(&mapping.tensor, &tensor.dims)?;
            values = transpose(&values, rows, cols);
        }
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        tensors.push((
            format!("{key_prefix}{}", mapping.key),
            mapping.shape.clone(),
            bytes,
        ));
    }
    Ok(tensors)
}

/// Loads `file`'s tensors into the declared tensors; `None` when no method declared PEFT
/// files. Every key must map to a declared tensor of the declared shape; nothing changes
/// unless all do.
pub(super) fn load_values(model: &mut Model, file: &Path) -> Result<Option<usize>> {
    let Some((method, files)) = declared(model)? else {
        return Ok(None);
    };
    let rank_pattern = read_rank_pattern(file)?;
    load_declared(model, &method, &files, file, KEY_PREFIX, &rank_pattern).map(Some)
}

/// Loads the safetensors `file` into the tensors `files` declares for `method`: each key,
/// with `key_prefix` (and a trailing `.weight`) optional, must be a declared key of the
/// declared shape in float32; ranks that `rank_pattern` pruned are put back as zeros. Nothing
/// changes unless every key loads. Returns the number of tensors set.
pub(crate) fn load_declared(
    model: &mut Model,
    method: &AppliedMethod,
    files: &PeftFiles,
    file: &Path,
    key_prefix: &str,
    rank_pattern: &[(String, Vec<bool>)],
) -> Result<usize> {
    let fail = |reason: String| Error::Config(format!("{}: {reason}", file.display()));
    let bytes = crate::input_file::read(file)?;
    let stored = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| fail(format!("not a safetensors file: {e}")))?;
    let mut items = Vec::new();
    for (key, view) in stored.tensors() {
        if view.dtype() != safetensors::Dtype::F32 {
            return Err(fail(format!(
                "{key:?} is {:?}; method {} needs float32",
                view.dtype(),
                method.method
            )));
        }
        let values: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        items.push((key, view.shape().to_vec(), values));
    }
    load_declared_values(model, method, files, items, file, key_prefix, rank_pattern)
}

/// [`load_declared`] for tensors already read from `file`, as `(key, shape, values)`.
pub(crate) fn load_declared_values(
    model: &mut Model,
    method: &AppliedMethod,
    files: &PeftFiles,
    items: Vec<(String, Vec<usize>, Vec<f32>)>,
    file: &Path,
    key_prefix: &str,
    rank_pattern: &[(String, Vec<bool>)],
) -> Result<usize> {
    let fail = |reason: String| Error::Config(format!("{}: {reason}", file.display()));
    let mut updates = Vec::new();
    for (key, mut shape, mut values) in items {
        let short = key.strip_prefix(key_prefix).unwrap_or(&key);
        let mapping = files
            .tensors
            .iter()
            .find(|m| {
                m.key == short
                    || format!("{}.weight", m.key) == short
                    || m.key.strip_suffix(".weight") == Some(short)
            })
            .ok_or_else(|| {
                fail(format!(
                    "key {key:?} matches no tensor of method {} (it expects keys such as {:?})",
                    method.method,
                    files.tensors.first().map(|m| &m.key)
                ))
            })?;
        let module = mapping.key.rsplit_once('.').map_or("", |(m, _)| m);
        let kept = rank_pattern
            .iter()
            .find(|(k, _)| k.rsplit_once('.').is_some_and(|(m, _)| m == module))
            .map(|(_, kept)| kept.as_slice());
        let stored_shape = shape.clone();
        if let (Some(kept), Some(axis)) = (kept, mapping.rank_axis) {
            if shape.get(axis) == Some(&kept.iter().filter(|k| **k).count()) {
                values = expand_ranks(&values, &shape, axis, kept);
                shape[axis] = kept.len();
            }
        }
        if shape != mapping.shape {
            return Err(fail(format!(
                "{key:?} is {stored_shape:?}; method {} needs {:?}",
                method.method, mapping.shape
            )));
        }
        if mapping.transpose {
            let [rows, cols] = [shape[0], shape[1]];
            values = transpose(&values, rows, cols);
        }
        updates.push((mapping.tensor.clone(), values));
    }
    let n = updates.len();
    for (name, values) in updates {
        let tensor = model
            .graph
            .initializer_mut(&name)
            .ok_or_else(|| Error::Tensor {
                name: name.clone(),
                reason: "declared for adapter files but missing from the model".into(),
            })?;
        let dims = tensor.dims.clone();
        tensor.set_float_values(dims, &values)?;
    }
    Ok(n)
}

/// The `rank_pattern` of the `adapter_config.json` beside `file`: module key → kept ranks
/// (AdaLoRA's lists of booleans; other forms and a missing config give none).
fn read_rank_pattern(file: &Path) -> Result<Vec<(String, Vec<bool>)>> {
    let config = file.with_file_name(super::CONFIG_FILE);
    if !config.exists() {
        return Ok(Vec::new());
    }
    let text = crate::input_file::read_to_string(&config)?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::Config(format!("{}: not JSON: {e}", config.display())))?;
    let Some(pattern) = value.get("rank_pattern").and_then(|p| p.as_object()) else {
        return Ok(Vec::new());
    };
    Ok(pattern
        .iter()
        .filter_map(|(key, kept)| {
            let kept: Option<Vec<bool>> = kept
                .as_array()?
                .iter()
                .map(serde_json::Value::as_bool)
                .collect();
            Some((key.clone(), kept?))
        })
        .collect())
}

/// `values` (row-major, `shape`) with axis `axis` spread back to `kept.len()` slots: the kept
/// ranks in order, zeros in the pruned ones.
fn expand_ranks(values: &[f32], shape: &[usize], axis: usize, kept: &[bool]) -> Vec<f32> {
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product();
    let slots: Vec<usize> = (0..kept.len()).filter(|&k| kept[k]).collect();
    let mut out = vec![0.0; outer * kept.len() * inner];
    for o in 0..outer {
        for (position, &slot) in slots.iter().enumerate() {
            let from = (o * shape[axis] + position) * inner;
            let to = (o * kept.len() + slot) * inner;
            out[to..to + inner].copy_from_slice(&values[from..from + inner]);
        }
    }
    out
}

fn matrix(name: &str, dims: &[i64]) -> Result<[usize; 2]> {
    match dims {
        [rows, cols] => Ok([*rows as usize, *cols as usize]),
        other => Err(Error::Tensor {
            name: name.to_owned(),
            reason: format!("a transposed PEFT tensor must be a matrix, not {other:?}"),
        }),
    }
}
