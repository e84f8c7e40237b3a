//! `graft import-hf`: the ONNX graph of a Hugging Face checkpoint folder (`config.json` and
//! safetensors weights, sharded or not), built without PyTorch.
//!
//! Families: BERT-like encoders (BERT, MiniLM, RoBERTa, XLM-R, DistilBERT; base model,
//! sequence and token classification) and LLaMA-like decoders (LLaMA, Mistral, Qwen2 with q/k/v
//! biases; grouped-query attention; RoPE `default`, `linear`, `llama3`, `yarn`; causal LM, with
//! an optional key/value cache). The graph computes what transformers computes in eager mode, in
//! float32, at opset 17; node names carry the module paths the legacy exporter writes and
//! initializers keep the checkpoint's tensor names, so graft's labels, PEFT's `target_modules`
//! and PEFT adapter files match the model as they match an exported one.
//!
//! Float32 weights are referenced in place (external data into the safetensors files) when the
//! model is saved in the checkpoint's folder; float16/bfloat16 ones are converted to float32.
//! Site detection reads the result like any other model: the importer only builds, it never
//! tells detection what it built.

mod builder;
mod checkpoint;
mod config;
mod decoder;
mod encoder;
mod package;
mod rope;

use std::path::Path;

pub use config::{Head, MODEL_TYPES};
pub use package::checkpoint_folder;

use crate::ir::{Graph, Model};
use crate::{Error, Result};
use builder::{Builder, FreshHeads};
use checkpoint::Checkpoint;
use config::Architecture;

/// What to build.
#[derive(Clone, Debug, Default)]
pub struct ImportOptions {
    /// The head; `None` takes the one the config's `architectures` names.
    pub head: Option<Head>,
    /// Decoders: past keys and values as inputs, present ones as outputs.
    pub kv_cache: bool,
    /// Encoders with a classification head: the number of labels. A head the checkpoint lacks
    /// (a classifier on a bare `BertModel`) is started only when this is given, drawn as
    /// transformers draws new weights, from `seed`.
    pub num_labels: Option<usize>,
    /// The seed of new head weights.
    pub seed: u64,
}

/// A built model and what it was built from.
#[derive(Debug)]
pub struct Imported {
    pub model: Model,
    pub summary: ImportSummary,
}

/// What an import built, for people and for programs.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ImportSummary {
    /// `model_type` from the config.
    pub model_type: String,
    /// The config's class (`architectures[0]`), if it names one.
    pub class: Option<String>,
    /// The head built (`base`, `seq-cls`, `token-cls`, `causal-lm`).
    pub head: &'static str,
    pub layers: usize,
    pub hidden_size: usize,
    pub heads: usize,
    pub kv_heads: usize,
    /// The RoPE variant (decoders).
    pub rope: Option<String>,
    pub kv_cache: bool,
    /// The checkpoint's safetensors files.
    pub files: Vec<String>,
    /// Stored element types, with tensor counts.
    pub stored_dtypes: std::collections::BTreeMap<String, usize>,
    /// Head modules the checkpoint lacked, started with new weights (`--num-labels`).
    pub started_heads: Vec<String>,
    /// Parameters in the graph.
    pub parameters: usize,
    pub nodes: usize,
}

/// Builds the graph of the checkpoint in `dir`.
pub fn import(dir: &Path, options: &ImportOptions) -> Result<Imported> {
    if !dir.is_dir() {
        return Err(Error::Config(format!(
            "{}: not a folder (import-hf reads a Hugging Face checkpoint folder: config.json and \
             *.safetensors)",
            dir.display()
        )));
    }
    let config = config::read(dir)?;
    let checkpoint = Checkpoint::open(dir)?;
    let head = match options.head.or_else(|| config.class_head()) {
        Some(head) => head,
        None => {
            return Err(Error::Config(format!(
                "{}: architectures names {:?}, whose head graft does not build; pass --head \
                 base (the model without its head), seq-cls, token-cls or causal-lm",
                dir.join("config.json").display(),
                config.class.as_deref().unwrap_or("nothing")
            )))
        }
    };
    let mut b = Builder::new(&checkpoint);
    let (layers, hidden_size, heads, kv_heads, rope) = match &config.architecture {
        Architecture::Encoder(encoder) => {
            if options.kv_cache {
                return Err(Error::Config(
                    "--kv-cache is for decoders; an encoder has no key/value cache".into(),
                ));
            }
            if options.num_labels.is_some() {
                b.start_missing_heads(FreshHeads::new(encoder.initializer_range, options.seed));
            }
            encoder::build(&mut b, encoder, head, options.num_labels)?;
            (
                encoder.layers,
                encoder.hidden_size,
                encoder.heads,
                encoder.heads,
                None,
            )
        }
        Architecture::Decoder(decoder) => {
            if options.num_labels.is_some() {
                return Err(Error::Config(
                    "--num-labels is for encoders' classification heads; graft builds decoders \
                     with their LM head"
                        .into(),
                ));
            }
            decoder::build(&mut b, decoder, head, options.kv_cache)?;
            let rope = Some(decoder.rope.kind.clone());
            (
                decoder.layers,
                decoder.hidden_size,
                decoder.heads,
                decoder.kv_heads,
                rope,
            )
        }
    };
    let started_heads = b.started_heads();
    let graph: Graph = b.graph;
    graph.validate()?;
    let parameters = graph
        .initializers
        .iter()
        .filter(|t| !t.name.starts_with("graft_import."))
        .map(|t| t.n_elements())
        .sum();
    let summary = ImportSummary {
        model_type: config.model_type.clone(),
        class: config.class.clone(),
        head: head.name(),
        layers,
        hidden_size,
        heads,
        kv_heads,
        rope,
        kv_cache: options.kv_cache,
        files: checkpoint.files(),
        stored_dtypes: checkpoint.dtypes(),
        started_heads,
        parameters,
        nodes: graph.nodes.len(),
    };
    let model = Model {
        ir_version: 8,
        opset_imports: vec![(String::new(), 17)],
        producer_name: "graft import-hf".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph,
        base_dir: Some(dir.to_path_buf()),
        ..Model::default()
    };
    Ok(Imported { model, summary })
}
