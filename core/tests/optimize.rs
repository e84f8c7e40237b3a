//! Graph optimizations keep every output: `narrow_unread_rows` on every fixture gives the
//! outputs ONNX Runtime computes for the unchanged model, and it narrows the models whose head
//! reads one token (BERT's pooler, ViT's class token); on a hand-built graph it narrows exactly
//! the ops after the last value something reads in full.

mod common;

use common::*;
use graft::runtime::HostTensor;

#[test]
fn narrowing_unread_rows_keeps_every_fixture_output() {
    let mut narrowed_fixtures = Vec::new();
    for fixture in FIXTURES {
        let base = graft::onnx::load(&fixture_model(fixture)).unwrap();
        let mut narrowed = base.clone();
        let count = graft::optimize::narrow_unread_rows(&mut narrowed).unwrap();
        narrowed.graph.validate().unwrap();
        if count == 0 {
            continue;
        }
        println!("{fixture}: {count} nodes narrowed");
        narrowed_fixtures.push(*fixture);
        let inputs = fixture_inputs(fixture);
        let expected = run_model(&base, &inputs);
        let got = run_model(&narrowed, &inputs);
        let diff = max_diff(&expected, &got);
        assert!(
            diff <= 1e-5,
            "{fixture}: {count} nodes narrowed, outputs differ by {diff}"
        );
        assert!(
            narrowed.graph.nodes.len() < base.graph.nodes.len() + 40,
            "{fixture}: the narrowing added {} nodes",
            narrowed.graph.nodes.len() - base.graph.nodes.len()
        );
    }
    for expected in ["bert-legacy", "vit-legacy"] {
        assert!(
            narrowed_fixtures.contains(&expected),
            "{expected} was not narrowed (narrowed: {narrowed_fixtures:?})"
        );
    }
}

/// A hand-built graph whose output reads one row (3, the last, the one before) of a value made by ops of every narrowable kind
/// (broadcasting Add, Reshape with copied dimensions, Transpose, Softmax over another axis, a
/// graph input read in full elsewhere): the narrowed graph narrows exactly the ops after the
/// value that a second output reads in full, and gives the same outputs.
#[test]
fn narrowing_stops_at_values_read_in_full_and_keeps_the_outputs() {
    for row in [3, -1, -2] {
        check_narrowing_of_row(row);
    }
}

fn check_narrowing_of_row(row: i64) {
    use graft::ir::attributes::{int_attribute, ints_attribute};
    use graft::ir::{DataType, Dim, Graph, Model, Node, Tensor, ValueInfo};

    let node = |op: &str, inputs: &[&str], output: &str| {
        Node::new(
            output,
            op,
            inputs.iter().map(|s| s.to_string()).collect(),
            vec![output.to_owned()],
        )
    };
    let with = |mut node: Node, attributes: Vec<onnx_protobuf::AttributeProto>| {
        node.attributes = attributes;
        node
    };
    let values = |n: usize, seed: usize| -> Vec<f32> {
        (0..n)
            .map(|i| (((i + seed) * 37 % 19) as f32 - 9.0) / 10.0)
            .collect()
    };
    let x_dims = [
        Dim::Symbol("batch".into()),
        Dim::Symbol("sequence".into()),
        Dim::Fixed(8),
    ];
    let model = Model {
        ir_version: 8,
        opset_imports: vec![(String::new(), 17)],
        graph: Graph {
            name: "rows".into(),
            inputs: vec![ValueInfo::tensor("x", DataType::Float, &x_dims)],
            outputs: vec![
                ValueInfo::tensor(
                    "row",
                    DataType::Float,
                    &[Dim::Symbol("batch".into()), Dim::Fixed(8)],
                ),
                ValueInfo::tensor(
                    "pooled",
                    DataType::Float,
                    &[Dim::Symbol("batch".into()), Dim::Fixed(8)],
                ),
            ],
            initializers: vec![
                Tensor::from_f32("gamma", vec![8], &values(8, 1)),
                Tensor::from_f32("beta", vec![8], &values(8, 2)),
                Tensor::from_f32("w", vec![8, 8], &values(64, 3)),
                Tensor::from_f32("bias", vec![8], &values(8, 4)),
                Tensor::from_i64("split_heads", vec![4], &[0, 0, 2, 4]),
                Tensor::from_i64("merge_heads", vec![3], &[0, 0, 8]),
                Tensor::from_i64("row_index", vec![], &[row]),
            ],
            nodes: vec![
                with(
                    node("LayerNormalization", &["x", "gamma", "beta"], "ln"),
                    vec![int_attribute("axis", -1)],
                ),
                node("MatMul", &["ln", "w"], "h"),
                with(
                    node("ReduceMean", &["h"], "pooled"),
                    vec![ints_attribute("axes", &[1]), int_attribute("keepdims", 0)],
                ),
                node("Add", &["h", "bias"], "hb"),
                node("Reshape", &["hb", "split_heads"], "heads"),
                with(
                    node("Transpose", &["heads"], "by_head"),
                    vec![ints_attribute("perm", &[0, 2, 1, 3])],
                ),
                with(
                    node("Softmax", &["by_head"], "weights"),
                    vec![int_attribute("axis", -1)],
                ),
                with(
                    node("Transpose", &["weights"], "by_row"),
                    vec![ints_attribute("perm", &[0, 2, 1, 3])],
                ),
                node("Reshape", &["by_row", "merge_heads"], "merged"),
                node("Mul", &["merged", "x"], "scaled"),
                with(
                    node("Gather", &["scaled", "row_index"], "row"),
                    vec![int_attribute("axis", 1)],
                ),
            ],
            ..Graph::default()
        },
        ..Model::default()
    };
    model.graph.validate().unwrap();
    let mut narrowed = model.clone();
    let count = graft::optimize::narrow_unread_rows(&mut narrowed).unwrap();
    narrowed.graph.validate().unwrap();
    // Add, Reshape, Transpose, Softmax, Transpose, Reshape, Mul; not the MatMul (its output is
    // also pooled in full) nor the LayerNorm in front of it.
    assert_eq!(count, 7, "row {row}");
    for name in ["h", "ln"] {
        let producer = narrowed
            .graph
            .nodes
            .iter()
            .find(|n| n.outputs[0] == name)
            .unwrap();
        assert_eq!(
            producer.inputs,
            model
                .graph
                .nodes
                .iter()
                .find(|n| n.outputs[0] == name)
                .unwrap()
                .inputs
        );
    }

    let x = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[2, 5, 8]), values(80, 5)).unwrap();
    let inputs = vec![("x".to_owned(), HostTensor::F32(x))];
    let expected = run_model(&model, &inputs);
    let got = run_model(&narrowed, &inputs);
    let diff = max_diff(&expected, &got);
    assert!(diff <= 1e-6, "row {row}: narrowed outputs differ by {diff}");
}
