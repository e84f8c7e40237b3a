//! `graft train`: train a patched model's adapter through ONNX Runtime.

use std::path::PathBuf;

use anyhow::Context;
use graft::runtime::{Device, SessionOptions};
use graft::train::optimizer::{OptimizerKind, Schedule};
use graft::train::{train, Task, TrainOptions};

/// Train the trainable tensors of a model written by `graft apply`.
///
/// graft differentiates the patched graph itself (forward + loss + gradients as standard ONNX),
/// runs it in an ONNX Runtime session, and updates the parameters on the host with AdamW (as
/// `torch.optim.AdamW`) or SGD. Data is pre-tokenized JSONL, one example per line:
/// `{"input_ids":[…],"attention_mask":[…],"label":1}` (seq-cls, regression) or `"labels":[…]`
/// (causal-lm, token-cls); other model inputs (`token_type_ids`) are taken by name.
///
/// Writes `metrics.jsonl` (one line per step: step, loss, lr, grad_norm, tokens_per_s),
/// `adapter.safetensors` (graft's names; `graft merge --adapter` reads it) and the adapter in HF
/// PEFT's format (`adapter_model.safetensors`, `adapter_config.json`) into RUN_DIR.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A model written by `graft apply`.
    patched: PathBuf,
    /// What to train for (decides the loss on the model's first output).
    #[arg(long, value_enum)]
    task: Task,
    /// Pre-tokenized JSONL training data.
    #[arg(long, value_name = "FILE.jsonl")]
    data: PathBuf,
    /// The run folder.
    #[arg(long, value_name = "RUN_DIR")]
    out: PathBuf,
    /// Start from this HF PEFT adapter (folder or adapter_model.safetensors) instead of the
    /// model's initial values.
    #[arg(long, value_name = "PEFT_DIR")]
    init_adapter: Option<PathBuf>,
    /// Optimizer steps (default: --epochs worth of batches).
    #[arg(long, conflicts_with = "epochs")]
    steps: Option<u64>,
    /// Passes over the data.
    #[arg(long, default_value_t = 1)]
    epochs: u64,
    /// Examples per batch.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Batches whose gradients are averaged per optimizer step.
    #[arg(long, default_value_t = 1)]
    grad_accumulation: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Decoupled weight decay (AdamW) or L2 penalty (SGD).
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// The update rule.
    #[arg(long, value_enum, default_value_t = OptimizerChoice::Adamw)]
    optimizer: OptimizerChoice,
    /// AdamW's β₁ and β₂.
    #[arg(long, num_args = 2, value_names = ["BETA1", "BETA2"], default_values_t = [0.9, 0.999])]
    betas: Vec<f64>,
    /// AdamW's ε.
    #[arg(long, default_value_t = 1e-8)]
    eps: f64,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.0)]
    momentum: f64,
    /// Linear warmup steps.
    #[arg(long, default_value_t = 0)]
    warmup: u64,
    /// Learning-rate schedule after warmup.
    #[arg(long, value_enum, default_value_t = Schedule::Constant)]
    schedule: Schedule,
    /// Clip the global gradient norm to this value.
    #[arg(long)]
    clip_norm: Option<f64>,
    /// Seed of the data order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Visit examples in file order (batches are consecutive lines).
    #[arg(long)]
    no_shuffle: bool,
    /// Skip malformed data lines (counted) instead of stopping at the first.
    #[arg(long)]
    skip_bad_lines: bool,
    /// Execution provider.
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    device: Device,
    /// Intra-op threads (0: ONNX Runtime's choice).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

/// Optimizers.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum OptimizerChoice {
    /// torch.optim.AdamW.
    Adamw,
    /// torch.optim.SGD (with --momentum).
    Sgd,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut model = graft::onnx::load(&args.patched)?;
    if let Some(adapter) = &args.init_adapter {
        let n = graft::peft::load_values(&mut model, adapter)?;
        println!("initial adapter: {n} tensors from {}", adapter.display());
    }
    let optimizer = match args.optimizer {
        OptimizerChoice::Adamw => OptimizerKind::AdamW {
            beta1: args.betas[0],
            beta2: args.betas[1],
            eps: args.eps,
            weight_decay: args.weight_decay,
        },
        OptimizerChoice::Sgd => OptimizerKind::Sgd {
            momentum: args.momentum,
            weight_decay: args.weight_decay,
        },
    };
    let options = TrainOptions {
        task: args.task,
        data: args.data.clone(),
        out: args.out.clone(),
        steps: args.steps,
        epochs: args.epochs,
        batch_size: args.batch_size,
        grad_accumulation: args.grad_accumulation,
        lr: args.lr,
        optimizer,
        warmup: args.warmup,
        schedule: args.schedule,
        clip_norm: args.clip_norm,
        seed: args.seed,
        shuffle: !args.no_shuffle,
        skip_bad_lines: args.skip_bad_lines,
        session: SessionOptions {
            device: args.device,
            threads: args.threads,
            exact: false,
        },
    };
    let summary = train(&model, &options, |m| {
        println!(
            "step {:>5}  loss {:.6}  lr {:.3e}  grad_norm {:.4}  {:.0} tokens/s",
            m.step, m.loss, m.lr, m.grad_norm, m.tokens_per_s
        );
    })
    .with_context(|| format!("training {}", args.patched.display()))?;
    println!(
        "trained {} steps in {:.1} s: loss {:.4} → {:.4}; metrics and adapter in {}",
        summary.steps,
        summary.seconds,
        summary.first_loss,
        summary.last_loss,
        summary.out.display()
    );
    Ok(())
}
