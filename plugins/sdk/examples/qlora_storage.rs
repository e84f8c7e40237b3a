//! QLoRA's storage at LLaMA-7B scale: the seven linear weights of one LLaMA-7B layer (q, k, v,
//! o: 4096×4096; gate, up: 4096×11008; down: 11008×4096), filled with seeded N(0, 0.02²)
//! values, quantized with the codec the `qlora` method uses (NF4 in blocks of 64, block scales
//! double-quantized to 8 bits in groups of 256), and every byte the patched model stores for
//! them counted: packed codes, 8-bit scale codes, float32 group scales and offsets. Every layer
//! of the model has the same shapes, so the figure is the model's.
//!
//! Run with `cargo run --release -p graft-plugin-sdk --example qlora_storage`.

use graft_plugin_sdk::quant::{
    bits_per_parameter, dequantize_blockwise, double_quantize, quantize_blockwise, Quantized,
    NF4_CODEBOOK,
};

const BLOCK: usize = 64;
const GROUP: usize = 256;

fn normal_values(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut uniform = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| {
            let (u1, u2) = (uniform(), uniform());
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * 0.02) as f32
        })
        .collect()
}

fn main() {
    let shapes = [
        ("q", 4096, 4096),
        ("k", 4096, 4096),
        ("v", 4096, 4096),
        ("o", 4096, 4096),
        ("gate", 4096, 11008),
        ("up", 4096, 11008),
        ("down", 11008, 4096),
    ];
    let start = std::time::Instant::now();
    let (mut elements, mut bytes) = (0usize, 0usize);
    let (mut squared_error, mut squared_value) = (0f64, 0f64);
    for (i, (name, rows, cols)) in shapes.iter().enumerate() {
        let values = normal_values(rows * cols, i as u64 + 1);
        let q = quantize_blockwise(&values, BLOCK, &NF4_CODEBOOK).expect("quantize");
        let scales = double_quantize(&q.absmax, GROUP).expect("double quantize");
        let stored = q.codes.len() + scales.codes.len() + 4 * scales.scales.len() + 4;
        let rebuilt = dequantize_blockwise(
            &Quantized {
                codes: q.codes.clone(),
                absmax: scales.decode(),
            },
            BLOCK,
            &NF4_CODEBOOK,
        );
        for (v, r) in values.iter().zip(&rebuilt) {
            squared_error += ((v - r) as f64).powi(2);
            squared_value += (*v as f64).powi(2);
        }
        println!(
            "{name:>4} [{rows}×{cols}]: {:.4} bits per weight",
            stored as f64 * 8.0 / values.len() as f64
        );
        elements += values.len();
        bytes += stored;
    }
    println!(
        "one LLaMA-7B layer: {elements} weights in {bytes} bytes = {:.4} bits per weight \
         (formula {:.4}; float16 16, QLoRA paper 4.127); relative RMS error {:.4}; {:.1} s",
        bytes as f64 * 8.0 / elements as f64,
        bits_per_parameter(BLOCK, Some(GROUP)),
        (squared_error / squared_value).sqrt(),
        start.elapsed().as_secs_f64()
    );
}
