//! `lokr`: `y + x · ΔWᵀ` with `ΔW = (W₁ ⊗ W₂) · α/r`, the Kronecker product of a
//! `[out_l, in_m]` and an `[out_k, in_n]` factor (`out = out_l·out_k`, `in = in_m·in_n`, each
//! split near its square root or by `decompose_factor`, as PEFT's `factorization` does).
//!
//! As in PEFT, `W₂` is a rank-`r` product `lokr_w2_a · lokr_w2_b` when `r < max(out_k, in_n)/2`
//! and a full `lokr_w2` otherwise; `W₁` is full (`lokr_w1`) unless `decompose_both` and
//! `r < max(out_l, in_m)/2` make it `lokr_w1_a · lokr_w1_b`. PEFT's init: `W₁` (or `lokr_w1_a`)
//! zero, the rest Kaiming-uniform with `a = √5`, so the model is unchanged at init.

use graft_plugin_sdk::{
    ConfigKey, DType, GraphView, Host, Init, MethodConfig, MethodDescription, PatchBuilder,
    PatchReply, PeftFiles, PeftTensor, Site,
};

use crate::{peft_config, peft_import, shared_keys, targets};

/// Every tensor name a LoKr module may have.
const FACTORS: [&str; 6] = [
    "lokr_w1",
    "lokr_w1_a",
    "lokr_w1_b",
    "lokr_w2",
    "lokr_w2_a",
    "lokr_w2_b",
];

/// The `lokr` method's description.
pub fn description() -> MethodDescription {
    let mut keys: Vec<ConfigKey> = shared_keys();
    keys.push(ConfigKey::bool(
        "decompose_both",
        false,
        "also factor the first Kronecker factor into rank-r matrices (when r < max(its dims)/2)",
    ));
    keys.push(ConfigKey::int(
        "decompose_factor",
        -1,
        "split each dimension as factor × rest when factor divides it (-1: near the square root)",
    ));
    MethodDescription::new(
        "lokr",
        "low-rank Kronecker product: y + x·ΔWᵀ, ΔW = W1 ⊗ (W2a·W2b)·alpha/r on the selected linear sites",
        keys,
    )
    .with_peft_import(peft_import(
        "LOKR",
        &["decompose_both", "decompose_factor"],
        &FACTORS,
    ))
}

/// PEFT's `factorization(dimension, factor)`: `(m, n)` with `m · n = dimension` and `m ≤ n`;
/// `factor` when it is positive and divides `dimension`, otherwise the divisor pair nearest the
/// square root (with `factor > 0`: among divisors not above `factor`).
pub fn factorization(dimension: usize, factor: i64) -> (usize, usize) {
    if factor > 0 && dimension.is_multiple_of(factor as usize) {
        let m = factor as usize;
        return (m, dimension / m);
    }
    let limit = if factor == -1 {
        dimension
    } else {
        factor.max(0) as usize
    };
    let (mut m, mut n) = (1, dimension);
    let length = m + n;
    while m < n {
        let mut new_m = m + 1;
        while !dimension.is_multiple_of(new_m) {
            new_m += 1;
        }
        let new_n = dimension / new_m;
        if new_m + new_n > length || new_m > limit {
            break;
        }
        (m, n) = (new_m, new_n);
    }
    if m > n {
        (n, m)
    } else {
        (m, n)
    }
}

/// The shape of one module's update: `((out_l, out_k), (in_m, in_n))` and which factors are
/// full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// `(out_l, out_k)`.
    pub out: (usize, usize),
    /// `(in_m, in_n)`.
    pub input: (usize, usize),
    /// `W₁` is one full matrix.
    pub full_w1: bool,
    /// `W₂` is one full matrix.
    pub full_w2: bool,
}

impl Layout {
    /// PEFT's layout for a `[out, in]` linear layer of rank `r`.
    pub fn new(n_out: usize, n_in: usize, r: usize, decompose_both: bool, factor: i64) -> Layout {
        let (in_m, in_n) = factorization(n_in, factor);
        let (out_l, out_k) = factorization(n_out, factor);
        let below_half = |a: usize, b: usize| (r as f64) < a.max(b) as f64 / 2.0;
        Layout {
            out: (out_l, out_k),
            input: (in_m, in_n),
            full_w1: !(decompose_both && below_half(out_l, in_m)),
            full_w2: !below_half(out_k, in_n),
        }
    }
}

/// Grafts a LoKr branch on every selected linear site.
pub fn patch(
    _host: &Host<'_>,
    config: &MethodConfig,
    graph: &GraphView,
) -> Result<PatchReply, String> {
    let targets = targets("lokr", config, graph)?;
    let decompose_both = config.get_bool("decompose_both")?;
    let factor = config.get_i64("decompose_factor")?;
    if factor == 0 || factor < -1 {
        return Err(format!(
            "decompose_factor {factor}: give a positive factor, or -1 for the square root"
        ));
    }
    let mut b = PatchBuilder::new(graph, "lokr").with_seed(config.get_usize("seed")? as u64);
    let mut tensors = Vec::new();
    for target in &targets {
        let site = target.site;
        let dtype = graph
            .tensor(&site.weight)
            .map(|t| t.dtype)
            .ok_or_else(|| format!("site {}: unknown weight", site.display_name()))?;
        let layout = Layout::new(
            site.out_features,
            site.in_features,
            target.r,
            decompose_both,
            factor,
        );
        let stem = b.stem(&format!("lokr.{}", site.display_name()));
        let mut factors = Factors {
            b: &mut b,
            site,
            stem: &stem,
            dtype,
            tensors: &mut tensors,
        };
        let ((out_l, out_k), (in_m, in_n), r) = (layout.out, layout.input, target.r);
        let w1 = if layout.full_w1 {
            Factor::Full(factors.add("lokr_w1", vec![out_l, in_m], Init::Zeros))
        } else {
            Factor::Product(
                factors.add("lokr_w1_a", vec![out_l, r], Init::Zeros),
                factors.add_kaiming("lokr_w1_b", vec![r, in_m]),
            )
        };
        let w2 = if layout.full_w2 {
            Factor::Full(factors.add_kaiming("lokr_w2", vec![out_k, in_n]))
        } else {
            Factor::Product(
                factors.add_kaiming("lokr_w2_a", vec![out_k, r]),
                factors.add_kaiming("lokr_w2_b", vec![r, in_n]),
            )
        };
        let scale = target.scale();
        b.delta_branch(site, &stem, |b| {
            Ok(kronecker_delta(b, &stem, &w1, &w2, layout, scale, dtype))
        })?;
    }
    let mut reply = b.finish();
    if let Some(mut peft) = peft_config("LOKR", config, &targets)? {
        peft.insert("decompose_both".into(), decompose_both.into());
        peft.insert("decompose_factor".into(), factor.into());
        peft.insert("rank_dropout_scale".into(), false.into());
        reply.patch.training.peft = Some(PeftFiles {
            config: peft.into(),
            tensors,
            ..PeftFiles::default()
        });
    }
    Ok(reply)
}

/// A Kronecker factor: one matrix, or the product of two.
enum Factor {
    Full(String),
    Product(String, String),
}

impl Factor {
    /// The factor's matrix: the tensor, or the `MatMul` of the pair.
    fn matrix(&self, b: &mut PatchBuilder<'_>, name: &str) -> String {
        match self {
            Factor::Full(tensor) => tensor.clone(),
            Factor::Product(left, right) => b.op(name, "MatMul", &[left, right], &[]),
        }
    }
}

/// Creates one site's factor parameters and their PEFT keys.
struct Factors<'a, 'g> {
    b: &'a mut PatchBuilder<'g>,
    site: &'a Site,
    stem: &'a str,
    dtype: DType,
    tensors: &'a mut Vec<PeftTensor>,
}

impl Factors<'_, '_> {
    fn add(&mut self, name: &str, shape: Vec<usize>, init: Init) -> String {
        let tensor = self.b.parameter(
            &format!("{}.{name}", self.stem),
            self.dtype,
            shape.clone(),
            init,
            true,
        );
        if let Some(label) = &self.site.label {
            self.tensors.push(PeftTensor {
                key: format!("{label}.{name}"),
                tensor: tensor.clone(),
                transpose: false,
                shape,
                rank_axis: None,
            });
        }
        tensor
    }

    /// A factor with PyTorch's `kaiming_uniform_(a = √5)` over its `[rows, cols]` shape.
    fn add_kaiming(&mut self, name: &str, shape: Vec<usize>) -> String {
        let init = Init::linear_default(shape[1], self.b.next_seed());
        self.add(name, shape, init)
    }
}

/// Emits `Transpose(W₁ ⊗ W₂) · scale`, the `[in, out]` update, as
/// `Reshape(Reshape(W₁, [a, 1, c, 1]) ⊙ Reshape(W₂, [1, b, 1, d]), [a·b, c·d])`; returns it.
fn kronecker_delta(
    b: &mut PatchBuilder<'_>,
    stem: &str,
    w1: &Factor,
    w2: &Factor,
    layout: Layout,
    scale: f64,
    dtype: DType,
) -> String {
    let ((out_l, out_k), (in_m, in_n)) = (layout.out, layout.input);
    let w1 = w1.matrix(b, &format!("{stem}.w1"));
    let w2 = w2.matrix(b, &format!("{stem}.w2"));
    let as_i64 = |v: usize| v as i64;
    let shape1 = b.constant_ints(
        &format!("{stem}.w1_shape"),
        &[as_i64(out_l), 1, as_i64(in_m), 1],
    );
    let shape2 = b.constant_ints(
        &format!("{stem}.w2_shape"),
        &[1, as_i64(out_k), 1, as_i64(in_n)],
    );
    let spread1 = b.op(
        &format!("{stem}.w1_spread"),
        "Reshape",
        &[&w1, &shape1],
        &[],
    );
    let spread2 = b.op(
        &format!("{stem}.w2_spread"),
        "Reshape",
        &[&w2, &shape2],
        &[],
    );
    let blocks = b.op(
        &format!("{stem}.kronecker_blocks"),
        "Mul",
        &[&spread1, &spread2],
        &[],
    );
    let out_in = b.constant_ints(
        &format!("{stem}.out_in"),
        &[as_i64(out_l * out_k), as_i64(in_m * in_n)],
    );
    let kronecker = b.op(
        &format!("{stem}.kronecker"),
        "Reshape",
        &[&blocks, &out_in],
        &[],
    );
    let transposed = b.op(
        &format!("{stem}.transpose"),
        "Transpose",
        &[&kronecker],
        &[],
    );
    let s = b.constant_scalar(&format!("{stem}.scale"), scale, dtype);
    b.op(&format!("{stem}.delta"), "Mul", &[&transposed, &s], &[])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn factorization_matches_peft_docstring() {
        // PEFT's own examples (peft/tuners/lokr/layer.py).
        assert_eq!(factorization(256, -1), (16, 16));
        assert_eq!(factorization(128, -1), (8, 16));
        assert_eq!(factorization(127, -1), (1, 127));
        assert_eq!(factorization(128, 4), (4, 32));
    }
}
