//! The small MLPs soft prompts are reparameterized with (P-Tuning's prompt encoder, prefix
//! tuning's projection): `Linear` layers with PyTorch's default init and an activation between
//! them.

use graft_plugin_sdk::{DType, Init, PatchBuilder, Result};

/// `input` `[n, widths[0]]` through `Linear(widths[i], widths[i + 1])` for each pair of
/// `widths`, with `activation` (an ONNX op such as `Relu` or `Tanh`) between consecutive
/// layers; parameters `<stem>.<i>.weight` `[in, out]` and `.bias` `[out]`, PyTorch's
/// `nn.Linear` init (weight Kaiming-uniform with `a = √5`, bias U(±1/√in)). Returns the
/// output `[n, widths.last()]`.
pub fn mlp(
    builder: &mut PatchBuilder<'_>,
    stem: &str,
    input: &str,
    dtype: DType,
    widths: &[usize],
    activation: &str,
) -> Result<String> {
    let mut x = input.to_owned();
    let layers = widths.len().saturating_sub(1);
    for (index, pair) in widths.windows(2).enumerate() {
        let (fan_in, fan_out) = (pair[0], pair[1]);
        let bound = 1.0 / (fan_in as f64).sqrt();
        let weight_init = Init::linear_default(fan_in, builder.next_seed());
        let bias_init = Init::Uniform {
            low: -bound,
            high: bound,
            seed: builder.next_seed(),
        };
        let layer = format!("{stem}.{index}");
        let weight = builder.parameter(
            &format!("{layer}.weight"),
            dtype,
            vec![fan_in, fan_out],
            weight_init,
            true,
        );
        let bias = builder.parameter(
            &format!("{layer}.bias"),
            dtype,
            vec![fan_out],
            bias_init,
            true,
        );
        let product = builder.op(&format!("{layer}.matmul"), "MatMul", &[&x, &weight], &[]);
        x = builder.op(&format!("{layer}.add"), "Add", &[&product, &bias], &[]);
        if index + 1 < layers {
            x = builder.op(
                &format!("{layer}.{}", activation.to_lowercase()),
                activation,
                &[&x],
                &[],
            );
        }
    }
    Ok(x)
}
