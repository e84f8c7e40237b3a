//! Gradient rules of elementwise ops: arithmetic, activations, selection, casts and dropout.
//! Inputs that broadcast get [`Gradient::Broadcast`]; the driver reduces them.

use std::f64::consts::PI;

use super::{Gradient, Gradients, RuleContext};
use crate::ir::attributes::int_attribute;
use crate::Result;

fn broadcast(value: String) -> Option<Gradient> {
    Some(Gradient::Broadcast(value))
}

fn exact(value: String) -> Option<Gradient> {
    Some(Gradient::Exact(value))
}

pub(super) fn add(ctx: &mut RuleContext) -> Result<Gradients> {
    let upstream = ctx.output_gradient(0)?;
    Ok(vec![broadcast(upstream.clone()), broadcast(upstream)])
}

pub(super) fn sub(ctx: &mut RuleContext) -> Result<Gradients> {
    let upstream = ctx.output_gradient(0)?;
    let negated = ctx.op("Neg", &[&upstream]);
    Ok(vec![broadcast(upstream), broadcast(negated)])
}

pub(super) fn mul(ctx: &mut RuleContext) -> Result<Gradients> {
    let (a, b) = (ctx.input(0)?, ctx.input(1)?);
    let upstream = ctx.output_gradient(0)?;
    let a_gradient = ctx.wants(0).then(|| ctx.op("Mul", &[&upstream, b]));
    let b_gradient = ctx.wants(1).then(|| ctx.op("Mul", &[&upstream, a]));
    Ok(vec![
        a_gradient.and_then(broadcast),
        b_gradient.and_then(broadcast),
    ])
}

pub(super) fn div(ctx: &mut RuleContext) -> Result<Gradients> {
    let (b, out) = (ctx.input(1)?, ctx.output(0)?);
    let upstream = ctx.output_gradient(0)?;
    let a_gradient = ctx.wants(0).then(|| ctx.op("Div", &[&upstream, b]));
    let b_gradient = ctx.wants(1).then(|| {
        let product = ctx.op("Mul", &[&upstream, out]);
        let quotient = ctx.op("Div", &[&product, b]);
        ctx.op("Neg", &[&quotient])
    });
    Ok(vec![
        a_gradient.and_then(broadcast),
        b_gradient.and_then(broadcast),
    ])
}

pub(super) fn neg(ctx: &mut RuleContext) -> Result<Gradients> {
    let upstream = ctx.output_gradient(0)?;
    Ok(vec![exact(ctx.op("Neg", &[&upstream]))])
}

pub(super) fn pow(ctx: &mut RuleContext) -> Result<Gradients> {
    let (a, b, out) = (ctx.input(0)?, ctx.input(1)?, ctx.output(0)?);
    let upstream = ctx.output_gradient(0)?;
    let mut gradients = vec![None, None];
    if ctx.wants(0) {
        let exponent = ctx.cast_like(b, a);
        let one = ctx.scalar(1.0, a)?;
        let lowered = ctx.op("Sub", &[&exponent, &one]);
        let power = ctx.op("Pow", &[a, &lowered]);
        let scaled = ctx.op("Mul", &[&exponent, &power]);
        gradients[0] = broadcast(ctx.op("Mul", &[&upstream, &scaled]));
    }
    if ctx.wants(1) {
        let log = ctx.op("Log", &[a]);
        let product = ctx.op("Mul", &[out, &log]);
        let gradient = ctx.op("Mul", &[&upstream, &product]);
        gradients[1] = broadcast(ctx.cast_like(&gradient, b));
    }
    Ok(gradients)
}

pub(super) fn sqrt(ctx: &mut RuleContext) -> Result<Gradients> {
    let out = ctx.output(0)?;
    let upstream = ctx.output_gradient(0)?;
    let half = ctx.scalar(0.5, out)?;
    let scaled = ctx.op("Mul", &[&upstream, &half]);
    Ok(vec![exact(ctx.op("Div", &[&scaled, out]))])
}

pub(super) fn reciprocal(ctx: &mut RuleContext) -> Result<Gradients> {
    let out = ctx.output(0)?;
    let upstream = ctx.output_gradient(0)?;
    let square = ctx.op("Mul", &[out, out]);
    let product = ctx.op("Mul", &[&upstream, &square]);
    Ok(vec![exact(ctx.op("Neg", &[&product]))])
}

pub(super) fn exp(ctx: &mut RuleContext) -> Result<Gradients> {
    let out = ctx.output(0)?;
    let upstream = ctx.output_gradient(0)?;
    Ok(vec![exact(ctx.op("Mul", &[&upstream, out]))])
}

pub(super) fn log(ctx: &mut RuleContext) -> Result<Gradients> {
    let a = ctx.input(0)?;
    let upstream = ctx.output_gradient(0)?;
    Ok(vec![exact(ctx.op("Div", &[&upstream, a]))])
}

pub(super) fn tanh(ctx: &mut RuleContext) -> Result<Gradients> {
    let out = ctx.output(0)?;
    let upstream = ctx.output_gradient(0)?;
    let one = ctx.scalar(1.0, out)?;
    let square = ctx.op("Mul", &[out, out]);
    let derivative = ctx.op("Sub", &[&one, &square]);
    Ok(vec![exact(ctx.op("Mul", &[&upstream, &derivative]))])
}

pub(super) fn sigmoid(ctx: &mut RuleContext) -> Result<Gradients> {
    let out = ctx.output(0)?;
    let upstream = ctx.output_gradient(0)?;
    let one = ctx.scalar(1.0, out)?;
    let complement = ctx.op("Sub", &[&one, out]);
    let derivative = ctx.op("Mul", &[out, &complement]);
    Ok(vec![exact(ctx.op("Mul", &[&upstream, &derivative]))])
}

pub(super) fn relu(ctx: &mut RuleContext) -> Result<Gradients> {
    let a = ctx.input(0)?;
    let upstream = ctx.output_gradient(0)?;
    let zero = ctx.scalar(0.0, a)?;
    let positive = ctx.op("Greater", &[a, &zero]);
    Ok(vec![exact(ctx.op("Where", &[&positive, &upstream, &zero]))])
}

pub(super) fn leaky_relu(ctx: &mut RuleContext) -> Result<Gradients> {
    let a = ctx.input(0)?;
    let upstream = ctx.output_gradient(0)?;
    let zero = ctx.scalar(0.0, a)?;
    let alpha = ctx.scalar(f64::from(ctx.attr_float("alpha", 0.01)), a)?;
    let positive = ctx.op("Greater", &[a, &zero]);
    let leaked = ctx.op("Mul", &[&upstream, &alpha]);
    Ok(vec![exact(
        ctx.op("Where", &[&positive, &upstream, &leaked]),
    )])
}

pub(super) fn erf(ctx: &mut RuleContext) -> Result<Gradients> {
    let a = ctx.input(0)?;
    let upstream = ctx.output_gradient(0)?;
    let square = ctx.op("Mul", &[a, a]);
    let negated = ctx.op("Neg", &[&square]);
    let gaussian = ctx.op("Exp", &[&negated]);
    let scale = ctx.scalar(2.0 / PI.sqrt(), a)?;
    let derivative = ctx.op("Mul", &[&gaussian, &scale]);
    Ok(vec![exact(ctx.op("Mul", &[&upstream, &derivative]))])
}

pub(super) fn gelu(ctx: &mut RuleContext) -> Result<Gradients> {
    let a = ctx.input(0)?;
    let upstream = ctx.output_gradient(0)?;
    let approximate = ctx.node.attr_string("approximate").unwrap_or_default();
    let half = ctx.scalar(0.5, a)?;
    let one = ctx.scalar(1.0, a)?;
    let square = ctx.op("Mul", &[a, a]);
    let derivative = match approximate.as_str() {
        "" | "none" => {
            // d/dx x·Φ(x) = Φ(x) + x·φ(x).
            let inverse_sqrt2 = ctx.scalar(std::f64::consts::FRAC_1_SQRT_2, a)?;
            let scaled = ctx.op("Mul", &[a, &inverse_sqrt2]);
            let erf = ctx.op("Erf", &[&scaled]);
            let shifted = ctx.op("Add", &[&erf, &one]);
            let cdf = ctx.op("Mul", &[&shifted, &half]);
            let minus_half = ctx.scalar(-0.5, a)?;
            let exponent = ctx.op("Mul", &[&square, &minus_half]);
            let gaussian = ctx.op("Exp", &[&exponent]);
            let normalizer = ctx.scalar(1.0 / (2.0 * PI).sqrt(), a)?;
            let pdf = ctx.op("Mul", &[&gaussian, &normalizer]);
            let x_pdf = ctx.op("Mul", &[a, &pdf]);
            ctx.op("Add", &[&cdf, &x_pdf])
        }
        "tanh" => {
            // gelu = ½x(1 + tanh(u)), u = √(2/π)(x + 0.044715x³).
            let coefficient = 0.044715;
            let sqrt_two_over_pi = ctx.scalar((2.0 / PI).sqrt(), a)?;
            let cubic_coefficient = ctx.scalar(coefficient, a)?;
            let triple_coefficient = ctx.scalar(3.0 * coefficient, a)?;
            let cube = ctx.op("Mul", &[&square, a]);
            let cubic = ctx.op("Mul", &[&cube, &cubic_coefficient]);
            let sum = ctx.op("Add", &[a, &cubic]);
            let u = ctx.op("Mul", &[&sum, &sqrt_two_over_pi]);
            let tanh_u = ctx.op("Tanh", &[&u]);
            let one_plus_tanh = ctx.op("Add", &[&one, &tanh_u]);
            let first = ctx.op("Mul", &[&one_plus_tanh, &half]);
            let tanh_square = ctx.op("Mul", &[&tanh_u, &tanh_u]);
            let sech_square = ctx.op("Sub", &[&one, &tanh_square]);
            let quadratic = ctx.op("Mul", &[&square, &triple_coefficient]);
            let inner = ctx.op("Add", &[&one, &quadratic]);
            let u_derivative = ctx.op("Mul", &[&inner, &sqrt_two_over_pi]);
            let half_x = ctx.op("Mul", &[a, &half]);
            let product = ctx.op("Mul", &[&half_x, &sech_square]);
            let second = ctx.op("Mul", &[&product, &u_derivative]);
            ctx.op("Add", &[&first, &second])
        }
        other => return Err(ctx.unsupported(format_args!("unknown approximate={other:?}"))),
    };
    Ok(vec![exact(ctx.op("Mul", &[&upstream, &derivative]))])
}

pub(super) fn sin(ctx: &mut RuleContext) -> Result<Gradients> {
    let a = ctx.input(0)?;
    let upstream = ctx.output_gradient(0)?;
    let cos = ctx.op("Cos", &[a]);
    Ok(vec![exact(ctx.op("Mul", &[&upstream, &cos]))])
}

pub(super) fn cos(ctx: &mut RuleContext) -> Result<Gradients> {
    let a = ctx.input(0)?;
    let upstream = ctx.output_gradient(0)?;
    let sin = ctx.op("Sin", &[a]);
    let product = ctx.op("Mul", &[&upstream, &sin]);
    Ok(vec![exact(ctx.op("Neg", &[&product]))])
}

pub(super) fn abs(ctx: &mut RuleContext) -> Result<Gradients> {
    let a = ctx.input(0)?;
    let upstream = ctx.output_gradient(0)?;
    let sign = ctx.op("Sign", &[a]);
    Ok(vec![exact(ctx.op("Mul", &[&upstream, &sign]))])
}

/// Max and Min: each input that attains the result gets the gradient, shared equally on ties.
pub(super) fn max_min(ctx: &mut RuleContext) -> Result<Gradients> {
    let out = ctx.output(0)?;
    let upstream = ctx.output_gradient(0)?;
    let inputs: Vec<&str> = ctx.node.inputs.iter().map(String::as_str).collect();
    if inputs.len() == 1 {
        return Ok(vec![exact(upstream)]);
    }
    let mut masks = Vec::with_capacity(inputs.len());
    for input in &inputs {
        let equal = ctx.op("Equal", &[input, out]);
        masks.push(ctx.op("CastLike", &[&equal, out]));
    }
    let mask_names: Vec<&str> = masks.iter().map(String::as_str).collect();
    let count = ctx.op("Sum", &mask_names);
    let shared = ctx.op("Div", &[&upstream, &count]);
    let mut gradients = Vec::with_capacity(inputs.len());
    for (slot, mask) in masks.iter().enumerate() {
        gradients.push(
            ctx.wants(slot)
                .then(|| ctx.op("Mul", &[&shared, mask]))
                .and_then(broadcast),
        );
    }
    Ok(gradients)
}

pub(super) fn sum(ctx: &mut RuleContext) -> Result<Gradients> {
    let upstream = ctx.output_gradient(0)?;
    Ok(ctx
        .node
        .inputs
        .iter()
        .map(|_| broadcast(upstream.clone()))
        .collect())
}

pub(super) fn mean(ctx: &mut RuleContext) -> Result<Gradients> {
    let out = ctx.output(0)?;
    let upstream = ctx.output_gradient(0)?;
    let count = ctx.scalar(ctx.node.inputs.len() as f64, out)?;
    let shared = ctx.op("Div", &[&upstream, &count]);
    Ok(ctx
        .node
        .inputs
        .iter()
        .map(|_| broadcast(shared.clone()))
        .collect())
}

/// Clip: the gradient passes where `min ≤ x ≤ max` (PyTorch's `clamp`); bounds get none.
pub(super) fn clip(ctx: &mut RuleContext) -> Result<Gradients> {
    let a = ctx.input(0)?;
    let upstream = ctx.output_gradient(0)?;
    let zero = ctx.scalar(0.0, a)?;
    let mut gradient = upstream;
    for (slot, comparison) in [(1, "GreaterOrEqual"), (2, "LessOrEqual")] {
        if let Some(bound) = ctx.node.input(slot) {
            let inside = ctx.op(comparison, &[a, bound]);
            gradient = ctx.op("Where", &[&inside, &gradient, &zero]);
        }
    }
    Ok(vec![exact(gradient), None, None])
}

/// Where(condition, x, y): x gets the gradient where the condition holds, y elsewhere.
pub(super) fn select(ctx: &mut RuleContext) -> Result<Gradients> {
    let (condition, out) = (ctx.input(0)?, ctx.output(0)?);
    let upstream = ctx.output_gradient(0)?;
    let zero = ctx.scalar(0.0, out)?;
    let x_gradient = ctx
        .wants(1)
        .then(|| ctx.op("Where", &[condition, &upstream, &zero]));
    let y_gradient = ctx
        .wants(2)
        .then(|| ctx.op("Where", &[condition, &zero, &upstream]));
    Ok(vec![
        None,
        x_gradient.and_then(broadcast),
        y_gradient.and_then(broadcast),
    ])
}

pub(super) fn cast(ctx: &mut RuleContext) -> Result<Gradients> {
    let a = ctx.input(0)?;
    let upstream = ctx.output_gradient(0)?;
    let gradient = match ctx.known_dtype(a) {
        Some(dtype) => ctx.op_with(
            "Cast",
            &[&upstream],
            vec![int_attribute("to", i64::from(dtype.code()))],
        ),
        None => ctx.op("CastLike", &[&upstream, a]),
    };
    Ok(vec![exact(gradient)])
}

pub(super) fn cast_like(ctx: &mut RuleContext) -> Result<Gradients> {
    let a = ctx.input(0)?;
    let upstream = ctx.output_gradient(0)?;
    Ok(vec![exact(ctx.op("CastLike", &[&upstream, a])), None])
}

pub(super) fn identity(ctx: &mut RuleContext) -> Result<Gradients> {
    Ok(vec![exact(ctx.output_gradient(0)?)])
}

/// Dropout: the identity unless `training_mode` may be true; then the kept elements, scaled by
/// 1/(1 − ratio), read from the mask output.
pub(super) fn dropout(ctx: &mut RuleContext) -> Result<Gradients> {
    let upstream = ctx.output_gradient(0)?;
    let Some(training_mode) = ctx.node.input(2) else {
        return Ok(vec![exact(upstream), None, None]);
    };
    let constant_mode = ctx
        .constant_ints(training_mode)
        .and_then(|v| v.first().copied());
    if constant_mode == Some(0) {
        return Ok(vec![exact(upstream), None, None]);
    }
    let mask = ctx
        .node
        .outputs
        .get(1)
        .filter(|m| !m.is_empty())
        .ok_or_else(|| ctx.unsupported("training mode needs the mask output to differentiate"))?;
    let a = ctx.input(0)?;
    let one = ctx.scalar(1.0, a)?;
    let ratio = match ctx.node.input(1) {
        Some(ratio) => ctx.cast_like(ratio, a),
        None => ctx.scalar(0.5, a)?,
    };
    let kept = ctx.op("Sub", &[&one, &ratio]);
    let scale = ctx.op("Div", &[&one, &kept]);
    let mask_values = ctx.op("CastLike", &[mask, a]);
    let masked = ctx.op("Mul", &[&upstream, &mask_values]);
    let mut gradient = ctx.op("Mul", &[&masked, &scale]);
    if constant_mode.is_none() {
        gradient = ctx.op("Where", &[training_mode, &gradient, &upstream]);
    }
    Ok(vec![exact(gradient), None, None])
}
