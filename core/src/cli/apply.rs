//! `graft apply`: graft one or more PEFT methods onto a model through their plugins.

use std::path::PathBuf;

use anyhow::{bail, Context};
use graft::onnx::{self, SaveOptions};
use graft::plugins::{apply_method, PluginRegistry};
use serde_json::{Map, Value};

/// Graft PEFT methods onto a model.
///
/// Each method comes from a plugin (see `graft plugins`). The new parameters start at values that
/// leave the model's outputs unchanged (LoRA's B = 0, IA3's scales = 1), are stored as named
/// initializers that a runtime can override as inputs, and the model's metadata records which
/// tensors are trainable and which method and config made them.
///
/// Settings come from `--config FILE.toml` (top-level keys for a single method, or one table per
/// method such as `[lora]`) and `--set key=value` (or `--set method.key=value` when several
/// methods are applied); `--set` wins.
///
/// `--from-peft DIR` instead grafts the LoRA adapter that HF PEFT saved in DIR
/// (`adapter_config.json` + `adapter_model.safetensors`), so that the model computes what
/// `PeftModel.from_pretrained` computes: branches on the modules PEFT targets, with PEFT's ranks
/// and scales and the saved values, and the base tensors of `modules_to_save` replaced. Module
/// paths are the site labels `graft inspect` shows. `--from-adapterhub DIR` grafts a bottleneck
/// adapter that AdapterHub's `adapters` library saved, with its settings, name and values; a
/// folder with `adapter_fusion_config.json` grafts that AdapterFusion with the adapters it
/// fuses (given as further `--from-adapterhub` folders, or found beside it by name).
///
/// AdapterFusion in two stages: train one adapter per task (`-m adapter --set name=sentiment`,
/// `graft train`), then graft the fusion onto the base model with the trained adapters
/// frozen and train only the fusion:
/// `graft apply base.onnx -m adapter_fusion --set adapters=sentiment,topic --values
/// run-sentiment/adapter.safetensors --values run-topic/adapter.safetensors -o fused.onnx`.
///
/// Example: graft apply model.onnx -m adapter --set config=double_seq_bn -o out.onnx
///
/// Example: graft apply model.onnx -m lora --set r=8 --set alpha=16 --set targets=q,v -o out.onnx
///
/// Example: graft apply model.onnx --from-peft my-adapter/ -o out.onnx
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The ONNX model to patch.
    model: PathBuf,
    /// A method to apply (repeat to stack methods, applied in order), e.g. lora, bitfit, ia3.
    #[arg(
        short,
        long = "method",
        value_name = "METHOD",
        required_unless_present_any = ["from_peft", "from_adapterhub"]
    )]
    methods: Vec<String>,
    /// Import the HF PEFT adapter saved in DIR instead of applying methods: LORA (with use_dora:
    /// the dora method), PROMPT_TUNING, P_TUNING, PREFIX_TUNING, and every peft_type a plugin
    /// declares (LOHA, LOKR, IA3 with the shipped plugins; `graft plugins` lists them).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["methods", "config", "settings"])]
    from_peft: Option<PathBuf>,
    /// Import the AdapterHub bottleneck adapter saved in DIR (`adapter_config.json` and
    /// `adapter.safetensors`, as `model.save_adapter(DIR, name, use_safetensors=True)` writes
    /// them); repeat for several adapters. A fusion folder (`adapter_fusion_config.json` and
    /// `model_adapter_fusion.safetensors`) imports the fusion with the adapters it fuses.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["methods", "config", "settings", "from_peft"])]
    from_adapterhub: Vec<PathBuf>,
    /// Load these values into the new model's method tensors after applying (repeatable): a
    /// safetensors file keyed by graft's tensor names, as `graft train` writes
    /// `RUN_DIR/adapter.safetensors`. AdapterFusion's second stage loads each first-stage
    /// adapter this way: `-m adapter_fusion --set adapters=a,b --values run-a/adapter.safetensors
    /// --values run-b/adapter.safetensors`.
    #[arg(long = "values", value_name = "FILE.safetensors")]
    values: Vec<PathBuf>,
    /// A TOML file of settings.
    #[arg(long, value_name = "FILE.toml")]
    config: Option<PathBuf>,
    /// A setting, `key=value` or `method.key=value` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    settings: Vec<String>,
    /// Load a plugin library (repeatable); plugins are also found through GRAFT_PLUGIN_PATH and
    /// beside the graft binary.
    #[arg(long = "plugin", value_name = "PATH")]
    plugins: Vec<PathBuf>,
    /// Where to write the patched model.
    #[arg(short, long)]
    output: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let registry = PluginRegistry::discover_with(
        &args.plugins,
        &graft::plugins::PluginIsolation::for_this_binary()?,
    )?;
    let mut model = onnx::load(&args.model)?;
    if !args.from_adapterhub.is_empty() {
        let (fusions, adapters): (Vec<&PathBuf>, Vec<&PathBuf>) = args
            .from_adapterhub
            .iter()
            .partition(|dir| graft::adapterhub::is_fusion_folder(dir));
        let adapters: Vec<PathBuf> = adapters.into_iter().cloned().collect();
        let mut fused = Vec::new();
        for dir in fusions {
            let (name, used, n) =
                graft::adapterhub::import_fusion(&registry, &mut model, dir, &adapters)?;
            println!(
                "adapter fusion {name}: loaded {n} tensors from {} and its {} adapters",
                dir.display(),
                used.len()
            );
            fused.extend(used);
        }
        for dir in adapters.iter().filter(|d| !fused.contains(d)) {
            let (name, n) = graft::adapterhub::import(&registry, &mut model, dir)?;
            println!("adapter {name}: loaded {n} tensors from {}", dir.display());
        }
    } else if let Some(dir) = &args.from_peft {
        let report = graft::peft::import(&registry, &mut model, dir)?;
        for warning in report.warnings() {
            eprintln!("warning: {warning}");
        }
        if let Some((method, n)) = &report.prompt {
            println!("{method}: {n} virtual tokens");
        }
        for branch in &report.branches {
            if branch.r > 0 {
                println!(
                    "{} {}: r {} alpha {} scale {}",
                    report.method, branch.module, branch.r, branch.alpha, branch.scale
                );
            } else {
                println!("{} {}", report.method, branch.module);
            }
        }
        for replaced in &report.replaced {
            println!(
                "replaced {} with {}{}",
                replaced.initializer,
                replaced.key,
                if replaced.transposed {
                    " (transposed)"
                } else {
                    ""
                }
            );
        }
    } else {
        let configs = method_configs(&args, &registry)?;
        for (method, config) in args.methods.iter().zip(&configs) {
            apply_method(&registry, &mut model, method, config)?;
        }
    }
    for path in &args.values {
        let n = graft::adapter::load_into(&mut model, path)?;
        println!("loaded {n} tensors from {}", path.display());
    }
    onnx::save(&model, &args.output, &SaveOptions::default())
        .with_context(|| format!("cannot write {}", args.output.display()))?;
    let record = graft::patch::read_record(&model)?;
    let n_trainable: usize = record
        .trainable()
        .filter_map(|name| model.graph.initializer(name))
        .map(|t| t.n_elements())
        .sum();
    let n_params = model.n_params();
    for applied in &record.methods {
        println!(
            "{}: {} trainable tensors ({} from plugin {} {})",
            applied.method,
            applied.trainable.len(),
            applied.config,
            applied.plugin,
            applied.plugin_version
        );
    }
    println!(
        "trainable parameters: {n_trainable} of {n_params} ({:.3}%)",
        100.0 * n_trainable as f64 / n_params.max(1) as f64
    );
    println!("wrote {}", args.output.display());
    Ok(())
}

/// One JSON config object per method, from the TOML file and the `--set` flags.
fn method_configs(args: &Args, registry: &PluginRegistry) -> anyhow::Result<Vec<Value>> {
    let mut configs: Vec<Map<String, Value>> = vec![Map::new(); args.methods.len()];
    let single = args.methods.len() == 1;
    if let Some(path) = &args.config {
        let text = graft::input_file::read_to_string(path)?;
        let table: toml::Table = text
            .parse()
            .with_context(|| format!("{}: invalid TOML", path.display()))?;
        for (key, value) in table {
            let json = toml_to_json(&value)
                .map_err(|e| anyhow::anyhow!("{}: setting {key}{e}", path.display()))?;
            match args.methods.iter().position(|m| *m == key) {
                Some(index) if value.is_table() => {
                    if let Value::Object(entries) = json {
                        configs[index].extend(entries);
                    }
                }
                _ if single => {
                    configs[0].insert(key, json);
                }
                _ => bail!(
                    "{}: key {key:?} is outside a method table; with several methods put settings under [{}]",
                    path.display(),
                    args.methods.join("], [")
                ),
            }
        }
    }
    for setting in &args.settings {
        let Some((key, value)) = setting.split_once('=') else {
            bail!("--set {setting:?}: expected key=value");
        };
        let (target, key) = match key.split_once('.') {
            Some((method, key)) if args.methods.iter().any(|m| m == method) => {
                (args.methods.iter().position(|m| m == method), key)
            }
            _ => (None, key),
        };
        let index = match target {
            Some(index) => index,
            None if single => 0,
            None => {
                let owners: Vec<usize> = args
                    .methods
                    .iter()
                    .enumerate()
                    .filter(|(_, method)| {
                        registry
                            .find_method(method)
                            .map(|(_, d)| d.config.iter().any(|k| k.key == key))
                            .unwrap_or(false)
                    })
                    .map(|(i, _)| i)
                    .collect();
                match owners.as_slice() {
                    [index] => *index,
                    [] => bail!(
                        "--set {setting:?}: none of the methods {} has a setting {key:?}",
                        args.methods.join(", ")
                    ),
                    _ => bail!(
                        "--set {setting:?}: several methods have a setting {key:?}; write method.{key}=…"
                    ),
                }
            }
        };
        configs[index].insert(key.to_owned(), Value::String(value.to_owned()));
    }
    Ok(configs.into_iter().map(Value::Object).collect())
}

/// `value` as JSON; fails on a float that is not finite (`nan`, `inf`), which JSON cannot
/// hold, with the path of the offending key inside `value` (`.inner.key`) and the reason.
fn toml_to_json(value: &toml::Value) -> Result<Value, String> {
    Ok(match value {
        toml::Value::Float(f) if !f.is_finite() => {
            return Err(format!(": {f} is not a finite number"));
        }
        toml::Value::Float(f) => Value::from(*f),
        toml::Value::Table(table) => {
            let mut entries = Map::new();
            for (key, inner) in table {
                let json = toml_to_json(inner).map_err(|e| format!(".{key}{e}"))?;
                entries.insert(key.clone(), json);
            }
            Value::Object(entries)
        }
        toml::Value::Array(items) => Value::Array(
            items
                .iter()
                .enumerate()
                .map(|(i, item)| toml_to_json(item).map_err(|e| format!("[{i}]{e}")))
                .collect::<Result<_, _>>()?,
        ),
        other => serde_json::to_value(other).map_err(|e| format!(": {e}"))?,
    })
}
