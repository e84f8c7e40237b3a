//! `graft combine`: weighted combinations of HF PEFT LoRA adapters.

use std::path::PathBuf;

use graft::peft::{Combination, CombineOptions, MajoritySign};

/// Combine HF PEFT LoRA adapters into one, as PEFT's `add_weighted_adapter` does.
///
/// Reads two or more LoRA adapter folders (as `graft export --format peft`, `graft train` or
/// PEFT's `save_pretrained` write them) and writes one adapter folder that PEFT and `graft apply
/// --from-peft` load. No model is needed.
///
/// Combinations (PEFT's `combination_type`):
///   linear           weighted sum of the factors (A with sign(w·s)·√|w·s|, B with √|w·s|)
///   cat              factors stacked: rank = the sum of the ranks; the update is exactly Σ w·ΔW
///   svd              truncated SVD of Σ w·ΔW at --svd-rank (default: the largest rank)
///   ties             magnitude pruning to --density, sign election, disjoint mean
///   magnitude_prune  magnitude pruning to --density, then the weighted sum
///   dare_linear      random pruning to --density with rescaling, then the weighted sum
///   dare_ties        DARE pruning, then TIES' sign election and disjoint mean
///
/// linear, ties, magnitude_prune and the DARE variants need adapters of one rank. DARE draws from
/// graft's generator (--seed); PEFT draws from torch's, so the two agree in distribution, not
/// value for value. Full tensors of the sources (modules_to_save) are left out, as in PEFT.
///
/// Example: graft combine math/ code/ --weights 0.7,0.3 --combination svd -o mixed/
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The LoRA adapter folders to combine.
    #[arg(required = true, num_args = 2..)]
    adapters: Vec<PathBuf>,
    /// One weight per adapter, comma separated (negative weights subtract).
    #[arg(
        long,
        value_delimiter = ',',
        allow_hyphen_values = true,
        required = true
    )]
    weights: Vec<f64>,
    /// How to combine: linear, cat, svd, ties, magnitude_prune, dare_linear, dare_ties.
    #[arg(long, default_value = "svd")]
    combination: String,
    /// Fraction of values kept by ties, magnitude_prune and the DARE variants, in [0, 1].
    #[arg(long, default_value_t = 1.0)]
    density: f64,
    /// TIES' sign election: total (sign of the sum) or frequency (sign of the majority).
    #[arg(long, default_value = "total")]
    majority_sign: String,
    /// Rank of an svd combination (default: the largest rank of the adapters).
    #[arg(long)]
    svd_rank: Option<usize>,
    /// Seed of DARE's random pruning.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    /// The adapter folder to write.
    #[arg(short, long)]
    output: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let combination = Combination::from_name(&args.combination).ok_or_else(|| {
        let names: Vec<&str> = Combination::ALL.iter().map(|(n, _)| *n).collect();
        graft::Error::Config(format!(
            "--combination {:?} is not one of: {}",
            args.combination,
            names.join(", ")
        ))
    })?;
    let majority_sign = match args.majority_sign.as_str() {
        "total" => MajoritySign::Total,
        "frequency" => MajoritySign::Frequency,
        other => {
            return Err(graft::Error::Config(format!(
                "--majority-sign {other:?} is not one of: total, frequency"
            ))
            .into())
        }
    };
    let options = CombineOptions {
        combination,
        weights: args.weights,
        density: args.density,
        majority_sign,
        svd_rank: args.svd_rank,
        seed: args.seed,
    };
    let report = graft::peft::combine(&args.adapters, &options, &args.output)?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "output": args.output,
                "combination": args.combination,
                "r": report.r,
                "modules": report.modules,
                "dropped_keys": report.dropped_keys,
            })
        );
        return Ok(());
    }
    for key in &report.dropped_keys {
        eprintln!("warning: left out {key} (not a LoRA factor)");
    }
    println!(
        "combined {} adapters ({}) over {} modules at rank {}",
        args.adapters.len(),
        args.combination,
        report.modules.len(),
        report.r
    );
    println!("wrote {}", args.output.display());
    Ok(())
}
