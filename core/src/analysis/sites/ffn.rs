//! Feed-forward blocks by shape: a down projection whose input is computed pointwise from the
//! output of one linear through an activation (up → act → down), or from two linears reading the
//! same input, one activated and one not, joined by a product (gate, up → act(gate) · up → down).

use std::collections::HashSet;

use super::attention::AttentionCore;
use super::context::Context;
use super::linear::Linears;

/// One feed-forward block, as indices into [`Linears::all`].
#[derive(Clone, Debug)]
pub(super) struct Ffn {
    pub up: usize,
    pub gate: Option<usize>,
    pub down: usize,
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
        let activated: HashSet<usize> = reached.iter().filter(|r| r.1).map(|r| r.0).collect();
        let all: HashSet<usize> = reached.iter().map(|r| r.0).collect();
        if activated.len() != 1 || all.iter().any(|l| used.contains(l)) {
            continue;
        }
        let Some(&activated_linear) = activated.iter().next() else {
            continue;
        };
        let others: Vec<usize> = all
            .iter()
            .copied()
            .filter(|&l| l != activated_linear)
            .collect();
        let (up, gate) = match others[..] {
            [] => (activated_linear, None),
            [plain] => {
                let same_input = context.source_of(&linears.all[plain].input)
                    == context.source_of(&linears.all[activated_linear].input);
                if !same_input {
                    continue;
                }
                (plain, Some(activated_linear))
            }
            _ => continue,
        };
        let up_linear = &linears.all[up];
        if up_linear.in_features != down_linear.out_features
            || up_linear.out_features != down_linear.in_features
        {
            continue;
        }
        used.insert(up);
        used.insert(down);
        used.extend(gate);
        ffns.push(Ffn { up, gate, down });
    }
    ffns
}

/// The linears whose outputs reach `value` through pointwise ops only, each with whether the
/// path crossed a nonlinearity. A linear reached both ways appears twice.
fn activation_sources(context: &Context, linears: &Linears, value: &str) -> Vec<(usize, bool)> {
    let mut found = Vec::new();
    let mut pending = vec![(value, false)];
    let mut visited = HashSet::new();
    while let Some((current, activated)) = pending.pop() {
        if visited.len() > 64 || !visited.insert((current, activated)) {
            continue;
        }
        if let Some(linear) = linears.producing(current) {
            if !found.contains(&(linear, activated)) {
                found.push((linear, activated));
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
