//! Shape rules of data-movement ops: `Reshape`, `Flatten`, `Transpose`, `Concat`, `Split`,
//! `Slice`, `Squeeze`, `Unsqueeze`, `Gather`, `GatherND`, `GatherElements`, `Expand`, `Tile`.
//! Values of small integer tensors move with their elements.

use super::symbolic::{self, broadcast_shapes};
use super::{
    fixed_size, normalize_axis, unknown_dims, Fact, OpContext, RuleTable, MAX_FOLDED_ELEMENTS,
};
use crate::ir::Dim;

/// Slice bounds at or beyond this mean "to the end" (exporters write `i64::MAX` or `INT_MAX`).
const TO_THE_END: i64 = i32::MAX as i64;

pub(super) fn register(table: &mut RuleTable) {
    table.insert("Reshape", reshape);
    table.insert("Flatten", flatten);
    table.insert("Transpose", transpose);
    table.insert("Concat", concat);
    table.insert("Split", split);
    table.insert("Slice", slice);
    table.insert("Squeeze", squeeze);
    table.insert("Unsqueeze", unsqueeze);
    table.insert("Gather", gather);
    table.insert("GatherND", gather_nd);
    table.insert("GatherElements", gather_elements);
    table.insert("Expand", expand);
    table.insert("Tile", tile);
}

/// Output 0 with the input's type, the given shape, and the input's elements (order preserved).
fn moved(context: &OpContext, shape: Option<Vec<Dim>>) -> Vec<Fact> {
    let value = context.value(0).map(<[Dim]>::to_vec);
    vec![Fact::new(context.dtype(0), shape).with_value(value)]
}

fn reshape(context: &OpContext) -> Vec<Fact> {
    let allow_zero = context.node.attr_int("allowzero", 0) != 0;
    let input = context.shape(0);
    let target: Option<Vec<Dim>> = match context.value(1) {
        Some(target) => Some(target.to_vec()),
        None => match context.shape(1) {
            Some([Dim::Fixed(n)]) => unknown_dims(*n),
            _ => None,
        },
    };
    let shape = target.map(|target| {
        let mut shape: Vec<Dim> = target
            .iter()
            .enumerate()
            .map(|(i, dim)| match dim {
                Dim::Fixed(0) if !allow_zero => input
                    .and_then(|input| input.get(i).cloned())
                    .unwrap_or(Dim::Unknown),
                other => other.clone(),
            })
            .collect();
        if let Some(inferred) = shape.iter().position(|d| *d == Dim::Fixed(-1)) {
            let known = symbolic::product(
                shape
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| *i != inferred)
                    .map(|(_, d)| d),
            );
            shape[inferred] = match input {
                Some(input) => symbolic::div(&symbolic::product(input), &known),
                None => Dim::Unknown,
            };
        }
        shape
    });
    moved(context, shape)
}

fn flatten(context: &OpContext) -> Vec<Fact> {
    let shape = context.shape(0).and_then(|input| {
        let axis = context.node.attr_int("axis", 1);
        let rank = input.len() as i64;
        let axis = if axis < 0 {
            axis.checked_add(rank)?
        } else {
            axis
        };
        let axis = usize::try_from(axis).ok().filter(|&a| a <= input.len())?;
        Some(vec![
            symbolic::product(&input[..axis]),
            symbolic::product(&input[axis..]),
        ])
    });
    moved(context, shape)
}

fn transpose(context: &OpContext) -> Vec<Fact> {
    let shape = context.shape(0).and_then(|input| {
        let permutation: Vec<i64> = match context.node.attr_ints("perm") {
            Some(perm) => perm.to_vec(),
            None => (0..input.len() as i64).rev().collect(),
        };
        permutation
            .iter()
            .map(|&axis| normalize_axis(axis, input.len()).map(|a| input[a].clone()))
            .collect::<Option<Vec<Dim>>>()
    });
    let rank = context.rank(0);
    let mut facts = moved(context, shape);
    if rank.is_none_or(|r| r > 1) {
        facts[0].value = None;
    }
    facts
}

/// Reports the first two inputs of a `Concat` whose known shapes cannot be joined: ranks that
/// differ, or fixed sizes that differ on an axis other than the concatenation axis.
fn report_concat_conflict(context: &OpContext) {
    let shapes: Vec<(usize, &[Dim])> = (0..context.node.inputs.len())
        .filter_map(|slot| Some((slot, context.shape(slot)?)))
        .collect();
    for (i, &(right, b)) in shapes.iter().enumerate() {
        for &(left, a) in &shapes[..i] {
            if a.len() != b.len() {
                let reason = format!("ranks {} and {} differ", a.len(), b.len());
                return context.report_conflict(left, right, reason);
            }
            let Some(axis) = normalize_axis(context.node.attr_int("axis", 0), a.len()) else {
                return;
            };
            let differing =
                (0..a.len())
                    .filter(|&d| d != axis)
                    .find_map(|d| match (&a[d], &b[d]) {
                        (Dim::Fixed(x), Dim::Fixed(y)) if x != y => Some((d, x, y)),
                        _ => None,
                    });
            if let Some((d, x, y)) = differing {
                let reason = format!(
                    "sizes {x} and {y} differ at axis {d} (the concatenation axis is {axis})"
                );
                return context.report_conflict(left, right, reason);
            }
        }
    }
}

fn concat(context: &OpContext) -> Vec<Fact> {
    let n_inputs = context.node.inputs.len();
    let dtype = (0..n_inputs).find_map(|slot| context.dtype(slot));
    report_concat_conflict(context);
    let shapes: Option<Vec<&[Dim]>> = (0..n_inputs).map(|slot| context.shape(slot)).collect();
    let shape: Option<Vec<Dim>> = shapes.and_then(|shapes| {
        let rank = shapes.first()?.len();
        if shapes.iter().any(|s| s.len() != rank) {
            return None;
        }
        let axis = normalize_axis(context.node.attr_int("axis", 0), rank)?;
        Some(
            (0..rank)
                .map(|i| {
                    if i == axis {
                        shapes
                            .iter()
                            .fold(Dim::Fixed(0), |total, s| symbolic::add(&total, &s[i]))
                    } else {
                        shapes
                            .iter()
                            .map(|s| s[i].clone())
                            .reduce(|a, b| symbolic::broadcast_dim(&a, &b))
                            .unwrap_or(Dim::Unknown)
                    }
                })
                .collect(),
        )
    });
    let value = (|| {
        if shape.as_ref()?.len() != 1 {
            return None;
        }
        let mut elements = Vec::new();
        for slot in 0..n_inputs {
            elements.extend_from_slice(context.value(slot)?);
        }
        Some(elements)
    })();
    vec![Fact::new(dtype, shape).with_value(value)]
}

fn split(context: &OpContext) -> Vec<Fact> {
    let n_outputs = context.node.outputs.len();
    let dtype = context.dtype(0);
    let Some(input) = context.shape(0) else {
        return vec![Fact::new(dtype, None); n_outputs];
    };
    let Some(axis) = normalize_axis(context.node.attr_int("axis", 0), input.len()) else {
        return vec![Fact::new(dtype, None); n_outputs];
    };
    let sizes: Vec<Dim> = match context.ints_from_input_or_attribute("split", 1) {
        Some(sizes) => sizes.into_iter().map(Dim::Fixed).collect(),
        None => match &input[axis] {
            Dim::Fixed(total) if n_outputs > 0 => {
                let n = n_outputs as i64;
                let chunk = (total + n - 1) / n;
                (0..n)
                    .map(|i| Dim::Fixed(chunk.min(total - i * chunk).max(0)))
                    .collect()
            }
            _ => vec![Dim::Unknown; n_outputs],
        },
    };
    (0..n_outputs)
        .map(|i| {
            let mut shape = input.to_vec();
            shape[axis] = sizes.get(i).cloned().unwrap_or(Dim::Unknown);
            Fact::new(dtype, Some(shape))
        })
        .collect()
}

/// The length of `dim[start..end:step]`, following ONNX's clamping rules when sizes are fixed
/// and assuming in-range bounds when they are symbolic.
fn sliced_length(dim: &Dim, start: &Dim, end: &Dim, step: i64) -> Dim {
    if step == 0 {
        return Dim::Unknown;
    }
    if let (Dim::Fixed(size), Dim::Fixed(start), Dim::Fixed(end)) = (dim, start, end) {
        let size = *size;
        if size <= 0 {
            return if size == 0 {
                Dim::Fixed(0)
            } else {
                Dim::Unknown
            };
        }
        let resolve = |bound: i64, low: i64, high: i64| {
            let bound = if bound < 0 {
                bound.saturating_add(size)
            } else {
                bound
            };
            bound.clamp(low, high)
        };
        let (start, end) = if step > 0 {
            (resolve(*start, 0, size), resolve(*end, 0, size))
        } else {
            (resolve(*start, 0, size - 1), resolve(*end, -1, size - 1))
        };
        let span = end - start;
        let length = if step > 0 {
            span.checked_add(step - 1).map(|n| n / step)
        } else {
            span.checked_add(step + 1).map(|n| n / step)
        };
        return length.map_or(Dim::Unknown, |n| Dim::Fixed(n.max(0)));
    }
    if step != 1 {
        return Dim::Unknown;
    }
    let resolve = |bound: &Dim| match bound {
        Dim::Fixed(n) if *n >= TO_THE_END => dim.clone(),
        Dim::Fixed(n) if *n < 0 => symbolic::add(dim, bound),
        other => other.clone(),
    };
    symbolic::sub(&symbolic::min(dim, &resolve(end)), &resolve(start))
}

fn slice(context: &OpContext) -> Vec<Fact> {
    let dtype = context.dtype(0);
    let Some(input) = context.shape(0) else {
        return vec![Fact::new(dtype, None)];
    };
    let dims_of = |slot: usize| -> Option<Vec<Dim>> { context.value(slot).map(<[Dim]>::to_vec) };
    let fixed_dims = |values: &[i64]| values.iter().map(|&v| Dim::Fixed(v)).collect::<Vec<_>>();
    let (starts, ends, axes, steps) = if context.opset >= 10 {
        (
            dims_of(1),
            dims_of(2),
            context.has_input(3).then(|| context.fixed_values(3)),
            context.has_input(4).then(|| context.fixed_values(4)),
        )
    } else {
        let node = context.node;
        (
            node.attr_ints("starts").map(fixed_dims),
            node.attr_ints("ends").map(fixed_dims),
            node.attr_ints("axes").map(|a| Some(a.to_vec())),
            None,
        )
    };
    let (Some(starts), Some(ends)) = (starts, ends) else {
        return vec![Fact::new(dtype, Some(vec![Dim::Unknown; input.len()]))];
    };
    let axes: Option<Vec<i64>> = match axes {
        Some(axes) => axes,
        None => Some((0..starts.len() as i64).collect()),
    };
    let steps: Option<Vec<i64>> = match steps {
        Some(steps) => steps,
        None => Some(vec![1; starts.len()]),
    };
    let (Some(axes), Some(steps)) = (axes, steps) else {
        return vec![Fact::new(dtype, Some(vec![Dim::Unknown; input.len()]))];
    };
    let mut shape = input.to_vec();
    for (i, &axis) in axes.iter().enumerate() {
        let (Some(axis), Some(start), Some(end), Some(&step)) = (
            normalize_axis(axis, input.len()),
            starts.get(i),
            ends.get(i),
            steps.get(i),
        ) else {
            return vec![Fact::new(dtype, Some(vec![Dim::Unknown; input.len()]))];
        };
        shape[axis] = sliced_length(&input[axis], start, end, step);
    }
    let value = (|| {
        let elements = context.value(0)?;
        if input.len() != 1 || axes.len() != 1 {
            return None;
        }
        let (Some(Dim::Fixed(start)), Some(Dim::Fixed(end)), Some(&step)) =
            (starts.first(), ends.first(), steps.first())
        else {
            return None;
        };
        let length = elements.len() as i64;
        if step == 0 || length == 0 {
            return (length == 0).then(Vec::new);
        }
        let resolve = |bound: i64| {
            if bound < 0 {
                bound.saturating_add(length)
            } else {
                bound
            }
        };
        let mut picked = Vec::new();
        let mut index = if step > 0 {
            resolve(*start).clamp(0, length)
        } else {
            resolve(*start).clamp(0, length - 1)
        };
        let stop = if step > 0 {
            resolve(*end).clamp(0, length)
        } else {
            resolve(*end).clamp(-1, length - 1)
        };
        while (step > 0 && index < stop) || (step < 0 && index > stop) {
            picked.push(elements.get(usize::try_from(index).ok()?)?.clone());
            index = index.checked_add(step)?;
        }
        Some(picked)
    })();
    vec![Fact::new(dtype, Some(shape)).with_value(value)]
}

fn squeeze(context: &OpContext) -> Vec<Fact> {
    let shape = context.shape(0).and_then(|input| {
        let axes = if context.opset >= 13 {
            if context.has_input(1) {
                Some(context.fixed_values(1)?)
            } else {
                None
            }
        } else {
            context.node.attr_ints("axes").map(<[i64]>::to_vec)
        };
        match axes {
            Some(axes) => {
                let removed: Vec<usize> = axes
                    .iter()
                    .map(|&a| normalize_axis(a, input.len()))
                    .collect::<Option<_>>()?;
                Some(
                    input
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| !removed.contains(i))
                        .map(|(_, d)| d.clone())
                        .collect(),
                )
            }
            None => Some(
                input
                    .iter()
                    .filter(|d| **d != Dim::Fixed(1))
                    .cloned()
                    .collect(),
            ),
        }
    });
    moved(context, shape)
}

fn unsqueeze(context: &OpContext) -> Vec<Fact> {
    let shape = context.shape(0).and_then(|input| {
        let axes = if context.opset >= 13 {
            context.fixed_values(1)?
        } else {
            context.node.attr_ints("axes")?.to_vec()
        };
        let rank = input.len() + axes.len();
        let mut inserted: Vec<usize> = axes
            .iter()
            .map(|&a| normalize_axis(a, rank))
            .collect::<Option<_>>()?;
        inserted.sort_unstable();
        let mut remaining = input.iter();
        (0..rank)
            .map(|i| {
                if inserted.contains(&i) {
                    Some(Dim::Fixed(1))
                } else {
                    remaining.next().cloned()
                }
            })
            .collect::<Option<Vec<Dim>>>()
    });
    moved(context, shape)
}

fn gather(context: &OpContext) -> Vec<Fact> {
    let dtype = context.dtype(0);
    let (Some(data), Some(indices)) = (context.shape(0), context.shape(1)) else {
        return vec![Fact::new(dtype, None)];
    };
    let Some(axis) = normalize_axis(context.node.attr_int("axis", 0), data.len()) else {
        return vec![Fact::new(dtype, None)];
    };
    let mut shape = data[..axis].to_vec();
    shape.extend_from_slice(indices);
    shape.extend_from_slice(&data[axis + 1..]);
    let value = (|| {
        let elements = context.value(0)?;
        if data.len() != 1 {
            return None;
        }
        let length = elements.len() as i64;
        context
            .fixed_values(1)?
            .into_iter()
            .map(|i| {
                let i = if i < 0 { i + length } else { i };
                elements.get(usize::try_from(i).ok()?).cloned()
            })
            .collect::<Option<Vec<Dim>>>()
    })();
    vec![Fact::new(dtype, Some(shape)).with_value(value)]
}

fn gather_nd(context: &OpContext) -> Vec<Fact> {
    let dtype = context.dtype(0);
    let shape = (|| {
        let data = context.shape(0)?;
        let indices = context.shape(1)?;
        let batch_dims = usize::try_from(context.node.attr_int("batch_dims", 0)).ok()?;
        let Dim::Fixed(depth) = indices.last()? else {
            return None;
        };
        let depth = usize::try_from(*depth).ok()?;
        let mut shape = indices[..indices.len() - 1].to_vec();
        shape.extend_from_slice(data.get(batch_dims + depth..)?);
        Some(shape)
    })();
    vec![Fact::new(dtype, shape)]
}

fn gather_elements(context: &OpContext) -> Vec<Fact> {
    vec![Fact::new(
        context.dtype(0),
        context.shape(1).map(<[Dim]>::to_vec),
    )]
}

fn expand(context: &OpContext) -> Vec<Fact> {
    let dtype = context.dtype(0);
    let target: Option<Vec<Dim>> = match context.value(1) {
        Some(target) => Some(target.to_vec()),
        None => match context.shape(1) {
            Some([Dim::Fixed(n)]) => unknown_dims(*n),
            _ => None,
        },
    };
    let shape = context
        .shape(0)
        .zip(target)
        .map(|(input, target)| broadcast_shapes(input, &target));
    let value = (|| {
        let element = match context.value(0)? {
            [single] => single.clone(),
            _ => return None,
        };
        let n = fixed_size(shape.as_ref()?)?;
        (n <= MAX_FOLDED_ELEMENTS).then(|| vec![element; n])
    })();
    vec![Fact::new(dtype, shape).with_value(value)]
}

fn tile(context: &OpContext) -> Vec<Fact> {
    let shape = context
        .shape(0)
        .zip(context.value(1))
        .filter(|(input, repeats)| input.len() == repeats.len())
        .map(|(input, repeats)| {
            input
                .iter()
                .zip(repeats)
                .map(|(dim, repeat)| symbolic::mul(dim, repeat))
                .collect()
        });
    vec![Fact::new(context.dtype(0), shape)]
}
