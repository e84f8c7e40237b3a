//! Temporary: dumps a training graph for inspection.
mod common;
use common::*;
use graft::autodiff::gradient_graph;
use graft::ir::{DataType, Node, Tensor, ValueInfo};

#[test]
fn dump() {
    let fixture = std::env::var("FIXTURE").unwrap_or("t5-legacy".into());
    let mut model = graft::onnx::load(&fixture_model(&fixture)).unwrap();
    let mut wrt = Vec::new();
    for node in model.graph.nodes.iter().filter(|n| n.is("MatMul")) {
        let w = node.inputs[1].clone();
        if model
            .graph
            .initializer(&w)
            .is_some_and(|t| t.dims.len() == 2)
            && !wrt.contains(&w)
        {
            wrt.push(w);
        }
        if wrt.len() == 2 {
            break;
        }
    }
    let first = model.graph.outputs[0].name.clone();
    model
        .graph
        .nodes
        .push(Node::new("c", "Cast", vec![first], vec!["wide".into()]));
    let mut cast = model.graph.nodes.pop().unwrap();
    let mut a = onnx_protobuf::AttributeProto::new();
    a.name = "to".into();
    a.i = 11;
    a.type_ = onnx_protobuf::attribute_proto::AttributeType::INT.into();
    cast.attributes.push(a);
    model.graph.nodes.push(cast);
    model.graph.nodes.push(Node::new(
        "r",
        "ReduceSum",
        vec!["wide".into()],
        vec!["loss".into()],
    ));
    let mut k = onnx_protobuf::AttributeProto::new();
    k.name = "keepdims".into();
    k.i = 0;
    k.type_ = onnx_protobuf::attribute_proto::AttributeType::INT.into();
    model.graph.nodes.last_mut().unwrap().attributes.push(k);
    model.graph.outputs = vec![ValueInfo::tensor("loss", DataType::Double, &[])];
    let _ = Tensor::from_f32("x", vec![], &[0.0]);
    let training = gradient_graph(&model, "loss", &wrt).unwrap();
    println!("wrt {:?}", wrt);
    std::fs::write(
        format!("/tmp/ad/{fixture}.onnx"),
        graft::onnx::to_bytes(&training.model).unwrap(),
    )
    .unwrap();
}
