//! Optimizers on the host: AdamW exactly as `torch.optim.AdamW` and SGD with momentum as
//! `torch.optim.SGD`, plus global-norm gradient clipping and learning-rate schedules.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Which update rule to use.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum OptimizerKind {
    /// `torch.optim.AdamW`: decoupled weight decay, bias-corrected moments.
    AdamW {
        /// β₁.
        beta1: f64,
        /// β₂.
        beta2: f64,
        /// ε added to the denominator.
        eps: f64,
        /// Decoupled weight decay.
        weight_decay: f64,
    },
    /// `torch.optim.SGD` with momentum (dampening 0, not Nesterov) and L2 weight decay.
    Sgd {
        /// Momentum factor (0 for plain SGD).
        momentum: f64,
        /// L2 penalty added to the gradient.
        weight_decay: f64,
    },
}

impl OptimizerKind {
    /// Fails with [`Error::Config`] naming the flag when a setting is outside its domain:
    /// betas in `[0, 1)`, `eps` and `weight_decay` finite and not negative, `momentum` in
    /// `[0, 1)`.
    pub fn check(&self) -> Result<()> {
        let unit = |flag: &str, value: f64| {
            if (0.0..1.0).contains(&value) {
                Ok(())
            } else {
                Err(Error::Config(format!("{flag} {value} is outside [0, 1)")))
            }
        };
        let non_negative = |flag: &str, value: f64| {
            if value.is_finite() && value >= 0.0 {
                Ok(())
            } else {
                Err(Error::Config(format!(
                    "{flag} {value} must be a finite number, 0 or more"
                )))
            }
        };
        match *self {
            OptimizerKind::AdamW {
                beta1,
                beta2,
                eps,
                weight_decay,
            } => {
                unit("--betas (beta1)", beta1)?;
                unit("--betas (beta2)", beta2)?;
                non_negative("--eps", eps)?;
                non_negative("--weight-decay", weight_decay)
            }
            OptimizerKind::Sgd {
                momentum,
                weight_decay,
            } => {
                unit("--momentum", momentum)?;
                non_negative("--weight-decay", weight_decay)
            }
        }
    }
}

/// The state of one optimizer over a list of parameter tensors (flat f32 buffers), serializable
/// for checkpoints.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Optimizer {
    /// The update rule.
    pub kind: OptimizerKind,
    /// Steps taken so far.
    pub step: u64,
    /// First moments (AdamW) or momentum buffers (SGD), one per parameter.
    pub first_moments: Vec<Vec<f32>>,
    /// Second moments (AdamW only), one per parameter.
    pub second_moments: Vec<Vec<f32>>,
}

impl Optimizer {
    /// A fresh optimizer for parameters of the given lengths.
    pub fn new(kind: OptimizerKind, parameter_lengths: &[usize]) -> Self {
        let zeros = || parameter_lengths.iter().map(|&n| vec![0.0; n]).collect();
        Optimizer {
            kind,
            step: 0,
            first_moments: zeros(),
            second_moments: match kind {
                OptimizerKind::AdamW { .. } => zeros(),
                OptimizerKind::Sgd { .. } => Vec::new(),
            },
        }
    }

    /// Applies one update with learning rate `lr` to `parameters` given `gradients` (same
    /// order and lengths as at construction). Arithmetic follows PyTorch's single-tensor
    /// implementations step for step (f32 state, f64 scalars).
    pub fn update(&mut self, parameters: &mut [Vec<f32>], gradients: &[Vec<f32>], lr: f64) {
        self.step += 1;
        match self.kind {
            OptimizerKind::AdamW {
                beta1,
                beta2,
                eps,
                weight_decay,
            } => {
                let step = self.step as i32;
                let bias_correction1 = 1.0 - beta1.powi(step);
                let bias_correction2 = 1.0 - beta2.powi(step);
                let step_size = (lr / bias_correction1) as f32;
                let bias_correction2_sqrt = bias_correction2.sqrt() as f32;
                let decay = (1.0 - lr * weight_decay) as f32;
                let (b1, b2, eps) = (beta1 as f32, beta2 as f32, eps as f32);
                for (index, (param, grad)) in parameters.iter_mut().zip(gradients).enumerate() {
                    let m = &mut self.first_moments[index];
                    let v = &mut self.second_moments[index];
                    for i in 0..param.len() {
                        param[i] *= decay;
                        // torch: exp_avg.lerp_(grad, 1 - beta1); exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2)
                        m[i] += (grad[i] - m[i]) * (1.0 - b1);
                        v[i] = v[i] * b2 + (1.0 - b2) * grad[i] * grad[i];
                        let denom = v[i].sqrt() / bias_correction2_sqrt + eps;
                        param[i] -= step_size * (m[i] / denom);
                    }
                }
            }
            OptimizerKind::Sgd {
                momentum,
                weight_decay,
            } => {
                let (lr, momentum, weight_decay) =
                    (lr as f32, momentum as f32, weight_decay as f32);
                let first_step = self.step == 1;
                for (index, (param, grad)) in parameters.iter_mut().zip(gradients).enumerate() {
                    let buffer = &mut self.first_moments[index];
                    for i in 0..param.len() {
                        let mut g = grad[i] + weight_decay * param[i];
                        if momentum != 0.0 {
                            buffer[i] = if first_step {
                                g
                            } else {
                                momentum * buffer[i] + g
                            };
                            g = buffer[i];
                        }
                        param[i] -= lr * g;
                    }
                }
            }
        }
    }
}

/// The global L2 norm of all gradients (as `torch.nn.utils.clip_grad_norm_` computes it).
pub fn global_norm(gradients: &[Vec<f32>]) -> f64 {
    gradients
        .iter()
        .flat_map(|g| g.iter())
        .map(|&v| (v as f64) * (v as f64))
        .sum::<f64>()
        .sqrt()
}

/// Scales gradients so that their global norm is at most `max_norm`, as
/// `torch.nn.utils.clip_grad_norm_` does (coefficient `max_norm / (norm + 1e-6)`, clamped to 1).
/// Returns the norm before clipping.
pub fn clip_global_norm(gradients: &mut [Vec<f32>], max_norm: f64) -> f64 {
    let norm = global_norm(gradients);
    let coefficient = max_norm / (norm + 1e-6);
    if coefficient < 1.0 {
        for value in gradients.iter_mut().flat_map(|g| g.iter_mut()) {
            *value *= coefficient as f32;
        }
    }
    norm
}

/// Learning-rate schedules, as in `transformers.get_*_schedule_with_warmup`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// The base rate throughout (after warmup).
    Constant,
    /// Linear warmup, then linear decay to 0 at the last step.
    Linear,
    /// Linear warmup, then half a cosine period down to 0 at the last step.
    Cosine,
}

impl Schedule {
    /// The learning rate for optimizer step `step` (0-based) of `total_steps`, with `warmup`
    /// warmup steps and base rate `base_lr`.
    pub fn lr(self, base_lr: f64, step: u64, warmup: u64, total_steps: u64) -> f64 {
        if step < warmup {
            return base_lr * step as f64 / warmup.max(1) as f64;
        }
        let progress = (step - warmup) as f64 / (total_steps.saturating_sub(warmup)).max(1) as f64;
        match self {
            Schedule::Constant => base_lr,
            Schedule::Linear => base_lr * (1.0 - progress).max(0.0),
            Schedule::Cosine => {
                base_lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()).max(0.0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One AdamW step from zero state moves each parameter by lr·sign(grad) (bias correction
    /// makes m̂/√v̂ = ±1), after the decoupled decay — a closed form independent of PyTorch.
    #[test]
    fn first_adamw_step_is_lr_times_sign() {
        let kind = OptimizerKind::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 0.0,
            weight_decay: 0.1,
        };
        let mut optimizer = Optimizer::new(kind, &[3]);
        let mut parameters = vec![vec![1.0f32, -2.0, 0.5]];
        optimizer.update(&mut parameters, &[vec![0.3, -4.0, 1e-3]], 0.01);
        let expected = [1.0 * 0.999 - 0.01, -2.0 * 0.999 + 0.01, 0.5 * 0.999 - 0.01];
        for (got, want) in parameters[0].iter().zip(expected) {
            assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        }
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let mut gradients = vec![vec![3.0f32], vec![4.0]];
        let norm = clip_global_norm(&mut gradients, 1.0);
        assert!((norm - 5.0).abs() < 1e-12);
        assert!((global_norm(&gradients) - 1.0).abs() < 1e-5);
    }

    #[test]
    fn schedules_warm_up_and_decay() {
        assert_eq!(Schedule::Linear.lr(1.0, 0, 2, 10), 0.0);
        assert_eq!(Schedule::Linear.lr(1.0, 1, 2, 10), 0.5);
        assert_eq!(Schedule::Linear.lr(1.0, 2, 2, 10), 1.0);
        assert!((Schedule::Linear.lr(1.0, 6, 2, 10) - 0.5).abs() < 1e-12);
        assert!((Schedule::Cosine.lr(1.0, 6, 2, 10) - 0.5).abs() < 1e-12);
        assert_eq!(Schedule::Constant.lr(1.0, 9, 2, 10), 1.0);
    }
}
