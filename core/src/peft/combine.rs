//! `graft combine`: weighted combinations of HF PEFT LoRA adapters, as PEFT's
//! `LoraModel.add_weighted_adapter` computes them (PEFT 0.21), on the adapter files alone — no
//! model needed.
//!
//! Per module, with PEFT's `A_i` `[r_i, in]`, `B_i` `[out, r_i]`, scale `s_i` and the user's
//! weight `w_i`:
//! - `linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune` (equal ranks): the A's are
//!   combined with weights `sign(w_i s_i)·√|w_i s_i|` and the B's with `√|w_i s_i|`, each side
//!   by the same merge rule (task arithmetic, TIES, DARE, magnitude pruning);
//! - `cat`: `A = [w_1 s_1 A_1; …]` stacked by rows, `B = [B_1 … B_n]` by columns (rank Σ r_i);
//! - `svd`: `ΔW = Σ w_i s_i B_i A_i` truncated to `svd_rank` (default: the largest r_i) by its
//!   singular value decomposition, `B = U·S`, `A = Vᵀ`.
//!
//! The result is written as PEFT writes it: the first adapter's config with `r` and
//! `lora_alpha` both the new rank (so the scale is 1, or √r with `use_rslora`, as in PEFT) and
//! `target_modules` the modules combined.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use super::config::{read_adapter_config, read_config, CONFIG_FILE};
use super::export::write_files;
use super::keys::{read_peft_tensors, TensorRole, KEY_PREFIX, WEIGHTS_FILE};
use super::select::{compile_patterns, pattern_value};
use crate::{Error, Result};

/// How adapters are combined (PEFT's `combination_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Combination {
    /// Weighted sum of the factors.
    Linear,
    /// Factors stacked along the rank.
    Cat,
    /// Truncated SVD of the weighted sum of the updates.
    Svd,
    /// TIES: magnitude pruning, sign election, disjoint mean.
    Ties,
    /// DARE: random pruning with rescaling, then a weighted sum.
    DareLinear,
    /// DARE pruning, then TIES' sign election and disjoint mean.
    DareTies,
    /// Magnitude pruning, then a weighted sum.
    MagnitudePrune,
}

impl Combination {
    /// Every combination with its name, as PEFT spells it.
    pub const ALL: [(&'static str, Combination); 7] = [
        ("linear", Combination::Linear),
        ("cat", Combination::Cat),
        ("svd", Combination::Svd),
        ("ties", Combination::Ties),
        ("dare_linear", Combination::DareLinear),
        ("dare_ties", Combination::DareTies),
        ("magnitude_prune", Combination::MagnitudePrune),
    ];

    /// The combination named `name`.
    pub fn from_name(name: &str) -> Option<Combination> {
        Combination::ALL
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, c)| *c)
    }
}

/// TIES' sign election (PEFT's `majority_sign_method`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MajoritySign {
    /// The sign of the sum of the pruned values.
    Total,
    /// The sign held by more of the pruned values.
    Frequency,
}

/// What to combine and how.
#[derive(Clone, Debug)]
pub struct CombineOptions {
    /// How.
    pub combination: Combination,
    /// One weight per adapter (negative weights subtract).
    pub weights: Vec<f64>,
    /// The fraction of values kept by TIES, DARE and magnitude pruning, in `[0, 1]`.
    pub density: f64,
    /// TIES' sign election.
    pub majority_sign: MajoritySign,
    /// The rank of an `svd` combination (default: the largest rank of the adapters).
    pub svd_rank: Option<usize>,
    /// The seed of DARE's random pruning (graft's generator: PEFT draws from torch's global
    /// one, so DARE results match PEFT's in distribution, not value for value).
    pub seed: u64,
}

/// What [`combine`] wrote.
#[derive(Clone, Debug, PartialEq)]
pub struct CombineReport {
    /// The modules combined.
    pub modules: Vec<String>,
    /// The combined adapter's rank.
    pub r: usize,
    /// Full tensors of the sources (`modules_to_save`) that the combination leaves out, as
    /// PEFT's does.
    pub dropped_keys: Vec<String>,
}

/// One source adapter: its config as written and, per module, `(A, B, scale)` in PEFT's
/// layout.
struct Source {
    dir: PathBuf,
    config: Value,
    modules: BTreeMap<String, Factors>,
    dropped_keys: Vec<String>,
}

/// A module's LoRA factors in PEFT's layout.
#[derive(Clone)]
struct Factors {
    /// `[r, in]`, row-major.
    a: Matrix,
    /// `[out, r]`.
    b: Matrix,
    scale: f64,
}

/// A dense row-major matrix of f64.
#[derive(Clone, Debug, PartialEq)]
struct Matrix {
    rows: usize,
    cols: usize,
    values: Vec<f64>,
}

impl Matrix {
    fn zeros(rows: usize, cols: usize) -> Matrix {
        Matrix {
            rows,
            cols,
            values: vec![0.0; rows * cols],
        }
    }

    fn at(&self, i: usize, j: usize) -> f64 {
        self.values[i * self.cols + j]
    }

    fn set(&mut self, i: usize, j: usize, v: f64) {
        self.values[i * self.cols + j] = v;
    }

    fn transpose(&self) -> Matrix {
        let mut t = Matrix::zeros(self.cols, self.rows);
        for i in 0..self.rows {
            for j in 0..self.cols {
                t.set(j, i, self.at(i, j));
            }
        }
        t
    }

    fn matmul(&self, other: &Matrix) -> Matrix {
        let mut out = Matrix::zeros(self.rows, other.cols);
        for i in 0..self.rows {
            for k in 0..self.cols {
                let a = self.at(i, k);
                if a == 0.0 {
                    continue;
                }
                for j in 0..other.cols {
                    out.values[i * other.cols + j] += a * other.at(k, j);
                }
            }
        }
        out
    }

    fn scaled(&self, factor: f64) -> Matrix {
        Matrix {
            values: self.values.iter().map(|v| v * factor).collect(),
            ..self.clone()
        }
    }

    fn f32_bytes(&self) -> Vec<u8> {
        self.values
            .iter()
            .flat_map(|v| (*v as f32).to_le_bytes())
            .collect()
    }
}

/// Combines the LoRA adapter folders `adapters` as `options` say and writes the result as a
/// PEFT adapter folder `out` (files written atomically). Errors name the folder and what is
/// wrong: not a LoRA adapter (DoRA, other types), a weight count that differs from the adapter
/// count, unequal ranks where the combination needs equal ones, factors of different shapes for
/// the same module, a density outside `[0, 1]`.
pub fn combine(
    adapters: &[PathBuf],
    options: &CombineOptions,
    out: &Path,
) -> Result<CombineReport> {
    if adapters.is_empty() {
        return Err(Error::Config("no adapters to combine".into()));
    }
    if options.weights.len() != adapters.len() {
        return Err(Error::Config(format!(
            "{} weights for {} adapters; give one weight per adapter",
            options.weights.len(),
            adapters.len()
        )));
    }
    if !(0.0..=1.0).contains(&options.density) {
        return Err(Error::Config(format!(
            "density {} is not in [0, 1]",
            options.density
        )));
    }
    let sources = adapters
        .iter()
        .map(|dir| read_source(dir))
        .collect::<Result<Vec<_>>>()?;
    let mut modules: Vec<String> = sources
        .iter()
        .flat_map(|s| s.modules.keys().cloned())
        .collect();
    modules.sort_unstable();
    modules.dedup();
    let rank_of = |s: &Source| s.modules.values().map(|f| f.a.rows).max().unwrap_or(0);
    let new_rank = match options.combination {
        Combination::Cat => sources.iter().map(rank_of).sum(),
        Combination::Svd => options
            .svd_rank
            .unwrap_or_else(|| sources.iter().map(rank_of).max().unwrap_or(0)),
        _ => {
            let ranks: Vec<usize> = sources
                .iter()
                .flat_map(|s| s.modules.values().map(|f| f.a.rows))
                .collect();
            if ranks.windows(2).any(|w| w[0] != w[1]) {
                return Err(Error::Config(format!(
                    "combination {:?} needs adapters of one rank; these have ranks {:?} (use cat or svd)",
                    options.combination,
                    sources.iter().map(rank_of).collect::<Vec<_>>()
                )));
            }
            ranks.first().copied().unwrap_or(0)
        }
    };
    if new_rank == 0 {
        return Err(Error::Config("the combined rank would be 0".into()));
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(options.seed);
    let mut tensors = Vec::new();
    for module in &modules {
        let present: Vec<(&Factors, f64, &Path)> = sources
            .iter()
            .zip(&options.weights)
            .filter_map(|(s, w)| Some((s.modules.get(module)?, *w, s.dir.as_path())))
            .collect();
        let (first, _, first_dir) = present[0];
        if let Some((_, _, dir)) = present
            .iter()
            .find(|(f, _, _)| f.a.cols != first.a.cols || f.b.rows != first.b.rows)
        {
            return Err(Error::Config(format!(
                "module {module}: {} and {} have factors of different shapes",
                first_dir.display(),
                dir.display()
            )));
        }
        let (a, b) = combine_module(&present, options, new_rank, &mut rng);
        tensors.push((
            format!("{KEY_PREFIX}{module}.lora_A.weight"),
            vec![a.rows, a.cols],
            a.f32_bytes(),
        ));
        tensors.push((
            format!("{KEY_PREFIX}{module}.lora_B.weight"),
            vec![b.rows, b.cols],
            b.f32_bytes(),
        ));
    }
    let mut config = sources[0].config.clone();
    if let Some(map) = config.as_object_mut() {
        map.insert("r".into(), json!(new_rank));
        map.insert("lora_alpha".into(), json!(new_rank));
        map.insert("target_modules".into(), json!(modules));
        map.insert("rank_pattern".into(), json!({}));
        map.insert("alpha_pattern".into(), json!({}));
        map.insert("modules_to_save".into(), Value::Null);
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    write_files(out, &config, &tensors)?;
    Ok(CombineReport {
        modules,
        r: new_rank,
        dropped_keys: sources.into_iter().flat_map(|s| s.dropped_keys).collect(),
    })
}

/// Reads a LoRA adapter folder: its factors per module and their scales (`lora_alpha / r`, or
/// `/ √r` with rsLoRA, after `alpha_pattern`).
fn read_source(dir: &Path) -> Result<Source> {
    let config_path = dir.join(CONFIG_FILE);
    let (config, _) = read_config(&config_path)?;
    let (_, raw) = read_adapter_config(&config_path)?;
    let alpha_patterns = compile_patterns(&config.alpha_pattern, "alpha_pattern")
        .map_err(|e| Error::Config(format!("{}: {e}", config_path.display())))?;
    let base_alpha = config.lora_alpha.unwrap_or(8.0);
    let rslora = config.use_rslora.unwrap_or(false);
    let weights_path = dir.join(WEIGHTS_FILE);
    let mut a_of = BTreeMap::new();
    let mut b_of = BTreeMap::new();
    let mut dropped_keys = Vec::new();
    for tensor in read_peft_tensors(&weights_path)? {
        let matrix = |shape: &[usize]| -> Result<Matrix> {
            match shape {
                [rows, cols] => Ok(Matrix {
                    rows: *rows,
                    cols: *cols,
                    values: tensor.values.iter().map(|v| *v as f64).collect(),
                }),
                other => Err(Error::Config(format!(
                    "{}: {:?} is {other:?}, not a matrix",
                    weights_path.display(),
                    tensor.key
                ))),
            }
        };
        match tensor.role {
            TensorRole::LoraA => {
                a_of.insert(tensor.module.clone(), matrix(&tensor.shape)?);
            }
            TensorRole::LoraB => {
                b_of.insert(tensor.module.clone(), matrix(&tensor.shape)?);
            }
            _ => dropped_keys.push(tensor.key.clone()),
        }
    }
    let mut modules = BTreeMap::new();
    for (module, a) in a_of {
        let b = b_of.remove(&module).ok_or_else(|| {
            Error::Config(format!(
                "{}: module {module} has lora_A but no lora_B",
                weights_path.display()
            ))
        })?;
        if b.cols != a.rows {
            return Err(Error::Config(format!(
                "{}: module {module}: lora_A is [{}, {}] but lora_B is [{}, {}]",
                weights_path.display(),
                a.rows,
                a.cols,
                b.rows,
                b.cols
            )));
        }
        let r = a.rows as f64;
        let alpha = pattern_value(&alpha_patterns, &module).unwrap_or(base_alpha);
        let scale = if rslora { alpha / r.sqrt() } else { alpha / r };
        modules.insert(module, Factors { a, b, scale });
    }
    if let Some(module) = b_of.keys().next() {
        return Err(Error::Config(format!(
            "{}: module {module} has lora_B but no lora_A",
            weights_path.display()
        )));
    }
    if modules.is_empty() {
        return Err(Error::Config(format!(
            "{}: no LoRA tensors",
            weights_path.display()
        )));
    }
    Ok(Source {
        dir: dir.to_path_buf(),
        config: raw,
        modules,
        dropped_keys,
    })
}

/// One module's combined `(A, B)`.
fn combine_module(
    present: &[(&Factors, f64, &Path)],
    options: &CombineOptions,
    new_rank: usize,
    rng: &mut impl Rng,
) -> (Matrix, Matrix) {
    match options.combination {
        Combination::Cat => {
            let (n_in, n_out) = (present[0].0.a.cols, present[0].0.b.rows);
            let mut a = Matrix::zeros(new_rank, n_in);
            let mut b = Matrix::zeros(n_out, new_rank);
            let mut offset = 0;
            for (factors, weight, _) in present {
                let r = factors.a.rows;
                let scaled = factors.a.scaled(weight * factors.scale);
                a.values[offset * n_in..(offset + r) * n_in].copy_from_slice(&scaled.values);
                for i in 0..n_out {
                    for k in 0..r {
                        b.set(i, offset + k, factors.b.at(i, k));
                    }
                }
                offset += r;
            }
            (a, b)
        }
        Combination::Svd => truncated_svd(present, new_rank),
        combination => {
            let signed: Vec<f64> = present
                .iter()
                .map(|(f, w, _)| {
                    let ws = w * f.scale;
                    let sign = if ws >= 0.0 { 1.0 } else { -1.0 };
                    sign * ws.abs().sqrt()
                })
                .collect();
            let unsigned: Vec<f64> = present
                .iter()
                .map(|(f, w, _)| (w * f.scale).abs().sqrt())
                .collect();
            let a_tensors: Vec<&Matrix> = present.iter().map(|(f, _, _)| &f.a).collect();
            let b_tensors: Vec<&Matrix> = present.iter().map(|(f, _, _)| &f.b).collect();
            let a = merge_tensors(combination, &a_tensors, &signed, options, rng);
            let b = merge_tensors(combination, &b_tensors, &unsigned, options, rng);
            (a, b)
        }
    }
}

/// PEFT's `merge_utils` rule for `combination` over same-shaped `tensors` with `weights`.
fn merge_tensors(
    combination: Combination,
    tensors: &[&Matrix],
    weights: &[f64],
    options: &CombineOptions,
    rng: &mut impl Rng,
) -> Matrix {
    let pruned: Vec<Vec<f64>> = tensors
        .iter()
        .map(|t| match combination {
            Combination::Ties | Combination::MagnitudePrune => {
                magnitude_prune(&t.values, options.density)
            }
            Combination::DareLinear | Combination::DareTies => {
                random_prune(&t.values, options.density, rng)
            }
            _ => t.values.clone(),
        })
        .collect();
    let n = pruned[0].len();
    let mut out = Matrix::zeros(tensors[0].rows, tensors[0].cols);
    let elect = matches!(combination, Combination::Ties | Combination::DareTies);
    for j in 0..n {
        if !elect {
            out.values[j] = pruned.iter().zip(weights).map(|(p, w)| p[j] * w).sum();
            continue;
        }
        let majority = match options.majority_sign {
            MajoritySign::Total => pruned.iter().map(|p| p[j]).sum::<f64>(),
            MajoritySign::Frequency => pruned.iter().map(|p| sign(p[j])).sum::<f64>(),
        };
        let majority = if majority >= 0.0 { 1.0 } else { -1.0 };
        let mut sum = 0.0;
        let mut kept = 0.0;
        for (p, w) in pruned.iter().zip(weights) {
            if sign(p[j]) == majority {
                sum += p[j] * w;
                kept += 1.0;
            }
        }
        out.values[j] = sum / f64::max(kept, 1.0);
    }
    out
}

/// torch's `sign`: -1, 0 or 1.
fn sign(v: f64) -> f64 {
    if v > 0.0 {
        1.0
    } else if v < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// Keeps the `⌊density · n⌋` values of largest magnitude (PEFT's `magnitude_based_pruning`);
/// a density of 1 or more keeps everything.
fn magnitude_prune(values: &[f64], density: f64) -> Vec<f64> {
    if density >= 1.0 {
        return values.to_vec();
    }
    let k = (density * values.len() as f64) as usize;
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&x, &y| values[y].abs().total_cmp(&values[x].abs()));
    let mut out = vec![0.0; values.len()];
    for &i in &order[..k] {
        out[i] = values[i];
    }
    out
}

/// Keeps each value with probability `density` and divides the kept ones by it (DARE); a
/// density of 1 or more keeps everything unchanged.
fn random_prune(values: &[f64], density: f64, rng: &mut impl Rng) -> Vec<f64> {
    if density >= 1.0 {
        return values.to_vec();
    }
    values
        .iter()
        .map(|v| {
            if rng.gen::<f64>() < density {
                v / density
            } else {
                0.0
            }
        })
        .collect()
}

/// `ΔW = Σ wᵢ sᵢ Bᵢ Aᵢ` truncated to rank `k` through its SVD, as `(A = Vᵀ_k, B = U_k S_k)`.
/// Computed from the factors: with `ΔW = Bc·Ac` (`Bc = [B₁ … Bₙ]`, `Ac` the weighted A's
/// stacked), thin QR factorisations `Bc = Qb Rb` and `Acᵀ = Qa Ra` leave the small core
/// `M = Rb Raᵀ`, whose SVD `M = U S Vᵀ` gives `ΔW = (Qb U) S (Qa V)ᵀ` — exact, and cheap for
/// any layer size.
fn truncated_svd(present: &[(&Factors, f64, &Path)], k: usize) -> (Matrix, Matrix) {
    let (n_in, n_out) = (present[0].0.a.cols, present[0].0.b.rows);
    let total: usize = present.iter().map(|(f, _, _)| f.a.rows).sum();
    let mut bc = Matrix::zeros(n_out, total);
    let mut ac_t = Matrix::zeros(n_in, total);
    let mut offset = 0;
    for (factors, weight, _) in present {
        let ws = weight * factors.scale;
        for r in 0..factors.a.rows {
            for i in 0..n_out {
                bc.set(i, offset + r, factors.b.at(i, r));
            }
            for j in 0..n_in {
                ac_t.set(j, offset + r, factors.a.at(r, j) * ws);
            }
        }
        offset += factors.a.rows;
    }
    let (qb, rb) = thin_qr(&bc);
    let (qa, ra) = thin_qr(&ac_t);
    let core = rb.matmul(&ra.transpose());
    let (u, s, v) = jacobi_svd(&core);
    let left = qb.matmul(&u);
    let right = qa.matmul(&v);
    let mut a = Matrix::zeros(k, n_in);
    let mut b = Matrix::zeros(n_out, k);
    for (c, &singular) in s.iter().enumerate().take(k) {
        for i in 0..n_out {
            b.set(i, c, left.at(i, c) * singular);
        }
        for j in 0..n_in {
            a.set(c, j, right.at(j, c));
        }
    }
    (a, b)
}

/// Thin QR by modified Gram–Schmidt with one re-orthogonalisation pass: `m = q·r`, `q`
/// `[rows, cols]` with orthonormal (or zero, for dependent columns) columns, `r` `[cols, cols]`.
fn thin_qr(m: &Matrix) -> (Matrix, Matrix) {
    let (rows, cols) = (m.rows, m.cols);
    let mut q = m.clone();
    let mut r = Matrix::zeros(cols, cols);
    for j in 0..cols {
        for _pass in 0..2 {
            for p in 0..j {
                let dot: f64 = (0..rows).map(|i| q.at(i, p) * q.at(i, j)).sum();
                r.set(p, j, r.at(p, j) + dot);
                for i in 0..rows {
                    let v = q.at(i, j) - dot * q.at(i, p);
                    q.set(i, j, v);
                }
            }
        }
        let norm = (0..rows).map(|i| q.at(i, j).powi(2)).sum::<f64>().sqrt();
        let scale = m
            .values
            .iter()
            .fold(0f64, |a, v| a.max(v.abs()))
            .max(1e-300);
        if norm > 1e-13 * scale {
            r.set(j, j, norm);
            for i in 0..rows {
                q.set(i, j, q.at(i, j) / norm);
            }
        } else {
            for i in 0..rows {
                q.set(i, j, 0.0);
            }
        }
    }
    (q, r)
}

/// One-sided Jacobi SVD of a square matrix: `m = u · diag(s) · vᵀ`, singular values
/// descending.
fn jacobi_svd(m: &Matrix) -> (Matrix, Vec<f64>, Matrix) {
    let n = m.cols;
    let mut work = m.clone();
    let mut v = Matrix::zeros(n, n);
    for i in 0..n {
        v.set(i, i, 1.0);
    }
    for _sweep in 0..60 {
        let mut rotated = false;
        for p in 0..n {
            for q in p + 1..n {
                let (mut alpha, mut beta, mut gamma) = (0.0, 0.0, 0.0);
                for i in 0..work.rows {
                    let (x, y) = (work.at(i, p), work.at(i, q));
                    alpha += x * x;
                    beta += y * y;
                    gamma += x * y;
                }
                if gamma.abs() <= 1e-15 * (alpha * beta).sqrt() || gamma == 0.0 {
                    continue;
                }
                rotated = true;
                let zeta = (beta - alpha) / (2.0 * gamma);
                let direction = if zeta >= 0.0 { 1.0 } else { -1.0 };
                let t = direction / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                let c = 1.0 / (1.0 + t * t).sqrt();
                let s = c * t;
                for i in 0..work.rows {
                    let (x, y) = (work.at(i, p), work.at(i, q));
                    work.set(i, p, c * x - s * y);
                    work.set(i, q, s * x + c * y);
                }
                for i in 0..n {
                    let (x, y) = (v.at(i, p), v.at(i, q));
                    v.set(i, p, c * x - s * y);
                    v.set(i, q, s * x + c * y);
                }
            }
        }
        if !rotated {
            break;
        }
    }
    let norms: Vec<f64> = (0..n)
        .map(|j| {
            (0..work.rows)
                .map(|i| work.at(i, j).powi(2))
                .sum::<f64>()
                .sqrt()
        })
        .collect();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| norms[b].total_cmp(&norms[a]));
    let mut u = Matrix::zeros(work.rows, n);
    let mut v_sorted = Matrix::zeros(n, n);
    let mut s = Vec::with_capacity(n);
    for (c, &j) in order.iter().enumerate() {
        s.push(norms[j]);
        for i in 0..work.rows {
            u.set(
                i,
                c,
                if norms[j] > 0.0 {
                    work.at(i, j) / norms[j]
                } else {
                    0.0
                },
            );
        }
        for i in 0..n {
            v_sorted.set(i, c, v.at(i, j));
        }
    }
    (u, s, v_sorted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix(rows: usize, cols: usize, seed: u64) -> Matrix {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        Matrix {
            rows,
            cols,
            values: (0..rows * cols).map(|_| rng.gen::<f64>() - 0.5).collect(),
        }
    }

    fn max_abs_diff(a: &Matrix, b: &Matrix) -> f64 {
        a.values
            .iter()
            .zip(&b.values)
            .fold(0.0, |m, (x, y)| f64::max(m, (x - y).abs()))
    }

    #[test]
    fn jacobi_svd_reconstructs_and_sorts() {
        let m = matrix(5, 5, 1);
        let (u, s, v) = jacobi_svd(&m);
        assert!(s.windows(2).all(|w| w[0] >= w[1]), "{s:?}");
        let mut us = u.clone();
        for i in 0..us.rows {
            for (j, &singular) in s.iter().enumerate() {
                us.set(i, j, u.at(i, j) * singular);
            }
        }
        assert!(max_abs_diff(&us.matmul(&v.transpose()), &m) < 1e-12);
    }

    #[test]
    fn factored_svd_equals_the_update_at_full_rank() {
        let (a1, b1) = (matrix(3, 7, 2), matrix(6, 3, 3));
        let (a2, b2) = (matrix(2, 7, 4), matrix(6, 2, 5));
        let f1 = Factors {
            a: a1.clone(),
            b: b1.clone(),
            scale: 2.0,
        };
        let f2 = Factors {
            a: a2.clone(),
            b: b2.clone(),
            scale: 0.5,
        };
        let path = Path::new("x");
        let present = [(&f1, 0.3, path), (&f2, -1.2, path)];
        let want = {
            let d1 = b1.matmul(&a1).scaled(0.3 * 2.0);
            let d2 = b2.matmul(&a2).scaled(-1.2 * 0.5);
            Matrix {
                values: d1
                    .values
                    .iter()
                    .zip(&d2.values)
                    .map(|(x, y)| x + y)
                    .collect(),
                ..d1
            }
        };
        let (a, b) = truncated_svd(&present, 5);
        assert!(max_abs_diff(&b.matmul(&a), &want) < 1e-12);
        // Truncation keeps the largest singular directions: the rank-1 error is the
        // second singular value, no more.
        let (a, b) = truncated_svd(&present, 1);
        let error = max_abs_diff(&b.matmul(&a), &want);
        assert!(error > 0.0 && error < 10.0);
    }

    #[test]
    fn magnitude_prune_keeps_the_largest_values() {
        assert_eq!(
            magnitude_prune(&[0.1, -3.0, 2.0, 0.5], 0.5),
            [0.0, -3.0, 2.0, 0.0]
        );
        assert_eq!(magnitude_prune(&[1.0, 2.0], 1.0), [1.0, 2.0]);
    }
}
