//! `graft inspect`: the transformer structure graft finds in a model.

use std::path::PathBuf;

use graft::analysis::sites::{detect, Structure};
use graft::onnx;

/// Show the transformer structure graft detects: stacks, layers, attention and FFN projections,
/// norms, embeddings and output heads.
///
/// Detection is structural (it follows the attention and FFN patterns in the graph, not weight
/// names); labels such as `bert.encoder.layer.0.attention.self.query` come from node names or
/// exporter metadata when present, and are how HF PEFT files and `target_regex` refer to sites.
///
/// `--json` prints a stable schema:
/// `{"opset","producer","n_params","stacks":[{"name","n_layers","hidden_size","n_heads","n_kv_heads",
/// "layers":[{"index","sites":[{"kind","attention","node","weight","label","in_features",
/// "out_features","layout","bias","input","output"}]}]}],"embeddings":[…],"heads":[…]}` where
/// `kind` is one of q k v o qkv ffn_up ffn_gate ffn_down ffn_gate_up norm, `attention` is self or
/// cross (attention sites only), and `layout` is in_out (MatMul(x, W[in,out])) or out_in
/// (Gemm transB=1, MatMul(x, Transpose(W))).
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The ONNX model to inspect.
    model: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let model = onnx::load(&args.model)?;
    let structure = detect(&model)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&structure)?);
    } else {
        print_table(&args.model, &structure);
    }
    Ok(())
}

fn print_table(path: &std::path::Path, structure: &Structure) {
    println!(
        "{}: opset {}, producer {}, {} parameters",
        path.display(),
        structure.opset,
        if structure.producer.is_empty() { "?" } else { &structure.producer },
        structure.n_params
    );
    for stack in &structure.stacks {
        println!(
            "\nstack {}: {} layers, hidden {}, {} heads, {} kv heads",
            stack.name, stack.n_layers, stack.hidden_size, stack.n_heads, stack.n_kv_heads
        );
        println!(
            "  {:<5} {:<12} {:<6} {:>6} {:>6}  {:<7} {:<48} weight",
            "layer", "site", "attn", "in", "out", "layout", "label"
        );
        for layer in &stack.layers {
            for site in &layer.sites {
                let json = serde_json::to_value(site).unwrap_or_default();
                let text = |key: &str| json[key].as_str().unwrap_or("-").to_owned();
                println!(
                    "  {:<5} {:<12} {:<6} {:>6} {:>6}  {:<7} {:<48} {}",
                    layer.index,
                    text("kind"),
                    text("attention"),
                    json["in_features"],
                    json["out_features"],
                    text("layout"),
                    text("label"),
                    text("weight"),
                );
            }
        }
    }
    for (title, items) in [("embeddings", &structure.embeddings), ("heads", &structure.heads)] {
        let items = serde_json::to_value(items).unwrap_or_default();
        let Some(items) = items.as_array().filter(|a| !a.is_empty()) else { continue };
        println!("\n{title}:");
        for item in items {
            let label = item["label"].as_str().unwrap_or("-");
            let kind = item["kind"].as_str().unwrap_or("head");
            let weight = item["weight"].as_str().unwrap_or("-");
            println!("  {kind:<12} {label:<48} {weight}");
        }
    }
}
