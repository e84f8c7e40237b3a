//! The loss curve of a run as an SVG image: training loss per step, evaluation loss as points.

use std::path::Path;

use plotters::prelude::*;

use crate::atomic_file::write_atomically;
use crate::{Error, Result};

/// Draws `training` (step, loss) as a line and `evaluation` (step, loss) as dots into an SVG
/// file at `path`, written atomically. Non-finite values are left out.
pub fn write_loss_curve(
    path: &Path,
    training: &[(u64, f64)],
    evaluation: &[(u64, f64)],
) -> Result<()> {
    let mut svg = String::new();
    draw(&mut svg, training, evaluation).map_err(|e| {
        Error::Config(format!(
            "{}: cannot draw the loss curve: {e}",
            path.display()
        ))
    })?;
    write_atomically(path, svg.as_bytes())
}

fn draw(
    svg: &mut String,
    training: &[(u64, f64)],
    evaluation: &[(u64, f64)],
) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let finite = |points: &[(u64, f64)]| -> Vec<(f64, f64)> {
        points
            .iter()
            .filter(|(_, loss)| loss.is_finite())
            .map(|&(step, loss)| (step as f64, loss))
            .collect()
    };
    let training = finite(training);
    let evaluation = finite(evaluation);
    let all = || training.iter().chain(&evaluation);
    let last_step = all().map(|p| p.0).fold(1.0, f64::max);
    let (low, high) = all().fold((f64::INFINITY, f64::NEG_INFINITY), |(low, high), p| {
        (low.min(p.1), high.max(p.1))
    });
    let (low, high) = if low.is_finite() {
        let margin = ((high - low) * 0.05).max(1e-6);
        (low - margin, high + margin)
    } else {
        (0.0, 1.0)
    };

    let root = SVGBackend::with_string(svg, (800, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("loss", ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..last_step, low..high)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("loss")
        .draw()?;
    chart
        .draw_series(LineSeries::new(training, BLUE.stroke_width(2)))?
        .label("training")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLUE.stroke_width(2)));
    if !evaluation.is_empty() {
        chart
            .draw_series(
                evaluation
                    .iter()
                    .map(|&point| Circle::new(point, 4, RED.filled())),
            )?
            .label("evaluation")
            .legend(|(x, y)| Circle::new((x + 8, y), 4, RED.filled()));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()?;
    root.present()?;
    Ok(())
}
