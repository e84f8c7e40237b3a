//! Training data: a file of examples, read in one of several formats, batched with padding.
//!
//! Pre-tokenized JSONL (`--data-format tokenized`) has one JSON object per line of integer lists
//! keyed by model input name (`input_ids`, `attention_mask`, `token_type_ids`, ...) plus the
//! target: `"label"` (an integer class or a number for regression) or `"labels"` (a list, for
//! causal LM and token classification). A value holding nested lists or a non-integer number
//! is a float feature (`"pixel_values": [[[0.1, ...]]]`), batched as float32 with the batch axis
//! first; every example of a file must give a feature the same shape. The text formats (classification text, instructions,
//! plain documents) are tokenized by [`super::text`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ndarray::{ArrayD, IxDyn};
use serde::Serialize;

use super::example::{json_object, label_target};
use super::text::{self, TextEncoder};
use crate::runtime::HostTensor;
use crate::{Error, Result};

pub use super::example::{Example, Feature, Target, IGNORE_INDEX};

/// How a data file is laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DataFormat {
    /// `.txt` files are `plain`; JSONL is told by the keys of its first object: `input_ids` →
    /// `tokenized`, `instruction` → `instruction`, `text` with `label` → `text`, `text` alone →
    /// `plain`.
    Auto,
    /// Pre-tokenized JSONL: integer lists by input name and `label` or `labels`.
    Tokenized,
    /// JSONL classification or regression: `{"text", "label"}`, optional `"text_pair"`.
    Text,
    /// Alpaca-shaped JSONL: `{"instruction", "input", "output"}`, scored on the output only.
    Instruction,
    /// Documents for causal LM: one per line of a `.txt` file, or JSONL `{"text"}`.
    Plain,
}

impl DataFormat {
    /// The flag value naming this format.
    pub fn name(self) -> &'static str {
        match self {
            DataFormat::Auto => "auto",
            DataFormat::Tokenized => "tokenized",
            DataFormat::Text => "text",
            DataFormat::Instruction => "instruction",
            DataFormat::Plain => "plain",
        }
    }
}

/// How to read a data file.
#[derive(Clone, Debug)]
pub struct DataOptions {
    /// The layout; `Auto` sniffs it with [`sniff_format`].
    pub format: DataFormat,
    /// The `tokenizer.json` (or a folder holding one) for the text formats.
    pub tokenizer: Option<PathBuf>,
    /// The most tokens a tokenized-from-text example has.
    pub max_len: usize,
    /// Count and skip malformed lines instead of failing at the first.
    pub skip_bad_lines: bool,
}

/// The examples of one data file.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// The examples, in file order.
    pub examples: Vec<Example>,
    /// The 1-based line of the file each example came from.
    pub lines: Vec<usize>,
    /// How many malformed lines were skipped.
    pub skipped: usize,
    /// What looks wrong with the data without stopping the run (most of it tokenizing to the
    /// unknown token).
    pub warnings: Vec<String>,
    /// The format the file was read in (never `Auto`).
    pub format: DataFormat,
}

/// Reads the data file at `path` as `options` say. A malformed line is an error naming
/// `file:line`, or is counted in [`Dataset::skipped`] when `options.skip_bad_lines` is set; a
/// file with no valid example is an error. The text formats need `options.tokenizer`.
pub fn read_data(path: &Path, options: &DataOptions) -> Result<Dataset> {
    let format = match options.format {
        DataFormat::Auto => sniff_format(path)?,
        format => format,
    };
    let skip = options.skip_bad_lines;
    let mut warnings = Vec::new();
    let (examples, lines, skipped) = match format {
        DataFormat::Auto | DataFormat::Tokenized => read_jsonl(path, skip)?,
        DataFormat::Text | DataFormat::Instruction | DataFormat::Plain => {
            let tokenizer = options.tokenizer.as_deref().ok_or_else(|| {
                Error::Config(format!(
                    "{}: the {} format needs a tokenizer: pass --tokenizer FILE (by default \
                     tokenizer.json beside the model is used when it exists)",
                    path.display(),
                    format.name()
                ))
            })?;
            let encoder = TextEncoder::from_file(tokenizer, options.max_len)?;
            let is_text_file = has_txt_extension(path);
            let read = read_lines(path, skip, |line| match format {
                DataFormat::Text => text::parse_classification(&encoder, line),
                DataFormat::Instruction => text::parse_instruction(&encoder, line),
                _ if is_text_file => encoder.document(line),
                _ => text::parse_document(&encoder, line),
            })?;
            warnings.extend(encoder.unknown_token_warning(path, &read.0));
            read
        }
    };
    Ok(Dataset {
        examples,
        lines,
        skipped,
        warnings,
        format,
    })
}

/// Tells the format of a data file: `plain` for a `.txt` file, otherwise from the keys of its
/// first line that is a JSON object (see [`DataFormat::Auto`]).
pub fn sniff_format(path: &Path) -> Result<DataFormat> {
    if has_txt_extension(path) {
        return Ok(DataFormat::Plain);
    }
    // Line by line: the first object line decides, and the rest of the file is not read here.
    let file = crate::input_file::open(path)?;
    for (index, line) in std::io::BufRead::lines(std::io::BufReader::new(file)).enumerate() {
        let line = line.map_err(|e| Error::io(path, e))?;
        let Ok(serde_json::Value::Object(object)) = serde_json::from_str(&line) else {
            continue;
        };
        let has = |key: &str| object.contains_key(key);
        return if has("input_ids") {
            Ok(DataFormat::Tokenized)
        } else if has("instruction") {
            Ok(DataFormat::Instruction)
        } else if has("text") && has("label") {
            Ok(DataFormat::Text)
        } else if has("text") {
            Ok(DataFormat::Plain)
        } else {
            let keys: Vec<&str> = object.keys().map(String::as_str).collect();
            Err(Error::Config(format!(
                "{}:{}: cannot tell the data format from the keys {keys:?}; pass --data-format",
                path.display(),
                index + 1
            )))
        };
    }
    Err(Error::Config(format!(
        "{}: no line is a JSON object, so the data format cannot be told; pass --data-format \
         (a .txt file is read as plain text)",
        path.display()
    )))
}

fn has_txt_extension(path: &Path) -> bool {
    path.extension()
        .is_some_and(|extension| extension.eq_ignore_ascii_case("txt"))
}

/// Reads a JSONL file of examples. A malformed line is an error naming its line number, unless
/// `skip_bad_lines` is set, in which case it is counted and skipped. Returns the examples, the
/// 1-based line of each, and the number of skipped lines.
pub fn read_jsonl(path: &Path, skip_bad_lines: bool) -> Result<(Vec<Example>, Vec<usize>, usize)> {
    read_lines(path, skip_bad_lines, parse_example)
}

/// Parses each non-blank line of `path` with `parse`; a failure is an error naming `file:line`,
/// or is counted and skipped with `skip_bad_lines`. Returns the examples, their 1-based lines
/// and the skipped count.
fn read_lines(
    path: &Path,
    skip_bad_lines: bool,
    mut parse: impl FnMut(&str) -> std::result::Result<Example, String>,
) -> Result<(Vec<Example>, Vec<usize>, usize)> {
    let text = crate::input_file::read_to_string(path)?;
    let mut examples = Vec::new();
    let mut lines = Vec::new();
    let mut skipped = 0;
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let parsed = parse(line).and_then(|example| match examples.first() {
            Some(first) => same_features(first, &example).map(|()| example),
            None => Ok(example),
        });
        match parsed {
            Ok(example) => {
                examples.push(example);
                lines.push(index + 1);
            }
            Err(_) if skip_bad_lines => skipped += 1,
            Err(reason) => {
                return Err(Error::Config(format!(
                    "{}:{}: {reason} (use --skip-bad-lines to skip such lines)",
                    path.display(),
                    index + 1
                )))
            }
        }
    }
    if examples.is_empty() {
        return Err(Error::Config(format!(
            "{}: no examples{}",
            path.display(),
            if skipped > 0 {
                format!(" ({skipped} malformed lines skipped)")
            } else {
                String::new()
            }
        )));
    }
    Ok((examples, lines, skipped))
}

fn parse_example(line: &str) -> std::result::Result<Example, String> {
    let object = json_object(line)?;
    let mut sequences = BTreeMap::new();
    let mut features = BTreeMap::new();
    let mut target = None;
    for (key, value) in &object {
        match key.as_str() {
            "label" => target = Some(label_target(value)?),
            "labels" => target = Some(Target::Tokens(int_list(key, value)?)),
            _ => match Feature::parse(value) {
                Some(feature) => {
                    features.insert(key.clone(), feature);
                }
                None => {
                    sequences.insert(key.clone(), int_list(key, value)?);
                }
            },
        }
    }
    let input_ids = sequences.get("input_ids").ok_or("missing \"input_ids\"")?;
    if input_ids.is_empty() {
        return Err("\"input_ids\" is empty".into());
    }
    for (key, sequence) in &sequences {
        if sequence.len() != input_ids.len() {
            return Err(format!(
                "\"{key}\" has {} entries, \"input_ids\" has {}",
                sequence.len(),
                input_ids.len()
            ));
        }
    }
    let target = target.ok_or("missing \"label\" or \"labels\"")?;
    if let Target::Tokens(labels) = &target {
        if labels.len() != input_ids.len() {
            return Err(format!(
                "\"labels\" has {} entries, \"input_ids\" has {}",
                labels.len(),
                input_ids.len()
            ));
        }
    }
    Ok(Example {
        sequences,
        features,
        target,
    })
}

/// `Ok` when `example` has the float features of `first`, each of the same shape.
fn same_features(first: &Example, example: &Example) -> std::result::Result<(), String> {
    let shapes = |e: &Example| -> Vec<(String, Vec<usize>)> {
        e.features
            .iter()
            .map(|(k, f)| (k.clone(), f.shape.clone()))
            .collect()
    };
    if shapes(first) == shapes(example) {
        Ok(())
    } else {
        Err(format!(
            "float features {:?} differ from the first example's {:?} (every example needs the \
             same features with the same shapes)",
            shapes(example),
            shapes(first)
        ))
    }
}

fn int_list(key: &str, value: &serde_json::Value) -> std::result::Result<Vec<i64>, String> {
    value
        .as_array()
        .ok_or_else(|| format!("\"{key}\" must be a list of integers"))?
        .iter()
        .map(|v| {
            v.as_i64()
                .ok_or_else(|| format!("\"{key}\" must be a list of integers"))
        })
        .collect()
}

/// Stacks examples into a batch padded on the right to the longest sequence: ids and other
/// sequences with 0, `attention_mask` with 0, token labels with [`IGNORE_INDEX`]. The target
/// comes back as `labels` (int64 classes or tokens, or float32 values).
pub fn collate(examples: &[&Example]) -> Vec<(String, HostTensor)> {
    let length = examples
        .iter()
        .map(|e| e.sequences["input_ids"].len())
        .max()
        .unwrap_or(0);
    let batch = examples.len();
    let mut tensors = Vec::new();
    let names: Vec<&String> = examples[0].sequences.keys().collect();
    for name in names {
        let mut data = vec![0i64; batch * length];
        for (row, example) in examples.iter().enumerate() {
            if let Some(sequence) = example.sequences.get(name) {
                data[row * length..row * length + sequence.len()].copy_from_slice(sequence);
            }
        }
        tensors.push((name.clone(), int_tensor(vec![batch, length], data)));
    }
    if !tensors.iter().any(|(name, _)| name == "attention_mask") {
        let mut mask = vec![0i64; batch * length];
        for (row, example) in examples.iter().enumerate() {
            let n = example.sequences["input_ids"].len();
            mask[row * length..row * length + n].fill(1);
        }
        tensors.push((
            "attention_mask".into(),
            int_tensor(vec![batch, length], mask),
        ));
    }
    let labels = match &examples[0].target {
        Target::Class(_) => int_tensor(
            vec![batch],
            examples
                .iter()
                .map(|e| match e.target {
                    Target::Class(c) => c,
                    _ => IGNORE_INDEX,
                })
                .collect(),
        ),
        Target::Value(_) => HostTensor::F32(
            ArrayD::from_shape_vec(
                IxDyn(&[batch]),
                examples
                    .iter()
                    .map(|e| match e.target {
                        Target::Value(v) => v,
                        Target::Class(c) => c as f32,
                        Target::Tokens(_) => 0.0,
                    })
                    .collect(),
            )
            .expect("batch-sized vector"),
        ),
        Target::Tokens(_) => {
            let mut data = vec![IGNORE_INDEX; batch * length];
            for (row, example) in examples.iter().enumerate() {
                if let Target::Tokens(labels) = &example.target {
                    data[row * length..row * length + labels.len()].copy_from_slice(labels);
                }
            }
            int_tensor(vec![batch, length], data)
        }
    };
    tensors.push(("labels".into(), labels));
    for name in examples[0].features.keys() {
        let shape = &examples[0].features[name].shape;
        let mut data = Vec::new();
        for example in examples {
            match example.features.get(name) {
                Some(feature) if &feature.shape == shape => data.extend(&feature.values),
                _ => data.extend(std::iter::repeat_n(0.0, shape.iter().product())),
            }
        }
        let mut batched = vec![batch];
        batched.extend(shape);
        let array = ArrayD::from_shape_vec(IxDyn(&batched), data).expect("shape matches data");
        tensors.push((name.clone(), HostTensor::F32(array)));
    }
    tensors
}

fn int_tensor(shape: Vec<usize>, data: Vec<i64>) -> HostTensor {
    HostTensor::I64(ArrayD::from_shape_vec(IxDyn(&shape), data).expect("shape matches data"))
}
