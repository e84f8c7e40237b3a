//! Builders of ONNX node attributes.

use onnx_protobuf::attribute_proto::AttributeType;
use onnx_protobuf::{AttributeProto, TensorProto};

/// An attribute called `name` of type `kind`, with no value set yet.
fn attribute(name: &str, kind: AttributeType) -> AttributeProto {
    let mut proto = AttributeProto::new();
    proto.name = name.to_owned();
    proto.type_ = kind.into();
    proto
}

/// An integer attribute.
pub fn int_attribute(name: &str, value: i64) -> AttributeProto {
    let mut proto = attribute(name, AttributeType::INT);
    proto.i = value;
    proto
}

/// A float attribute.
pub fn float_attribute(name: &str, value: f32) -> AttributeProto {
    let mut proto = attribute(name, AttributeType::FLOAT);
    proto.f = value;
    proto
}

/// An integer-list attribute.
pub fn ints_attribute(name: &str, values: &[i64]) -> AttributeProto {
    let mut proto = attribute(name, AttributeType::INTS);
    proto.ints = values.to_vec();
    proto
}

/// A string attribute.
pub fn string_attribute(name: &str, value: &str) -> AttributeProto {
    let mut proto = attribute(name, AttributeType::STRING);
    proto.s = value.as_bytes().to_vec();
    proto
}

/// A tensor attribute.
pub fn tensor_attribute(name: &str, tensor: TensorProto) -> AttributeProto {
    let mut proto = attribute(name, AttributeType::TENSOR);
    proto.t = Some(tensor).into();
    proto
}
