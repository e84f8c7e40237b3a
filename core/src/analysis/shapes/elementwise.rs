//! Shape rules of elementwise ops: unary maps, broadcasting arithmetic and comparisons, `Where`,
//! `Cast`, variadic `Max`/`Min`/`Sum`/`Mean`; integer arithmetic on small tensors is folded.

use super::symbolic::{self, broadcast_conflict, broadcast_shapes};
use super::{Fact, OpContext, Rule, RuleTable};
use crate::ir::{DataType, Dim};

/// Unary ops whose output has the input's type and shape.
const SAME_TYPE_UNARY: &[&str] = &[
    "Acos",
    "Acosh",
    "Asin",
    "Asinh",
    "Atan",
    "Atanh",
    "Ceil",
    "Celu",
    "Cos",
    "Cosh",
    "CumSum",
    "Elu",
    "Erf",
    "Exp",
    "Floor",
    "Gelu",
    "HardSigmoid",
    "HardSwish",
    "Hardmax",
    "LeakyRelu",
    "Log",
    "LogSoftmax",
    "Mish",
    "PRelu",
    "Reciprocal",
    "Relu",
    "Round",
    "Selu",
    "Shrink",
    "Sigmoid",
    "Sign",
    "Sin",
    "Sinh",
    "Softmax",
    "Softplus",
    "Softsign",
    "Sqrt",
    "Tan",
    "Tanh",
    "ThresholdedRelu",
    "Trilu",
    "Clip",
    "BitwiseNot",
];

pub(super) fn register(table: &mut RuleTable) {
    for &op in SAME_TYPE_UNARY {
        table.insert(op, same_as_input as Rule);
    }
    table.insert("Identity", identity);
    table.insert("Dropout", dropout);
    table.insert("Neg", negate);
    table.insert("Abs", absolute);
    table.insert("Not", not);
    table.insert("IsNaN", is_special);
    table.insert("IsInf", is_special);
    for op in ["Add", "Sub", "Mul", "Div", "Pow", "Mod", "BitShift"] {
        table.insert(op, arithmetic);
    }
    for op in ["BitwiseAnd", "BitwiseOr", "BitwiseXor"] {
        table.insert(op, arithmetic);
    }
    for op in ["Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual"] {
        table.insert(op, comparison);
    }
    for op in ["And", "Or", "Xor"] {
        table.insert(op, logical);
    }
    for op in ["Max", "Min", "Sum", "Mean"] {
        table.insert(op, variadic);
    }
    table.insert("Where", select);
    table.insert("Cast", cast);
    table.insert("CastLike", cast_like);
}

fn same_as_input(context: &OpContext) -> Vec<Fact> {
    vec![Fact::new(
        context.dtype(0),
        context.shape(0).map(<[Dim]>::to_vec),
    )]
}

fn identity(context: &OpContext) -> Vec<Fact> {
    let value = context.value(0).map(<[Dim]>::to_vec);
    vec![same_as_input(context).remove(0).with_value(value)]
}

fn dropout(context: &OpContext) -> Vec<Fact> {
    let shape = context.shape(0).map(<[Dim]>::to_vec);
    vec![
        identity(context).remove(0),
        Fact::new(Some(DataType::Bool), shape),
    ]
}

fn map_value(context: &OpContext, map: fn(&Dim) -> Dim) -> Vec<Fact> {
    let value = context.value(0).map(|v| v.iter().map(map).collect());
    vec![same_as_input(context).remove(0).with_value(value)]
}

fn negate(context: &OpContext) -> Vec<Fact> {
    map_value(context, |d| match d {
        Dim::Fixed(n) => n.checked_neg().map_or(Dim::Unknown, Dim::Fixed),
        _ => Dim::Unknown,
    })
}

fn absolute(context: &OpContext) -> Vec<Fact> {
    map_value(context, |d| match d {
        Dim::Fixed(n) => n.checked_abs().map_or(Dim::Unknown, Dim::Fixed),
        symbol => symbol.clone(),
    })
}

fn not(context: &OpContext) -> Vec<Fact> {
    map_value(context, |d| match d {
        Dim::Fixed(n) => Dim::Fixed(i64::from(*n == 0)),
        _ => Dim::Unknown,
    })
}

fn is_special(context: &OpContext) -> Vec<Fact> {
    vec![Fact::new(
        Some(DataType::Bool),
        context.shape(0).map(<[Dim]>::to_vec),
    )]
}

/// The broadcast shape of every present input, when all their shapes are known. Two inputs whose
/// fixed sizes cannot broadcast are reported as a conflict.
fn broadcast_inputs(context: &OpContext, slots: impl Iterator<Item = usize>) -> Option<Vec<Dim>> {
    let slots: Vec<usize> = slots.collect();
    report_broadcast_conflict(context, &slots);
    let mut shape: Option<Vec<Dim>> = None;
    for slot in slots {
        let input = context.shape(slot)?;
        shape = Some(match shape {
            None => input.to_vec(),
            Some(so_far) => broadcast_shapes(&so_far, input),
        });
    }
    shape
}

/// Reports the first pair of `slots` whose known shapes cannot broadcast.
fn report_broadcast_conflict(context: &OpContext, slots: &[usize]) {
    for (i, &right) in slots.iter().enumerate() {
        for &left in &slots[..i] {
            let (Some(a), Some(b)) = (context.shape(left), context.shape(right)) else {
                continue;
            };
            if let Some((axis, x, y)) = broadcast_conflict(a, b) {
                let reason = format!("sizes {x} and {y} at axis {axis} cannot broadcast");
                context.report_conflict(left, right, reason);
                return;
            }
        }
    }
}

/// Folds a binary elementwise op over two small tensors whose shapes are equal or where one side
/// holds a single element.
fn fold_binary(context: &OpContext, combine: fn(&Dim, &Dim) -> Dim) -> Option<Vec<Dim>> {
    let left = context.value(0)?;
    let right = context.value(1)?;
    let same_shape = context.shape(0)? == context.shape(1)?;
    match (left.len(), right.len()) {
        (1, _) => Some(right.iter().map(|r| combine(&left[0], r)).collect()),
        (_, 1) => Some(left.iter().map(|l| combine(l, &right[0])).collect()),
        _ if same_shape => Some(left.iter().zip(right).map(|(l, r)| combine(l, r)).collect()),
        _ => None,
    }
}

fn arithmetic(context: &OpContext) -> Vec<Fact> {
    let dtype = context.dtype(0).or_else(|| context.dtype(1));
    let shape = broadcast_inputs(context, 0..2);
    let combine: Option<fn(&Dim, &Dim) -> Dim> = match context.node.op_type.as_str() {
        "Add" => Some(symbolic::add),
        "Sub" => Some(symbolic::sub),
        "Mul" => Some(symbolic::mul),
        "Div" => Some(symbolic::div),
        _ => None,
    };
    let integer = dtype.is_some_and(|t| !t.is_float());
    let value = combine
        .filter(|_| integer)
        .and_then(|combine| fold_binary(context, combine));
    vec![Fact::new(dtype, shape).with_value(value)]
}

fn compare(op_type: &str, left: &Dim, right: &Dim) -> Dim {
    let truth = |b: bool| Dim::Fixed(i64::from(b));
    match (left, right) {
        (Dim::Fixed(l), Dim::Fixed(r)) => truth(match op_type {
            "Equal" => l == r,
            "Less" => l < r,
            "LessOrEqual" => l <= r,
            "Greater" => l > r,
            _ => l >= r,
        }),
        (Dim::Symbol(_), Dim::Symbol(_)) if left == right => truth(matches!(
            op_type,
            "Equal" | "LessOrEqual" | "GreaterOrEqual"
        )),
        (Dim::Symbol(_), Dim::Fixed(r)) if *r < 0 => {
            truth(matches!(op_type, "Greater" | "GreaterOrEqual"))
        }
        (Dim::Fixed(l), Dim::Symbol(_)) if *l < 0 => {
            truth(matches!(op_type, "Less" | "LessOrEqual"))
        }
        _ => Dim::Unknown,
    }
}

fn comparison(context: &OpContext) -> Vec<Fact> {
    let shape = broadcast_inputs(context, 0..2);
    let value = match context.node.op_type.as_str() {
        "Equal" => fold_binary(context, |l, r| compare("Equal", l, r)),
        "Less" => fold_binary(context, |l, r| compare("Less", l, r)),
        "LessOrEqual" => fold_binary(context, |l, r| compare("LessOrEqual", l, r)),
        "Greater" => fold_binary(context, |l, r| compare("Greater", l, r)),
        _ => fold_binary(context, |l, r| compare("GreaterOrEqual", l, r)),
    };
    vec![Fact::new(Some(DataType::Bool), shape).with_value(value)]
}

fn logical(context: &OpContext) -> Vec<Fact> {
    let shape = broadcast_inputs(context, 0..2);
    let combine: fn(&Dim, &Dim) -> Dim = match context.node.op_type.as_str() {
        "And" => |l, r| match (l, r) {
            (Dim::Fixed(0), _) | (_, Dim::Fixed(0)) => Dim::Fixed(0),
            (Dim::Fixed(_), Dim::Fixed(_)) => Dim::Fixed(1),
            _ => Dim::Unknown,
        },
        "Or" => |l, r| match (l, r) {
            (Dim::Fixed(a), _) | (_, Dim::Fixed(a)) if *a != 0 => Dim::Fixed(1),
            (Dim::Fixed(_), Dim::Fixed(_)) => Dim::Fixed(0),
            _ => Dim::Unknown,
        },
        _ => |l, r| match (l, r) {
            (Dim::Fixed(a), Dim::Fixed(b)) => Dim::Fixed(i64::from((*a != 0) != (*b != 0))),
            _ => Dim::Unknown,
        },
    };
    let value = fold_binary(context, combine);
    vec![Fact::new(Some(DataType::Bool), shape).with_value(value)]
}

fn variadic(context: &OpContext) -> Vec<Fact> {
    let n_inputs = context.node.inputs.len();
    let dtype = (0..n_inputs).find_map(|slot| context.dtype(slot));
    let shape = broadcast_inputs(context, 0..n_inputs);
    let value = match (context.node.op_type.as_str(), n_inputs) {
        ("Max", 2) => fold_binary(context, symbolic::max),
        ("Min", 2) => fold_binary(context, symbolic::min),
        ("Sum", 2) => fold_binary(context, symbolic::add),
        (_, 1) => context.value(0).map(<[Dim]>::to_vec),
        _ => None,
    };
    let integer = dtype.is_some_and(|t| !t.is_float());
    vec![Fact::new(dtype, shape).with_value(value.filter(|_| integer))]
}

fn select(context: &OpContext) -> Vec<Fact> {
    let dtype = context.dtype(1).or_else(|| context.dtype(2));
    let shape = broadcast_inputs(context, 0..3);
    let value = (|| {
        let condition = context.value(0)?;
        let when_true = context.value(1)?;
        let when_false = context.value(2)?;
        let length = condition.len().max(when_true.len()).max(when_false.len());
        let pick = |values: &[Dim], i: usize| -> Option<Dim> {
            match values.len() {
                1 => Some(values[0].clone()),
                n if n == length => Some(values[i].clone()),
                _ => None,
            }
        };
        (0..length)
            .map(|i| match pick(condition, i)? {
                Dim::Fixed(0) => pick(when_false, i),
                Dim::Fixed(_) => pick(when_true, i),
                _ => Some(Dim::Unknown),
            })
            .collect::<Option<Vec<Dim>>>()
    })();
    vec![Fact::new(dtype, shape).with_value(value)]
}

fn converted_value(context: &OpContext, target: Option<DataType>) -> Option<Vec<Dim>> {
    let source = context.dtype(0)?;
    let target = target?;
    if source.is_float() || target.is_float() {
        return None;
    }
    let value = context.value(0)?;
    Some(match target {
        DataType::Bool => value
            .iter()
            .map(|d| match d {
                Dim::Fixed(n) => Dim::Fixed(i64::from(*n != 0)),
                _ => Dim::Unknown,
            })
            .collect(),
        _ => value.to_vec(),
    })
}

fn cast(context: &OpContext) -> Vec<Fact> {
    let code = context.node.attr_int("to", 0);
    let dtype = i32::try_from(code).ok().and_then(DataType::from_code);
    let value = converted_value(context, dtype);
    vec![Fact::new(dtype, context.shape(0).map(<[Dim]>::to_vec)).with_value(value)]
}

fn cast_like(context: &OpContext) -> Vec<Fact> {
    let dtype = context.dtype(1);
    let value = converted_value(context, dtype);
    vec![Fact::new(dtype, context.shape(0).map(<[Dim]>::to_vec)).with_value(value)]
}
