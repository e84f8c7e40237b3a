//! Structural site detection: finds a transformer's stacks, layers and adaptable sites (q/k/v/o
//! projections, FFN projections, norms), its embeddings and its output heads from the graph's
//! shape alone. Names are used only to attach labels afterwards.
//!
//! The passes, each in its own file: `linear` finds every linear (`MatMul`/`Gemm` with a
//! weight initializer); `attention` finds each `Softmax` between two `MatMul`s and traces the
//! linears feeding its query, key and value operands and the one reading its output; `ffn`
//! finds linears (or the split halves of one) joined by an activation; `norm` finds LayerNorm
//! and RMSNorm, fused or decomposed; `stacks` chains the blocks along the residual stream into layers and stacks and
//! names them; `embeddings` finds token, position, token-type and patch embeddings and the
//! heads after the last layer; `inputs` gives graph inputs their roles. [`Structure`] is the documented `graft inspect --json` schema.

mod attention;
mod context;
mod embeddings;
mod ffn;
mod inputs;
mod linear;
mod norm;
mod stacks;

use serde::{Deserialize, Serialize};

use crate::analysis::ShapeMap;
use crate::ir::Model;
use crate::Result;

/// The transformer structure of a model, as `graft inspect --json` prints it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Structure {
    /// The default-domain opset version.
    pub opset: i64,
    /// The ONNX `producer_name` (for example `pytorch`), empty when unset.
    pub producer: String,
    /// The number of elements in floating-point initializers.
    pub n_params: usize,
    /// The transformer stacks (an encoder-decoder model has two), encoder-like stacks first.
    pub stacks: Vec<Stack>,
    /// The embeddings found, in graph order.
    pub embeddings: Vec<Embedding>,
    /// The linears after the last layer of a stack (LM head, classifier, pooler, projections),
    /// in graph order.
    pub heads: Vec<Head>,
    /// The graph inputs whose role detection found, in graph-input order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<GraphInput>,
}

pub use graft_plugin_sdk::{
    Attention, AttentionKind, BlockKind, Embedding, EmbeddingKind, GraphInput, Head, InputRole,
    Layer, NormInfo, NormKind, NormPlacement, ResidualBlock, Site, SiteKind, SplitPart, Stack,
    StackKind, WeightLayout,
};

/// Finds `model`'s transformer structure from the graph's shape.
///
/// A model without attention yields a [`Structure`] with no stacks; detection fails only if
/// shape inference does.
pub fn detect(model: &Model) -> Result<Structure> {
    Ok(detect_with_shapes(model)?.0)
}

/// [`detect`], also handing back the shapes it inferred on the way.
pub fn detect_with_shapes(model: &Model) -> Result<(Structure, ShapeMap)> {
    let context = context::Context::new(model)?;
    let linears = linear::find_linears(&context);
    let cores = attention::find_attention(&context, &linears);
    let ffns = ffn::find_ffns(&context, &linears, &cores);
    let norms = norm::find_norms(&context);
    let stacks = stacks::build_stacks(&context, &linears, &cores, &ffns, &norms);
    let embeddings = embeddings::find_embeddings(&context, &stacks);
    let heads = embeddings::find_heads(&context, &linears, &stacks);
    let inputs = inputs::find_input_roles(&context, &stacks, &cores, &embeddings);
    let structure = Structure {
        opset: model.opset(),
        producer: model.producer_name.clone(),
        n_params: model.n_params(),
        stacks: stacks.into_iter().map(|s| s.stack).collect(),
        embeddings,
        heads,
        inputs,
    };
    Ok((structure, context.shapes))
}
