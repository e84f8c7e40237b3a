//! Shape rules of ops that create tensors: `Constant`, `ConstantOfShape`, `Shape`, `Size`,
//! `Range`, `EyeLike`. `Shape` is where symbolic dimensions enter integer arithmetic.

use onnx_protobuf::TensorProto;

use super::{
    fixed_size, integer_elements, symbolic, unknown_dims, Fact, OpContext, RuleTable,
    MAX_FOLDED_ELEMENTS,
};
use crate::ir::{DataType, Dim};

pub(super) fn register(table: &mut RuleTable) {
    table.insert("Constant", constant);
    table.insert("ConstantOfShape", constant_of_shape);
    table.insert("Shape", shape_of);
    table.insert("Size", size_of);
    table.insert("Range", range);
    table.insert("EyeLike", eye_like);
}

/// The fact of a tensor stored in an attribute: its type and dims, and its values when small and
/// integer.
fn tensor_proto_fact(proto: &TensorProto) -> Fact {
    let dtype = DataType::from_code(proto.data_type);
    let shape: Vec<Dim> = proto.dims.iter().map(|&d| Dim::Fixed(d)).collect();
    let small = fixed_size(&shape).is_some_and(|n| n <= MAX_FOLDED_ELEMENTS);
    let value = match dtype {
        Some(dtype) if small && !proto.raw_data.is_empty() => {
            integer_elements(dtype, Some(&proto.raw_data))
        }
        Some(DataType::Int64) if small => {
            Some(proto.int64_data.iter().map(|&v| Dim::Fixed(v)).collect())
        }
        Some(DataType::Int32 | DataType::Int8 | DataType::Uint8 | DataType::Bool) if small => Some(
            proto
                .int32_data
                .iter()
                .map(|&v| Dim::Fixed(i64::from(v)))
                .collect(),
        ),
        _ => None,
    };
    Fact::new(dtype, Some(shape)).with_value(value)
}

fn constant(context: &OpContext) -> Vec<Fact> {
    let node = context.node;
    let fact = if let Some(proto) = node.attribute("value").and_then(|a| a.t.as_ref()) {
        tensor_proto_fact(proto)
    } else if let Some(attribute) = node.attribute("value_int") {
        Fact::new(Some(DataType::Int64), Some(Vec::new()))
            .with_value(Some(vec![Dim::Fixed(attribute.i)]))
    } else if let Some(values) = node.attr_ints("value_ints") {
        Fact::new(
            Some(DataType::Int64),
            Some(vec![Dim::Fixed(values.len() as i64)]),
        )
        .with_value(Some(values.iter().map(|&v| Dim::Fixed(v)).collect()))
    } else if node.attribute("value_float").is_some() {
        Fact::new(Some(DataType::Float), Some(Vec::new()))
    } else if let Some(attribute) = node.attribute("value_floats") {
        Fact::new(
            Some(DataType::Float),
            Some(vec![Dim::Fixed(attribute.floats.len() as i64)]),
        )
    } else if node.attribute("value_string").is_some() {
        Fact::new(Some(DataType::String), Some(Vec::new()))
    } else if let Some(attribute) = node.attribute("value_strings") {
        Fact::new(
            Some(DataType::String),
            Some(vec![Dim::Fixed(attribute.strings.len() as i64)]),
        )
    } else {
        Fact::unknown()
    };
    vec![fact]
}

fn constant_of_shape(context: &OpContext) -> Vec<Fact> {
    let fill = context
        .node
        .attribute("value")
        .and_then(|a| a.t.as_ref())
        .map(tensor_proto_fact);
    let dtype = fill
        .as_ref()
        .map_or(Some(DataType::Float), |f| f.value_type.dtype);
    let shape = context
        .value(0)
        .map(<[Dim]>::to_vec)
        .or_else(|| match context.shape(0)? {
            [Dim::Fixed(n)] => unknown_dims(*n),
            _ => None,
        });
    let fill_element = match &fill {
        None => None,
        Some(fact) => fact.value.as_ref().and_then(|v| v.first().cloned()),
    };
    let value = shape
        .as_deref()
        .and_then(fixed_size)
        .filter(|&n| n <= MAX_FOLDED_ELEMENTS)
        .zip(fill_element)
        .map(|(n, element)| vec![element; n]);
    vec![Fact::new(dtype, shape).with_value(value)]
}

fn shape_of(context: &OpContext) -> Vec<Fact> {
    let Some(input) = context.shape(0) else {
        return vec![Fact::new(Some(DataType::Int64), Some(vec![Dim::Unknown]))];
    };
    let rank = input.len();
    let clamp = |bound: i64| -> usize {
        let rank_signed = rank as i64;
        let bound = if bound < 0 {
            bound.saturating_add(rank_signed)
        } else {
            bound
        };
        bound.clamp(0, rank_signed) as usize
    };
    let start = clamp(context.node.attr_int("start", 0));
    let end = clamp(context.node.attr_int("end", rank as i64));
    let dims = input.get(start..end.max(start)).unwrap_or(&[]).to_vec();
    vec![Fact::new(
        Some(DataType::Int64),
        Some(vec![Dim::Fixed(dims.len() as i64)]),
    )
    .with_value(Some(dims))]
}

fn size_of(context: &OpContext) -> Vec<Fact> {
    let value = context.shape(0).map(|s| vec![symbolic::product(s)]);
    vec![Fact::new(Some(DataType::Int64), Some(Vec::new())).with_value(value)]
}

fn scalar(context: &OpContext, slot: usize) -> Option<Dim> {
    match context.value(slot)? {
        [single] => Some(single.clone()),
        _ => None,
    }
}

fn range(context: &OpContext) -> Vec<Fact> {
    let dtype = context.dtype(0);
    let integer = dtype.is_some_and(|t| !t.is_float());
    let bounds = (scalar(context, 0), scalar(context, 1), scalar(context, 2));
    let (length, value) = match bounds {
        (Some(Dim::Fixed(start)), Some(Dim::Fixed(limit)), Some(Dim::Fixed(delta)))
            if integer && delta != 0 =>
        {
            let span = i128::from(limit) - i128::from(start);
            let delta_wide = i128::from(delta);
            let count = if (span > 0) == (delta > 0) && span != 0 {
                (span + delta_wide - delta_wide.signum()) / delta_wide
            } else {
                0
            };
            let count = i64::try_from(count).unwrap_or(i64::MAX);
            let value = usize::try_from(count)
                .ok()
                .filter(|&n| n <= MAX_FOLDED_ELEMENTS)
                .map(|n| {
                    (0..n as i64)
                        .map(|i| {
                            i.checked_mul(delta)
                                .and_then(|offset| start.checked_add(offset))
                                .map_or(Dim::Unknown, Dim::Fixed)
                        })
                        .collect()
                });
            (Dim::Fixed(count.max(0)), value)
        }
        (Some(start), Some(limit), Some(Dim::Fixed(1))) if integer => {
            (symbolic::sub(&limit, &start), None)
        }
        _ => (Dim::Unknown, None),
    };
    vec![Fact::new(dtype, Some(vec![length])).with_value(value)]
}

fn eye_like(context: &OpContext) -> Vec<Fact> {
    let dtype = match context.node.attribute("dtype") {
        Some(attribute) => i32::try_from(attribute.i)
            .ok()
            .and_then(DataType::from_code),
        None => context.dtype(0),
    };
    let shape = context.shape(0).map(<[Dim]>::to_vec);
    vec![Fact::new(dtype, shape)]
}
