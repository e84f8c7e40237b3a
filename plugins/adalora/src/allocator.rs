//! AdaLoRA's rank allocator, run by the step hook after every optimizer step, as HF PEFT's
//! `RankAllocator.update_and_allocate` does it: the importance `|p·∇p|` of every entry of `A`,
//! `E` and `B` smoothed by an EMA (β1) and its uncertainty by another (β2); a cubic budget
//! schedule from `init_r` to `target_r` ranks per branch between `tinit` and
//! `total_step − tfinal`, pruning every `deltaT` steps; pruning zeroes the `E` entries of the
//! triplets whose score `s(E_i) + mean s(A_·i) + mean s(B_i·)` is among the lowest, with
//! `s = EMA(importance) · EMA(uncertainty)`. At step `total_step − tfinal` the final pattern is
//! fixed and reapplied after every later step. Steps are numbered from 0 here, as PEFT's
//! `global_step` is; the host's step `k` (1-based) is PEFT's step `k − 1`.
//!
//! Arithmetic is float32 where PEFT's is (the EMAs and scores) and float64 where PEFT uses
//! Python floats (the schedule).

use std::collections::BTreeMap;

use graft_plugin_sdk::{HostArray, MethodConfig, StepReply, StepRequest};
use serde::{Deserialize, Serialize};

/// One adapted linear: its label and the names of its SVD factors.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Module {
    /// The site's label (HF module path where known).
    pub label: String,
    /// `A`, `[in, r]`.
    pub a: String,
    /// `E`, `[r]`.
    pub e: String,
    /// `B`, `[r, out]`.
    pub b: String,
    /// The rank `r`.
    pub rank: usize,
}

/// What the step hook keeps between steps (JSON; the EMAs travel as state tensors).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// The adapted modules, in patch order.
    pub modules: Vec<Module>,
    /// The last rank pattern: per module label, which ranks are kept.
    #[serde(default)]
    pub rank_pattern: Option<BTreeMap<String, Vec<bool>>>,
}

impl State {
    /// The state before the first step.
    pub fn new(modules: Vec<Module>) -> State {
        State {
            modules,
            rank_pattern: None,
        }
    }
}

/// The budget schedule's settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    /// Initial rank per module.
    pub init_r: usize,
    /// Target rank per module.
    pub target_r: usize,
    /// Warmup steps.
    pub tinit: u64,
    /// Final steps with a fixed pattern.
    pub tfinal: u64,
    /// Pruning interval.
    pub delta_t: u64,
    /// Total steps (0: the run's).
    pub total_step: u64,
    /// Importance EMA factor.
    pub beta1: f32,
    /// Uncertainty EMA factor.
    pub beta2: f32,
}

impl Schedule {
    /// Reads and checks the settings.
    pub fn from_config(config: &MethodConfig) -> Result<Schedule, String> {
        let schedule = Schedule {
            init_r: config.get_usize("init_r")?,
            target_r: config.get_usize("target_r")?,
            tinit: config.get_usize("tinit")? as u64,
            tfinal: config.get_usize("tfinal")? as u64,
            delta_t: config.get_usize("deltaT")? as u64,
            total_step: config.get_usize("total_step")? as u64,
            beta1: config.get_f32("beta1")?,
            beta2: config.get_f32("beta2")?,
        };
        schedule.check(None)?;
        Ok(schedule)
    }

    /// [`Schedule::from_config`] for a run of `total_steps`, which a `total_step` of 0 means.
    pub fn for_run(config: &MethodConfig, total_steps: u64) -> Result<Schedule, String> {
        let mut schedule = Schedule::from_config(config)?;
        if schedule.total_step == 0 {
            schedule.total_step = total_steps;
        }
        schedule.check(Some(total_steps))?;
        Ok(schedule)
    }

    fn check(&self, total_steps: Option<u64>) -> Result<(), String> {
        if self.init_r == 0 || self.target_r > self.init_r {
            return Err(format!(
                "adalora: need 1 <= init_r and target_r <= init_r (init_r {}, target_r {})",
                self.init_r, self.target_r
            ));
        }
        if self.delta_t == 0 {
            return Err("adalora: deltaT must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
            return Err("adalora: beta1 and beta2 must lie in [0, 1)".into());
        }
        if let Some(total) = total_steps.map(|_| self.total_step) {
            if self.tinit + self.tfinal >= total {
                return Err(format!(
                    "adalora: tinit ({}) + tfinal ({}) must be below total_step ({total}); the \
                     budget schedule has no room",
                    self.tinit, self.tfinal
                ));
            }
        }
        Ok(())
    }

    /// The budget and whether to prune at (0-based) `step`, as PEFT's `budget_schedule`.
    pub fn budget(&self, step: u64, init_budget: usize, target_budget: usize) -> (usize, bool) {
        if step <= self.tinit {
            (init_budget, false)
        } else if step > self.total_step - self.tfinal {
            (target_budget, true)
        } else {
            let span = (self.total_step - self.tfinal - self.tinit) as f64;
            let remaining = 1.0 - (step - self.tinit) as f64 / span;
            let budget =
                (init_budget - target_budget) as f64 * remaining.powi(3) + target_budget as f64;
            (budget as usize, step.is_multiple_of(self.delta_t))
        }
    }
}

const IMPORTANCE: &str = "importance_ema/";
const UNCERTAINTY: &str = "uncertainty_ema/";

/// The step hook: updates the importance EMAs, applies the budget schedule and returns the
/// masked `E`s to set, with `budget` and `kept_ranks` as metrics.
pub fn step(config: &MethodConfig, request: &StepRequest) -> Result<StepReply, String> {
    let schedule = Schedule::for_run(config, request.total_steps)?;
    let mut state: State = serde_json::from_value(request.state.clone())
        .map_err(|e| format!("adalora: unreadable step-hook state: {e}"))?;
    let mut emas = request.state_tensors.clone();
    let step = request.step.saturating_sub(1);
    let final_step = schedule.total_step - schedule.tfinal;
    let init_budget: usize = state.modules.iter().map(|m| m.rank).sum();
    let target_budget = schedule.target_r * state.modules.len();
    let value = |name: &str| {
        request
            .values
            .get(name)
            .ok_or_else(|| format!("adalora: the host sent no value for {name:?}"))
    };

    let mut reply = StepReply::default();
    if step < final_step {
        update_importance(request, &state, schedule, &mut emas)?;
    }
    let (budget, prune) = schedule.budget(step, init_budget, target_budget);
    if step <= final_step && (prune || step == final_step) {
        state.rank_pattern = Some(rank_pattern(
            &state,
            &emas,
            init_budget - budget.min(init_budget),
        )?);
    }
    if step == final_step {
        emas.clear();
    }
    if let Some(pattern) = &state.rank_pattern {
        if prune || step >= final_step {
            for module in &state.modules {
                let kept = &pattern[&module.label];
                let mut e = value(&module.e)?.clone();
                for (v, keep) in e.data.iter_mut().zip(kept) {
                    if !keep {
                        *v = 0.0;
                    }
                }
                reply.set.insert(module.e.clone(), e);
            }
        }
    }
    reply.metrics.insert("budget".into(), budget as f64);
    if let Some(pattern) = &state.rank_pattern {
        let kept = pattern.values().flatten().filter(|k| **k).count();
        reply.metrics.insert("kept_ranks".into(), kept as f64);
        // Which ranks of each module are kept, as a bit mask (bit k = rank k).
        for (label, ranks) in pattern {
            let mask: u64 = ranks
                .iter()
                .enumerate()
                .filter(|(_, k)| **k)
                .map(|(i, _)| 1 << i)
                .sum();
            reply.metrics.insert(format!("kept.{label}"), mask as f64);
        }
    }
    reply.state = serde_json::to_value(&state).map_err(|e| e.to_string())?;
    reply.state_tensors = emas;
    Ok(reply)
}

/// `ema_I ← β1·ema_I + (1−β1)·|p·g|`, `ema_U ← β2·ema_U + (1−β2)·||p·g| − ema_I|` for every
/// entry of every factor (PEFT's `update_ipt`, in float32).
fn update_importance(
    request: &StepRequest,
    state: &State,
    schedule: Schedule,
    emas: &mut BTreeMap<String, HostArray>,
) -> Result<(), String> {
    let (b1, b2) = (schedule.beta1, schedule.beta2);
    let (c1, c2) = ((1.0 - b1 as f64) as f32, (1.0 - b2 as f64) as f32);
    for name in state.modules.iter().flat_map(|m| [&m.a, &m.e, &m.b]) {
        let value = request
            .values
            .get(name)
            .ok_or_else(|| format!("adalora: the host sent no value for {name:?}"))?;
        let gradient = request.gradients.get(name).ok_or_else(|| {
            format!("adalora: no gradient for {name:?}; is the method trained in this run?")
        })?;
        let zeros = || HostArray {
            shape: value.shape.clone(),
            data: vec![0.0; value.data.len()],
        };
        let mut importance = emas
            .remove(&format!("{IMPORTANCE}{name}"))
            .unwrap_or_else(zeros);
        let mut uncertainty = emas
            .remove(&format!("{UNCERTAINTY}{name}"))
            .unwrap_or_else(zeros);
        for (((p, g), i), u) in value
            .data
            .iter()
            .zip(&gradient.data)
            .zip(&mut importance.data)
            .zip(&mut uncertainty.data)
        {
            let current = (p * g).abs();
            *i = b1 * *i + c1 * current;
            *u = b2 * *u + c2 * (current - *i).abs();
        }
        emas.insert(format!("{IMPORTANCE}{name}"), importance);
        emas.insert(format!("{UNCERTAINTY}{name}"), uncertainty);
    }
    Ok(())
}

/// The triplet scores and which ranks survive when the `n_masked` lowest are pruned (PEFT's
/// `mask_to_budget`: every score ≤ the `n_masked`-th smallest is pruned).
fn rank_pattern(
    state: &State,
    emas: &BTreeMap<String, HostArray>,
    n_masked: usize,
) -> Result<BTreeMap<String, Vec<bool>>, String> {
    let score = |name: &str| -> Result<Vec<f32>, String> {
        let i = emas
            .get(&format!("{IMPORTANCE}{name}"))
            .ok_or_else(|| format!("adalora: no importance for {name:?} yet"))?;
        let u = &emas[&format!("{UNCERTAINTY}{name}")];
        Ok(i.data.iter().zip(&u.data).map(|(i, u)| i * u).collect())
    };
    let mut triplets: Vec<(String, Vec<f32>)> = Vec::new();
    for module in &state.modules {
        let r = module.rank;
        let a = score(&module.a)?;
        let b = score(&module.b)?;
        let e = score(&module.e)?;
        let n_in = a.len() / r;
        let n_out = b.len() / r;
        let scores = (0..r)
            .map(|k| {
                // A [in, r]: a rank is a column; B [r, out]: a rank is a row.
                let mean_a = (0..n_in).map(|i| a[i * r + k]).sum::<f32>() / n_in as f32;
                let mean_b = b[k * n_out..(k + 1) * n_out].iter().sum::<f32>() / n_out as f32;
                e[k] + (mean_a + mean_b)
            })
            .collect();
        triplets.push((module.label.clone(), scores));
    }
    let threshold = if n_masked == 0 {
        None
    } else {
        let mut all: Vec<f32> = triplets
            .iter()
            .flat_map(|(_, s)| s.iter().copied())
            .collect();
        all.sort_by(f32::total_cmp);
        all.get(n_masked - 1).copied()
    };
    Ok(triplets
        .into_iter()
        .map(|(label, scores)| {
            let kept = scores
                .iter()
                .map(|s| threshold.is_none_or(|t| *s > t))
                .collect();
            (label, kept)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule() -> Schedule {
        Schedule {
            init_r: 6,
            target_r: 3,
            tinit: 4,
            tfinal: 6,
            delta_t: 2,
            total_step: 24,
            beta1: 0.85,
            beta2: 0.85,
        }
    }

    #[test]
    fn the_budget_follows_peft_s_cubic_schedule() {
        // Budgets PEFT 0.21.2 reported for 4 modules, init_r 6, target_r 3, tinit 4,
        // tfinal 6, deltaT 2, total_step 24 (models/references/adalora-bert/schedule.json).
        let expected = [24, 24, 24, 24, 24, 21, 19, 17, 16, 15, 14, 13, 12, 12];
        for (step, want) in expected.iter().enumerate() {
            assert_eq!(
                schedule().budget(step as u64, 24, 12).0,
                *want,
                "step {step}"
            );
        }
        assert!(!schedule().budget(5, 24, 12).1);
        assert!(schedule().budget(6, 24, 12).1);
        assert!(schedule().budget(19, 24, 12).1);
    }
}
