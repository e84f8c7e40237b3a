//! Rotary position embeddings: the inverse frequencies and the cos/sin scaling of the RoPE
//! variants whose frequencies do not depend on the sequence length (`default`, `linear`,
//! `llama3`, `yarn`), computed in float32 in the order transformers computes them so that the
//! tables agree to the last bits.

use serde_json::Value;

use super::config::Fields;
use crate::Result;

/// A RoPE variant reduced to what the graph needs.
#[derive(Clone, Debug, PartialEq)]
pub struct Rope {
    /// `head_dim / 2` inverse frequencies.
    pub inv_freq: Vec<f32>,
    /// The factor cos and sin are multiplied by (YaRN's attention factor; 1 otherwise).
    pub attention_factor: f32,
    /// The variant's name, for the summary.
    pub kind: String,
}

/// The RoPE variants graft builds, for messages.
const KINDS: &str = "default, linear, llama3, yarn";

impl Rope {
    /// Reads `rope_parameters` (transformers ≥ 5) or `rope_theta` with `rope_scaling` (older
    /// configs).
    pub(super) fn from_config(
        fields: &Fields,
        head_dim: usize,
        max_position_embeddings: usize,
    ) -> Result<Rope> {
        let (field, parameters) = match (fields.get("rope_parameters"), fields.get("rope_scaling"))
        {
            (Some(p), _) => ("rope_parameters", p.clone()),
            (None, Some(s)) => ("rope_scaling", s.clone()),
            (None, None) => ("rope_parameters", Value::Object(Default::default())),
        };
        let object = parameters
            .as_object()
            .ok_or_else(|| fields.error(field, "is not an object"))?;
        let number = |key: &str| -> Result<Option<f64>> {
            match object.get(key).filter(|v| !v.is_null()) {
                None => Ok(None),
                Some(v) => v
                    .as_f64()
                    .filter(|x| x.is_finite())
                    .map(Some)
                    .ok_or_else(|| fields.error(field, format!("{key:?} = {v} is not a number"))),
            }
        };
        let required = |key: &str| -> Result<f64> {
            number(key)?.ok_or_else(|| fields.error(field, format!("{key:?} is missing")))
        };
        let theta = match number("rope_theta")? {
            Some(theta) => theta,
            None => fields.f64_or("rope_theta", 10000.0)?,
        };
        let kind = object
            .get("rope_type")
            .or_else(|| object.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default")
            .to_owned();
        if number("partial_rotary_factor")?.is_some_and(|f| f != 1.0)
            || fields.f64_or("partial_rotary_factor", 1.0)? != 1.0
        {
            return Err(fields.error(
                "partial_rotary_factor",
                "only 1 is supported (every dimension rotates)",
            ));
        }
        let base = default_inv_freq(theta, head_dim);
        let (inv_freq, attention_factor) = match kind.as_str() {
            "default" => (base, 1.0),
            "linear" => {
                let factor = required("factor")? as f32;
                (base.iter().map(|f| f / factor).collect(), 1.0)
            }
            "llama3" => (
                llama3(
                    &base,
                    required("factor")? as f32,
                    required("low_freq_factor")? as f32,
                    required("high_freq_factor")? as f32,
                    required("original_max_position_embeddings")? as f32,
                ),
                1.0,
            ),
            "yarn" => {
                let original = required("original_max_position_embeddings")?;
                let factor = number("factor")?.unwrap_or(max_position_embeddings as f64 / original);
                let truncate = object
                    .get("truncate")
                    .and_then(Value::as_bool)
                    .unwrap_or(true);
                let attention = match number("attention_factor")? {
                    Some(a) => a,
                    None => match (number("mscale")?, number("mscale_all_dim")?) {
                        (Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                            yarn_mscale(factor, m) / yarn_mscale(factor, all)
                        }
                        _ => yarn_mscale(factor, 1.0),
                    },
                };
                let yarn = Yarn {
                    theta,
                    head_dim,
                    factor,
                    original,
                    beta_fast: number("beta_fast")?.filter(|&b| b != 0.0).unwrap_or(32.0),
                    beta_slow: number("beta_slow")?.filter(|&b| b != 0.0).unwrap_or(1.0),
                    truncate,
                };
                (yarn.inv_freq(), attention as f32)
            }
            other => {
                return Err(fields.error(
                    field,
                    format!(
                        "rope type {other:?} is not supported (graft builds {KINDS}; \
                         \"dynamic\" and \"longrope\" change with the sequence length)"
                    ),
                ))
            }
        };
        Ok(Rope {
            inv_freq,
            attention_factor,
            kind,
        })
    }
}

/// `1 / theta^(2i/d)` for `i < d/2`, in float32 as transformers computes it.
fn default_inv_freq(theta: f64, head_dim: usize) -> Vec<f32> {
    let dim = head_dim as f32;
    (0..head_dim)
        .step_by(2)
        .map(|i| 1.0 / (theta as f32).powf(i as f32 / dim))
        .collect()
}

/// Llama 3.1's frequency scaling: long wavelengths divided by `factor`, short ones kept, the
/// band between interpolated.
fn llama3(base: &[f32], factor: f32, low: f32, high: f32, original: f32) -> Vec<f32> {
    let low_wavelen = original / low;
    let high_wavelen = original / high;
    base.iter()
        .map(|&f| {
            let wavelen = 2.0 * std::f32::consts::PI / f;
            let scaled = if wavelen > low_wavelen { f / factor } else { f };
            let smooth = (original / wavelen - low) / (high - low);
            let smoothed = (1.0 - smooth) * scaled / factor + smooth * scaled;
            let medium = (high_wavelen..=low_wavelen).contains(&wavelen);
            if medium {
                smoothed
            } else {
                scaled
            }
        })
        .collect()
}

fn yarn_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

/// YaRN's parameters.
struct Yarn {
    theta: f64,
    head_dim: usize,
    factor: f64,
    original: f64,
    beta_fast: f64,
    beta_slow: f64,
    truncate: bool,
}

impl Yarn {
    /// Interpolated frequencies below the correction range, extrapolated above, a linear ramp
    /// between.
    fn inv_freq(&self) -> Vec<f32> {
        let dim = self.head_dim as f64;
        let correction = |rotations: f64| {
            (dim * (self.original / (rotations * 2.0 * std::f64::consts::PI)).ln())
                / (2.0 * self.theta.ln())
        };
        let (mut low, mut high) = (correction(self.beta_fast), correction(self.beta_slow));
        if self.truncate {
            low = low.floor();
            high = high.ceil();
        }
        let (low, mut high) = (low.max(0.0), high.min(dim - 1.0));
        if low == high {
            high += 0.001;
        }
        let dim32 = self.head_dim as f32;
        (0..self.head_dim / 2)
            .map(|i| {
                let pos_freq = (self.theta as f32).powf((2 * i) as f32 / dim32);
                let extrapolation = 1.0 / pos_freq;
                let interpolation = 1.0 / (self.factor as f32 * pos_freq);
                let ramp = ((i as f32 - low as f32) / (high as f32 - low as f32)).clamp(0.0, 1.0);
                let extrapolation_factor = 1.0 - ramp;
                interpolation * (1.0 - extrapolation_factor) + extrapolation * extrapolation_factor
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_frequencies_fall_from_one() {
        let f = default_inv_freq(10000.0, 8);
        assert_eq!(f.len(), 4);
        assert_eq!(f[0], 1.0);
        assert!((f[1] - 0.1).abs() < 1e-7 && (f[3] - 0.001).abs() < 1e-9);
    }

    #[test]
    fn llama3_keeps_short_wavelengths_and_divides_long_ones() {
        let base = [1.0f32, 1e-4];
        let scaled = llama3(&base, 8.0, 1.0, 4.0, 8192.0);
        assert_eq!(scaled[0], 1.0);
        assert!((scaled[1] - 1e-4 / 8.0).abs() < 1e-12);
    }
}
