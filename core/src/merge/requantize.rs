//! Merging into quantized storage (`graft merge --requantize`): a dequantized weight's merged
//! values written back into its 4-bit codes and block scales, in the same block layout, so the
//! merged model keeps QLoRA's storage.

use graft_plugin_sdk::quant::{
    dequantize_blockwise, double_quantize, quantize_blockwise, Quantized,
};
use graft_plugin_sdk::{QuantizedStorage, StoredScales};

use crate::ir::{DataType, Graph, Tensor};
use crate::{Error, Result};

/// How far a requantized weight is from merging into float.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct RequantizedWeight {
    /// The dequantized value whose storage was rewritten.
    pub value: String,
    /// Elements of the weight.
    pub elements: usize,
    /// The largest `|dequantized − float merge|` over the weight.
    pub max_abs_error: f64,
    /// `‖dequantized − float merge‖ / ‖float merge‖` (0 for an all-zero weight).
    pub relative_rms_error: f64,
}

/// Takes the float initializer `value` (the dequantized weight with every update folded into
/// it) out of `graph`, quantizes it as `storage` describes (blocks scaled by their largest
/// magnitude, codes of the nearest codebook value, scales double-quantized where they were)
/// and overwrites the storage's initializers, which keep their names, types and shapes. The
/// nodes that dequantize the storage stay, so they compute `value` again. Returns the error
/// against `value` and the bytes written.
pub(super) fn requantize(
    graph: &mut Graph,
    value: &str,
    storage: &QuantizedStorage,
) -> Result<(RequantizedWeight, usize)> {
    let position = graph
        .initializers
        .iter()
        .position(|t| t.name == value)
        .ok_or_else(|| Error::Tensor {
            name: value.to_owned(),
            reason: "the merge baked it, but it is gone".into(),
        })?;
    let merged = graph.initializers.remove(position).float_values()?;
    let codebook: [f32; 16] =
        storage
            .codebook
            .as_slice()
            .try_into()
            .map_err(|_| Error::Tensor {
                name: storage.codes.clone(),
                reason: format!(
                    "its codebook has {} values; 4-bit codes index 16",
                    storage.codebook.len()
                ),
            })?;
    let quantized =
        quantize_blockwise(&merged, storage.block_size, &codebook).map_err(|e| Error::Tensor {
            name: value.to_owned(),
            reason: format!("cannot requantize: {e}"),
        })?;
    let mut written = replace_data(
        graph,
        &storage.codes,
        DataType::Uint8,
        quantized.codes.clone(),
    )?;
    let decoded_scales = match &storage.scales {
        StoredScales::Float { absmax } => {
            written += replace_data(graph, absmax, DataType::Float, f32_bytes(&quantized.absmax))?;
            quantized.absmax.clone()
        }
        StoredScales::Double {
            codes,
            scales,
            offset,
            block_size,
        } => {
            let double =
                double_quantize(&quantized.absmax, *block_size).map_err(|e| Error::Tensor {
                    name: codes.clone(),
                    reason: format!("cannot requantize the scales: {e}"),
                })?;
            let code_bytes = double.codes.iter().map(|c| *c as u8).collect();
            written += replace_data(graph, codes, DataType::Int8, code_bytes)?;
            written += replace_data(graph, scales, DataType::Float, f32_bytes(&double.scales))?;
            written += replace_data(graph, offset, DataType::Float, f32_bytes(&[double.offset]))?;
            double.decode()
        }
    };
    let rebuilt = dequantize_blockwise(
        &Quantized {
            codes: quantized.codes,
            absmax: decoded_scales,
        },
        storage.block_size,
        &codebook,
    );
    Ok((error_against(value, &merged, &rebuilt), written))
}

fn error_against(value: &str, merged: &[f32], rebuilt: &[f32]) -> RequantizedWeight {
    let (mut max_abs, mut squared, mut norm) = (0f64, 0f64, 0f64);
    for (m, r) in merged.iter().zip(rebuilt) {
        let diff = (*r as f64 - *m as f64).abs();
        max_abs = max_abs.max(diff);
        squared += diff * diff;
        norm += (*m as f64) * (*m as f64);
    }
    RequantizedWeight {
        value: value.to_owned(),
        elements: merged.len(),
        max_abs_error: max_abs,
        relative_rms_error: if norm > 0.0 {
            (squared / norm).sqrt()
        } else {
            0.0
        },
    }
}

/// Replaces the data of initializer `name`, which must already hold `bytes.len()` bytes of
/// `dtype`; returns the bytes written.
fn replace_data(graph: &mut Graph, name: &str, dtype: DataType, bytes: Vec<u8>) -> Result<usize> {
    let tensor = graph
        .initializers
        .iter_mut()
        .find(|t| t.name == name)
        .ok_or_else(|| Error::Tensor {
            name: name.to_owned(),
            reason: "the quantized storage names it, but the model has no such initializer".into(),
        })?;
    if tensor.dtype != dtype || tensor.byte_len() != bytes.len() {
        return Err(Error::Tensor {
            name: name.to_owned(),
            reason: format!(
                "is {} of {} bytes; the requantized storage is {dtype} of {} bytes",
                tensor.dtype,
                tensor.byte_len(),
                bytes.len()
            ),
        });
    }
    let written = bytes.len();
    *tensor = Tensor::from_raw(name, dtype, tensor.dims.clone(), bytes);
    Ok(written)
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}
