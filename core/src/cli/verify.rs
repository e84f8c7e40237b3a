//! `graft verify`: whether a model and its external data are intact.

use std::path::PathBuf;

use graft::onnx::{self, Verification};

/// Check that a model and its external data are intact and consistent.
///
/// Confirms that MODEL parses, that every external-data location stays inside the model's
/// folder and every tensor's bytes lie inside its file with the size its type and dims need,
/// that the graph is acyclic and wired in order, and — for models graft saved, which record a
/// CRC-32 of every tensor in their metadata — that every tensor's bytes still match the
/// checksum recorded at save time. This tells a damaged model (a truncated or overwritten data
/// file, a data file from another export, flipped bits) from a good one. Checksums detect
/// accidents, not tampering: see SECURITY.md.
///
/// Exit status 0 when intact, 2 when anything is wrong (each problem is named). `--json` prints
/// `{"model","nodes","initializers","inline_bytes","external_files":[{"location","file_bytes",
/// "tensors","tensor_bytes"}],"checksums_matched","checksums_missing":[names],"problems":[…]}`
/// for a model that loads; one that does not load is an error message, as for any command.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The ONNX model to check.
    model: PathBuf,
    /// Count a tensor without a recorded checksum as a problem (for models that must have
    /// been saved by graft).
    #[arg(long)]
    require_checksums: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut report = onnx::verify(&args.model)?;
    if args.require_checksums && !report.checksums_missing.is_empty() {
        report.problems.push(format!(
            "{} of {} tensors have no recorded checksum (first: {:?}); re-save the model with \
             `graft convert` to record them",
            report.checksums_missing.len(),
            report.initializers,
            report.checksums_missing[0]
        ));
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    match report.problems.len() {
        0 => Ok(()),
        1 => anyhow::bail!(
            "{} is damaged: {}",
            args.model.display(),
            report.problems[0]
        ),
        n => anyhow::bail!(
            "{} is damaged: {n} problems (listed above)",
            args.model.display()
        ),
    }
}

fn print_report(report: &Verification) {
    let status = if report.is_intact() {
        "intact"
    } else {
        "DAMAGED"
    };
    println!("{}: {status}", report.model.display());
    println!(
        "  {} nodes, {} initializers: {} inline",
        report.nodes,
        report.initializers,
        bytes(report.inline_bytes)
    );
    for file in &report.external_files {
        println!(
            "  {}: {} tensors, {} of a {} file",
            file.location,
            file.tensors,
            bytes(file.tensor_bytes),
            bytes(file.file_bytes)
        );
    }
    let missing = report.checksums_missing.len();
    if missing == report.initializers && report.checksums_matched == 0 {
        println!("  checksums: none recorded (not saved by graft); sizes and offsets checked only");
    } else {
        println!(
            "  checksums: {} of {} tensors match{}",
            report.checksums_matched,
            report.initializers,
            if missing > 0 {
                format!(", {missing} have none recorded")
            } else {
                String::new()
            }
        );
    }
    if report.problems.len() > 1 {
        for problem in &report.problems {
            println!("  problem: {problem}");
        }
    }
}

/// `n` bytes for people: `512 B`, `3.2 kB`, `1.5 MB`, `7.1 GB`.
fn bytes(n: u64) -> String {
    let n = n as f64;
    match n {
        n if n >= 1e9 => format!("{:.1} GB", n / 1e9),
        n if n >= 1e6 => format!("{:.1} MB", n / 1e6),
        n if n >= 1e3 => format!("{:.1} kB", n / 1e3),
        n => format!("{n} B"),
    }
}
