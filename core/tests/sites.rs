//! Shape inference and structural site detection on the committed fixtures: inferred types
//! match what the exporters declared, and the detected stacks, layers, sites and labels match
//! each fixture's `expected.json` (written from the HF config by the fixture generator), also
//! after every name and all metadata are stripped.

mod common;

use std::collections::HashMap;

use common::{
    apply_method, fixture_dir, fixture_inputs, fixture_model, max_diff, randomize_trainable,
    run_model, FIXTURES,
};
use graft::analysis::{
    detect, infer_shapes, AttentionKind, EmbeddingKind, InputRole, NormPlacement, Site, SiteKind,
    SplitPart, Stack, StackKind, Structure,
};
use graft::ir::{Dim, Model};
use serde_json::Value;

/// Symbols the fixtures' graph inputs declare for batch and sequence axes.
const INPUT_SYMBOLS: &[&str] = &["batch", "sequence", "decoder_sequence", "image_batch"];

fn load(name: &str) -> Model {
    graft::onnx::load(&fixture_model(name)).expect("fixture loads")
}

fn expected(name: &str) -> Value {
    let text =
        std::fs::read_to_string(fixture_dir(name).join("expected.json")).expect("expected.json");
    serde_json::from_str(&text).expect("expected.json parses")
}

/// Whether an inferred dimension is consistent with a declared one: fixed sizes equal, declared
/// symbols inferred as symbols (with `same_input_symbols`, the input symbols by the same name),
/// unknowns unconstrained.
fn dim_matches(inferred: &Dim, declared: &Dim, same_input_symbols: bool) -> bool {
    match declared {
        Dim::Fixed(_) => inferred == declared,
        Dim::Symbol(symbol) if same_input_symbols && INPUT_SYMBOLS.contains(&symbol.as_str()) => {
            inferred == declared
        }
        Dim::Symbol(symbol) if symbol.starts_with("unk__") => true,
        Dim::Symbol(_) => matches!(inferred, Dim::Symbol(_)),
        Dim::Unknown => true,
    }
}

#[test]
fn inferred_outputs_match_declared_types_with_symbols_kept() {
    for name in FIXTURES {
        let mut model = load(name);
        model.graph.value_infos.clear();
        let shapes = infer_shapes(&model).unwrap();
        for output in &model.graph.outputs {
            let declared = output.value_type().expect("outputs are typed tensors");
            let inferred = shapes
                .value_type(&output.name)
                .unwrap_or_else(|| panic!("{name}: no type for output {}", output.name));
            assert_eq!(
                inferred.dtype, declared.dtype,
                "{name}: dtype of {}",
                output.name
            );
            let (Some(inferred_shape), Some(declared_shape)) = (&inferred.shape, &declared.shape)
            else {
                panic!("{name}: no shape for output {}", output.name);
            };
            assert_eq!(
                inferred_shape.len(),
                declared_shape.len(),
                "{name}: rank of {}",
                output.name
            );
            for (got, want) in inferred_shape.iter().zip(declared_shape) {
                assert!(
                    dim_matches(got, want, true),
                    "{name}: output {} inferred {inferred_shape:?}, declared {declared_shape:?}",
                    output.name
                );
            }
        }
    }
}

/// Dynamo knows bounds the graph does not show (a sequence no longer than the position table),
/// so where it simplifies `min(16, sequence)` to `sequence` only the kind of dimension is compared.
#[test]
fn inferred_intermediates_match_dynamo_value_infos() {
    for name in FIXTURES.iter().filter(|n| n.ends_with("-dynamo")) {
        let mut model = load(name);
        let declared = std::mem::take(&mut model.graph.value_infos);
        assert!(
            !declared.is_empty(),
            "{name}: dynamo exports declare intermediate types"
        );
        let shapes = infer_shapes(&model).unwrap();
        for info in &declared {
            let Some(want) = info.value_type() else {
                continue;
            };
            let got = shapes
                .value_type(&info.name)
                .unwrap_or_else(|| panic!("{name}: no type for {}", info.name));
            assert_eq!(got.dtype, want.dtype, "{name}: dtype of {}", info.name);
            if let (Some(got_shape), Some(want_shape)) = (&got.shape, &want.shape) {
                assert_eq!(
                    got_shape.len(),
                    want_shape.len(),
                    "{name}: rank of {}",
                    info.name
                );
                for (g, w) in got_shape.iter().zip(want_shape) {
                    assert!(
                        dim_matches(g, w, false),
                        "{name}: {} inferred {got_shape:?}, declared {want_shape:?}",
                        info.name
                    );
                }
            } else {
                assert!(
                    want.shape.is_none(),
                    "{name}: no shape inferred for {}",
                    info.name
                );
            }
        }
    }
}

#[test]
fn reshape_targets_are_folded_from_shape_arithmetic() {
    let model = load("bert-legacy");
    let shapes = infer_shapes(&model).unwrap();
    let heads = shapes
        .shape("/bert/encoder/layer.0/attention/self/Reshape_output_0")
        .expect("the query reshape has a shape");
    let symbol = |s: &str| Dim::Symbol(s.to_owned());
    assert_eq!(
        heads,
        [
            symbol("batch"),
            symbol("sequence"),
            Dim::Fixed(4),
            Dim::Fixed(8)
        ]
    );
}

/// The intermediate (FFN) width of a stack from the HF config.
fn intermediate_size(config: &Value, stack: &str) -> u64 {
    let sub_config = match stack {
        "text" => &config["text_config"],
        "vision" => &config["vision_config"],
        _ => config,
    };
    ["intermediate_size", "d_ff", "n_inner"]
        .iter()
        .find_map(|key| sub_config[key].as_u64())
        .expect("the config gives an intermediate size")
}

/// The per-head width from the HF config (`d_kv`, `head_dim`) or hidden / heads.
fn head_dim(config: &Value, stack: &Value) -> u64 {
    config["d_kv"]
        .as_u64()
        .or_else(|| config["head_dim"].as_u64())
        .unwrap_or_else(|| {
            stack["hidden_size"].as_u64().unwrap() / stack["n_heads"].as_u64().unwrap()
        })
}

fn sites_of(
    stack: &Stack,
    layer: usize,
    kind: SiteKind,
    attention: Option<AttentionKind>,
) -> Vec<&Site> {
    stack.layers[layer]
        .sites
        .iter()
        .filter(|s| s.kind == kind && s.attention == attention)
        .collect()
}

fn check_stack(name: &str, config: &Value, want: &Value, stack: &Stack) {
    let stack_name = want["name"].as_str().unwrap();
    let context = format!("{name}: stack {stack_name}");
    assert_eq!(
        stack.n_layers as u64,
        want["n_layers"].as_u64().unwrap(),
        "{context}: n_layers"
    );
    assert_eq!(stack.layers.len(), stack.n_layers, "{context}: layers");
    assert_eq!(
        stack.hidden_size as u64,
        want["hidden_size"].as_u64().unwrap(),
        "{context}: hidden"
    );
    assert_eq!(
        stack.n_heads as u64,
        want["n_heads"].as_u64().unwrap(),
        "{context}: n_heads"
    );
    assert_eq!(
        stack.n_kv_heads as u64,
        want["n_kv_heads"].as_u64().unwrap(),
        "{context}: n_kv_heads"
    );
    let hidden = stack.hidden_size;
    let head_width = head_dim(config, want) as usize;
    assert_eq!(stack.head_dim, Some(head_width), "{context}: head_dim");
    let query_width = stack.n_heads * head_width;
    let key_width = stack.n_kv_heads * head_width;
    let intermediate = intermediate_size(config, stack_name) as usize;
    let fused = want["fused_qkv"].as_bool().unwrap();
    let gated = want["ffn"].as_str() == Some("gate_up_down");
    let fused_ffn = want["ffn"].as_str() == Some("fused_gate_up_down");
    let cross = want["cross_attention"].as_bool().unwrap();
    let self_attention = Some(AttentionKind::SelfAttention);
    for (index, layer) in stack.layers.iter().enumerate() {
        let context = format!("{context} layer {index}");
        assert_eq!(layer.index, index, "{context}: index");
        let one = |kind, attention| {
            let found = sites_of(stack, index, kind, attention);
            assert_eq!(
                found.len(),
                1,
                "{context}: {kind:?} {attention:?} sites: {found:?}"
            );
            found[0]
        };
        let mut attentions = vec![self_attention];
        if cross {
            attentions.push(Some(AttentionKind::Cross));
        }
        for attention in attentions {
            if fused {
                let qkv = one(SiteKind::Qkv, attention);
                assert_eq!(
                    (qkv.in_features, qkv.out_features),
                    (hidden, query_width + 2 * key_width)
                );
                assert!(
                    qkv.key_states.is_some() || qkv.value_states.is_some(),
                    "{context}: states"
                );
                let parts: Vec<(SiteKind, usize)> =
                    qkv.split.iter().map(|p| (p.kind, p.width)).collect();
                assert_eq!(
                    parts,
                    [
                        (SiteKind::Q, query_width),
                        (SiteKind::K, key_width),
                        (SiteKind::V, key_width)
                    ],
                    "{context}: qkv split"
                );
            } else {
                let q = one(SiteKind::Q, attention);
                let k = one(SiteKind::K, attention);
                let v = one(SiteKind::V, attention);
                assert_eq!(
                    (q.in_features, q.out_features),
                    (hidden, query_width),
                    "{context}: q"
                );
                assert_eq!(
                    (k.in_features, k.out_features),
                    (hidden, key_width),
                    "{context}: k"
                );
                assert_eq!(
                    (v.in_features, v.out_features),
                    (hidden, key_width),
                    "{context}: v"
                );
                assert!(v.value_states.is_some(), "{context}: value states");
                let cross_input = k.input != q.input;
                assert_eq!(
                    cross_input,
                    attention == Some(AttentionKind::Cross),
                    "{context}: inputs"
                );
            }
            let o = one(SiteKind::O, attention);
            assert_eq!(
                (o.in_features, o.out_features),
                (query_width, hidden),
                "{context}: o"
            );
        }
        if fused_ffn {
            let gate_up = one(SiteKind::FfnGateUp, None);
            assert_eq!(
                (gate_up.in_features, gate_up.out_features),
                (hidden, 2 * intermediate),
                "{context}: gate_up"
            );
            let mut halves: Vec<(SiteKind, usize)> =
                gate_up.split.iter().map(|p| (p.kind, p.width)).collect();
            halves.sort_by_key(|&(kind, _)| kind.name());
            assert_eq!(
                halves,
                [
                    (SiteKind::FfnGate, intermediate),
                    (SiteKind::FfnUp, intermediate)
                ],
                "{context}: gate_up split"
            );
        } else {
            let up = one(SiteKind::FfnUp, None);
            assert_eq!(
                (up.in_features, up.out_features),
                (hidden, intermediate),
                "{context}: up"
            );
        }
        let down = one(SiteKind::FfnDown, None);
        assert_eq!(
            (down.in_features, down.out_features),
            (intermediate, hidden),
            "{context}: down"
        );
        let gates = sites_of(stack, index, SiteKind::FfnGate, None);
        assert_eq!(gates.len(), usize::from(gated), "{context}: gate");
        for gate in gates {
            assert_eq!(
                (gate.in_features, gate.out_features),
                (hidden, intermediate)
            );
        }
        let norms = sites_of(stack, index, SiteKind::Norm, None);
        assert!(!norms.is_empty(), "{context}: no norm");
        for norm in norms {
            assert_eq!(
                (norm.in_features, norm.out_features),
                (hidden, hidden),
                "{context}: norm"
            );
        }
        let other_kinds = layer.sites.iter().filter(|s| {
            let ffn_kind_absent = if fused_ffn {
                matches!(s.kind, SiteKind::FfnUp | SiteKind::FfnGate)
            } else {
                s.kind == SiteKind::FfnGateUp
            };
            ffn_kind_absent
                || (fused && matches!(s.kind, SiteKind::Q | SiteKind::K | SiteKind::V))
                || (!matches!(s.kind, SiteKind::Qkv | SiteKind::FfnGateUp) && !s.split.is_empty())
        });
        assert_eq!(other_kinds.count(), 0, "{context}: unexpected sites");
    }
}

/// The expected.json label key for a site kind.
fn label_kind(key: &str) -> SiteKind {
    match key {
        "q" => SiteKind::Q,
        "k" => SiteKind::K,
        "v" => SiteKind::V,
        "o" => SiteKind::O,
        "qkv" => SiteKind::Qkv,
        "up" => SiteKind::FfnUp,
        "gate" => SiteKind::FfnGate,
        "down" => SiteKind::FfnDown,
        "gate_up" => SiteKind::FfnGateUp,
        other => panic!("unknown label key {other}"),
    }
}

fn check_structure(name: &str, structure: &Structure) {
    let expected = expected(name);
    let config = &expected["hf_config"];
    let want_stacks = expected["stacks"].as_array().unwrap();
    let mut got_names: Vec<&str> = structure.stacks.iter().map(|s| s.name.as_str()).collect();
    let mut want_names: Vec<&str> = want_stacks
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    got_names.sort_unstable();
    want_names.sort_unstable();
    assert_eq!(got_names, want_names, "{name}: stacks");
    for want in want_stacks {
        let stack = structure
            .stacks
            .iter()
            .find(|s| s.name == want["name"].as_str().unwrap())
            .unwrap();
        check_stack(name, config, want, stack);
    }
    assert_eq!(
        structure.opset,
        expected["opset"].as_i64().unwrap(),
        "{name}: opset"
    );
    let kinds: Vec<EmbeddingKind> = structure.embeddings.iter().map(|e| e.kind).collect();
    let has_tokens = want_names.iter().any(|n| *n != "vision") && !name.starts_with("vit");
    let has_patches = want_names.contains(&"vision") || name.starts_with("vit");
    assert_eq!(
        kinds.contains(&EmbeddingKind::Token),
        has_tokens,
        "{name}: token embedding"
    );
    assert_eq!(
        kinds.contains(&EmbeddingKind::Patch),
        has_patches,
        "{name}: patch embedding"
    );
    if let Some(token) = structure
        .embeddings
        .iter()
        .find(|e| e.kind == EmbeddingKind::Token)
    {
        let vocabulary = config["vocab_size"]
            .as_u64()
            .or_else(|| config["text_config"]["vocab_size"].as_u64())
            .unwrap();
        assert_eq!(token.n_embeddings as u64, vocabulary, "{name}: vocabulary");
    }
    assert!(!structure.heads.is_empty(), "{name}: no head");
}

fn check_labels(name: &str, structure: &Structure) {
    let expected = expected(name);
    let Some(labels) = expected["labels"].as_object() else {
        return;
    };
    for (key, label) in labels {
        let kind = label_kind(key);
        let label = label.as_str().unwrap();
        let found = structure.stacks.iter().any(|stack| {
            stack.layers[0]
                .sites
                .iter()
                .any(|s| s.kind == kind && s.label.as_deref() == Some(label))
        });
        assert!(found, "{name}: no layer-0 {key} site labelled {label}");
    }
}

#[test]
fn detect_finds_the_expected_structure() {
    for name in FIXTURES {
        let structure = detect(&load(name)).unwrap();
        check_structure(name, &structure);
    }
}

#[test]
fn layer_zero_labels_are_hf_module_paths() {
    for name in FIXTURES {
        let structure = detect(&load(name)).unwrap();
        check_labels(name, &structure);
    }
}

#[test]
fn key_and_value_states_follow_the_cache() {
    for name in [
        "gpt2-past-legacy",
        "gpt2-past-dynamo",
        "llama-past-legacy",
        "llama-past-dynamo",
    ] {
        let structure = detect(&load(name)).unwrap();
        for (index, layer) in structure.stacks[0].layers.iter().enumerate() {
            let key = layer.sites.iter().find_map(|s| s.key_states.clone());
            let value = layer.sites.iter().find_map(|s| s.value_states.clone());
            assert_eq!(
                key.as_deref(),
                Some(format!("present.{index}.key").as_str()),
                "{name}"
            );
            assert_eq!(
                value.as_deref(),
                Some(format!("present.{index}.value").as_str()),
                "{name}"
            );
        }
    }
}

#[test]
fn structure_serializes_to_the_documented_schema() {
    let structure = detect(&load("llama-dynamo")).unwrap();
    let json = serde_json::to_value(&structure).unwrap();
    let site = &json["stacks"][0]["layers"][0]["sites"][1];
    assert_eq!(site["kind"], "q");
    assert_eq!(site["attention"], "self");
    assert_eq!(site["layout"], "in_out");
    assert_eq!(site["label"], "model.layers.0.self_attn.q_proj");
    assert!(site.get("split").is_none(), "no split written for a q site");
    assert_eq!(
        json["stacks"][0]["layers"][0]["sites"][6]["kind"],
        "ffn_gate"
    );
    assert_eq!(json["embeddings"][0]["kind"], "token");
    let back: Structure = serde_json::from_value(json).unwrap();
    assert_eq!(back, structure);
}

/// A copy of `model` with every value, initializer and node renamed to a meaningless name, and
/// node metadata, value annotations and model metadata dropped; plus the value renaming.
fn anonymized(model: &Model) -> (Model, HashMap<String, String>) {
    let mut model = model.clone();
    let mut renames: HashMap<String, String> = HashMap::new();
    let mut rename = |name: &mut String, prefix: &str| {
        if name.is_empty() {
            return;
        }
        let count = renames.len();
        let new = renames
            .entry(name.clone())
            .or_insert_with(|| format!("{prefix}{count}"))
            .clone();
        *name = new;
    };
    let graph = &mut model.graph;
    for tensor in &mut graph.initializers {
        rename(&mut tensor.name, "w");
    }
    for value in graph.inputs.iter_mut().chain(graph.outputs.iter_mut()) {
        rename(&mut value.name, "v");
        value.proto.name.clone_from(&value.name);
    }
    for (i, node) in graph.nodes.iter_mut().enumerate() {
        node.name = format!("n{i}");
        node.metadata.clear();
        node.doc_string.clear();
        for value in node.inputs.iter_mut().chain(node.outputs.iter_mut()) {
            rename(value, "v");
        }
    }
    graph.value_infos.clear();
    model.metadata.clear();
    (model, renames)
}

#[test]
fn detection_is_structural() {
    for name in FIXTURES {
        let original = load(name);
        let reference = detect(&original).unwrap();
        let (model, renames) = anonymized(&original);
        let structure = detect(&model).unwrap();
        check_structure(name, &structure);
        let node_names: HashMap<&str, String> = original
            .graph
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.name.as_str(), format!("n{i}")))
            .collect();
        let value = |v: &str| renames.get(v).cloned().unwrap_or_else(|| v.to_owned());
        let value_option = |v: &Option<String>| v.as_deref().map(value);
        assert_eq!(structure.stacks.len(), reference.stacks.len(), "{name}");
        for (stack, reference_stack) in structure.stacks.iter().zip(&reference.stacks) {
            assert_eq!(stack.name, reference_stack.name, "{name}");
            for (layer, reference_layer) in stack.layers.iter().zip(&reference_stack.layers) {
                assert_eq!(layer.sites.len(), reference_layer.sites.len(), "{name}");
                for (site, want) in layer.sites.iter().zip(&reference_layer.sites) {
                    assert_eq!(site.label, None, "{name}: labels need names");
                    assert_eq!(
                        (site.kind, site.attention),
                        (want.kind, want.attention),
                        "{name}"
                    );
                    assert_eq!(site.node, node_names[want.node.as_str()], "{name}: node");
                    assert_eq!(site.weight, value(&want.weight), "{name}: weight");
                    assert_eq!(site.bias, value_option(&want.bias), "{name}: bias");
                    assert_eq!(site.input, value(&want.input), "{name}: input");
                    assert_eq!(site.output, value(&want.output), "{name}: output");
                    assert_eq!(site.key_states, value_option(&want.key_states), "{name}");
                    assert_eq!(
                        site.value_states,
                        value_option(&want.value_states),
                        "{name}"
                    );
                    assert_eq!(
                        (site.in_features, site.out_features, site.layout),
                        (want.in_features, want.out_features, want.layout),
                        "{name}"
                    );
                    assert_eq!(site.split, want.split, "{name}: split");
                }
            }
        }
        for (stack, want) in structure.stacks.iter().zip(&reference.stacks) {
            let renamed = |v: &Option<String>| v.as_deref().map(value);
            assert_eq!(
                (stack.kind, stack.cross_attention),
                (want.kind, want.cross_attention),
                "{name}"
            );
            assert_eq!(stack.input, renamed(&want.input), "{name}: stack input");
            assert_eq!(stack.output, renamed(&want.output), "{name}: stack output");
            for (layer, want) in stack.layers.iter().zip(&want.layers) {
                assert_eq!(layer.input, renamed(&want.input), "{name}: layer input");
                assert_eq!(layer.output, renamed(&want.output), "{name}: layer output");
                assert_eq!(layer.attention_sum, renamed(&want.attention_sum), "{name}");
                assert_eq!(layer.ffn_sum, renamed(&want.ffn_sum), "{name}");
                assert_eq!(layer.norm_placement, want.norm_placement, "{name}");
                assert_eq!(layer.attention.len(), want.attention.len(), "{name}");
                for (attention, want) in layer.attention.iter().zip(&want.attention) {
                    assert_eq!(
                        (attention.kind, attention.causal),
                        (want.kind, want.causal),
                        "{name}"
                    );
                    assert_eq!(attention.mask, renamed(&want.mask), "{name}: mask");
                    assert_eq!(attention.scores, value(&want.scores), "{name}: scores");
                    assert_eq!(
                        attention.probabilities,
                        value(&want.probabilities),
                        "{name}"
                    );
                    assert_eq!(attention.key_states, renamed(&want.key_states), "{name}");
                    assert_eq!(
                        attention.value_states,
                        renamed(&want.value_states),
                        "{name}"
                    );
                    assert_eq!(attention.sum, renamed(&want.sum), "{name}");
                }
            }
        }
        let summary = |s: &Structure| -> Vec<(EmbeddingKind, usize, usize)> {
            s.embeddings
                .iter()
                .map(|e| (e.kind, e.n_embeddings, e.dim))
                .collect()
        };
        assert_eq!(
            summary(&structure),
            summary(&reference),
            "{name}: embeddings"
        );
        let heads = |s: &Structure| -> Vec<(usize, usize)> {
            s.heads
                .iter()
                .map(|h| (h.in_features, h.out_features))
                .collect()
        };
        assert_eq!(heads(&structure), heads(&reference), "{name}: heads");
        assert!(
            structure.heads.iter().all(|h| h.label.is_none()),
            "{name}: head labels"
        );
    }
}

/// The role of each fixture input, from the names the generator gave them (`manifest.json`):
/// the test's reference, which detection must reach without reading names.
fn expected_role(input: &str) -> Option<(InputRole, Option<usize>)> {
    let past = |suffix: &str| {
        input
            .strip_prefix("past_key_values.")
            .and_then(|rest| rest.strip_suffix(suffix))
            .and_then(|layer| layer.parse().ok())
    };
    Some(match input {
        "input_ids" => (InputRole::TokenIds, None),
        "attention_mask" => (InputRole::AttentionMask, None),
        "token_type_ids" => (InputRole::TokenTypeIds, None),
        "decoder_input_ids" => (InputRole::DecoderInputIds, None),
        "pixel_values" => (InputRole::PixelValues, None),
        _ => match (past(".key"), past(".value")) {
            (Some(layer), _) => (InputRole::PastKey, Some(layer)),
            (_, Some(layer)) => (InputRole::PastValue, Some(layer)),
            _ => return None,
        },
    })
}

/// Stack kinds, norm placement and masks by architecture: GPT-2, Llama, CLIP's text tower and
/// T5's decoder mask their self-attention causally; BERT, ViT, CLIP's vision tower and T5's
/// encoder do not; BERT normalizes after each residual add, the others before each block; every
/// model with an `attention_mask` input adds the mask to the scores of each attention that
/// sees padding, and CLIP's vision tower has no mask.
#[test]
fn residual_stream_and_attention_follow_the_architecture() {
    for name in FIXTURES {
        let model = load(name);
        let structure = detect(&model).unwrap();
        let expected = expected(name);
        let softmax: HashMap<&str, &str> = model
            .graph
            .nodes
            .iter()
            .filter(|n| n.is("Softmax"))
            .map(|n| (n.inputs[0].as_str(), n.outputs[0].as_str()))
            .collect();
        for stack in &structure.stacks {
            let context = format!("{name}: stack {}", stack.name);
            let want = expected["stacks"]
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["name"] == stack.name.as_str())
                .unwrap();
            let causal = stack.name == "decoder" || stack.name == "text";
            let kind = if causal {
                StackKind::Decoder
            } else {
                StackKind::Encoder
            };
            assert_eq!(stack.kind, Some(kind), "{context}: kind");
            assert_eq!(
                stack.cross_attention,
                want["cross_attention"].as_bool().unwrap(),
                "{context}: cross"
            );
            let placement = if name.starts_with("bert") || name.starts_with("roberta") {
                NormPlacement::Post
            } else {
                NormPlacement::Pre
            };
            assert_eq!(stack.input, stack.layers[0].input, "{context}: input");
            for (layer, next) in stack.layers.iter().zip(&stack.layers[1..]) {
                assert_eq!(layer.output, next.input, "{context}: layer {}", layer.index);
            }
            let last = stack.layers.last().unwrap();
            // A pre-norm stack ends in its final norm, except CLIP's vision tower, whose
            // post_layernorm reads only the pooled first token.
            let final_norm = placement == NormPlacement::Pre && stack.name != "vision";
            assert_eq!(
                stack.output != last.output,
                final_norm,
                "{context}: output {:?}",
                stack.output
            );
            for layer in &stack.layers {
                let context = format!("{context} layer {}", layer.index);
                assert_eq!(layer.norm_placement, Some(placement), "{context}: norms");
                assert!(layer.ffn_sum.is_some(), "{context}: ffn sum");
                assert_eq!(
                    layer.output == layer.ffn_sum,
                    placement == NormPlacement::Pre,
                    "{context}: output"
                );
                let mut kinds = vec![AttentionKind::SelfAttention];
                if stack.cross_attention {
                    kinds.push(AttentionKind::Cross);
                }
                let got: Vec<AttentionKind> = layer.attention.iter().map(|a| a.kind).collect();
                assert_eq!(got, kinds, "{context}: attention blocks");
                assert_eq!(layer.attention[0].sum, layer.attention_sum, "{context}");
                for attention in &layer.attention {
                    let context = format!("{context} {:?}", attention.kind);
                    let self_attention = attention.kind == AttentionKind::SelfAttention;
                    assert_eq!(attention.causal, causal && self_attention, "{context}");
                    assert_eq!(
                        softmax.get(attention.scores.as_str()).copied(),
                        Some(attention.probabilities.as_str()),
                        "{context}: scores and probabilities"
                    );
                    let sites = layer
                        .sites
                        .iter()
                        .filter(|s| s.attention == Some(attention.kind));
                    let keys: Vec<_> = sites.clone().filter_map(|s| s.key_states.clone()).collect();
                    let values: Vec<_> = sites.filter_map(|s| s.value_states.clone()).collect();
                    assert_eq!(attention.key_states, keys.first().cloned(), "{context}");
                    assert_eq!(attention.value_states, values.first().cloned(), "{context}");
                    if stack.name != "vision" && !name.starts_with("vit") {
                        assert!(attention.mask.is_some(), "{context}: mask");
                    }
                    if stack.name == "vision" {
                        assert_eq!(attention.mask, None, "{context}: mask");
                    }
                }
            }
        }
    }
}

/// Every input's role is found from the graph, and equals the role its generator-given name
/// says; the past keys of layer 0 in the legacy exports are the known gap (see
/// `past_inputs_known_gap`).
#[test]
fn graph_inputs_have_their_roles() {
    for name in FIXTURES {
        let model = load(name);
        let structure = detect(&model).unwrap();
        let (anonymous_model, renames) = anonymized(&model);
        let anonymous = detect(&anonymous_model).unwrap();
        let renamed: Vec<_> = structure
            .inputs
            .iter()
            .map(|i| {
                let mut i = i.clone();
                i.name = renames[&i.name].clone();
                i.present = i.present.map(|p| renames[&p].clone());
                i
            })
            .collect();
        assert_eq!(anonymous.inputs, renamed, "{name}: roles need no names");
        for input in &model.graph.inputs {
            let want = expected_role(&input.name);
            let got = structure
                .inputs
                .iter()
                .find(|i| i.name == input.name)
                .map(|i| (i.role, i.layer));
            assert_eq!(got, want, "{name}: input {}", input.name);
            if matches!(want, Some((InputRole::PastKey | InputRole::PastValue, _))) {
                let present = structure
                    .inputs
                    .iter()
                    .find(|i| i.name == input.name)
                    .and_then(|i| i.present.clone());
                let expected = input.name.replace("past_key_values", "present");
                assert_eq!(
                    present,
                    Some(expected),
                    "{name}: the present output of {}",
                    input.name
                );
            }
        }
    }
}

/// Phi-3 fuses q, k, v into one `qkv_proj` (sliced apart) and gate and up into one
/// `gate_up_proj` whose halves the legacy export takes with two `Slice`s and the dynamo export
/// with one `Split`: both are one stack of two layers with the sites qkv (32 + 16 + 16 columns),
/// o, ffn_gate_up (gate half first, 64 + 64 columns) and ffn_down. IA3 with the FFN down input scaled and LoRA on both
/// FFN projections apply there, change nothing at init (bit for bit: ones and a zero `B`), and
/// change the outputs once their tensors move.
#[test]
fn phi3_fused_projections_are_one_stack_that_ia3_and_lora_adapt() {
    let methods: [(&str, &[&str], usize); 2] = [
        (
            "ia3",
            &["targets=qkv,ffn_gate_up,ffn_down", "feedforward=ffn_down"],
            3,
        ),
        (
            "lora",
            &["targets=ffn_gate_up,ffn_down", "r=4", "alpha=8"],
            4,
        ),
    ];
    for name in ["phi3-legacy", "phi3-dynamo"] {
        let base = load(name);
        let structure = detect(&base).unwrap();
        assert_eq!(structure.stacks.len(), 1, "{name}: stacks");
        let stack = &structure.stacks[0];
        assert_eq!(
            (stack.n_layers, stack.layers.len()),
            (2, 2),
            "{name}: layers"
        );
        for layer in &stack.layers {
            let kinds: Vec<SiteKind> = layer
                .sites
                .iter()
                .map(|s| s.kind)
                .filter(|k| k.is_linear())
                .collect();
            assert_eq!(
                kinds,
                [
                    SiteKind::Qkv,
                    SiteKind::O,
                    SiteKind::FfnGateUp,
                    SiteKind::FfnDown
                ],
                "{name}: layer {}",
                layer.index
            );
            let part = |kind, width| SplitPart { kind, width };
            let qkv = layer
                .sites
                .iter()
                .find(|s| s.kind == SiteKind::Qkv)
                .unwrap();
            assert_eq!(
                qkv.split,
                [
                    part(SiteKind::Q, 32),
                    part(SiteKind::K, 16),
                    part(SiteKind::V, 16)
                ],
                "{name}: layer {}",
                layer.index
            );
            let gate_up = layer
                .sites
                .iter()
                .find(|s| s.kind == SiteKind::FfnGateUp)
                .unwrap();
            assert_eq!(
                gate_up.split,
                [part(SiteKind::FfnGate, 64), part(SiteKind::FfnUp, 64)],
                "{name}: layer {}",
                layer.index
            );
            assert_eq!(
                gate_up.label.as_deref(),
                Some(format!("model.layers.{}.mlp.gate_up_proj", layer.index).as_str()),
                "{name}"
            );
        }

        let inputs = fixture_inputs(name);
        let base_outputs = run_model(&base, &inputs);
        for (method, settings, tensors_per_layer) in methods {
            let dir = tempfile::tempdir().unwrap();
            let out = dir.path().join("patched.onnx");
            apply_method(name, method, settings, &out);
            let mut patched = graft::onnx::load(&out).unwrap();
            let record = graft::patch::read_record(&patched).unwrap();
            assert_eq!(
                record.trainable().count(),
                2 * tensors_per_layer,
                "{name} {method}: trainable tensors"
            );
            let at_init = run_model(&patched, &inputs);
            assert_eq!(
                max_diff(&base_outputs, &at_init),
                0.0,
                "{name} {method}: not a no-op at init"
            );
            randomize_trainable(&mut patched);
            let change = max_diff(&base_outputs, &run_model(&patched, &inputs));
            assert!(
                change > 1e-4 && change.is_finite(),
                "{name} {method}: outputs changed by {change}"
            );
        }
    }
}
