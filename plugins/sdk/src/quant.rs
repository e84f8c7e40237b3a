//! Blockwise 4-bit quantization with a 16-entry codebook (NF4 and the like): the packing
//! convention the `dequantize_weight` subgraph decodes, and reference codecs.

/// The NormalFloat4 codebook of QLoRA (bitsandbytes' `NF4` table), ascending.
pub const NF4_CODEBOOK: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// Codes and scales of a blockwise-quantized tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantized {
    /// Packed 4-bit codebook indices, two per byte: element `2i` in the high nibble of byte
    /// `i`, element `2i + 1` in the low nibble.
    pub codes: Vec<u8>,
    /// One scale per block of `block_size` consecutive elements (row-major order).
    pub absmax: Vec<f32>,
}

/// Packs 4-bit indices (each below 16) two per byte, first in the high nibble. Errors on an
/// odd count or an index of 16 or more.
pub fn pack_nibbles(indices: &[u8]) -> Result<Vec<u8>, String> {
    if indices.len() % 2 != 0 {
        return Err(format!(
            "cannot pack an odd number ({}) of 4-bit indices",
            indices.len()
        ));
    }
    if let Some(bad) = indices.iter().find(|i| **i > 15) {
        return Err(format!("index {bad} does not fit in 4 bits"));
    }
    Ok(indices
        .chunks_exact(2)
        .map(|p| (p[0] << 4) | p[1])
        .collect())
}

/// Unpacks bytes into 4-bit indices, high nibble first; the inverse of [`pack_nibbles`].
pub fn unpack_nibbles(codes: &[u8]) -> Vec<u8> {
    codes.iter().flat_map(|b| [b >> 4, b & 0x0f]).collect()
}

/// Quantizes `values` in blocks of `block_size`: each block's scale is its largest absolute
/// value, and each element becomes the index of the codebook entry nearest `value / scale`
/// (nearest to 0 for an all-zero block, whose scale is 0). Errors when `block_size` is 0 or
/// odd, or does not divide `values.len()`.
pub fn quantize_blockwise(
    values: &[f32],
    block_size: usize,
    codebook: &[f32; 16],
) -> Result<Quantized, String> {
    check_blocks(values.len(), block_size)?;
    let mut indices = Vec::with_capacity(values.len());
    let mut absmax = Vec::with_capacity(values.len() / block_size);
    for block in values.chunks_exact(block_size) {
        let scale = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        absmax.push(scale);
        for v in block {
            let x = if scale > 0.0 { v / scale } else { 0.0 };
            indices.push(nearest(codebook, x));
        }
    }
    Ok(Quantized {
        codes: pack_nibbles(&indices)?,
        absmax,
    })
}

/// Reconstructs `codebook[index] · absmax[block]` for every element, in `f32`, exactly as the
/// `dequantize_weight` subgraph computes it.
pub fn dequantize_blockwise(q: &Quantized, block_size: usize, codebook: &[f32; 16]) -> Vec<f32> {
    unpack_nibbles(&q.codes)
        .iter()
        .enumerate()
        .map(|(i, idx)| {
            codebook[*idx as usize] * q.absmax.get(i / block_size.max(1)).copied().unwrap_or(0.0)
        })
        .collect()
}

/// Block scales stored in 8 bits (QLoRA's double quantization): the scales minus their mean
/// `offset`, in groups of `block_size`, each group as int8 codes of `value / scale · 127`
/// rounded, `scale` its largest magnitude (float32); the last group may be partial.
#[derive(Debug, Clone, PartialEq)]
pub struct DoubleQuantized {
    /// One code per scale.
    pub codes: Vec<i8>,
    /// One float32 scale per group.
    pub scales: Vec<f32>,
    /// The mean of the original scales, added back after decoding.
    pub offset: f32,
    /// Scales per group (256 in QLoRA).
    pub block_size: usize,
    /// The number of scales encoded (`codes.len()`).
    pub count: usize,
}

impl DoubleQuantized {
    /// The decoded scales, exactly as the dequantizing subgraph computes them.
    pub fn decode(&self) -> Vec<f32> {
        (0..self.count)
            .map(|i| {
                let scaled = self.codes[i] as f32 * self.scales[i / self.block_size];
                scaled * (1.0 / 127.0) + self.offset
            })
            .collect()
    }

    /// Errors when the code, scale and count lengths disagree.
    pub fn check(&self) -> Result<(), String> {
        let groups = self.count.div_ceil(self.block_size.max(1));
        if self.block_size == 0 || self.codes.len() != self.count || self.scales.len() != groups {
            return Err(format!(
                "{} codes and {} group scales do not hold {} scales in groups of {}",
                self.codes.len(),
                self.scales.len(),
                self.count,
                self.block_size
            ));
        }
        Ok(())
    }
}

/// Quantizes block scales to 8 bits in groups of `block_size` ([`DoubleQuantized`]).
pub fn double_quantize(scales: &[f32], block_size: usize) -> Result<DoubleQuantized, String> {
    if block_size == 0 {
        return Err("double-quantization block size 0".into());
    }
    let offset = if scales.is_empty() {
        0.0
    } else {
        (scales.iter().map(|v| *v as f64).sum::<f64>() / scales.len() as f64) as f32
    };
    let groups = scales.len().div_ceil(block_size);
    let mut codes = vec![0i8; scales.len()];
    let mut group_scales = Vec::with_capacity(groups);
    for (g, chunk) in scales.chunks(block_size).enumerate() {
        let scale = chunk.iter().fold(0f32, |m, v| m.max((v - offset).abs()));
        group_scales.push(scale);
        for (i, v) in chunk.iter().enumerate() {
            let code = if scale > 0.0 {
                ((v - offset) / scale * 127.0).round().clamp(-127.0, 127.0)
            } else {
                0.0
            };
            codes[g * block_size + i] = code as i8;
        }
    }
    Ok(DoubleQuantized {
        codes,
        scales: group_scales,
        offset,
        block_size,
        count: scales.len(),
    })
}

/// Bits per weight element of NF4 storage with `block_size` blocks, double-quantized in groups
/// of `scale_block` (`None`: float32 scales): `4 + 8/block + 32/(block·scale_block)` (QLoRA's
/// 4.127 for 64 and 256), or `4 + 32/block`.
pub fn bits_per_parameter(block_size: usize, scale_block: Option<usize>) -> f64 {
    let block = block_size as f64;
    match scale_block {
        Some(group) => 4.0 + 8.0 / block + 32.0 / (block * group as f64),
        None => 4.0 + 32.0 / block,
    }
}

pub(crate) fn check_blocks(n: usize, block_size: usize) -> Result<(), String> {
    if block_size == 0 || block_size % 2 != 0 {
        return Err(format!("block size {block_size} must be even and positive"));
    }
    if n % block_size != 0 {
        return Err(format!(
            "{n} elements do not split into blocks of {block_size}"
        ));
    }
    Ok(())
}

fn nearest(codebook: &[f32; 16], x: f32) -> u8 {
    let mut best = 0;
    for (i, c) in codebook.iter().enumerate() {
        if (c - x).abs() < (codebook[best] - x).abs() {
            best = i;
        }
    }
    best as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn double_quantization_is_close_and_costs_qlora_bits() {
        let scales: Vec<f32> = (0..300).map(|i| 0.01 + (i % 37) as f32 * 0.003).collect();
        let dq = double_quantize(&scales, 256).unwrap();
        assert_eq!((dq.codes.len(), dq.scales.len()), (300, 2));
        dq.check().unwrap();
        let back = dq.decode();
        let worst = scales
            .iter()
            .zip(&back)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        let range = dq.scales.iter().fold(0f32, |m, v| m.max(*v));
        assert!(
            worst <= range / 254.0 + 1e-7,
            "{worst} vs half a step of {range}"
        );
        assert!((bits_per_parameter(64, Some(256)) - 4.127).abs() < 1e-3);
    }

    #[test]
    fn packing_is_high_nibble_first() {
        assert_eq!(pack_nibbles(&[1, 2, 15, 0]).unwrap(), [0x12, 0xf0]);
        assert_eq!(unpack_nibbles(&[0x12, 0xf0]), [1, 2, 15, 0]);
        assert!(pack_nibbles(&[1]).is_err());
        assert!(pack_nibbles(&[16, 0]).is_err());
    }

    #[test]
    fn codebook_values_round_trip_exactly() {
        let values: Vec<f32> = (0..32).map(|i| NF4_CODEBOOK[(i * 7) % 16] * 0.5).collect();
        let q = quantize_blockwise(&values, 16, &NF4_CODEBOOK).unwrap();
        assert_eq!(q.absmax.len(), 2);
        let back = dequantize_blockwise(&q, 16, &NF4_CODEBOOK);
        assert_eq!(back, values);
        let zeros = quantize_blockwise(&[0.0; 4], 2, &NF4_CODEBOOK).unwrap();
        assert_eq!(dequantize_blockwise(&zeros, 2, &NF4_CODEBOOK), [0.0; 4]);
        assert!(quantize_blockwise(&[0.0; 6], 4, &NF4_CODEBOOK).is_err());
        assert!(quantize_blockwise(&[0.0; 6], 3, &NF4_CODEBOOK).is_err());
    }
}
