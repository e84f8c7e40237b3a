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
