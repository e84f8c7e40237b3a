//! `loha`: `y + x · ΔWᵀ` with `ΔW = ((W₁ₐ·W₁ᵦ) ⊙ (W₂ₐ·W₂ᵦ)) · α/r` — the Hadamard product of two
//! rank-`r` matrices, whose rank can reach `r²` (LoHa, FedPara's low-rank Hadamard product).
//!
//! Tensors per site, in PEFT's shapes: `hada_w1_a`, `hada_w2_a` `[out, r]` and `hada_w1_b`,
//! `hada_w2_b` `[r, in]`; PEFT's init (Kaiming-uniform with `a = √5`, `hada_w2_b` zero), so the
//! model is unchanged until training moves `hada_w2_b`.

use graft_plugin_sdk::{
    ConfigKey, DType, GraphView, Host, Init, MethodConfig, MethodDescription, PatchBuilder,
    PatchReply, PeftFiles, PeftTensor,
};

use crate::{peft_config, peft_import, shared_keys, targets};

/// The factor names, in PEFT's key order.
const FACTORS: [&str; 4] = ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"];

/// The `loha` method's description.
pub fn description() -> MethodDescription {
    let keys: Vec<ConfigKey> = shared_keys();
    MethodDescription::new(
        "loha",
        "low-rank Hadamard product: y + x·ΔWᵀ, ΔW = (W1a·W1b) ⊙ (W2a·W2b)·alpha/r on the selected linear sites",
        keys,
    )
    .with_peft_import(peft_import("LOHA", &[], &FACTORS))
}

/// Grafts a LoHa branch on every selected linear site.
pub fn patch(
    _host: &Host<'_>,
    config: &MethodConfig,
    graph: &GraphView,
) -> Result<PatchReply, String> {
    let targets = targets("loha", config, graph)?;
    let mut b = PatchBuilder::new(graph, "loha").with_seed(config.get_usize("seed")? as u64);
    let mut tensors = Vec::new();
    for target in &targets {
        let site = target.site;
        let dtype = graph
            .tensor(&site.weight)
            .map(|t| t.dtype)
            .ok_or_else(|| format!("site {}: unknown weight", site.display_name()))?;
        let (n_in, n_out, r) = (site.in_features, site.out_features, target.r);
        let stem = b.stem(&format!("loha.{}", site.display_name()));
        let mut factor = |b: &mut PatchBuilder<'_>, name: &str, shape: Vec<usize>| {
            let init = if name == "hada_w2_b" {
                Init::Zeros
            } else {
                Init::linear_default(shape[1], b.next_seed())
            };
            let tensor = b.parameter(&format!("{stem}.{name}"), dtype, shape.clone(), init, true);
            if let Some(label) = &site.label {
                tensors.push(PeftTensor {
                    key: format!("{label}.{name}"),
                    tensor: tensor.clone(),
                    transpose: false,
                    shape,
                    rank_axis: None,
                });
            }
            tensor
        };
        let w1a = factor(&mut b, FACTORS[0], vec![n_out, r]);
        let w1b = factor(&mut b, FACTORS[1], vec![r, n_in]);
        let w2a = factor(&mut b, FACTORS[2], vec![n_out, r]);
        let w2b = factor(&mut b, FACTORS[3], vec![r, n_in]);
        let scale = target.scale();
        b.delta_branch(site, &stem, |b| {
            Ok(hadamard_delta(
                b,
                &stem,
                [&w1a, &w1b, &w2a, &w2b],
                scale,
                dtype,
            ))
        })?;
    }
    let mut reply = b.finish();
    if let Some(config) = peft_config("LOHA", config, &targets)? {
        reply.patch.training.peft = Some(PeftFiles {
            config: config.into(),
            tensors,
            ..PeftFiles::default()
        });
    }
    Ok(reply)
}

/// Emits `Transpose((w1a·w1b) ⊙ (w2a·w2b)) · scale`, the `[in, out]` update; returns it.
fn hadamard_delta(
    b: &mut PatchBuilder<'_>,
    stem: &str,
    [w1a, w1b, w2a, w2b]: [&str; 4],
    scale: f64,
    dtype: DType,
) -> String {
    let first = b.op(&format!("{stem}.product_1"), "MatMul", &[w1a, w1b], &[]);
    let second = b.op(&format!("{stem}.product_2"), "MatMul", &[w2a, w2b], &[]);
    let hadamard = b.op(&format!("{stem}.hadamard"), "Mul", &[&first, &second], &[]);
    let transposed = b.op(&format!("{stem}.transpose"), "Transpose", &[&hadamard], &[]);
    let s = b.constant_scalar(&format!("{stem}.scale"), scale, dtype);
    b.op(&format!("{stem}.delta"), "Mul", &[&transposed, &s], &[])
}
