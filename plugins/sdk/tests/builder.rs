//! Patch-building helpers: names, rewires, folds, payloads, and wire round trips.

mod common;

use common::{site_of, view, FFN, HIDDEN};
use graft_plugin_sdk::quant::{pack_nibbles, NF4_CODEBOOK};
use graft_plugin_sdk::{
    decode_frame, encode_frame, Activation, AttributeValue, DType, Error, Fold, Init, Patch,
    PatchBuilder, PatchReply, Placement, Rewire, SequenceFill, SiteKind, SiteSelector,
    WeightLayout,
};
use std::collections::BTreeSet;

fn assert_valid(b: &PatchBuilder<'_>) {
    if let Err(problems) = b.patch().check(b.graph()) {
        panic!("patch is inconsistent: {problems:#?}");
    }
}

fn all_created_names(p: &Patch) -> Vec<String> {
    let mut names: Vec<String> = p.parameters.iter().map(|x| x.name.clone()).collect();
    for n in &p.nodes {
        names.push(n.name.clone());
        names.extend(n.outputs.iter().cloned());
    }
    names
}

#[test]
fn low_rank_branch_emits_lora_and_its_fold() {
    let g = view(DType::Float);
    let q = site_of(&g, 0, SiteKind::Q);
    let mut b = PatchBuilder::new(&g, "lora").with_seed(3);
    let seed = b.next_seed();
    let names = b
        .low_rank_branch(
            &q,
            4,
            2.0,
            Init::linear_default(HIDDEN, seed),
            Init::Zeros,
            Some(0.1),
        )
        .unwrap();
    assert_valid(&b);
    assert_eq!(names.a, "lora.encoder.layers.0.q.A");
    assert_eq!(names.b, "lora.encoder.layers.0.q.B");
    let p = b.patch();
    let a = &p.parameters[0];
    assert_eq!(
        (a.dtype, a.shape.clone(), a.trainable),
        (DType::Float, vec![HIDDEN, 4], true)
    );
    assert_eq!(p.parameters[1].shape, vec![4, HIDDEN]);
    assert_eq!(p.parameters[1].init, Init::Zeros);
    let ops: Vec<&str> = p.nodes.iter().map(|n| n.op_type.as_str()).collect();
    assert_eq!(
        ops,
        ["Constant", "Dropout", "MatMul", "MatMul", "Constant", "Mul", "Add"]
    );
    let dropout = &p.nodes[1];
    assert_eq!(
        dropout.inputs,
        [q.input.clone(), p.nodes[0].outputs[0].clone()]
    );
    assert_eq!(
        p.nodes[0].attributes["value_float"],
        AttributeValue::Float(0.1)
    );
    assert_eq!(p.nodes[6].inputs[0], q.output);
    assert_eq!(
        p.rewires,
        [Rewire {
            value: q.output.clone(),
            replacement: names.output.clone(),
            keep: vec![],
            only: vec![]
        }]
    );
    assert_eq!(
        p.folds,
        [Fold::LowRank {
            weight: q.weight.clone(),
            a: names.a.clone(),
            b: names.b.clone(),
            scale: 2.0,
            layout: WeightLayout::InOut,
            branch_nodes: names.nodes.clone(),
            branch_output: names.output.clone(),
            base_output: q.output.clone(),
        }]
    );
    assert_eq!(names.nodes.len(), 7);
}

#[test]
fn low_rank_in_half_precision_casts_the_scale_and_skips_zero_dropout() {
    let g = view(DType::Float16);
    let v = site_of(&g, 1, SiteKind::V);
    let mut b = PatchBuilder::new(&g, "lora");
    b.low_rank_branch(&v, 2, 0.5, Init::Zeros, Init::Zeros, Some(0.0))
        .unwrap();
    assert_valid(&b);
    let p = b.patch();
    assert!(p.parameters.iter().all(|x| x.dtype == DType::Float16));
    let ops: Vec<&str> = p.nodes.iter().map(|n| n.op_type.as_str()).collect();
    assert_eq!(ops, ["MatMul", "MatMul", "Constant", "Cast", "Mul", "Add"]);
    assert_eq!(p.nodes[3].attributes["to"], AttributeValue::Int(10));
}

#[test]
fn names_are_unique_across_many_insertions() {
    let g = view(DType::Float);
    let mut b = PatchBuilder::new(&g, "lora");
    let sites: Vec<_> = g
        .sites()
        .map(|s| s.site.clone())
        .filter(|s| s.kind.is_linear())
        .collect();
    for s in &sites {
        b.low_rank_branch(s, 2, 1.0, Init::Zeros, Init::Zeros, Some(0.1))
            .unwrap();
    }
    let again = b
        .low_rank_branch(&sites[0], 2, 1.0, Init::Zeros, Init::Zeros, None)
        .unwrap();
    assert_eq!(again.a, "lora.encoder.layers.0.q_2.A");
    for s in &sites {
        b.scale_output(s, Init::Ones).unwrap();
        b.scale_input(s, Init::Ones).unwrap();
    }
    b.residual_module(
        "l0.norm.out",
        HIDDEN,
        4,
        Activation::Gelu,
        Placement::Sequential,
        Init::Zeros,
    )
    .unwrap();
    b.residual_module(
        "l0.norm.out",
        HIDDEN,
        4,
        Activation::Silu,
        Placement::Sequential,
        Init::Zeros,
    )
    .unwrap();
    b.gate("l1.context", "l1.o.out", Some(HIDDEN), Init::Zeros)
        .unwrap();
    assert_valid(&b);
    let names = all_created_names(b.patch());
    let unique: BTreeSet<&String> = names.iter().collect();
    assert_eq!(unique.len(), names.len());
    let known = g.known_names();
    assert!(names.iter().all(|n| !known.contains(n.as_str())));
}

#[test]
fn stems_avoid_names_already_in_the_graph() {
    let mut g = view(DType::Float);
    g.tensors.push(graft_plugin_sdk::TensorInfo {
        name: "lora.encoder.layers.0.q.A".into(),
        dtype: DType::Float,
        shape: vec![1],
    });
    let q = site_of(&g, 0, SiteKind::Q);
    let mut b = PatchBuilder::new(&g, "lora");
    let names = b
        .low_rank_branch(&q, 1, 1.0, Init::Zeros, Init::Zeros, None)
        .unwrap();
    assert_eq!(names.a, "lora.encoder.layers.0.q_2.A");
    assert_eq!(
        b.claim("lora.encoder.layers.0.q.A"),
        "lora.encoder.layers.0.q.A_2"
    );
    assert_valid(&b);
}

#[test]
fn insertions_on_one_site_chain_and_fold_in_order() {
    let g = view(DType::Float);
    let k = site_of(&g, 0, SiteKind::K);
    let mut b = PatchBuilder::new(&g, "m");
    let lora = b
        .low_rank_branch(&k, 2, 1.0, Init::Zeros, Init::Zeros, None)
        .unwrap();
    let ia3 = b.scale_output(&k, Init::Ones).unwrap();
    assert_eq!(b.current(&k.output), ia3.output);
    let p = b.patch();
    let mul = p.nodes.iter().find(|n| n.name == ia3.nodes[0]).unwrap();
    assert_eq!(mul.inputs, [lora.output.clone(), ia3.vector.clone()]);
    assert_eq!(
        p.rewires[1],
        Rewire {
            value: lora.output.clone(),
            replacement: ia3.output.clone(),
            keep: vec![],
            only: vec![]
        }
    );
    match &p.folds[1] {
        Fold::ScaleOutput {
            bias,
            base_output,
            branch_output,
            vector,
            ..
        } => {
            assert_eq!(bias.as_deref(), Some("l0.k.bias"));
            assert_eq!(base_output, &lora.output);
            assert_eq!(branch_output, &ia3.output);
            assert_eq!(vector, &ia3.vector);
        }
        other => panic!("unexpected fold {other:?}"),
    }
    assert_valid(&b);
}

#[test]
fn scale_input_rewires_only_the_site_node_and_low_rank_reads_the_raw_input() {
    let g = view(DType::Float);
    let down = site_of(&g, 0, SiteKind::FfnDown);
    let mut b = PatchBuilder::new(&g, "ia3");
    let s = b.scale_input(&down, Init::Ones).unwrap();
    assert_eq!(b.patch().parameters[0].shape, vec![FFN]);
    assert_eq!(
        b.patch().rewires[0],
        Rewire {
            value: down.input.clone(),
            replacement: s.output.clone(),
            keep: vec![],
            only: vec![down.node.clone()]
        }
    );
    assert_eq!(b.current_for(&down.input, &down.node), s.output);
    assert_eq!(b.current(&down.input), down.input);
    let lora = b
        .low_rank_branch(&down, 2, 1.0, Init::Zeros, Init::Zeros, None)
        .unwrap();
    let matmul_a = b
        .patch()
        .nodes
        .iter()
        .find(|n| n.name == lora.nodes[0])
        .unwrap();
    assert_eq!(matmul_a.inputs[0], down.input);
    let again = b.scale_input(&down, Init::Ones).unwrap();
    let mul = b
        .patch()
        .nodes
        .iter()
        .find(|n| n.name == again.nodes[0])
        .unwrap();
    assert_eq!(mul.inputs[0], s.output);
    assert!(
        matches!(&b.patch().folds[0], Fold::ScaleInput { base_output, .. } if *base_output == down.input)
    );
    assert_valid(&b);
}

#[test]
fn residual_module_starts_as_a_no_op() {
    let g = view(DType::Float);
    let mut b = PatchBuilder::new(&g, "adapter");
    let r = b
        .residual_module(
            "l0.ffn_down.out",
            HIDDEN,
            3,
            Activation::Relu,
            Placement::Parallel {
                from: "l0.o.out".into(),
            },
            Init::Normal {
                mean: 0.0,
                std: 0.01,
                seed: 1,
            },
        )
        .unwrap();
    assert_valid(&b);
    let p = b.patch();
    let inits: Vec<(&str, &Init, &[usize])> = p
        .parameters
        .iter()
        .map(|x| (x.name.as_str(), &x.init, x.shape.as_slice()))
        .collect();
    assert_eq!(inits[0].2, [HIDDEN, 3]);
    assert!(matches!(inits[0].1, Init::Normal { .. }));
    for (_, init, _) in &inits[1..] {
        assert_eq!(**init, Init::Zeros);
    }
    let ops: Vec<&str> = p.nodes.iter().map(|n| n.op_type.as_str()).collect();
    assert_eq!(ops, ["MatMul", "Add", "Relu", "MatMul", "Add", "Add"]);
    assert_eq!(p.nodes[0].inputs[0], "l0.o.out");
    assert_eq!(p.nodes[5].inputs[0], "l0.ffn_down.out");
    assert_eq!(p.rewires[0].replacement, r.output);
    assert!(p.folds.is_empty());
    assert_eq!("swish".parse::<Activation>().unwrap(), Activation::Silu);
    assert!("mish".parse::<Activation>().is_err());
}

#[test]
fn soft_prompt_extends_sequence_and_mask() {
    let g = view(DType::Float);
    let mut b = PatchBuilder::new(&g, "prompt");
    let names = b
        .prepend_to_sequence(
            "embeddings",
            Some("attention_mask"),
            5,
            HIDDEN,
            Init::Normal {
                mean: 0.0,
                std: 0.02,
                seed: 9,
            },
            false,
        )
        .unwrap();
    assert_valid(&b);
    let p = b.patch();
    assert_eq!(p.parameters[0].shape, vec![5, HIDDEN]);
    assert_eq!(p.parameters[0].name, names.prompt.clone().unwrap());
    let concat = p
        .nodes
        .iter()
        .find(|n| n.outputs[0] == names.output)
        .unwrap();
    assert_eq!(concat.attributes["axis"], AttributeValue::Int(1));
    assert_eq!(concat.inputs[1], "embeddings");
    let mask_concat = p
        .nodes
        .iter()
        .find(|n| Some(&n.outputs[0]) == names.mask_output.as_ref())
        .unwrap();
    assert_eq!(mask_concat.inputs[1], "attention_mask");
    let len = p
        .nodes
        .iter()
        .find(|n| n.attributes.get("value_ints") == Some(&AttributeValue::Ints(vec![5])))
        .unwrap();
    assert_eq!(len.op_type, "Constant");
    assert!(
        !p.nodes.iter().any(|n| n.op_type == "Cast"),
        "an int64 mask needs no cast"
    );
    let rewired: Vec<&str> = p.rewires.iter().map(|r| r.value.as_str()).collect();
    assert_eq!(rewired, ["embeddings", "attention_mask"]);
    assert_eq!(names.nodes.len(), p.nodes.len());
}

/// With placeholders the token ids are lengthened first (repeating each sequence's first id),
/// and the prompt replaces the embedding's leading rows instead of preceding them.
#[test]
fn soft_prompts_replace_placeholders_of_lengthened_ids() {
    let g = view(DType::Float);
    let mut b = PatchBuilder::new(&g, "prompt");
    let ids = b
        .extend_sequence_input("attention_mask", 3, SequenceFill::CopyFirst)
        .unwrap();
    assert_eq!(b.current("attention_mask"), ids.output);
    let first = b
        .patch()
        .nodes
        .iter()
        .find(|n| n.op_type == "Slice")
        .unwrap();
    assert_eq!(first.inputs[0], "attention_mask");
    let names = b
        .prepend_to_sequence("embeddings", None, 3, HIDDEN, Init::Zeros, true)
        .unwrap();
    assert_valid(&b);
    let p = b.patch();
    let concat = p
        .nodes
        .iter()
        .find(|n| n.outputs[0] == names.output)
        .unwrap();
    let tokens = p
        .nodes
        .iter()
        .find(|n| n.outputs[0] == concat.inputs[1])
        .unwrap();
    assert_eq!(tokens.op_type, "Slice", "the placeholders are cut off");
    assert_eq!(tokens.inputs[0], "embeddings");
    assert_eq!(b.current("embeddings"), names.output);
}

#[test]
fn float_masks_get_a_cast_and_zero_lengths_are_no_ops() {
    let mut g = view(DType::Float);
    g.values
        .iter_mut()
        .find(|v| v.name == "attention_mask")
        .unwrap()
        .dtype = Some(DType::Float);
    let mut b = PatchBuilder::new(&g, "prompt");
    let m = b.extend_mask("attention_mask", 2).unwrap();
    let cast = b
        .patch()
        .nodes
        .iter()
        .find(|n| n.op_type == "Cast")
        .unwrap();
    assert_eq!(cast.attributes["to"], AttributeValue::Int(1));
    assert_eq!(b.current("attention_mask"), m.output);
    assert_valid(&b);

    let g = view(DType::Float);
    let mut b = PatchBuilder::new(&g, "prompt");
    let p = b
        .prepend_to_sequence(
            "embeddings",
            Some("attention_mask"),
            0,
            HIDDEN,
            Init::Zeros,
            false,
        )
        .unwrap();
    assert_eq!(
        (p.prompt, p.output.as_str(), p.mask_output.as_deref()),
        (None, "embeddings", Some("attention_mask"))
    );
    let k = b
        .prefix_key_values("l0.keys", "l0.values", 2, 4, 0, Init::Zeros)
        .unwrap();
    assert_eq!(k.key_output, "l0.keys");
    assert!(b.extend_mask("attention_mask", 0).unwrap().nodes.is_empty());
    assert!(b.finish().patch.is_empty());
}

#[test]
fn prefix_key_values_concatenates_on_the_sequence_axis() {
    let g = view(DType::Float);
    let mut b = PatchBuilder::new(&g, "prefix");
    let names = b
        .prefix_key_values(
            "l1.keys",
            "l1.values",
            2,
            4,
            3,
            Init::Normal {
                mean: 0.0,
                std: 1.0,
                seed: 5,
            },
        )
        .unwrap();
    assert_valid(&b);
    let p = b.patch();
    assert_eq!(p.parameters.len(), 2);
    for param in &p.parameters {
        assert_eq!(param.shape, vec![1, 2, 3, 4]);
    }
    assert_ne!(p.parameters[0].init.seed(), p.parameters[1].init.seed());
    assert_eq!(p.parameters[0].init.seed(), Some(5));
    for (out, src) in [
        (&names.key_output, "l1.keys"),
        (&names.value_output, "l1.values"),
    ] {
        let concat = p.nodes.iter().find(|n| &n.outputs[0] == out).unwrap();
        assert_eq!(concat.attributes["axis"], AttributeValue::Int(2));
        assert_eq!(concat.inputs[1], src);
    }
    assert_eq!(p.rewires.len(), 2);
}

#[test]
fn gate_is_zero_initialised_and_scalar_by_default() {
    let g = view(DType::Float);
    let mut b = PatchBuilder::new(&g, "llama_adapter");
    let gate = b.gate("l0.context", "l0.o.out", None, Init::Zeros).unwrap();
    let p = b.patch();
    assert_eq!(p.parameters[0].shape, vec![1]);
    assert_eq!(p.parameters[0].name, gate.gate);
    let ops: Vec<&str> = p.nodes.iter().map(|n| n.op_type.as_str()).collect();
    assert_eq!(ops, ["Mul", "Add"]);
    assert_eq!(p.nodes[1].inputs[0], "l0.o.out");
    assert_valid(&b);
}

#[test]
fn dequantize_weight_carries_codes_and_scales_as_data() {
    let g = view(DType::Float16);
    let q = site_of(&g, 0, SiteKind::Q);
    let n = HIDDEN * HIDDEN;
    let indices: Vec<u8> = (0..n).map(|i| (i % 16) as u8).collect();
    let codes = pack_nibbles(&indices).unwrap();
    let mut b = PatchBuilder::new(&g, "qlora");
    let names = b
        .dequantize_weight(
            &q.weight,
            codes.clone(),
            vec![1.0; n / 16],
            16,
            &NF4_CODEBOOK,
        )
        .unwrap();
    assert_valid(&b);
    let reply = b.finish();
    reply.check_payloads().unwrap();
    let p = &reply.patch;
    let codes_param = p.parameters.iter().find(|x| x.name == names.codes).unwrap();
    assert_eq!(
        (
            codes_param.dtype,
            codes_param.shape.clone(),
            codes_param.trainable
        ),
        (DType::Uint8, vec![n / 2], false)
    );
    let absmax_param = p
        .parameters
        .iter()
        .find(|x| x.name == names.absmax)
        .unwrap();
    assert_eq!(absmax_param.shape, vec![n / 16, 1]);
    assert_eq!(
        reply
            .tensors
            .iter()
            .find(|t| t.dtype == DType::Uint8)
            .unwrap()
            .data,
        codes
    );
    assert_eq!(
        p.rewires,
        [Rewire {
            value: q.weight.clone(),
            replacement: names.output.clone(),
            keep: vec![],
            only: vec![]
        }]
    );
    let last = p.nodes.last().unwrap();
    assert_eq!(
        (last.op_type.as_str(), &last.attributes["to"]),
        ("Cast", &AttributeValue::Int(10))
    );
    let shifts: Vec<&str> = p
        .nodes
        .iter()
        .filter(|n| n.op_type == "BitShift")
        .map(|n| match &n.attributes["direction"] {
            AttributeValue::String(s) => s.as_str(),
            _ => "",
        })
        .collect();
    assert_eq!(shifts, ["RIGHT", "LEFT", "RIGHT"]);
    let table = p
        .nodes
        .iter()
        .find(|n| n.attributes.contains_key("value_floats"))
        .unwrap();
    assert_eq!(
        table.attributes["value_floats"],
        AttributeValue::Floats(NF4_CODEBOOK.to_vec())
    );

    let frame = reply.to_frame().unwrap();
    assert_eq!(PatchReply::from_frame(&frame).unwrap(), {
        let mut sorted = reply.clone();
        sorted.tensors.sort_by(|a, b| a.key.cmp(&b.key));
        sorted
    });
}

#[test]
fn dequantize_weight_rejects_bad_arguments() {
    let g = view(DType::Float);
    let q = site_of(&g, 0, SiteKind::Q);
    let mut b = PatchBuilder::new(&g, "qlora");
    let n = HIDDEN * HIDDEN;
    for (codes, absmax, block) in [
        (n / 2, n / 16, 0),
        (n / 2, n / 16, 3),
        (n / 2 - 1, n / 16, 16),
        (n / 2, 1, 16),
    ] {
        let e = b
            .dequantize_weight(
                &q.weight,
                vec![0; codes],
                vec![1.0; absmax],
                block,
                &NF4_CODEBOOK,
            )
            .unwrap_err();
        assert!(matches!(e, Error::Build(_)), "{e}");
    }
    assert!(b
        .dequantize_weight("missing", vec![], vec![], 16, &NF4_CODEBOOK)
        .is_err());
    assert!(b.patch().is_empty());
}

#[test]
fn mark_trainable_records_an_in_place_fold_once() {
    let g = view(DType::Float);
    let mut b = PatchBuilder::new(&g, "bitfit");
    for s in g.sites() {
        if let Some(bias) = &s.site.bias {
            b.mark_trainable(bias).unwrap();
            b.mark_trainable(bias).unwrap();
        }
    }
    let p = b.patch();
    assert_eq!(p.mark_trainable.len(), 12);
    assert_eq!(p.folds.len(), 12);
    assert_eq!(
        p.folds[0],
        Fold::InPlace {
            tensor: "l0.q.bias".into()
        }
    );
    assert!(b.mark_trainable("nope").is_err());
    assert_valid(&b);
}

#[test]
fn check_reports_every_problem_with_names_and_trainability() {
    let mut g = view(DType::Float);
    g.tensors.push(graft_plugin_sdk::TensorInfo {
        name: "position_ids".into(),
        dtype: DType::Int64,
        shape: vec![1, 16],
    });
    g.record.methods.push(graft_plugin_sdk::AppliedMethod {
        method: "bitfit".into(),
        trainable: vec!["l0.q.bias".into()],
        ..Default::default()
    });
    let node = |name: &str, input: &str, output: &str| graft_plugin_sdk::NewNode {
        name: name.into(),
        op_type: "Identity".into(),
        domain: String::new(),
        inputs: vec![input.into()],
        outputs: vec![output.into()],
        attributes: Default::default(),
    };
    let patch = Patch {
        nodes: vec![
            // A base node's name is taken, and is not a value to read.
            node("l0.q.MatMul", "embeddings", "fresh"),
            node("reads_a_node", "l1.k.MatMul", "fresh_2"),
        ],
        mark_trainable: vec![
            "position_ids".into(),
            "l0.q.bias".into(),
            "l0.q.bias".into(),
        ],
        ..Patch::default()
    };
    let problems = patch.check(&g).unwrap_err();
    assert_eq!(
        problems,
        [
            "node \"l0.q.MatMul\" already exists in the graph",
            "node \"reads_a_node\" reads unknown value \"l1.k.MatMul\"",
            "mark_trainable names \"position_ids\", which is int64, not floating point",
            "mark_trainable names \"l0.q.bias\" twice",
            "\"l0.q.bias\" is already trainable by an earlier method",
        ]
    );
}

#[test]
fn helpers_reject_what_they_cannot_build() {
    let g = view(DType::Float);
    let norm = site_of(&g, 0, SiteKind::Norm);
    let q = site_of(&g, 0, SiteKind::Q);
    let mut b = PatchBuilder::new(&g, "x");
    assert_eq!(
        b.low_rank_branch(&norm, 2, 1.0, Init::Zeros, Init::Zeros, None)
            .unwrap_err()
            .to_string(),
        "low_rank_branch needs a linear site; encoder.layers.0.norm is a norm"
    );
    assert!(b
        .low_rank_branch(&q, 0, 1.0, Init::Zeros, Init::Zeros, None)
        .is_err());
    assert!(b
        .low_rank_branch(&q, 2, 1.0, Init::Zeros, Init::Zeros, Some(1.0))
        .is_err());
    assert!(b.scale_output(&norm, Init::Ones).is_err());
    let unknown = PatchBuilder::new(&graft_plugin_sdk::GraphView::default(), "x")
        .residual_module(
            "h",
            4,
            2,
            Activation::Relu,
            Placement::Sequential,
            Init::Zeros,
        )
        .unwrap_err();
    assert_eq!(unknown.to_string(), "the element type of \"h\" is unknown");
    assert!(b.patch().is_empty());
}

#[test]
fn seeds_are_deterministic_and_distinct() {
    let g = view(DType::Float);
    let draw = |seed| {
        let mut b = PatchBuilder::new(&g, "x").with_seed(seed);
        (0..4).map(|_| b.next_seed()).collect::<Vec<_>>()
    };
    assert_eq!(draw(1), draw(1));
    assert_ne!(draw(1), draw(2));
    let set: BTreeSet<u64> = draw(1).into_iter().collect();
    assert_eq!(set.len(), 4);
}

#[test]
fn kaiming_bound_matches_torch() {
    let bound = Init::kaiming_uniform_bound(64, 5f64.sqrt());
    assert!((bound - 1.0 / 8.0).abs() < 1e-12, "{bound}");
    let relu = Init::kaiming_uniform_bound(3, 0.0);
    assert!((relu - (2.0f64).sqrt() * 1.0).abs() < 1e-12);
    assert_eq!(
        Init::linear_default(64, 7),
        Init::KaimingUniform {
            fan_in: 64,
            a: 5f64.sqrt(),
            seed: 7
        }
    );
    assert_eq!(Init::Zeros.with_seed(3), Init::Zeros);
    assert_eq!(
        Init::Uniform {
            low: 0.0,
            high: 1.0,
            seed: 1
        }
        .with_seed(3)
        .seed(),
        Some(3)
    );
}

#[test]
fn patch_json_round_trips_with_documented_shapes() {
    let g = view(DType::Float);
    let mut b = PatchBuilder::new(&g, "mix");
    let sites = SiteSelector::parse(&["attention", "ffn_down"])
        .unwrap()
        .select(&g);
    assert_eq!(sites.len(), 2 * 5);
    for s in &sites {
        b.low_rank_branch(
            s.site,
            2,
            1.0,
            Init::linear_default(s.site.in_features, 1),
            Init::Zeros,
            Some(0.05),
        )
        .unwrap();
    }
    b.scale_input(&site_of(&g, 0, SiteKind::FfnDown), Init::Ones)
        .unwrap();
    b.mark_trainable("l0.norm.bias").unwrap();
    b.prepend_to_sequence(
        "embeddings",
        Some("attention_mask"),
        2,
        HIDDEN,
        Init::Uniform {
            low: -0.5,
            high: 0.5,
            seed: 2,
        },
        false,
    )
    .unwrap();
    let patch = b.finish().patch;
    let json = serde_json::to_string(&patch).unwrap();
    assert_eq!(serde_json::from_str::<Patch>(&json).unwrap(), patch);
    let value: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(value["folds"][0]["kind"], "low_rank");
    assert_eq!(value["parameters"][0]["init"]["kind"], "kaiming_uniform");
    assert_eq!(value["parameters"][0]["dtype"], "float");
    assert!(value["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|n| n["attributes"]["axis"] == serde_json::json!({"int": 1})));
    assert!(value["rewires"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["only"].is_array()));
    assert!(value["rewires"][0].get("keep").is_none());
    let minimal: Patch = serde_json::from_str(r#"{"mark_trainable":["x"]}"#).unwrap();
    assert_eq!(minimal.mark_trainable, ["x"]);
    let node: graft_plugin_sdk::NewNode =
        serde_json::from_str(r#"{"name":"n","op_type":"Relu","inputs":["a"],"outputs":["b"]}"#)
            .unwrap();
    assert_eq!(node.domain, "");
}

#[test]
fn graph_view_json_uses_the_documented_names() {
    let g = view(DType::Bfloat16);
    let json = serde_json::to_value(&g).unwrap();
    let site = &json["stacks"][0]["layers"][0]["sites"][0];
    assert_eq!(site["kind"], "q");
    assert_eq!(site["attention"], "self");
    assert_eq!(site["layout"], "in_out");
    assert!(site.get("key_states").is_none());
    assert_eq!(json["stacks"][0]["layers"][0]["sites"][4]["kind"], "ffn_up");
    assert_eq!(
        json["values"][0]["shape"],
        serde_json::json!(["batch", "seq"])
    );
    assert_eq!(json["embeddings"][0]["kind"], "token");
    assert_eq!(json["tensors"][1]["dtype"], "bfloat16");
    let back: graft_plugin_sdk::GraphView = serde_json::from_value(json).unwrap();
    assert_eq!(back, g);
    let dims: Vec<graft_plugin_sdk::Dim> = serde_json::from_str(r#"[3, "batch", null]"#).unwrap();
    assert_eq!(
        dims,
        [
            graft_plugin_sdk::Dim::Fixed(3),
            graft_plugin_sdk::Dim::Symbolic("batch".into()),
            graft_plugin_sdk::Dim::Unknown
        ]
    );
    assert_eq!(g.stacks[0].head_dim(), 4);
}

#[test]
fn frames_round_trip_and_reject_truncation() {
    let frame = encode_frame(b"{\"a\":1}", b"blob");
    assert_eq!(&frame[..8], &7u64.to_le_bytes());
    assert_eq!(
        decode_frame(&frame).unwrap(),
        (&b"{\"a\":1}"[..], &b"blob"[..])
    );
    assert_eq!(
        decode_frame(&encode_frame(b"{}", b"")).unwrap(),
        (&b"{}"[..], &b""[..])
    );
    assert!(matches!(decode_frame(&frame[..10]), Err(Error::Frame(_))));
    assert!(decode_frame(&[1, 2, 3]).is_err());
    let huge = encode_frame(b"", b"");
    let mut huge = huge.clone();
    huge[7] = 0xff;
    assert!(decode_frame(&huge).is_err());

    let reply = PatchReply::new(Patch::default());
    let frame = reply.to_frame().unwrap();
    assert_eq!(
        frame.len(),
        8 + serde_json::to_vec(&Patch::default()).unwrap().len()
    );
    assert_eq!(PatchReply::from_frame(&frame).unwrap(), reply);
}

#[test]
fn payload_checks_catch_mismatches() {
    let g = view(DType::Float);
    let mut b = PatchBuilder::new(&g, "x");
    let init = b.data("w", DType::Float, vec![2], vec![0; 8]).unwrap();
    assert!(b.data("w", DType::Float, vec![3], vec![0; 8]).is_err());
    b.parameter("x.w", DType::Float, vec![2], init.clone(), true);
    let reply = b.finish();
    reply.check_payloads().unwrap();

    let mut wrong_shape = reply.clone();
    wrong_shape.patch.parameters[0].shape = vec![1, 2];
    assert!(wrong_shape
        .check_payloads()
        .unwrap_err()
        .to_string()
        .contains("payload \"w\""));
    let mut missing = reply.clone();
    missing.tensors.clear();
    assert!(missing.check_payloads().is_err());
    let mut unused = reply.clone();
    unused.patch.parameters.clear();
    assert_eq!(
        unused.check_payloads().unwrap_err().to_string(),
        "payload \"w\" is not used by any parameter"
    );
    let mut int4 = reply;
    int4.tensors[0].dtype = DType::Int4;
    int4.tensors[0].data = vec![0; 1];
    assert!(int4.to_frame().is_err());
}

fn node_names(p: &Patch) -> Vec<String> {
    p.nodes.iter().map(|n| n.name.clone()).collect()
}

#[test]
fn block_returns_exactly_the_nodes_added_in_order_and_nests() {
    let g = view(DType::Float);
    let q = site_of(&g, 0, SiteKind::Q);
    let mut b = PatchBuilder::new(&g, "m");
    let before = b.constant_ints("m.before", &[1]);
    let ((value, inner_nodes, lora), outer_nodes) = b
        .block(|b| {
            let first = b.constant_scalar("m.first", 2.0, DType::Float16);
            let ((value, lora), inner_nodes) = b.block(|b| {
                let lora = b.low_rank_branch(&q, 2, 1.0, Init::Zeros, Init::Zeros, None)?;
                let value = b.op("m.inner", "Mul", &[&lora.output, &first], &[]);
                Ok((value, lora))
            })?;
            b.op("m.last", "Relu", &[&value], &[]);
            Ok((value, inner_nodes, lora))
        })
        .unwrap();
    assert_eq!(value, "m.inner.out");
    let all = node_names(b.patch());
    assert_eq!(all[0], "m.before");
    assert_eq!(b.patch().nodes[0].outputs, [before]);
    assert_eq!(outer_nodes, all[1..]);
    assert_eq!(&outer_nodes[..2], ["m.first", "m.first.cast"]);
    assert_eq!(outer_nodes.last().map(String::as_str), Some("m.last"));
    let mut expected_inner = lora.nodes.clone();
    expected_inner.push("m.inner".into());
    assert_eq!(inner_nodes, expected_inner);
    assert_eq!(outer_nodes[2..outer_nodes.len() - 1], inner_nodes[..]);
    match &b.patch().folds[0] {
        Fold::LowRank { branch_nodes, .. } => assert_eq!(branch_nodes, &lora.nodes),
        other => panic!("unexpected fold {other:?}"),
    }

    let ((), empty) = b
        .block(|b| {
            b.parameter(
                "m.only_a_parameter",
                DType::Float,
                vec![1],
                Init::Zeros,
                true,
            );
            Ok(())
        })
        .unwrap();
    assert!(empty.is_empty());
    assert_valid(&b);
}

#[test]
fn block_lists_a_helpers_nodes_and_passes_errors_through() {
    let g = view(DType::Float);
    let k = site_of(&g, 1, SiteKind::K);
    let mut b = PatchBuilder::new(&g, "m");
    let (names, nodes) = b.block(|b| b.scale_output(&k, Init::Ones)).unwrap();
    assert_eq!(names.nodes, nodes);
    let (prompt, nodes) = b
        .block(|b| {
            b.prepend_to_sequence(
                "embeddings",
                Some("attention_mask"),
                2,
                HIDDEN,
                Init::Zeros,
                false,
            )
        })
        .unwrap();
    assert_eq!(prompt.nodes, nodes);
    assert!(nodes.iter().any(|n| n.starts_with("m.mask.")));

    let n_nodes = b.patch().nodes.len();
    let error = b
        .block(|b| {
            b.op("m.kept", "Relu", &["embeddings"], &[]);
            b.scale_output(&site_of(&g, 0, SiteKind::Norm), Init::Ones)
        })
        .unwrap_err();
    assert!(matches!(error, Error::Build(_)), "{error}");
    assert_eq!(node_names(b.patch())[n_nodes..], ["m.kept"]);
    assert_valid(&b);
}

#[test]
fn a_block_records_a_plugins_own_fold() {
    let g = view(DType::Float);
    let v = site_of(&g, 0, SiteKind::V);
    let mut b = PatchBuilder::new(&g, "custom");
    let a = b.parameter("custom.A", DType::Float, vec![HIDDEN, 2], Init::Zeros, true);
    let up = b.parameter("custom.B", DType::Float, vec![2, HIDDEN], Init::Zeros, true);
    let ((output, base), branch_nodes) = b
        .block(|b| {
            let h = b.op("custom.down", "MatMul", &[&v.input, &a], &[]);
            let u = b.op("custom.up", "MatMul", &[&h, &up], &[]);
            let base = b.current(&v.output);
            let output = b.op("custom.add", "Add", &[&base, &u], &[]);
            b.rewire(&base, &output);
            Ok((output, base))
        })
        .unwrap();
    assert_eq!(branch_nodes, ["custom.down", "custom.up", "custom.add"]);
    b.fold(Fold::LowRank {
        weight: v.weight.clone(),
        a,
        b: up,
        scale: 1.0,
        layout: v.layout,
        branch_nodes,
        branch_output: output,
        base_output: base,
    });
    assert_valid(&b);
}

#[test]
fn scale_output_by_a_computed_value_reads_it_and_creates_no_parameter() {
    let g = view(DType::Float);
    let k = site_of(&g, 0, SiteKind::K);
    let mut b = PatchBuilder::new(&g, "ia3x");
    let logits = b.parameter("ia3x.logits", DType::Float, vec![HIDDEN], Init::Zeros, true);
    let vector = b.op("ia3x.sigmoid", "Sigmoid", &[&logits], &[]);
    let (n_parameters, n_nodes) = (b.patch().parameters.len(), b.patch().nodes.len());
    let names = b.scale_output_by(&k, &vector).unwrap();
    let p = b.patch();
    assert_eq!(p.parameters.len(), n_parameters);
    assert_eq!(names.vector, vector);
    assert_eq!(names.nodes, node_names(p)[n_nodes..]);
    let mul = p.nodes.last().unwrap();
    assert_eq!(
        (mul.op_type.as_str(), mul.inputs.clone()),
        ("Mul", vec![k.output.clone(), vector.clone()])
    );
    assert_eq!(mul.outputs, std::slice::from_ref(&names.output));
    assert_eq!(
        p.rewires,
        [Rewire {
            value: k.output.clone(),
            replacement: names.output.clone(),
            keep: vec![],
            only: vec![]
        }]
    );
    assert!(p.folds.is_empty(), "a computed scale cannot be folded");
    assert_eq!(b.current(&k.output), names.output);

    let norm_scale = b.scale_output_by(&site_of(&g, 1, SiteKind::K), "l0.norm.weight");
    assert_eq!(norm_scale.unwrap().vector, "l0.norm.weight");
    assert!(b.patch().folds.is_empty());
    assert_eq!(b.patch().parameters.len(), n_parameters);
    assert_valid(&b);
}

#[test]
fn scale_by_a_callers_parameter_of_the_right_shape_folds() {
    let g = view(DType::Float);
    let mut b = PatchBuilder::new(&g, "shared");
    let shared = b.parameter("shared.out", DType::Float, vec![HIDDEN], Init::Ones, true);
    let wide = b.parameter("shared.in", DType::Float, vec![FFN], Init::Ones, true);
    let scalar = b.parameter("shared.scalar", DType::Float, vec![1], Init::Ones, true);
    let k0 = site_of(&g, 0, SiteKind::K);
    let k1 = site_of(&g, 1, SiteKind::K);
    let down = site_of(&g, 0, SiteKind::FfnDown);
    let first = b.scale_output_by(&k0, &shared).unwrap();
    let second = b.scale_output_by(&k1, &shared).unwrap();
    let input = b.scale_input_by(&down, &wide).unwrap();
    b.scale_output_by(&site_of(&g, 0, SiteKind::Q), &scalar)
        .unwrap();
    let p = b.patch();
    assert_eq!(p.parameters.len(), 3);
    assert_eq!(
        p.folds,
        [
            Fold::ScaleOutput {
                weight: k0.weight.clone(),
                bias: k0.bias.clone(),
                vector: shared.clone(),
                layout: k0.layout,
                branch_nodes: first.nodes.clone(),
                branch_output: first.output.clone(),
                base_output: k0.output.clone(),
            },
            Fold::ScaleOutput {
                weight: k1.weight.clone(),
                bias: k1.bias.clone(),
                vector: shared.clone(),
                layout: k1.layout,
                branch_nodes: second.nodes.clone(),
                branch_output: second.output.clone(),
                base_output: k1.output.clone(),
            },
            Fold::ScaleInput {
                weight: down.weight.clone(),
                vector: wide.clone(),
                layout: down.layout,
                branch_nodes: input.nodes.clone(),
                branch_output: input.output.clone(),
                base_output: down.input.clone(),
            },
        ],
        "a [1] parameter broadcasts but is not a foldable vector"
    );
    assert_valid(&b);
}

#[test]
fn scale_input_by_rewires_only_the_site_node() {
    let g = view(DType::Float);
    let down = site_of(&g, 1, SiteKind::FfnDown);
    let mut b = PatchBuilder::new(&g, "ia3x");
    let half = b.constant_scalar("ia3x.half", 0.5, DType::Float);
    let names = b.scale_input_by(&down, &half).unwrap();
    let p = b.patch();
    assert!(p.parameters.is_empty());
    assert_eq!(p.nodes.last().unwrap().inputs, [down.input.clone(), half]);
    assert_eq!(
        p.rewires,
        [Rewire {
            value: down.input.clone(),
            replacement: names.output.clone(),
            keep: vec![],
            only: vec![down.node.clone()]
        }]
    );
    assert_eq!(b.current_for(&down.input, &down.node), names.output);
    assert_eq!(b.current(&down.input), down.input);
    assert!(p.folds.is_empty());
    assert_valid(&b);
}

#[test]
fn gate_by_a_computed_value_reads_it_and_creates_no_parameter() {
    let g = view(DType::Float);
    let mut b = PatchBuilder::new(&g, "llama_adapter");
    let raw = b.parameter(
        "llama_adapter.raw_gate",
        DType::Float,
        vec![1],
        Init::Zeros,
        true,
    );
    let gate = b.op("llama_adapter.tanh", "Tanh", &[&raw], &[]);
    let first = b.gate_by("l0.context", "l0.o.out", &gate).unwrap();
    let second = b.gate_by("l1.context", "l1.o.out", &gate).unwrap();
    let p = b.patch();
    assert_eq!(p.parameters.len(), 1);
    assert_eq!(
        (first.gate.as_str(), second.gate.as_str()),
        (gate.as_str(), gate.as_str())
    );
    let ops: Vec<&str> = p.nodes.iter().map(|n| n.op_type.as_str()).collect();
    assert_eq!(ops, ["Tanh", "Mul", "Add", "Mul", "Add"]);
    assert_eq!(p.nodes[1].inputs, ["l0.context".to_string(), gate.clone()]);
    assert_eq!(
        p.nodes[2].inputs,
        ["l0.o.out".to_string(), p.nodes[1].outputs[0].clone()]
    );
    assert_eq!(first.nodes, node_names(p)[1..3]);
    assert_eq!(b.current("l0.o.out"), first.output);
    assert!(p.folds.is_empty());
    assert_valid(&b);
}

#[test]
fn by_variants_reject_unknown_or_mistyped_values_and_change_nothing() {
    let g = view(DType::Float);
    let k = site_of(&g, 0, SiteKind::K);
    let mut b = PatchBuilder::new(&g, "x");
    let half = b.parameter("x.half", DType::Float16, vec![HIDDEN], Init::Ones, true);
    let before = b.patch().clone();
    assert_eq!(
        b.scale_output_by(&k, "nowhere").unwrap_err().to_string(),
        "scale_output_by on encoder.layers.0.k: unknown value \"nowhere\""
    );
    assert_eq!(
        b.scale_input_by(&k, &half).unwrap_err().to_string(),
        "scale_input_by on encoder.layers.0.k: \"x.half\" is float16, not float"
    );
    assert!(b
        .scale_output_by(&site_of(&g, 0, SiteKind::Norm), "l0.norm.weight")
        .is_err());
    assert!(b.gate_by("l0.context", "l0.o.out", "input_ids").is_err());
    assert!(b.gate_by("l0.context", "l0.o.out", "nowhere").is_err());
    assert_eq!(b.patch(), &before);
    let again = b.scale_output(&k, Init::Ones).unwrap();
    assert_eq!(
        again.vector, "x.encoder.layers.0.k.scale",
        "failed calls reserve no names"
    );
}
