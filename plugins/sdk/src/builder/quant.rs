//! Quantized storage of frozen weights: a weight replaced by its dequantization from 4-bit
//! codes and block scales (QLoRA's NF4).

use super::{attr_int, PatchBuilder};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::patch::AttributeValue;
use crate::quant::check_blocks;

/// Names created by [`PatchBuilder::dequantize_weight`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DequantNames {
    /// Packed codes, `uint8 [numel / 2]`, frozen, carried as
    /// [`Init::Data`](crate::Init::Data).
    pub codes: String,
    /// Block scales, `float [numel / block_size, 1]`, frozen, carried as
    /// [`Init::Data`](crate::Init::Data).
    pub absmax: String,
    /// The dequantized weight, of the original type and shape.
    pub output: String,
    /// Every node emitted, in order.
    pub nodes: Vec<String>,
}

impl PatchBuilder<'_> {
    /// Replaces initializer `weight`'s consumers by its dequantization from 4-bit codes
    /// (QLoRA's NF4 storage): element `i` (row-major) is `codebook[index_i] ·
    /// absmax[i / block_size]`, the indices packed two per byte in `codes`, high nibble first
    /// ([`crate::quant::pack_nibbles`]). `codes` (`uint8 [numel / 2]`) and `absmax`
    /// (`float [numel / block_size, 1]`) become frozen parameters carried as
    /// [`Init::Data`](crate::Init::Data). The original initializer is left without consumers
    /// (the core drops it). A weight whose values are all codebook entries is reproduced
    /// exactly with `absmax` all ones.
    ///
    /// Nodes: `Constant(4)` + `Cast(uint8)`; `BitShift(codes, 4, RIGHT)` (high nibbles);
    /// `BitShift(codes, 4, LEFT)`, `BitShift(·, 4, RIGHT)` (low nibbles); `Cast(int64)` of
    /// each; `Unsqueeze(·, [1])` of each; `Concat(axis = 1)` and `Reshape([n_blocks,
    /// block_size])` (indices in element order); `Constant(value_floats = codebook)`;
    /// `Gather`; `Mul(·, absmax)`; `Reshape(weight shape)`; `Cast(weight type)` unless
    /// `float`. Errors when `weight` is not a float initializer, its element count is odd or
    /// not a multiple of `block_size` (even, positive), or the data lengths disagree.
    pub fn dequantize_weight(
        &mut self,
        weight: &str,
        codes: Vec<u8>,
        absmax: Vec<f32>,
        block_size: usize,
        codebook: &[f32; 16],
    ) -> Result<DequantNames> {
        let info = self.graph.tensor(weight).ok_or_else(|| {
            Error::Build(format!("dequantize_weight: no initializer \"{weight}\""))
        })?;
        if !info.dtype.is_float() {
            return Err(Error::Build(format!(
                "dequantize_weight: \"{weight}\" is {}, not a float type",
                info.dtype
            )));
        }
        let numel = info.numel().ok_or_else(|| {
            Error::Build(format!(
                "dequantize_weight: \"{weight}\" has shape {:?}",
                info.shape
            ))
        })?;
        check_blocks(numel, block_size)
            .map_err(|e| Error::Build(format!("dequantize_weight on \"{weight}\": {e}")))?;
        let n_blocks = numel / block_size;
        if codes.len() * 2 != numel || absmax.len() != n_blocks {
            return Err(Error::Build(format!(
                "dequantize_weight on \"{weight}\": {} code bytes and {} scales do not fit {numel} elements in blocks of {block_size}",
                codes.len(),
                absmax.len()
            )));
        }
        let dtype = info.dtype;
        let shape = info.shape.clone();
        let stem = self.stem(&format!("{}.{weight}", self.prefix));
        let codes_init = self.data(
            &format!("{stem}.codes"),
            DType::Uint8,
            vec![numel / 2],
            codes,
        )?;
        let absmax_bytes = absmax.iter().flat_map(|v| v.to_le_bytes()).collect();
        let absmax_init = self.data(
            &format!("{stem}.absmax"),
            DType::Float,
            vec![n_blocks, 1],
            absmax_bytes,
        )?;
        let codes = self.parameter(
            &format!("{stem}.codes"),
            DType::Uint8,
            vec![numel / 2],
            codes_init,
            false,
        );
        let absmax = self.parameter(
            &format!("{stem}.absmax"),
            DType::Float,
            vec![n_blocks, 1],
            absmax_init,
            false,
        );
        let (output, nodes) = self.block(|builder| {
            let four = builder.constant_scalar(&format!("{stem}.four"), 4.0, DType::Uint8);
            let right = ("direction", AttributeValue::String("RIGHT".into()));
            let left = ("direction", AttributeValue::String("LEFT".into()));
            let high = builder.op(
                &format!("{stem}.high"),
                "BitShift",
                &[&codes, &four],
                std::slice::from_ref(&right),
            );
            let shifted = builder.op(
                &format!("{stem}.shift_left"),
                "BitShift",
                &[&codes, &four],
                &[left],
            );
            let low = builder.op(
                &format!("{stem}.low"),
                "BitShift",
                &[&shifted, &four],
                &[right],
            );
            let to_i64 = [attr_int("to", DType::Int64.onnx_code() as i64)];
            let high = builder.op(&format!("{stem}.high_i64"), "Cast", &[&high], &to_i64);
            let low = builder.op(&format!("{stem}.low_i64"), "Cast", &[&low], &to_i64);
            let axes = builder.constant_ints(&format!("{stem}.axes"), &[1]);
            let high = builder.op(
                &format!("{stem}.high_col"),
                "Unsqueeze",
                &[&high, &axes],
                &[],
            );
            let low = builder.op(&format!("{stem}.low_col"), "Unsqueeze", &[&low, &axes], &[]);
            let pairs = builder.op(
                &format!("{stem}.pairs"),
                "Concat",
                &[&high, &low],
                &[attr_int("axis", 1)],
            );
            let block_shape = builder.constant_ints(
                &format!("{stem}.block_shape"),
                &[n_blocks as i64, block_size as i64],
            );
            let indices = builder.op(
                &format!("{stem}.indices"),
                "Reshape",
                &[&pairs, &block_shape],
                &[],
            );
            let table = builder.op(
                &format!("{stem}.codebook"),
                "Constant",
                &[],
                &[("value_floats", AttributeValue::Floats(codebook.to_vec()))],
            );
            let values = builder.op(
                &format!("{stem}.lookup"),
                "Gather",
                &[&table, &indices],
                &[attr_int("axis", 0)],
            );
            let scaled = builder.op(&format!("{stem}.scaled"), "Mul", &[&values, &absmax], &[]);
            let weight_shape = builder.constant_ints(&format!("{stem}.weight_shape"), &shape);
            let mut output = builder.op(
                &format!("{stem}.reshape"),
                "Reshape",
                &[&scaled, &weight_shape],
                &[],
            );
            if dtype != DType::Float {
                output = builder.op(
                    &format!("{stem}.cast"),
                    "Cast",
                    &[&output],
                    &[attr_int("to", dtype.onnx_code() as i64)],
                );
            }
            builder.rewire(weight, &output);
            Ok(output)
        })?;
        Ok(DequantNames {
            codes,
            absmax,
            output,
            nodes,
        })
    }
}
