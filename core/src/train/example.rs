//! One training example and the JSON-line pieces every data format shares (the object, the
//! label), so that the pre-tokenized reader (`data`) and the text readers (`text`) depend on
//! this module and not on each other.

use std::collections::BTreeMap;

pub use crate::autodiff::loss::IGNORE_INDEX;

/// One example: integer sequences and float features by input name, and its target.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    /// Sequences by model input name.
    pub sequences: BTreeMap<String, Vec<i64>>,
    /// Float inputs by model input name (images, audio frames, precomputed embeddings).
    pub features: BTreeMap<String, Feature>,
    /// The target.
    pub target: Target,
}

/// A float input of one example: a tensor without the batch axis.
#[derive(Clone, Debug, PartialEq)]
pub struct Feature {
    /// Its shape.
    pub shape: Vec<usize>,
    /// Its values, row-major.
    pub values: Vec<f32>,
}

impl Feature {
    /// The feature a JSON value holds: nested lists of numbers of a rectangular shape, or a
    /// flat list with a non-integer number. `None` for anything else (a flat integer list is
    /// a sequence, not a feature).
    pub fn parse(value: &serde_json::Value) -> Option<Feature> {
        let list = value.as_array()?;
        let nested = list.first().is_some_and(serde_json::Value::is_array);
        let fractional = list.iter().any(|v| v.is_f64());
        if !nested && !fractional {
            return None;
        }
        let mut shape = Vec::new();
        let mut probe = value;
        while let Some(items) = probe.as_array() {
            shape.push(items.len());
            probe = items.first()?;
        }
        let mut values = Vec::with_capacity(shape.iter().product());
        flatten(value, &shape, &mut values)?;
        Some(Feature { shape, values })
    }
}

fn flatten(value: &serde_json::Value, shape: &[usize], out: &mut Vec<f32>) -> Option<()> {
    match shape.split_first() {
        None => out.push(value.as_f64()? as f32),
        Some((&n, rest)) => {
            let items = value.as_array().filter(|items| items.len() == n)?;
            for item in items {
                flatten(item, rest, out)?;
            }
        }
    }
    Some(())
}

/// What an example should predict.
#[derive(Clone, Debug, PartialEq)]
pub enum Target {
    /// A class index.
    Class(i64),
    /// A real value (regression).
    Value(f32),
    /// One label per token (`IGNORE_INDEX` where no loss applies).
    Tokens(Vec<i64>),
}

/// A `"label"` value as a target: an integer is a class, any other number a regression value.
pub(super) fn label_target(label: &serde_json::Value) -> std::result::Result<Target, String> {
    Ok(match label.as_i64() {
        Some(class) => Target::Class(class),
        None => Target::Value(label.as_f64().ok_or("\"label\" must be a number")? as f32),
    })
}

/// A JSONL line that must be a JSON object.
pub(super) fn json_object(
    line: &str,
) -> std::result::Result<serde_json::Map<String, serde_json::Value>, String> {
    match serde_json::from_str(line).map_err(|e| format!("not valid JSON: {e}"))? {
        serde_json::Value::Object(object) => Ok(object),
        _ => Err("expected a JSON object".into()),
    }
}
