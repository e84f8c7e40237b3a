//! The one patch validator, on the real bert-legacy fixture: the SDK's `Patch::check` against the
//! plugin's view, then element types, shapes and cycles on the patched graph. Patches are built
//! by hand with `PatchBuilder` and applied with `apply_patch`; a refused patch must leave the
//! model byte for byte as it was, and its error must name the node, its op and both shapes.

mod common;

use common::*;
use graft::ir::Model;
use graft::onnx;
use graft::patch::{apply_patch, AppliedMethod};
use graft::plugins::graph_view;
use graft_plugin_sdk::{Dim, GraphView, Init, NewValue, PatchBuilder, PatchReply, Site, SiteKind};

const FIXTURE: &str = "bert-legacy";

fn base_model() -> Model {
    onnx::load(&fixture_model(FIXTURE)).expect("load the fixture")
}

fn method() -> AppliedMethod {
    AppliedMethod {
        method: "patch-validation".into(),
        plugin: "core/tests/patch_validation.rs".into(),
        plugin_version: "0".into(),
        config: serde_json::json!({}),
        ..AppliedMethod::default()
    }
}

/// The site of `kind` in layer `layer` of the first stack.
fn site(view: &GraphView, layer: usize, kind: SiteKind) -> Site {
    view.stacks[0].layers[layer]
        .sites
        .iter()
        .find(|s| s.kind == kind)
        .unwrap_or_else(|| panic!("{FIXTURE} has no {} site in layer {layer}", kind.name()))
        .clone()
}

/// A value's shape as graft's messages write it: `[batch, sequence, 32]`.
fn shape_text(view: &GraphView, value: &str) -> String {
    let dims = (view.value(value).and_then(|v| v.shape.clone()))
        .unwrap_or_else(|| panic!("the shape of {value:?} is not known"));
    let dims: Vec<String> = dims
        .iter()
        .map(|d| match d {
            Dim::Fixed(n) => n.to_string(),
            Dim::Symbolic(s) => s.clone(),
            Dim::Unknown => "?".into(),
        })
        .collect();
    format!("[{}]", dims.join(", "))
}

/// A LoRA-like branch on `site`, written out node by node: `output + (input · A) · B`, with `A`
/// of shape `[a_rows, 4]` and `B` of shape `[4, b_columns]`, both zero.
fn low_rank_like(view: &GraphView, site: &Site, a_rows: usize, b_columns: usize) -> PatchReply {
    let dtype = view.dtype_of(&site.weight).expect("the weight's type");
    let mut builder = PatchBuilder::new(view, "check");
    let a = builder.parameter("check.A", dtype, vec![a_rows, 4], Init::Zeros, true);
    let b = builder.parameter("check.B", dtype, vec![4, b_columns], Init::Zeros, true);
    let down = builder.op("check.down", "MatMul", &[&site.input, &a], &[]);
    let up = builder.op("check.up", "MatMul", &[&down, &b], &[]);
    let sum = builder.op("check.add", "Add", &[&site.output, &up], &[]);
    builder.rewire(&site.output, &sum);
    builder.finish()
}

/// Applies `reply` to a copy of `base`, expects a refusal, checks that the copy did not change,
/// and returns the error's text.
fn refusal(base: &Model, reply: &PatchReply) -> String {
    let mut model = base.clone();
    let before = onnx::to_bytes(&model).unwrap();
    let error = apply_patch(&mut model, reply, method())
        .expect_err("the patch was applied")
        .to_string();
    assert_eq!(
        onnx::to_bytes(&model).unwrap(),
        before,
        "a refused patch changed the model ({error})"
    );
    error
}

#[test]
fn a_matmul_whose_inner_dimensions_differ_is_refused() {
    let base = base_model();
    let view = graph_view(&base).unwrap();
    let q = site(&view, 0, SiteKind::Q);
    let reply = low_rank_like(&view, &q, q.in_features + 1, q.out_features);
    let error = refusal(&base, &reply);
    let expected = format!(
        "new node \"check.down\" (MatMul) cannot combine {:?} {} with \"check.A\" [{}, 4]: inner \
         dimensions {} and {} differ",
        q.input,
        shape_text(&view, &q.input),
        q.in_features + 1,
        q.in_features,
        q.in_features + 1,
    );
    assert!(error.contains(&expected), "{error}\nexpected: {expected}");
}

#[test]
fn an_add_whose_fixed_sizes_cannot_broadcast_is_refused() {
    let base = base_model();
    let view = graph_view(&base).unwrap();
    let v = site(&view, 1, SiteKind::V);
    let reply = low_rank_like(&view, &v, v.in_features, v.out_features + 3);
    let error = refusal(&base, &reply);
    let output_shape = shape_text(&view, &v.output);
    let branch_shape = output_shape.replace(
        &format!("{}]", v.out_features),
        &format!("{}]", v.out_features + 3),
    );
    let expected = format!(
        "new node \"check.add\" (Add) cannot combine {:?} {output_shape} with \"check.up.out\" \
         {branch_shape}: sizes {} and {} at axis -1 cannot broadcast",
        v.output,
        v.out_features,
        v.out_features + 3,
    );
    assert!(error.contains(&expected), "{error}\nexpected: {expected}");
}

#[test]
fn a_concat_whose_other_axes_differ_is_refused() {
    let base = base_model();
    let view = graph_view(&base).unwrap();
    let q = site(&view, 0, SiteKind::Q);
    let dtype = view.dtype_of(&q.weight).unwrap();
    let mut builder = PatchBuilder::new(&view, "check");
    let prompt = builder.parameter(
        "check.prompt",
        dtype,
        vec![1, 2, q.in_features + 1],
        Init::Zeros,
        true,
    );
    let axis = graft_plugin_sdk::AttributeValue::Int(1);
    builder.op(
        "check.concat",
        "Concat",
        &[&prompt, &q.input],
        &[("axis", axis)],
    );
    let error = refusal(&base, &builder.finish());
    let expected = format!(
        "new node \"check.concat\" (Concat) cannot combine \"check.prompt\" [1, 2, {}] with {:?} \
         {}: sizes {} and {} differ at axis 2 (the concatenation axis is 1)",
        q.in_features + 1,
        q.input,
        shape_text(&view, &q.input),
        q.in_features + 1,
        q.in_features,
    );
    assert!(error.contains(&expected), "{error}\nexpected: {expected}");
}

#[test]
fn a_valid_low_rank_branch_applies_and_leaves_the_outputs_unchanged() {
    let base = base_model();
    let view = graph_view(&base).unwrap();
    let q = site(&view, 0, SiteKind::Q);
    let reply = low_rank_like(&view, &q, q.in_features, q.out_features);
    let mut patched = base.clone();
    apply_patch(&mut patched, &reply, method()).expect("a valid branch applies");
    assert_eq!(
        patched.graph.nodes.len(),
        base.graph.nodes.len() + 3,
        "the branch's three nodes are in the graph"
    );
    let inputs = fixture_inputs(FIXTURE);
    // B is zero, so the branch adds exact zeros: the outputs keep every bit.
    let diff = max_diff(&run_model(&base, &inputs), &run_model(&patched, &inputs));
    assert_eq!(diff, 0.0, "a zero branch changed the outputs by {diff}");
}

#[test]
fn symbolic_sizes_that_differ_by_name_are_not_refused() {
    let base = base_model();
    let view = graph_view(&base).unwrap();
    let q = site(&view, 0, SiteKind::Q);
    let dtype = view.dtype_of(&q.weight).unwrap();
    let mut builder = PatchBuilder::new(&view, "check");
    builder
        .graph_input(NewValue {
            name: "check.extra".into(),
            dtype,
            shape: vec![
                Dim::Symbolic("rows".into()),
                Dim::Symbolic("columns".into()),
                Dim::Fixed(q.in_features as i64),
            ],
        })
        .unwrap();
    builder.op("check.add", "Add", &[&q.input, "check.extra"], &[]);
    let mut patched = base.clone();
    apply_patch(&mut patched, &builder.finish(), method())
        .expect("sizes only the run time knows are not a conflict");
}

#[test]
fn every_naming_problem_is_reported_at_once() {
    let base = base_model();
    let view = graph_view(&base).unwrap();
    let q = site(&view, 0, SiteKind::Q);
    let existing_node = base.graph.nodes[0].name.clone();
    let identity = |input: &str| graft_plugin_sdk::NewNode {
        name: existing_node.clone(),
        op_type: "Identity".into(),
        domain: String::new(),
        inputs: vec![input.into()],
        outputs: vec!["check.copy".into()],
        attributes: Default::default(),
    };
    let mut builder = PatchBuilder::new(&view, "check");
    assert!(
        builder.add_node(identity(&q.input)).is_err(),
        "the builder knows the name of every node in the view"
    );
    let mut reply = builder.finish();
    reply.patch.nodes.push(identity("check.no_such_value"));
    let error = refusal(&base, &reply);
    for expected in [
        "2 problems".to_string(),
        format!("node {existing_node:?} already exists in the graph"),
        format!("node {existing_node:?} reads unknown value \"check.no_such_value\""),
    ] {
        assert!(error.contains(&expected), "{error}\nexpected: {expected}");
    }
}

#[test]
fn a_cycle_the_patch_creates_is_the_patchs() {
    let base = base_model();
    let view = graph_view(&base).unwrap();
    let q = site(&view, 0, SiteKind::Q);
    let mut builder = PatchBuilder::new(&view, "check");
    let loop_back = builder.op("check.loop", "Identity", &[&q.output], &[]);
    builder.rewire(&q.input, &loop_back);
    let error = refusal(&base, &builder.finish());
    assert!(
        error.contains("the patch creates a cycle through node"),
        "{error}"
    );
}

#[test]
fn a_cycle_already_in_the_model_is_the_models() {
    let mut cyclic = base_model();
    let view = graph_view(&cyclic).unwrap();
    let q = site(&view, 0, SiteKind::Q);
    // The q projection reads the output of its own consumer: a two-node cycle in the model.
    let graph = &mut cyclic.graph;
    let projection = graph.nodes.iter().position(|n| n.name == q.node).unwrap();
    let consumer = (graph.nodes.iter().enumerate().skip(projection + 1))
        .find(|(_, n)| {
            n.inputs
                .iter()
                .any(|i| graph.nodes[projection].outputs.contains(i))
        })
        .map(|(index, _)| index)
        .expect("the projection has a consumer after it");
    let consumer_name = graph.nodes[consumer].name.clone();
    let fed_back = graph.nodes[consumer].outputs[0].clone();
    let input_slot = (graph.nodes[projection].inputs.iter())
        .position(|i| *i == q.input)
        .unwrap();
    graph.nodes[projection].inputs[input_slot] = fed_back;

    let view = graph_view(&cyclic).unwrap();
    let v = site(&view, 1, SiteKind::V);
    let reply = low_rank_like(&view, &v, v.in_features, v.out_features);
    let error = refusal(&cyclic, &reply);
    let names_a_cycle_node = [&q.node, &consumer_name].iter().any(|name| {
        error.contains(&format!(
            "the model already has a cycle through node {name:?}"
        ))
    });
    assert!(
        names_a_cycle_node,
        "{error}\nexpected the model's cycle through {:?} or {consumer_name:?}",
        q.node
    );
}
