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
/// "out_features","layout","bias","input","output","split"}]}]}],"embeddings":[…],"heads":[…]}`
/// where `kind` is one of q k v o qkv ffn_up ffn_gate ffn_down ffn_gate_up norm, `attention` is
/// self or cross (attention sites only), `layout` is in_out (MatMul(x, W[in,out])) or out_in
/// (Gemm transB=1, MatMul(x, Transpose(W))), and `split` (fused qkv and ffn_gate_up sites only,
/// absent when the parts are not contiguous) lists the parts of the output in column order as
/// `[{"kind","width"}]`. The table marks a fused site's parts after its kind (`ffn_gate_up 64+64`).
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
        if structure.producer.is_empty() {
            "?"
        } else {
            &structure.producer
        },
        structure.n_params
    );
    for stack in &structure.stacks {
        println!(
            "\nstack {}: {} layers, hidden {}, {} heads, {} kv heads",
            stack.name, stack.n_layers, stack.hidden_size, stack.n_heads, stack.n_kv_heads
        );
        println!(
            "  {:<5} {:<18} {:<5} {:>6} {:>6}  {:<6} {:<52} weight",
            "layer", "site", "attn", "in", "out", "layout", "label"
        );
        for layer in &stack.layers {
            for site in &layer.sites {
                println!(
                    "  {:<5} {:<18} {:<5} {:>6} {:>6}  {:<6} {:<52} {}",
                    layer.index,
                    site_kind(site),
                    site.attention.as_ref().map_or("-".into(), schema_name),
                    site.in_features,
                    site.out_features,
                    schema_name(&site.layout),
                    site.label.as_deref().unwrap_or("-"),
                    site.weight,
                );
            }
        }
    }
    if !structure.embeddings.is_empty() {
        println!("\nembeddings:");
        for embedding in &structure.embeddings {
            println!(
                "  {:<11} {:>6} × {:<5} {:<52} {}",
                schema_name(&embedding.kind),
                embedding.n_embeddings,
                embedding.dim,
                embedding.label.as_deref().unwrap_or("-"),
                embedding.weight
            );
        }
    }
    if !structure.heads.is_empty() {
        println!("\nheads:");
        for head in &structure.heads {
            println!(
                "  {:>6} → {:<6} {:<52} {}",
                head.in_features,
                head.out_features,
                head.label.as_deref().unwrap_or("-"),
                head.weight
            );
        }
    }
}

/// The name a value has in the JSON schema (`ffn_up`, `self`, `in_out`, ...).
fn schema_name<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// A site's kind, with the widths of a fused output's parts (`qkv 32+16+16`).
fn site_kind(site: &graft::analysis::sites::Site) -> String {
    let kind = schema_name(&site.kind);
    if site.split.is_empty() {
        return kind;
    }
    let widths: Vec<String> = site.split.iter().map(|p| p.width.to_string()).collect();
    format!("{kind} {}", widths.join("+"))
}
