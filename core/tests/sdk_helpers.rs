//! The SDK's insertion helpers on real fixtures: residual modules, soft prompts, key/value
//! prefixes, gates, NF4 dequantization and in-place training. Each patch is built with
//! `PatchBuilder` from `graph_view`, applied with `apply_patch` and run in ONNX Runtime's exact
//! mode. At their no-op values the outputs equal the base model's bit for bit; with other values
//! they change and stay finite. A prompt on LLaMA and prefixes on the KV-cache inputs are also
//! compared with the base model run on the equivalent longer input, which must give the same bits.

mod common;

use common::*;
use graft::ir::{Model, Tensor};
use graft::onnx;
use graft::patch::{apply_patch, AppliedMethod};
use graft::plugins::graph_view;
use graft::runtime::HostTensor;
use graft_plugin_sdk::quant::{dequantize_blockwise, quantize_blockwise, NF4_CODEBOOK};
use graft_plugin_sdk::{
    Activation, EmbeddingKind, Fold, GraphView, Init, PatchBuilder, Placement, Site, SiteKind,
};
use ndarray::{concatenate, s, Array2, ArrayD, Axis, IxDyn};

type Outputs = Vec<(String, HostTensor)>;

/// Builds a patch with `build` on `base`'s view, checks its names, applies it to a copy of
/// `base`, and returns the copy with whatever `build` returned.
fn patched<T>(base: &Model, build: impl FnOnce(&GraphView, &mut PatchBuilder) -> T) -> (Model, T) {
    let view = graph_view(base).expect("graph view");
    let mut builder = PatchBuilder::new(&view, "helper").with_seed(11);
    let built = build(&view, &mut builder);
    let reply = builder.finish();
    if let Err(problems) = reply.patch.check(&view) {
        panic!("the builder's patch has bad names: {problems:?}");
    }
    let mut model = base.clone();
    let method = AppliedMethod {
        method: "sdk-helpers".into(),
        plugin: "core/tests/sdk_helpers.rs".into(),
        plugin_version: "0".into(),
        config: serde_json::json!({}),
        ..AppliedMethod::default()
    };
    apply_patch(&mut model, &reply, method).expect("apply the patch");
    (model, built)
}

fn assert_unchanged(base: &Outputs, patched: &Outputs, what: &str) {
    let diff = max_diff(base, patched);
    assert_eq!(
        diff, 0.0,
        "{what}: outputs differ by {diff} at the no-op values"
    );
}

fn assert_changed_and_finite(base: &Outputs, patched: &Outputs, what: &str) {
    let mut change: f64 = 0.0;
    for (name, tensor) in patched {
        assert!(
            tensor.to_f64().iter().all(|v| v.is_finite()),
            "{what}: output {name} is not finite"
        );
        change = change.max(named(base, name).max_abs_diff(tensor));
    }
    assert!(
        change > 1e-4 && change.is_finite(),
        "{what}: the outputs moved by {change} only"
    );
}

fn set_values(model: &mut Model, name: &str, values: &[f32]) {
    let tensor = model
        .graph
        .initializers
        .iter_mut()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no initializer {name}"));
    assert_eq!(tensor.n_elements(), values.len(), "{name}: wrong length");
    *tensor = Tensor::from_f32(name, tensor.dims.clone(), values);
}

fn values_of(model: &Model, name: &str) -> Vec<f32> {
    model.graph.initializer(name).unwrap().to_f32().unwrap()
}

fn named<'i>(inputs: &'i [(String, HostTensor)], name: &str) -> &'i HostTensor {
    &inputs.iter().find(|(n, _)| n == name).unwrap().1
}

fn replace_input(inputs: &mut [(String, HostTensor)], name: &str, tensor: HostTensor) {
    inputs.iter_mut().find(|(n, _)| n == name).unwrap().1 = tensor;
}

fn output_f32<'o>(outputs: &'o Outputs, name: &str) -> &'o ArrayD<f32> {
    named(outputs, name).as_f32().expect("float32 output")
}

/// `mask` `[batch, seq]` with `n` columns of ones in front.
fn mask_with_ones_in_front(mask: &HostTensor, n: usize) -> HostTensor {
    let HostTensor::I64(mask) = mask else {
        panic!("attention_mask is not int64")
    };
    let ones = ArrayD::from_elem(IxDyn(&[mask.shape()[0], n]), 1i64);
    HostTensor::I64(concatenate(Axis(1), &[ones.view(), mask.view()]).unwrap())
}

/// The site of `kind` in a layer.
fn site(sites: &[Site], kind: SiteKind) -> Option<&Site> {
    sites.iter().find(|s| s.kind == kind)
}

#[test]
fn residual_modules_are_no_ops_at_init_on_every_fixture() {
    let activations = [
        Activation::Gelu,
        Activation::Relu,
        Activation::Silu,
        Activation::Tanh,
        Activation::Identity,
    ];
    for fixture in FIXTURES {
        let base = onnx::load(&fixture_model(fixture)).unwrap();
        let inputs = fixture_inputs(fixture);
        let base_outputs = run_model(&base, &inputs);
        let (mut model, n_modules) = patched(&base, |view, b| {
            let mut n_modules = 0;
            for stack in &view.stacks {
                for layer in &stack.layers {
                    let o = site(&layer.sites, SiteKind::O).expect("o site");
                    let init = Init::linear_default(o.out_features, b.next_seed());
                    let activation = activations[n_modules % activations.len()];
                    let names = b
                        .residual_module(
                            &o.output,
                            o.out_features,
                            4,
                            activation,
                            Placement::Sequential,
                            init,
                        )
                        .unwrap();
                    assert_eq!(b.current(&o.output), names.output);
                    n_modules += 1;

                    let up = site(&layer.sites, SiteKind::FfnUp)
                        .or_else(|| site(&layer.sites, SiteKind::FfnGateUp))
                        .expect("ffn_up or ffn_gate_up site");
                    let down = site(&layer.sites, SiteKind::FfnDown).expect("ffn_down site");
                    let init = Init::linear_default(up.in_features, b.next_seed());
                    let activation = activations[n_modules % activations.len()];
                    let from = up.input.clone();
                    b.residual_module(
                        &down.output,
                        down.out_features,
                        4,
                        activation,
                        Placement::Parallel { from },
                        init,
                    )
                    .unwrap();
                    n_modules += 1;
                }
            }
            n_modules
        });
        assert!(n_modules >= 4, "{fixture}: {n_modules} modules");
        let at_init = run_model(&model, &inputs);
        assert_unchanged(
            &base_outputs,
            &at_init,
            &format!("{fixture} residual modules"),
        );

        randomize_trainable(&mut model);
        let trained = run_model(&model, &inputs);
        assert_changed_and_finite(
            &base_outputs,
            &trained,
            &format!("{fixture} residual modules"),
        );
    }
}

/// The legacy LLaMA export computes positions, RoPE and the causal mask from the embedding
/// output's length and the attention mask, so a prompt prepended at the token-embedding output
/// behaves exactly as if its vectors were the embeddings of extra tokens in front of the input.
/// (The dynamo export also declares every intermediate's shape with the input's symbolic
/// sequence length, which ONNX Runtime enforces and a longer sequence contradicts.)
#[test]
fn a_soft_prompt_on_llama_equals_the_base_model_on_the_longer_input() {
    let fixture = "llama-legacy";
    let base = onnx::load(&fixture_model(fixture)).unwrap();
    let inputs = fixture_inputs(fixture);
    let base_outputs = run_model(&base, &inputs);
    let view = graph_view(&base).unwrap();
    let token = view
        .embeddings
        .iter()
        .find(|e| e.kind == EmbeddingKind::Token)
        .expect("token embedding")
        .clone();

    let (nothing, names) = patched(&base, |_, b| {
        b.prepend_to_sequence(
            &token.output,
            Some("attention_mask"),
            0,
            token.dim,
            Init::Zeros,
            false,
        )
        .unwrap()
    });
    assert!(names.prompt.is_none() && names.nodes.is_empty());
    assert_unchanged(&base_outputs, &run_model(&nothing, &inputs), fixture);

    let prompt_ids = [5i64, 17, 99];
    let n_virtual = prompt_ids.len();
    let (mut prompted, names) = patched(&base, |_, b| {
        b.prepend_to_sequence(
            &token.output,
            Some("attention_mask"),
            n_virtual,
            token.dim,
            Init::Zeros,
            false,
        )
        .unwrap()
    });
    let prompt = names.prompt.expect("prompt parameter");
    assert!(names.mask_output.is_some());
    let table = values_of(&base, &token.weight);
    let rows: Vec<f32> = prompt_ids
        .iter()
        .flat_map(|&id| &table[id as usize * token.dim..(id as usize + 1) * token.dim])
        .copied()
        .collect();
    set_values(&mut prompted, &prompt, &rows);

    let mut longer = inputs.clone();
    let HostTensor::I64(ids) = named(&inputs, "input_ids") else {
        panic!("input_ids is not int64")
    };
    let front = Array2::from_shape_fn((ids.shape()[0], n_virtual), |(_, j)| prompt_ids[j]);
    let longer_ids = concatenate(Axis(1), &[front.into_dyn().view(), ids.view()]).unwrap();
    replace_input(&mut longer, "input_ids", HostTensor::I64(longer_ids));
    let longer_mask = mask_with_ones_in_front(named(&inputs, "attention_mask"), n_virtual);
    replace_input(&mut longer, "attention_mask", longer_mask);
    let reference = run_model(&base, &longer);
    assert_unchanged(
        &reference,
        &run_model(&prompted, &inputs),
        &format!("{fixture}: token-embedding prompt vs the longer input"),
    );

    randomize_trainable(&mut prompted);
    let trained = run_model(&prompted, &inputs);
    let logits = output_f32(&trained, "logits");
    let real_positions = vec![(
        "logits".to_string(),
        HostTensor::F32(logits.slice(s![.., n_virtual.., ..]).to_owned().into_dyn()),
    )];
    assert_changed_and_finite(&base_outputs, &real_positions, fixture);
}

/// BERT adds token-type and position embeddings, sized by `input_ids`, after the word-embedding
/// lookup, so a prompt prepended there cannot broadcast; it goes on the embeddings' LayerNorm
/// output (what the first layer reads), where every later shape of the legacy export comes from
/// the hidden states or the (extended) attention mask. (The dynamo export sizes its attention
/// reshapes from `input_ids`, so no point after the embeddings takes a longer sequence.)
#[test]
fn a_soft_prompt_on_bert_goes_after_the_position_embeddings() {
    let fixture = "bert-legacy";
    let base = onnx::load(&fixture_model(fixture)).unwrap();
    let inputs = fixture_inputs(fixture);
    let base_outputs = run_model(&base, &inputs);
    let view = graph_view(&base).unwrap();
    let stack = &view.stacks[0];
    let hidden_states = stack.layers[0].sites[0].input.clone();
    let hidden = stack.hidden_size;

    let (nothing, _) = patched(&base, |_, b| {
        b.prepend_to_sequence(
            &hidden_states,
            Some("attention_mask"),
            0,
            hidden,
            Init::Zeros,
            false,
        )
        .unwrap()
    });
    assert_unchanged(&base_outputs, &run_model(&nothing, &inputs), fixture);

    let init = Init::Normal {
        mean: 0.0,
        std: 1.0,
        seed: 3,
    };
    let (prompted, names) = patched(&base, |_, b| {
        b.prepend_to_sequence(
            &hidden_states,
            Some("attention_mask"),
            3,
            hidden,
            init,
            false,
        )
        .unwrap()
    });
    assert!(names.mask_output.is_some());
    let trained = run_model(&prompted, &inputs);
    assert_changed_and_finite(&base_outputs, &trained, fixture);

    let token = view
        .embeddings
        .iter()
        .find(|e| e.kind == EmbeddingKind::Token)
        .unwrap();
    let (too_early, _) = patched(&base, |_, b| {
        b.prepend_to_sequence(
            &token.output,
            Some("attention_mask"),
            3,
            hidden,
            Init::Zeros,
            false,
        )
        .unwrap()
    });
    assert!(
        try_run_model(&too_early, &inputs).is_err(),
        "{fixture}: a prompt before the position embeddings should not broadcast"
    );
}

/// Without a cache input the graph builds its causal mask and RoPE positions for the `seq`
/// queries alone, so prefixed keys shift the causal window: the patch runs and trains, but it is
/// HF PEFT's prefix tuning only through the cache inputs (next test).
#[test]
fn key_value_prefixes_on_llama_are_no_ops_when_empty_and_train_otherwise() {
    let fixture = "llama-legacy";
    let base = onnx::load(&fixture_model(fixture)).unwrap();
    let inputs = fixture_inputs(fixture);
    let base_outputs = run_model(&base, &inputs);
    for n_prefix in [0, 2] {
        let (model, n_layers) = patched(&base, |view, b| {
            let stack = &view.stacks[0];
            let mut n_layers = 0;
            for layer in &stack.layers {
                let key_states = site(&layer.sites, SiteKind::K)
                    .and_then(|k| k.key_states.clone())
                    .expect("key states");
                let value_states = site(&layer.sites, SiteKind::V)
                    .and_then(|v| v.value_states.clone())
                    .expect("value states");
                let init = Init::Normal {
                    mean: 0.0,
                    std: 1.0,
                    seed: b.next_seed(),
                };
                let names = b
                    .prefix_key_values(
                        &key_states,
                        &value_states,
                        stack.n_kv_heads,
                        stack.head_dim(),
                        n_prefix,
                        init,
                    )
                    .unwrap();
                assert_eq!(names.key_prefix.is_some(), n_prefix > 0);
                n_layers += 1;
            }
            b.extend_mask("attention_mask", n_prefix).unwrap();
            n_layers
        });
        assert_eq!(n_layers, 2);
        let outputs = run_model(&model, &inputs);
        if n_prefix == 0 {
            assert_unchanged(&base_outputs, &outputs, fixture);
        } else {
            assert_changed_and_finite(&base_outputs, &outputs, fixture);
        }
    }
}

/// With a KV cache, the graph takes the past length from the cache input's shape, so a prefix
/// prepended to the cache inputs (and ones to the mask) is exactly HF PEFT's prefix tuning: the
/// base model fed the longer cache gives the same bits. The sites' `key_states` here are the
/// concatenated `present` values, whose length the attention mask does not follow.
#[test]
fn key_value_prefixes_on_the_cache_equal_the_base_model_on_a_longer_cache() {
    for fixture in [
        "llama-past-legacy",
        "llama-past-dynamo",
        "gpt2-past-legacy",
        "gpt2-past-dynamo",
    ] {
        let base = onnx::load(&fixture_model(fixture)).unwrap();
        let inputs = fixture_inputs(fixture);
        let base_outputs = run_model(&base, &inputs);
        let view = graph_view(&base).unwrap();
        let stack = &view.stacks[0];
        let cache_input = |states: &str| -> String {
            let producer = |value: &str| {
                base.graph
                    .nodes
                    .iter()
                    .find(|n| n.outputs.iter().any(|o| o == value))
            };
            let concat = producer(states).expect("producer of the attention's keys or values");
            assert!(concat.is("Concat"), "{fixture}: {states} is not a Concat");
            let mut cache = concat.inputs[0].clone();
            while !view.inputs.contains(&cache) {
                let pass_through = producer(&cache)
                    .filter(|n| n.inputs.len() == 1)
                    .unwrap_or_else(|| {
                        panic!("{fixture}: {cache} does not come from a graph input")
                    });
                cache = pass_through.inputs[0].clone();
            }
            cache
        };
        let caches: Vec<(String, String)> = stack
            .layers
            .iter()
            .map(|layer| {
                let states = |kind: SiteKind| {
                    layer
                        .sites
                        .iter()
                        .filter(|s| s.kind == kind || s.kind == SiteKind::Qkv)
                        .find_map(|s| match kind {
                            SiteKind::K => s.key_states.clone(),
                            _ => s.value_states.clone(),
                        })
                        .expect("key and value states")
                };
                (
                    cache_input(&states(SiteKind::K)),
                    cache_input(&states(SiteKind::V)),
                )
            })
            .collect();

        let n_prefix = 2;
        let (model, prefixes) = patched(&base, |_, b| {
            let mut prefixes = Vec::new();
            for (keys, values) in &caches {
                let init = Init::Normal {
                    mean: 0.0,
                    std: 1.0,
                    seed: b.next_seed(),
                };
                let names = b
                    .prefix_key_values(
                        keys,
                        values,
                        stack.n_kv_heads,
                        stack.head_dim(),
                        n_prefix,
                        init,
                    )
                    .unwrap();
                prefixes.push((names.key_prefix.unwrap(), keys.clone()));
                prefixes.push((names.value_prefix.unwrap(), values.clone()));
            }
            b.extend_mask("attention_mask", n_prefix).unwrap();
            prefixes
        });
        let outputs = run_model(&model, &inputs);

        let mut longer = inputs.clone();
        for (prefix, cache) in &prefixes {
            let past = named(&inputs, cache).as_f32().unwrap();
            let values = values_of(&model, prefix);
            let shape = [1, stack.n_kv_heads, n_prefix, stack.head_dim()];
            let prefix = ArrayD::from_shape_vec(IxDyn(&shape), values).unwrap();
            let mut batch_shape = shape;
            batch_shape[0] = past.shape()[0];
            let prefix = prefix.broadcast(IxDyn(&batch_shape)).unwrap();
            let extended = concatenate(Axis(2), &[prefix, past.view()]).unwrap();
            replace_input(&mut longer, cache, HostTensor::F32(extended));
        }
        let longer_mask = mask_with_ones_in_front(named(&inputs, "attention_mask"), n_prefix);
        replace_input(&mut longer, "attention_mask", longer_mask);
        let reference = run_model(&base, &longer);
        assert_unchanged(
            &reference,
            &outputs,
            &format!("{fixture}: cache prefix vs the longer cache"),
        );
        let logits = vec![("logits".to_string(), named(&outputs, "logits").clone())];
        assert_changed_and_finite(&base_outputs, &logits, fixture);
    }
}

#[test]
fn gates_are_no_ops_when_closed_on_every_fixture() {
    for fixture in FIXTURES {
        let base = onnx::load(&fixture_model(fixture)).unwrap();
        let inputs = fixture_inputs(fixture);
        let base_outputs = run_model(&base, &inputs);
        let (mut model, n_gates) = patched(&base, |view, b| {
            let mut n_gates = 0;
            for layer in view.stacks.iter().flat_map(|s| &s.layers) {
                for (kind, width) in [(SiteKind::O, true), (SiteKind::FfnDown, false)] {
                    let s = site(&layer.sites, kind).expect("site");
                    let stem = b.stem(&format!("helper.{}.side", s.display_name()));
                    let init = Init::linear_default(s.in_features, b.next_seed());
                    let dtype = b.value_dtype(&s.output).unwrap();
                    let weight = b.parameter(
                        &format!("{stem}.weight"),
                        dtype,
                        vec![s.in_features, s.out_features],
                        init,
                        true,
                    );
                    let branch = b.op(
                        &format!("{stem}.matmul"),
                        "MatMul",
                        &[&s.input, &weight],
                        &[],
                    );
                    let width = width.then_some(s.out_features);
                    let names = b.gate(&branch, &s.output, width, Init::Zeros).unwrap();
                    assert_eq!(names.nodes.len(), 2);
                    n_gates += 1;
                }
            }
            n_gates
        });
        assert!(n_gates >= 4, "{fixture}: {n_gates} gates");
        let at_init = run_model(&model, &inputs);
        assert_unchanged(&base_outputs, &at_init, &format!("{fixture} gates"));

        randomize_trainable(&mut model);
        let trained = run_model(&model, &inputs);
        assert_changed_and_finite(&base_outputs, &trained, &format!("{fixture} gates"));
    }
}

/// Every linear weight is first replaced by its NF4 reconstruction (codebook value times block
/// scale, computed on the host); the dequantizing subgraph must then rebuild exactly those
/// values from the codes and scales.
#[test]
fn nf4_dequantization_reproduces_codebook_weights_exactly() {
    const BLOCK: usize = 64;
    for fixture in ["llama-legacy", "bert-legacy", "gpt2-legacy", "t5-dynamo"] {
        let mut base = onnx::load(&fixture_model(fixture)).unwrap();
        let inputs = fixture_inputs(fixture);
        let view = graph_view(&base).unwrap();
        let weights: Vec<String> = view
            .sites()
            .filter(|s| s.site.kind.is_linear())
            .map(|s| s.site.weight.clone())
            .collect();
        let mut quantized = Vec::new();
        for weight in &weights {
            let q = quantize_blockwise(&values_of(&base, weight), BLOCK, &NF4_CODEBOOK).unwrap();
            set_values(
                &mut base,
                weight,
                &dequantize_blockwise(&q, BLOCK, &NF4_CODEBOOK),
            );
            quantized.push((weight.clone(), q));
        }
        let base_outputs = run_model(&base, &inputs);

        let (mut model, scales) = patched(&base, |_, b| {
            quantized
                .iter()
                .map(|(weight, q)| {
                    let names = b
                        .dequantize_weight(
                            weight,
                            q.codes.clone(),
                            q.absmax.clone(),
                            BLOCK,
                            &NF4_CODEBOOK,
                        )
                        .unwrap();
                    (names.absmax, q.absmax.clone())
                })
                .collect::<Vec<_>>()
        });
        for weight in &weights {
            assert!(
                !model.graph.nodes.iter().any(|n| n.inputs.contains(weight)),
                "{fixture}: {weight} is still read"
            );
            assert!(
                model.graph.initializer(weight).is_none(),
                "{fixture}: the replaced weight {weight} is still stored"
            );
        }
        let record = graft::patch::read_record(&model).unwrap();
        assert_eq!(record.trainable().count(), 0, "codes and scales are frozen");
        let dequantized = run_model(&model, &inputs);
        assert_unchanged(
            &base_outputs,
            &dequantized,
            &format!("{fixture} NF4 dequantization"),
        );

        for (name, absmax) in &scales {
            let scaled: Vec<f32> = absmax.iter().map(|v| v * 1.25).collect();
            set_values(&mut model, name, &scaled);
        }
        let rescaled = run_model(&model, &inputs);
        assert_changed_and_finite(&base_outputs, &rescaled, &format!("{fixture} NF4 scales"));
    }
}

#[test]
fn marking_norms_trainable_records_them_once_and_trains_them_in_place() {
    for fixture in ["bert-legacy", "llama-legacy", "t5-legacy", "vit-dynamo"] {
        let base = onnx::load(&fixture_model(fixture)).unwrap();
        let inputs = fixture_inputs(fixture);
        let base_outputs = run_model(&base, &inputs);
        let (mut model, norms) = patched(&base, |view, b| {
            let norms: Vec<String> = view
                .sites()
                .filter(|s| s.site.kind == SiteKind::Norm)
                .map(|s| s.site.weight.clone())
                .collect();
            for norm in norms.iter().chain(&norms) {
                b.mark_trainable(norm).unwrap();
            }
            assert!(b.mark_trainable("no such tensor").is_err());
            norms
        });
        let mut unique = norms.clone();
        unique.sort();
        unique.dedup();
        assert!(!unique.is_empty(), "{fixture}: no norms");

        let record = graft::patch::read_record(&model).unwrap();
        let mut trainable: Vec<&str> = record.trainable().collect();
        trainable.sort();
        assert_eq!(trainable, unique, "{fixture}: trainable tensors");
        let in_place = record
            .folds
            .iter()
            .filter(|f| matches!(f, Fold::InPlace { .. }))
            .count();
        assert_eq!(in_place, unique.len(), "{fixture}: one in-place fold each");
        for norm in &unique {
            assert!(model.graph.inputs.iter().any(|i| &i.name == norm));
        }

        let at_init = run_model(&model, &inputs);
        assert_unchanged(&base_outputs, &at_init, &format!("{fixture} norms"));
        randomize_trainable(&mut model);
        let trained = run_model(&model, &inputs);
        assert_changed_and_finite(&base_outputs, &trained, &format!("{fixture} norms"));
    }
}

/// A bake fold: a weight computed in the graph from parameters only (`tanh(P) · Q`, as a
/// reparameterized prefix or prompt encoder computes its table) becomes a stored tensor at merge
/// time — the nodes computing it and the parameters they read are gone, and the merged model
/// computes what the patched model computes.
#[test]
fn a_bake_fold_stores_a_parameter_only_subgraph_as_a_tensor() {
    let base = onnx::load(&fixture_model("bert-legacy")).unwrap();
    let inputs = fixture_inputs("bert-legacy");
    let (mut model, (baked, p, q)) = patched(&base, |view, b| {
        let s = view
            .sites()
            .find(|s| s.site.kind == SiteKind::V)
            .unwrap()
            .site;
        let dtype = b.value_dtype(&s.output).unwrap();
        let seed_p = b.next_seed();
        let p = b.parameter(
            "helper.bake.P",
            dtype,
            vec![s.in_features, 3],
            Init::linear_default(3, seed_p),
            true,
        );
        let seed_q = b.next_seed();
        let q = b.parameter(
            "helper.bake.Q",
            dtype,
            vec![3, s.out_features],
            Init::linear_default(3, seed_q),
            true,
        );
        let (weight, nodes) = b
            .block(|b| {
                let t = b.op("helper.bake.tanh", "Tanh", &[&p], &[]);
                Ok(b.op("helper.bake.weight", "MatMul", &[&t, &q], &[]))
            })
            .unwrap();
        let x = b.current(&s.input);
        let side = b.op("helper.bake.matmul", "MatMul", &[&x, &weight], &[]);
        let y = b.current(&s.output);
        let sum = b.op("helper.bake.add", "Add", &[&y, &side], &[]);
        b.rewire(&y, &sum);
        b.fold(Fold::Bake {
            value: weight.clone(),
            nodes,
            storage: None,
        });
        (weight, p, q)
    });
    randomize_trainable(&mut model);
    let patched_outputs = run_model(&model, &inputs);
    assert_changed_and_finite(&run_model(&base, &inputs), &patched_outputs, "bake branch");
    let mut merged = model.clone();
    graft::merge::merge(&mut merged).unwrap();
    assert!(
        merged.graph.initializer(&baked).is_some(),
        "{baked} is not a tensor"
    );
    let remaining: Vec<&str> = (merged.graph.nodes.iter())
        .map(|n| n.name.as_str())
        .filter(|n| n.starts_with("helper.bake.tanh") || n.starts_with("helper.bake.weight"))
        .collect();
    assert!(
        remaining.is_empty(),
        "the baked nodes remain: {remaining:?}"
    );
    for parameter in [&p, &q] {
        assert!(
            merged.graph.initializer(parameter).is_none(),
            "{parameter} remains"
        );
    }
    let diff = max_diff(&patched_outputs, &run_model(&merged, &inputs));
    assert!(diff <= 1e-6, "merged vs patched {diff}");
}
