//! `graft train`: train a patched model's adapter through ONNX Runtime.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;
use graft::runtime::{Device, Precision, SessionOptions};
use graft::train::data::DataFormat;
use graft::train::optimizer::{OptimizerKind, Schedule};
use graft::train::{train, EvalMetrics, StepMetrics, Task, TrainEvent, TrainOptions, TrainSummary};
use indicatif::{ProgressBar, ProgressStyle};

/// Train the trainable tensors of a model written by `graft apply`.
///
/// graft differentiates the patched graph itself (forward + loss + gradients as standard ONNX),
/// runs it in an ONNX Runtime session, and updates the parameters on the host with AdamW (as
/// `torch.optim.AdamW`) or SGD.
///
/// Data (--data-format, told from the file when `auto`), one example per line:
/// pre-tokenized JSONL `{"input_ids":[…],"attention_mask":[…],"label":1}` (seq-cls, regression)
/// or `"labels":[…]` (causal-lm, token-cls), other inputs (`token_type_ids`) taken by name;
/// `text`: `{"text":…,"label":1}` with an optional `"text_pair"` (seq-cls, regression);
/// `instruction`: `{"instruction":…,"input":…,"output":…}` (causal-lm; the prompt
/// "Instruction: …\nInput: …\nResponse:\n" is not scored, the output and end-of-sequence are);
/// `plain`: one document per line of a .txt file, or `{"text":…}` (causal-lm). The text formats
/// are tokenized with --tokenizer and cut to --max-len tokens.
///
/// Writes into RUN_DIR: `metrics.jsonl` (one line per step: step, loss, lr, grad_norm,
/// tokens_per_s; one per evaluation: step, eval_loss, eval_accuracy), `checkpoint/` (adapter,
/// optimizer state, data position; every --save-every steps and at the end), `loss.svg`,
/// `adapter.safetensors` (graft's names; `graft merge --adapter` reads it) and the adapter in HF
/// PEFT's format (`adapter_model.safetensors`, `adapter_config.json`). A non-finite loss stops
/// the run (exit status 2) and leaves the last good checkpoint in place; `--resume RUN_DIR`
/// continues from a checkpoint with the same per-step results as an uninterrupted run (with
/// LoRA dropout above 0, the resumed part draws its dropout masks afresh: ONNX Runtime keeps the
/// dropout generator in the session, so only the loss curve's shape, not each value, repeats).
/// A resume is refused when the learning rate, schedule, warmup, clipping, patched model or
/// training examples (data file, tokenizer, --max-len) differ from the checkpoint's, unless
/// --accept-changes is given, which continues and reports each change.
///
/// Methods take part in training through their plugins: loss terms (logged per step under
/// `loss_terms`), inputs graft feeds at every step, and step hooks that run after each optimizer
/// step (AdaLoRA's rank allocation; their figures are logged under `plugin`, their state is
/// checkpointed). `--train METHOD` trains some methods and keeps the others frozen.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A model written by `graft apply`.
    patched: PathBuf,
    /// Train only these methods (comma separated or repeated; default: every method); the
    /// tensors of the others stay frozen, byte for byte.
    #[arg(long = "train", value_name = "METHOD", value_delimiter = ',')]
    train_methods: Vec<String>,
    /// Load a plugin library (repeatable), for methods with step hooks; plugins are also found
    /// through GRAFT_PLUGIN_PATH and beside the graft binary.
    #[arg(long = "plugin", value_name = "PATH")]
    plugins: Vec<PathBuf>,
    /// What to train for (decides the loss on the model's first output).
    #[arg(long, value_enum)]
    task: Task,
    /// Training data (JSONL or .txt; see --data-format).
    #[arg(long, value_name = "FILE")]
    data: PathBuf,
    /// How the data files are laid out.
    #[arg(long, value_enum, default_value_t = DataFormat::Auto)]
    data_format: DataFormat,
    /// The tokenizer.json for text data (default: tokenizer.json beside PATCHED).
    #[arg(long, value_name = "PATH")]
    tokenizer: Option<PathBuf>,
    /// The most tokens per example tokenized from text (longer ones are cut).
    #[arg(long, value_name = "N", default_value_t = 128)]
    max_len: usize,
    /// Evaluation data, in the same format as --data: loss (and accuracy for seq-cls and
    /// token-cls) without dropout, after the last step and every --eval-every steps.
    #[arg(long, value_name = "FILE")]
    eval_data: Option<PathBuf>,
    /// Evaluate every K steps.
    #[arg(long, value_name = "K", requires = "eval_data")]
    eval_every: Option<u64>,
    /// Also evaluate before the first step (logged as step 0): the score training starts from.
    #[arg(long, requires = "eval_data")]
    eval_at_start: bool,
    /// Repeat each evaluation once per value of a method's value input, as INPUT=V1,V2,…:
    /// `adapter.adapter.dropped_layers=0,1,2,3` scores a robust-AdapterDrop adapter with the
    /// adapters of the lowest 0, 1, 2 and 3 layers dropped; `adapter.NAME.active=1,0` with and
    /// without an adapter. Each evaluation line of metrics.jsonl records the value under
    /// `inputs`; the best evaluations are taken at the first value.
    #[arg(long, value_name = "INPUT=V1,V2,…", requires = "eval_data")]
    eval_sweep: Option<graft::train::EvalSweep>,
    /// Write RUN_DIR/checkpoint every K steps (it is always written after the last step).
    #[arg(long, value_name = "K")]
    save_every: Option<u64>,
    /// Continue the run in RUN_DIR from its checkpoint; give the same data and settings as the
    /// interrupted run. metrics.jsonl keeps its lines up to the checkpoint and is appended to.
    #[arg(long, value_name = "RUN_DIR")]
    resume: Option<PathBuf>,
    /// With --resume: continue although the learning rate, schedule, clipping, patched model
    /// or data differ from the checkpoint's, reporting each change (refused otherwise).
    #[arg(long, requires = "resume")]
    accept_changes: bool,
    /// The run folder (with --resume, the folder resumed, which is the default).
    #[arg(long, value_name = "RUN_DIR", required_unless_present = "resume")]
    out: Option<PathBuf>,
    /// Print a progress line every N steps when stderr is not a terminal (a progress bar
    /// otherwise); 0 prints only the last step's. metrics.jsonl has every step either way.
    #[arg(long, value_name = "N", default_value_t = 1)]
    log_every: u64,
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
    /// Seed of the data order and of LoRA dropout's masks.
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
    /// Compute precision: f32, or bf16 on --device openvino (bfloat16 products where the CPU
    /// has AVX-512 BF16 or AMX; float32 master weights and optimizer state stay on the host).
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    precision: Precision,
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
    let out = match (&args.resume, &args.out) {
        (Some(resume), Some(out)) if resume != out => anyhow::bail!(
            "--resume {} and --out {} name different run folders",
            resume.display(),
            out.display()
        ),
        (Some(folder), _) | (None, Some(folder)) => folder.clone(),
        (None, None) => anyhow::bail!("--out RUN_DIR is required"),
    };
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
    let tokenizer = args.tokenizer.clone().or_else(|| {
        let beside = args.patched.with_file_name("tokenizer.json");
        beside.is_file().then_some(beside)
    });
    let options = TrainOptions {
        task: args.task,
        data: args.data.clone(),
        data_format: args.data_format,
        tokenizer,
        max_len: args.max_len,
        eval_data: args.eval_data.clone(),
        eval_every: args.eval_every,
        eval_at_start: args.eval_at_start,
        eval_sweep: args.eval_sweep.clone(),
        save_every: args.save_every,
        resume: args.resume.is_some(),
        accept_changes: args.accept_changes,
        out,
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
            precision: args.precision,
        },
        train_methods: args.train_methods.clone(),
    };
    let record = graft::patch::read_record(&model)?;
    let needs_plugins = record
        .methods
        .iter()
        .any(|m| m.training.step_hook.is_some());
    let registry = if needs_plugins {
        graft::plugins::PluginRegistry::discover_with(
            &args.plugins,
            &graft::plugins::PluginIsolation::for_this_binary()?,
        )?
    } else {
        graft::plugins::PluginRegistry::default()
    };
    let hooks = graft::plugins::RegistryStepHooks(&registry);
    if args.device != Device::Cpu || args.precision != Precision::F32 {
        println!("device {:?}, precision {:?}", args.device, args.precision);
        if args.precision == Precision::Bf16 && Precision::cpu_has_bf16() == Some(false) {
            eprintln!(
                "warning: this CPU has neither avx512_bf16 nor amx_bf16; OpenVINO computes in \
                 float32 instead of bfloat16"
            );
        }
    }
    let mut progress = Progress::new(std::io::stderr().is_terminal(), args.log_every);
    let result = train(&model, &options, &hooks, |event| progress.show(event));
    progress.finish();
    let summary = result.with_context(|| format!("training {}", args.patched.display()))?;
    print_summary(&summary);
    Ok(())
}

/// Shows a run's progress: a progress bar on a terminal, plain lines on stdout otherwise.
struct Progress {
    bar: Option<ProgressBar>,
    terminal: bool,
    log_every: u64,
    total_steps: u64,
}

impl Progress {
    fn new(terminal: bool, log_every: u64) -> Self {
        Progress {
            bar: None,
            terminal,
            log_every,
            total_steps: 0,
        }
    }

    fn show(&mut self, event: TrainEvent<'_>) {
        match event {
            TrainEvent::Started {
                first_step,
                total_steps,
                examples,
                skipped_lines,
                eval_examples,
            } => {
                self.total_steps = total_steps;
                let mut line = format!("{examples} training examples");
                if skipped_lines > 0 {
                    line += &format!(" ({skipped_lines} malformed lines skipped)");
                }
                if let Some(eval_examples) = eval_examples {
                    line += &format!(", {eval_examples} evaluation examples");
                }
                if first_step > 0 {
                    line += &format!("; resuming after step {first_step} of {total_steps}");
                }
                println!("{line}");
                if self.terminal {
                    let bar = ProgressBar::new(total_steps).with_position(first_step);
                    bar.set_style(
                        ProgressStyle::with_template(
                            "{bar:30.cyan/blue} {pos}/{len} steps  {msg}  eta {eta}",
                        )
                        .unwrap_or_else(|_| ProgressStyle::default_bar()),
                    );
                    self.bar = Some(bar);
                }
            }
            TrainEvent::Step(metrics) => match &self.bar {
                Some(bar) => {
                    bar.set_position(metrics.step);
                    bar.set_message(format!(
                        "loss {:.4}  lr {:.2e}  {:.0} tokens/s",
                        metrics.loss, metrics.lr, metrics.tokens_per_s
                    ));
                }
                None => {
                    if (self.log_every > 0 && metrics.step % self.log_every == 0)
                        || metrics.step == self.total_steps
                    {
                        println!("{}", step_line(metrics));
                    }
                }
            },
            TrainEvent::Warning(warning) => eprintln!("warning: {warning}"),
            TrainEvent::Evaluated(metrics) => self.line(eval_line(metrics)),
            TrainEvent::Checkpoint { .. } => {}
        }
    }

    fn line(&self, line: String) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => println!("{line}"),
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

fn step_line(metrics: &StepMetrics) -> String {
    format!(
        "step {:>5}  loss {:.6}  lr {:.3e}  grad_norm {:.4}  {:.0} tokens/s",
        metrics.step, metrics.loss, metrics.lr, metrics.grad_norm, metrics.tokens_per_s
    )
}

fn eval_line(metrics: &EvalMetrics) -> String {
    let mut line = format!("eval  {:>5}", metrics.step);
    for (input, value) in &metrics.inputs {
        line += &format!("  {input}={value}");
    }
    line += &format!("  loss {:.6}", metrics.eval_loss);
    if let Some(accuracy) = metrics.eval_accuracy {
        line += &format!("  accuracy {accuracy:.4}");
    }
    line
}

fn print_summary(summary: &TrainSummary) {
    let resumed = summary.resumed_from.map_or(String::new(), |step| {
        format!(" (resumed after step {step})")
    });
    println!(
        "trained {} steps{resumed} in {:.1} s: loss {:.4} → {:.4}",
        summary.steps, summary.seconds, summary.first_loss, summary.last_loss
    );
    if summary.skipped_lines > 0 || summary.skipped_eval_lines > 0 {
        println!(
            "skipped {} malformed training lines and {} malformed evaluation lines",
            summary.skipped_lines, summary.skipped_eval_lines
        );
    }
    if let Some(best) = &summary.best_eval_loss {
        println!(
            "best evaluation loss {:.6} at step {}",
            best.eval_loss, best.step
        );
    }
    if let Some(best) = &summary.best_eval_accuracy {
        println!(
            "best evaluation accuracy {:.4} at step {}",
            best.eval_accuracy.unwrap_or(f64::NAN),
            best.step
        );
    }
    println!("written in {}:", summary.out.display());
    for file in &summary.files {
        let shown = file.strip_prefix(&summary.out).unwrap_or(file);
        let folder = if file.is_dir() { "/" } else { "" };
        println!("  {}{folder}", shown.display());
    }
}
