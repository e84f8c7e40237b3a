//! `dora`: weight-decomposed LoRA (Liu et al., 2024), as HF PEFT's `LoraConfig(use_dora=True)`.
//! The adapted weight is the LoRA-updated weight rescaled per output to a learned magnitude:
//!
//! `W' = m ⊙ (W + s·(A·B)) / ‖W + s·(A·B)‖`, the norm over the input axis of each output,
//!
//! grafted as a delta branch `y + x·(W' − W)` that `graft merge` folds into `W`. `A` `[in, r]`
//! (Kaiming-uniform, as LoRA) and `B` `[r, out]` (zero) are PEFT's `lora_A` / `lora_B`
//! transposed; the magnitude `m` `[out]` starts at the column norms of `W`, so the model is
//! unchanged at init. PEFT detaches the norm from the gradient (the paper's memory saving);
//! graft differentiates through it, which is the exact gradient of the same function.

use graft_plugin_sdk::{
    bytes_to_f32, f32_to_bytes, serde_json, AttributeValue, ConfigKey, DType, GraphView, Host,
    Init, MethodConfig, MethodDescription, PatchBuilder, PatchReply, PeftFiles, PeftImport,
    PeftTensor, Site, WeightLayout,
};

use crate::{lora_keys, selected_sites};

/// PEFT's key of the magnitude vector after the module path.
const MAGNITUDE_KEY: &str = "lora_magnitude_vector";

/// The `dora` method's description: LoRA's keys.
pub fn description() -> MethodDescription {
    let keys: Vec<ConfigKey> = lora_keys()
        .into_iter()
        .map(|mut key| {
            if key.key == "dropout" {
                key.help = "dropout on the branch input; only 0 is supported for dora".into();
            }
            key
        })
        .collect();
    MethodDescription::new(
        "dora",
        "weight-decomposed LoRA: W' = m ⊙ (W + (alpha/r)·A·B) / ‖·‖ per output, m learned",
        keys,
    )
    .with_peft_import(PeftImport {
        peft_type: "LORA".into(),
        flag: Some("use_dora".into()),
        rank_field: Some("r".into()),
        alpha_field: Some("lora_alpha".into()),
        fields: vec![
            ("lora_dropout".into(), "dropout".into()),
            ("use_rslora".into(), "rslora".into()),
        ],
        inert_fields: vec![
            "init_lora_weights".into(),
            "fan_in_fan_out".into(),
            "bias".into(),
        ],
        tensor_suffixes: vec!["lora_A".into(), "lora_B".into(), MAGNITUDE_KEY.into()],
        ..PeftImport::default()
    })
}

/// Grafts a DoRA branch on every selected linear site.
pub fn patch(
    host: &Host<'_>,
    config: &MethodConfig,
    graph: &GraphView,
) -> Result<PatchReply, String> {
    let dropout = config.get_f64("dropout")?;
    if dropout != 0.0 {
        return Err(format!(
            "dropout = {dropout}: dora supports only 0 (PEFT drops the LoRA path's input only, which a weight-delta branch cannot)"
        ));
    }
    if config.get_string("init")? != "kaiming" {
        return Err("init: dora supports only kaiming (HF PEFT's default)".into());
    }
    let targets = selected_sites(config, graph)?;
    let mut b = PatchBuilder::new(graph, "dora").with_seed(config.get_usize("seed")? as u64);
    let mut tensors = Vec::new();
    let mut modules = Vec::new();
    let (mut ranks, mut alphas) = (serde_json::Map::new(), serde_json::Map::new());
    let base_r = config.get_usize("r")?;
    let base_alpha = config.get_f64("alpha")?;
    let rslora = config.get_bool("rslora")?;
    for target in &targets {
        let site = target.site;
        site.check_rank(target.r)?;
        let dtype = graph
            .tensor(&site.weight)
            .map(|t| t.dtype)
            .ok_or_else(|| format!("site {}: unknown weight", site.display_name()))?;
        let (n_in, n_out, r) = (site.in_features, site.out_features, target.r);
        let stem = b.stem(&format!("dora.{}", site.display_name()));
        let norms = column_norms(host, site, dtype)?;
        let magnitude_init = b.data(
            &format!("{stem}.magnitude"),
            dtype,
            vec![n_out],
            f32_to_bytes(dtype, &norms).ok_or("magnitude bytes")?,
        )?;
        let seed = b.next_seed();
        let a = b.parameter(
            &format!("{stem}.A"),
            dtype,
            vec![n_in, r],
            Init::linear_default(n_in, seed),
            true,
        );
        let bm = b.parameter(
            &format!("{stem}.B"),
            dtype,
            vec![r, n_out],
            Init::Zeros,
            true,
        );
        let m = b.parameter(
            &format!("{stem}.magnitude"),
            dtype,
            vec![n_out],
            magnitude_init,
            true,
        );
        let scale = target.scale;
        b.delta_branch(site, &stem, |b| {
            Ok(dora_delta(b, &stem, site, [&a, &bm, &m], scale, dtype))
        })?;
        if let Some(label) = &site.label {
            modules.push(label.clone());
            if r != base_r {
                ranks.insert(label.clone(), r.into());
            }
            let alpha = scale * if rslora { (r as f64).sqrt() } else { r as f64 };
            if (alpha - base_alpha).abs() > 1e-9 * base_alpha.abs().max(1.0) {
                alphas.insert(label.clone(), alpha.into());
            }
            // PEFT's keys: `lora_A.weight`, `lora_B.weight`, and the magnitude without
            // `.weight` (PEFT strips it to keep its older DoRA format).
            for (suffix, tensor, transpose, shape) in [
                ("lora_A.weight", &a, true, vec![r, n_in]),
                ("lora_B.weight", &bm, true, vec![n_out, r]),
                (MAGNITUDE_KEY, &m, false, vec![n_out]),
            ] {
                tensors.push(PeftTensor {
                    key: format!("{label}.{suffix}"),
                    tensor: tensor.clone(),
                    transpose,
                    shape,
                    rank_axis: None,
                });
            }
        }
    }
    let mut reply = b.finish();
    if modules.len() == targets.len() {
        modules.sort_unstable();
        reply.patch.training.peft = Some(PeftFiles {
            config: serde_json::json!({
                "peft_type": "LORA",
                "use_dora": true,
                "task_type": null,
                "base_model_name_or_path": null,
                "inference_mode": true,
                "r": base_r,
                "lora_alpha": base_alpha,
                "lora_dropout": 0.0,
                "use_rslora": rslora,
                "fan_in_fan_out": false,
                "bias": "none",
                "target_modules": modules,
                "rank_pattern": ranks,
                "alpha_pattern": alphas,
                "init_lora_weights": true,
                "modules_to_save": null,
            }),
            tensors,
            ..PeftFiles::default()
        });
    }
    Ok(reply)
}

/// `‖W[:, j]‖` over the input axis for every output `j`: the magnitude DoRA starts from.
fn column_norms(host: &Host<'_>, site: &Site, dtype: DType) -> Result<Vec<f32>, String> {
    let bytes = host.tensor_view(&site.weight).ok_or_else(|| {
        format!(
            "site {}: the host lent no weight values",
            site.display_name()
        )
    })?;
    let values = bytes_to_f32(dtype, bytes)
        .ok_or_else(|| format!("site {}: weight is not a float tensor", site.display_name()))?;
    let (n_in, n_out) = (site.in_features, site.out_features);
    if values.len() != n_in * n_out {
        return Err(format!(
            "site {}: weight has {} values, not {n_in}×{n_out}",
            site.display_name(),
            values.len()
        ));
    }
    let at = |i: usize, j: usize| match site.layout {
        WeightLayout::InOut => values[i * n_out + j],
        WeightLayout::OutIn => values[j * n_in + i],
    };
    Ok((0..n_out)
        .map(|j| {
            let sum: f64 = (0..n_in).map(|i| (at(i, j) as f64).powi(2)).sum();
            sum.sqrt() as f32
        })
        .collect())
}

/// Emits `V·(m / ‖V‖₀) − W` with `V = W + scale·(A·B)`, all `[in, out]` (`W` transposed when
/// stored `[out, in]`) and the norm over axis 0; returns it.
fn dora_delta(
    b: &mut PatchBuilder<'_>,
    stem: &str,
    site: &Site,
    [a, bm, m]: [&str; 3],
    scale: f64,
    dtype: DType,
) -> String {
    let weight = match site.layout {
        WeightLayout::InOut => site.weight.clone(),
        WeightLayout::OutIn => b.op(
            &format!("{stem}.weight_in_out"),
            "Transpose",
            &[&site.weight],
            &[],
        ),
    };
    let product = b.op(&format!("{stem}.product"), "MatMul", &[a, bm], &[]);
    let s = b.constant_scalar(&format!("{stem}.scale"), scale, dtype);
    let update = b.op(
        &format!("{stem}.scaled_product"),
        "Mul",
        &[&product, &s],
        &[],
    );
    let adapted = b.op(&format!("{stem}.adapted"), "Add", &[&weight, &update], &[]);
    let squares = b.op(
        &format!("{stem}.squares"),
        "Mul",
        &[&adapted, &adapted],
        &[],
    );
    let axes = b.constant_ints(&format!("{stem}.norm_axes"), &[0]);
    let sum = b.op(
        &format!("{stem}.sum_squares"),
        "ReduceSum",
        &[&squares, &axes],
        &[("keepdims", AttributeValue::Int(1))],
    );
    let norm = b.op(&format!("{stem}.norm"), "Sqrt", &[&sum], &[]);
    let factor = b.op(&format!("{stem}.magnitude_scale"), "Div", &[m, &norm], &[]);
    let rescaled = b.op(
        &format!("{stem}.rescaled"),
        "Mul",
        &[&adapted, &factor],
        &[],
    );
    b.op(&format!("{stem}.delta"), "Sub", &[&rescaled, &weight], &[])
}
