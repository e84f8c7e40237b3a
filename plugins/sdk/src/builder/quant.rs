//! Quantized storage of frozen weights: a weight replaced by its dequantization from 4-bit
//! codes and block scales (QLoRA's NF4).

use super::{attr_int, PatchBuilder};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::patch::{AttributeValue, Fold, QuantizedStorage, StoredScales};
use crate::quant::{check_blocks, DoubleQuantized};

/// The block scales of a quantized weight: float32, or double-quantized.
enum BlockScales {
    Float(Vec<f32>),
    Double(DoubleQuantized),
}

/// Where the dequantizing subgraph reads its block scales from.
enum ScaleSource {
    Parameter(String),
    Double {
        codes: String,
        scales: String,
        offset: String,
        block_size: usize,
    },
}

/// Emits the double-quantized scales' reconstruction, `[n_blocks, 1]` float; returns it.
fn rebuild_scales(
    b: &mut PatchBuilder<'_>,
    stem: &str,
    [codes, scales, offset]: [&String; 3],
    group: usize,
    n_blocks: usize,
) -> String {
    let as_float = b.op(
        &format!("{stem}.absmax_float"),
        "Cast",
        &[codes],
        &[attr_int("to", DType::Float.onnx_code() as i64)],
    );
    let padding = n_blocks.div_ceil(group) * group - n_blocks;
    let pads = b.constant_ints(&format!("{stem}.absmax_pads"), &[0, padding as i64]);
    let padded = b.op(
        &format!("{stem}.absmax_padded"),
        "Pad",
        &[&as_float, &pads],
        &[],
    );
    let grouped_shape = b.constant_ints(&format!("{stem}.absmax_groups"), &[-1, group as i64]);
    let grouped = b.op(
        &format!("{stem}.absmax_grouped"),
        "Reshape",
        &[&padded, &grouped_shape],
        &[],
    );
    let scaled = b.op(
        &format!("{stem}.absmax_scaled"),
        "Mul",
        &[&grouped, scales],
        &[],
    );
    let step = b.constant_scalar(&format!("{stem}.absmax_step"), 1.0 / 127.0, DType::Float);
    let unit = b.op(
        &format!("{stem}.absmax_unit"),
        "Mul",
        &[&scaled, &step],
        &[],
    );
    let flat_shape = b.constant_ints(&format!("{stem}.absmax_flat_shape"), &[-1]);
    let flat = b.op(
        &format!("{stem}.absmax_flat"),
        "Reshape",
        &[&unit, &flat_shape],
        &[],
    );
    let start = b.constant_ints(&format!("{stem}.absmax_start"), &[0]);
    let end = b.constant_ints(&format!("{stem}.absmax_end"), &[n_blocks as i64]);
    let kept = b.op(
        &format!("{stem}.absmax_kept"),
        "Slice",
        &[&flat, &start, &end],
        &[],
    );
    let shifted = b.op(
        &format!("{stem}.absmax_shifted"),
        "Add",
        &[&kept, offset],
        &[],
    );
    let column = b.constant_ints(&format!("{stem}.absmax_column"), &[n_blocks as i64, 1]);
    b.op(
        &format!("{stem}.absmax_rebuilt"),
        "Reshape",
        &[&shifted, &column],
        &[],
    )
}

/// Names created by [`PatchBuilder::dequantize_weight`].
#[derive(Debug, Clone, PartialEq)]
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
    /// Where the codes and scales are stored, for a merge that requantizes.
    pub storage: QuantizedStorage,
}

impl DequantNames {
    /// The fold that bakes the dequantized weight at merge time, or, when the merge
    /// requantizes, writes the updated weight back into [`DequantNames::storage`].
    pub fn bake_fold(&self) -> Fold {
        Fold::Bake {
            value: self.output.clone(),
            nodes: self.nodes.clone(),
            storage: Some(self.storage.clone()),
        }
    }
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
        self.dequantize(
            weight,
            codes,
            BlockScales::Float(absmax),
            block_size,
            codebook,
        )
    }

    /// [`PatchBuilder::dequantize_weight`] with QLoRA's double quantization: the block scales
    /// are themselves stored in 8 bits ([`crate::quant::double_quantize`]), so a weight costs
    /// `4 + 8/block_size + 32/(block_size·scales.block_size)` bits per element (4.127 for blocks
    /// of 64 and 256). The scales are rebuilt in the graph as
    /// `codes/127 · scale[block / scales.block_size] + offset` before the lookup.
    ///
    /// Nodes: `Cast(float)`, `Pad` with zeros to whole groups, `Reshape([n, scales.block_size])`, `Mul(·, scales)`, `Mul(1/127)`,
    /// `Reshape([-1])`, `Slice` to the block count, `Add(offset)`, `Reshape([n_blocks, 1])`,
    /// then [`PatchBuilder::dequantize_weight`]'s. `absmax` in the names is the rebuilt
    /// scales' value. Errors as that helper does, and when the scale data do not fit.
    pub fn dequantize_weight_double(
        &mut self,
        weight: &str,
        codes: Vec<u8>,
        scales: DoubleQuantized,
        block_size: usize,
        codebook: &[f32; 16],
    ) -> Result<DequantNames> {
        self.dequantize(
            weight,
            codes,
            BlockScales::Double(scales),
            block_size,
            codebook,
        )
    }

    fn dequantize(
        &mut self,
        weight: &str,
        codes: Vec<u8>,
        scales: BlockScales,
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
        let n_scales = match &scales {
            BlockScales::Float(absmax) => absmax.len(),
            BlockScales::Double(double) => double.count,
        };
        if codes.len() * 2 != numel || n_scales != n_blocks {
            return Err(Error::Build(format!(
                "dequantize_weight on \"{weight}\": {} code bytes and {n_scales} scales do not fit {numel} elements in blocks of {block_size}",
                codes.len(),
            )));
        }
        if let BlockScales::Double(double) = &scales {
            double.check().map_err(|e| {
                Error::Build(format!("dequantize_weight_double on \"{weight}\": {e}"))
            })?;
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
        let codes = self.parameter(
            &format!("{stem}.codes"),
            DType::Uint8,
            vec![numel / 2],
            codes_init,
            false,
        );
        let absmax = match scales {
            BlockScales::Float(absmax) => {
                let bytes = absmax.iter().flat_map(|v| v.to_le_bytes()).collect();
                let init = self.data(
                    &format!("{stem}.absmax"),
                    DType::Float,
                    vec![n_blocks, 1],
                    bytes,
                )?;
                let name = self.parameter(
                    &format!("{stem}.absmax"),
                    DType::Float,
                    vec![n_blocks, 1],
                    init,
                    false,
                );
                ScaleSource::Parameter(name)
            }
            BlockScales::Double(double) => {
                let count = double.codes.len();
                let groups = double.scales.len();
                let codes_init = self.data(
                    &format!("{stem}.absmax_codes"),
                    DType::Int8,
                    vec![count],
                    double.codes.iter().map(|c| *c as u8).collect(),
                )?;
                let scales_bytes = double.scales.iter().flat_map(|v| v.to_le_bytes()).collect();
                let scales_init = self.data(
                    &format!("{stem}.absmax_scales"),
                    DType::Float,
                    vec![groups, 1],
                    scales_bytes,
                )?;
                let offset_init = self.data(
                    &format!("{stem}.absmax_offset"),
                    DType::Float,
                    vec![1],
                    double.offset.to_le_bytes().to_vec(),
                )?;
                let scale_codes = self.parameter(
                    &format!("{stem}.absmax_codes"),
                    DType::Int8,
                    vec![count],
                    codes_init,
                    false,
                );
                let scales = self.parameter(
                    &format!("{stem}.absmax_scales"),
                    DType::Float,
                    vec![groups, 1],
                    scales_init,
                    false,
                );
                let offset = self.parameter(
                    &format!("{stem}.absmax_offset"),
                    DType::Float,
                    vec![1],
                    offset_init,
                    false,
                );
                ScaleSource::Double {
                    codes: scale_codes,
                    scales,
                    offset,
                    block_size: double.block_size,
                }
            }
        };
        let stored_scales = match &absmax {
            ScaleSource::Parameter(name) => StoredScales::Float {
                absmax: name.clone(),
            },
            ScaleSource::Double {
                codes,
                scales,
                offset,
                block_size,
            } => StoredScales::Double {
                codes: codes.clone(),
                scales: scales.clone(),
                offset: offset.clone(),
                block_size: *block_size,
            },
        };
        let storage = QuantizedStorage {
            codebook: codebook.to_vec(),
            block_size,
            codes: codes.clone(),
            scales: stored_scales,
        };
        let ((output, absmax), nodes) = self.block(|builder| {
            let absmax = match &absmax {
                ScaleSource::Parameter(name) => name.clone(),
                ScaleSource::Double {
                    codes: scale_codes,
                    scales,
                    offset,
                    block_size: group,
                } => rebuild_scales(
                    builder,
                    &stem,
                    [scale_codes, scales, offset],
                    *group,
                    n_blocks,
                ),
            };
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
            Ok((output, absmax))
        })?;
        self.computed_dtypes.insert(output.clone(), dtype);
        Ok(DequantNames {
            codes,
            absmax,
            output,
            nodes,
            storage,
        })
    }
}
