//! Feed-forward blocks by shape: a down projection whose input is computed pointwise from the
//! output of one linear through an activation (up → act → down), from two linears reading the
//! same input, one activated and one not, joined by a product (gate, up → act(gate) · up →
//! down), or from two runs of columns of one linear's output, split apart and joined the same
//! way (gate_up → act(gate) · up → down, Phi-3's fused `gate_up_proj`).

use std::collections::HashSet;
use std::ops::Range;

use super::attention::AttentionCore;
use super::context::Context;
use super::linear::{output_columns, Linears};

/// One feed-forward block, as indices into [`Linears::all`].
#[derive(Clone, Debug)]
pub(super) struct Ffn {
    /// The up projection; for a fused gate/up projection, the fused linear.
    pub up: usize,
    pub gate: Option<usize>,
    pub down: usize,
    /// For a fused gate/up projection, which of its output columns are the gate and which the up
    /// half.
    pub fused_halves: Option<FusedHalves>,
}

/// The output columns of a fused gate/up projection that form each half.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct FusedHalves {
    pub gate: Range<usize>,
    pub up: Range<usize>,
}

/// Where a value on the way into a down projection comes from: a linear's whole output, or a run
/// of its output columns.
#[derive(Clone, Debug, PartialEq)]
struct Source {
    linear: usize,
    columns: Option<Range<usize>>,
}

/// Pointwise arithmetic and reshaping ops that may sit inside an activation or a gating product
/// without, on their own, marking the path as activated.
const ARITHMETIC_OPS: &[&str] = &[
    "Mul", "Add", "Sub", "Div", "Pow", "Neg", "Cast", "Identity", "Dropout", "Reshape", "Flatten",
];

/// The pointwise ops that make a path nonlinear.
const NONLINEAR_OPS: &[&str] = &[
    "Gelu",
    "Relu",
    "Erf",
    "Tanh",
    "Sigmoid",
    "Softplus",
    "Elu",
    "Selu",
    "LeakyRelu",
    "PRelu",
    "HardSigmoid",
    "HardSwish",
    "Mish",
    "Celu",
    "Clip",
    "Exp",
    "Log",
];

pub(super) fn find_ffns(context: &Context, linears: &Linears, cores: &[AttentionCore]) -> Vec<Ffn> {
    let attention: HashSet<usize> = cores
        .iter()
        .flat_map(|c| [c.query, c.key, c.value].into_iter().chain(c.output))
        .collect();
    let mut used = attention.clone();
    let mut ffns = Vec::new();
    for (down, down_linear) in linears.all.iter().enumerate() {
        if used.contains(&down) {
            continue;
        }
        let reached = activation_sources(context, linears, &down_linear.input);
        let mut activated: Vec<&Source> = Vec::new();
        let mut all: Vec<&Source> = Vec::new();
        for (source, is_activated) in &reached {
            if *is_activated && !activated.contains(&source) {
                activated.push(source);
            }
            if !all.contains(&source) {
                all.push(source);
            }
        }
        if activated.len() != 1 || all.iter().any(|s| used.contains(&s.linear)) {
            continue;
        }
        let activated_source = activated[0];
        let others: Vec<&Source> = all
            .iter()
            .copied()
            .filter(|&s| s != activated_source)
            .collect();
        let Some(ffn) = ffn_of(context, linears, down, activated_source, &others) else {
            continue;
        };
        used.insert(ffn.up);
        used.insert(ffn.down);
        used.extend(ffn.gate);
        ffns.push(ffn);
    }
    ffns
}

/// The feed-forward block ending in the linear `down`, whose input is computed from `activated`
/// through an activation and from `others` without one, if their shapes make one.
fn ffn_of(
    context: &Context,
    linears: &Linears,
    down: usize,
    activated: &Source,
    others: &[&Source],
) -> Option<Ffn> {
    let down_linear = &linears.all[down];
    let (up, gate, fused_halves) = match (others, &activated.columns) {
        ([], None) => (activated.linear, None, None),
        ([plain], None) if plain.columns.is_none() => {
            let same_input = context.source_of(&linears.all[plain.linear].input)
                == context.source_of(&linears.all[activated.linear].input);
            if !same_input {
                return None;
            }
            (plain.linear, Some(activated.linear), None)
        }
        ([plain], Some(gate_columns)) if plain.linear == activated.linear => {
            let up_columns = plain.columns.clone()?;
            let width = linears.all[activated.linear].out_features;
            let halves_tile_the_output = gate_columns.len() == up_columns.len()
                && gate_columns.len() + up_columns.len() == width
                && (gate_columns.end == up_columns.start || up_columns.end == gate_columns.start);
            if !halves_tile_the_output {
                return None;
            }
            let halves = FusedHalves {
                gate: gate_columns.clone(),
                up: up_columns,
            };
            (activated.linear, None, Some(halves))
        }
        _ => return None,
    };
    let up_linear = &linears.all[up];
    let up_width = fused_halves
        .as_ref()
        .map_or(up_linear.out_features, |h| h.up.len());
    if up_linear.in_features != down_linear.out_features || up_width != down_linear.in_features {
        return None;
    }
    Some(Ffn {
        up,
        gate,
        down,
        fused_halves,
    })
}

/// The sources whose values reach `value` through pointwise ops only, each with whether the
/// path crossed a nonlinearity: linears, and runs of a linear's output columns a `Slice` or
/// `Split` took. A source reached both ways appears twice.
fn activation_sources(context: &Context, linears: &Linears, value: &str) -> Vec<(Source, bool)> {
    let mut found = Vec::new();
    let mut pending = vec![(value, false)];
    let mut visited = HashSet::new();
    while let Some((current, activated)) = pending.pop() {
        if visited.len() > 64 || !visited.insert((current, activated)) {
            continue;
        }
        let source = match linears.producing(current) {
            Some(linear) => Some(Source {
                linear,
                columns: None,
            }),
            None => output_columns(context, linears, current).map(|(linear, columns)| Source {
                linear,
                columns: Some(columns),
            }),
        };
        if let Some(source) = source {
            let entry = (source, activated);
            if !found.contains(&entry) {
                found.push(entry);
            }
            continue;
        }
        let Some((position, node)) = context.producer(current) else {
            continue;
        };
        let op = node.op_type.as_str();
        if !ARITHMETIC_OPS.contains(&op) && !NONLINEAR_OPS.contains(&op) {
            continue;
        }
        let activated = activated || NONLINEAR_OPS.contains(&op);
        if matches!(op, "Reshape" | "Flatten") {
            pending.extend(node.input(0).map(|input| (input, activated)));
        } else {
            pending.extend(
                context
                    .dynamic_inputs(position)
                    .map(|input| (input, activated)),
            );
        }
    }
    found
}
