//! The `adalora` method plugin: AdaLoRA (Zhang et al., 2023) with HF PEFT's semantics —
//! low-rank updates in SVD form `y = W·x + ((x·(A ⊙ E))·B)·α/(r + ε)` whose rank budget is
//! re-allocated during training by the step hook (see [`allocator`]), with the orthogonality
//! regularizer `γ · mean(‖AᵀA − I‖_F, ‖BBᵀ − I‖_F)` added to the loss.
//!
//! Tensors per site, in graft's input-major layout: `A` `[in, r]` (PEFT's `lora_A` transposed),
//! `E` `[r]` (PEFT's `lora_E` `[r, 1]`), `B` `[r, out]` (PEFT's `lora_B` transposed); `A`, `B` ~
//! N(0, 0.02) and `E` = 0 at init, so the model is unchanged until `E` trains. The branch folds
//! exactly through a delta fold `(A ⊙ E)·B·α/(r + ε)`.

pub mod allocator;

use graft_plugin_sdk::{
    export_plugin, f32_to_bytes, AttributeValue, ConfigKey, DType, Fold, GraphView, Host, Init,
    LossTerm, MethodConfig, MethodDescription, NewNode, PatchBuilder, PatchReply, PeftFiles,
    PeftTensor, Plugin, SiteSelector, StepHook, StepReply, StepRequest,
};

use allocator::{Module, Schedule, State};

/// The ε PEFT adds to the rank in the branch scale `α / (r + ε)`.
pub const RANK_EPSILON: f64 = 1e-5;

/// AdaLoRA, configured like HF PEFT's `AdaLoraConfig`.
pub struct AdaLora;

impl Plugin for AdaLora {
    const NAME: &'static str = "adalora";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn methods() -> Vec<MethodDescription> {
        vec![MethodDescription::new(
            "adalora",
            "adaptive low-rank adaptation: SVD-form branches whose rank budget the step hook re-allocates by importance",
            vec![
                ConfigKey::list("targets", &["q", "v"], "site kinds (q k v o qkv ffn_up ffn_gate ffn_down ffn_gate_up), all-linear, or label patterns"),
                ConfigKey::int("init_r", 12, "initial rank of every branch"),
                ConfigKey::int("target_r", 8, "average rank per branch at the end of the budget schedule"),
                ConfigKey::int("tinit", 0, "steps of warmup before ranks are pruned"),
                ConfigKey::int("tfinal", 0, "final steps trained with the last rank pattern"),
                ConfigKey::int("deltaT", 1, "prune every this many steps during the schedule"),
                ConfigKey::float("beta1", 0.85, "EMA factor of the importance |p·∇p|"),
                ConfigKey::float("beta2", 0.85, "EMA factor of the importance's uncertainty"),
                ConfigKey::float("orth_reg_weight", 0.5, "weight of the orthogonality regularizer in the loss"),
                ConfigKey::float("alpha", 8.0, "branch scale numerator: scale = alpha / (init_r + 1e-5)"),
                ConfigKey::int("total_step", 0, "steps of the budget schedule (0: the run's total steps)"),
                ConfigKey::int("seed", 0, "seed of A's and B's random init"),
            ],
        )]
    }

    fn patch(
        _host: &Host<'_>,
        method: &str,
        config: &MethodConfig,
        graph: &GraphView,
    ) -> Result<PatchReply, String> {
        let schedule = Schedule::from_config(config)?;
        let r = schedule.init_r;
        let selector = SiteSelector::parse(&config.get_list("targets")?)
            .map_err(|e| format!("targets {e}"))?;
        let sites: Vec<_> = selector
            .select(graph)
            .into_iter()
            .filter(|s| s.site.kind.is_linear())
            .collect();
        if sites.is_empty() {
            return Err(format!(
                "{method}: targets match no linear site of this model"
            ));
        }
        for site_ref in &sites {
            site_ref
                .site
                .check_rank(r)
                .map_err(|e| format!("init_r: {e}"))?;
        }
        let scale = config.get_f64("alpha")? / (r as f64 + RANK_EPSILON);
        let mut b = PatchBuilder::new(graph, "adalora").with_seed(config.get_usize("seed")? as u64);
        let mut eye = vec![0f32; r * r];
        eye.iter_mut().step_by(r + 1).for_each(|v| *v = 1.0);
        let identity_bytes = f32_to_bytes(DType::Float, &eye).ok_or("identity")?;
        let identity_init = b.data("adalora.identity", DType::Float, vec![r, r], identity_bytes)?;
        let identity = b.parameter(
            "adalora.identity",
            DType::Float,
            vec![r, r],
            identity_init,
            false,
        );
        let mut modules = Vec::new();
        let mut norms = Vec::new();
        let mut peft_tensors = Vec::new();
        for site_ref in sites {
            let site = site_ref.site;
            let dtype = graph
                .tensor(&site.weight)
                .map(|t| t.dtype)
                .ok_or_else(|| format!("site {}: unknown weight", site.display_name()))?;
            if dtype != DType::Float {
                return Err(format!(
                    "site {}: adalora supports float32 weights for now, not {dtype}",
                    site.display_name()
                ));
            }
            let stem = b.stem(&format!("adalora.{}", site.display_name()));
            let normal = |seed| Init::Normal {
                mean: 0.0,
                std: 0.02,
                seed,
            };
            let seed_a = b.next_seed();
            let a = b.parameter(
                &format!("{stem}.A"),
                dtype,
                vec![site.in_features, r],
                normal(seed_a),
                true,
            );
            let e = b.parameter(&format!("{stem}.E"), dtype, vec![r], Init::Zeros, true);
            let seed_b = b.next_seed();
            let bm = b.parameter(
                &format!("{stem}.B"),
                dtype,
                vec![r, site.out_features],
                normal(seed_b),
                true,
            );
            let ((output, base), nodes) = b.block(|b| {
                let x = b.current(&site.input);
                let scaled_a = b.op(&format!("{stem}.scale_a"), "Mul", &[&a, &e], &[]);
                let h = b.op(&format!("{stem}.matmul_a"), "MatMul", &[&x, &scaled_a], &[]);
                let u = b.op(&format!("{stem}.matmul_b"), "MatMul", &[&h, &bm], &[]);
                let s = b.constant_scalar(&format!("{stem}.scale"), scale, dtype);
                let d = b.op(&format!("{stem}.mul_scale"), "Mul", &[&u, &s], &[]);
                let base = b.current(&site.output);
                let output = b.op(&format!("{stem}.add"), "Add", &[&base, &d], &[]);
                b.rewire(&base, &output);
                Ok((output, base))
            })?;
            b.fold(Fold::Delta {
                weight: site.weight.clone(),
                layout: site.layout,
                delta_nodes: delta_nodes(&a, &e, &bm, scale as f32),
                delta: "delta".into(),
                branch_nodes: nodes,
                branch_output: output,
                base_output: base,
            });
            for (factor, transpose_first) in [(&a, true), (&bm, false)] {
                norms.push(orthogonality_norm(
                    &mut b,
                    factor,
                    transpose_first,
                    &identity,
                ));
            }
            if let Some(label) = &site.label {
                let (n_in, n_out) = (site.in_features, site.out_features);
                for (suffix, tensor, transpose, shape, rank_axis) in [
                    ("lora_A", &a, true, vec![r, n_in], 0),
                    ("lora_E", &e, false, vec![r, 1], 0),
                    ("lora_B", &bm, true, vec![n_out, r], 1),
                ] {
                    peft_tensors.push(PeftTensor {
                        key: format!("{label}.{suffix}"),
                        tensor: tensor.clone(),
                        transpose,
                        shape,
                        rank_axis: Some(rank_axis),
                    });
                }
            }
            modules.push(Module {
                label: site
                    .label
                    .clone()
                    .unwrap_or_else(|| site.display_name().to_owned()),
                a,
                e,
                b: bm,
                rank: r,
            });
        }
        let mut sum = norms[0].clone();
        for norm in &norms[1..] {
            sum = b.op("adalora.orthogonality.add", "Add", &[&sum, norm], &[]);
        }
        let inverse_count = b.constant_scalar(
            "adalora.orthogonality.inverse_count",
            1.0 / norms.len() as f64,
            DType::Float,
        );
        let term = b.op("adalora.orthogonality", "Mul", &[&sum, &inverse_count], &[]);
        let mut reply = b.finish();
        reply.patch.training.loss_terms.push(LossTerm {
            name: "orthogonality".into(),
            value: term,
            weight: config.get_f64("orth_reg_weight")?,
        });
        if peft_tensors.len() == 3 * modules.len() {
            reply.patch.training.peft = Some(PeftFiles {
                config: peft_config(config, &modules)?,
                tensors: peft_tensors,
                ..PeftFiles::default()
            });
        }
        reply.patch.training.step_hook = Some(StepHook {
            tensors: modules
                .iter()
                .flat_map(|m| [m.a.clone(), m.e.clone(), m.b.clone()])
                .collect(),
            state: serde_json::to_value(State::new(modules)).map_err(|e| e.to_string())?,
        });
        Ok(reply)
    }

    fn step(
        _host: &Host<'_>,
        config: &MethodConfig,
        request: &StepRequest,
    ) -> Result<StepReply, String> {
        allocator::step(config, request)
    }
}

/// PEFT's `adapter_config.json` for an AdaLoRA adapter with these settings. Tensors are
/// written at full rank with `rank_pattern: null` (masked ranks have `E = 0`), which PEFT
/// loads as it trained them; the final pattern is in the run's metrics.
fn peft_config(config: &MethodConfig, modules: &[Module]) -> Result<serde_json::Value, String> {
    let mut targets: Vec<&str> = modules.iter().map(|m| m.label.as_str()).collect();
    targets.sort_unstable();
    let total_step = config.get_usize("total_step")?;
    Ok(serde_json::json!({
        "peft_type": "ADALORA",
        "task_type": null,
        "base_model_name_or_path": null,
        "inference_mode": true,
        "r": config.get_usize("init_r")?,
        "init_r": config.get_usize("init_r")?,
        "target_r": config.get_usize("target_r")?,
        "tinit": config.get_usize("tinit")?,
        "tfinal": config.get_usize("tfinal")?,
        "deltaT": config.get_usize("deltaT")?,
        "beta1": config.get_f64("beta1")?,
        "beta2": config.get_f64("beta2")?,
        "orth_reg_weight": config.get_f64("orth_reg_weight")?,
        "lora_alpha": config.get_f64("alpha")?,
        "lora_dropout": 0.0,
        "total_step": if total_step == 0 { serde_json::Value::Null } else { total_step.into() },
        "target_modules": targets,
        "rank_pattern": null,
        "bias": "none",
        "fan_in_fan_out": false,
        "init_lora_weights": true,
        "modules_to_save": null,
    }))
}

/// `‖XᵀX − I‖_F` for `X = A` (`transpose_first`) or `‖XXᵀ − I‖_F` for `X = B`: PEFT's
/// `A·Aᵀ` and `Bᵀ·B` in its `[r, in]` / `[out, r]` layout.
fn orthogonality_norm(
    b: &mut PatchBuilder<'_>,
    factor: &str,
    transpose_first: bool,
    identity: &str,
) -> String {
    let transposed = b.op(&format!("{factor}.transpose"), "Transpose", &[factor], &[]);
    let covariance = if transpose_first {
        b.op(
            &format!("{factor}.covariance"),
            "MatMul",
            &[&transposed, factor],
            &[],
        )
    } else {
        b.op(
            &format!("{factor}.covariance"),
            "MatMul",
            &[factor, &transposed],
            &[],
        )
    };
    let difference = b.op(
        &format!("{factor}.minus_identity"),
        "Sub",
        &[&covariance, identity],
        &[],
    );
    let squares = b.op(
        &format!("{factor}.squares"),
        "Mul",
        &[&difference, &difference],
        &[],
    );
    let total = b.op(
        &format!("{factor}.sum_squares"),
        "ReduceSum",
        &[&squares],
        &[("keepdims", AttributeValue::Int(0))],
    );
    b.op(&format!("{factor}.frobenius"), "Sqrt", &[&total], &[])
}

/// The side subgraph of the delta fold: `delta = ((A ⊙ E) · B) · scale`, `[in, out]`.
fn delta_nodes(a: &str, e: &str, b: &str, scale: f32) -> Vec<NewNode> {
    let node =
        |name: &str, op: &str, inputs: &[&str], attributes: Vec<(&str, AttributeValue)>| NewNode {
            name: name.into(),
            op_type: op.into(),
            domain: String::new(),
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            outputs: vec![name.into()],
            attributes: attributes
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
        };
    vec![
        node("scaled_a", "Mul", &[a, e], vec![]),
        node("product", "MatMul", &["scaled_a", b], vec![]),
        node(
            "scale",
            "Constant",
            &[],
            vec![("value_float", AttributeValue::Float(scale))],
        ),
        node("delta", "Mul", &["product", "scale"], vec![]),
    ]
}

export_plugin!(AdaLora);
