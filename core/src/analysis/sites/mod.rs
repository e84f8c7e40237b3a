//! Structural site detection: finds a transformer's stacks, layers and adaptable sites (q/k/v/o
//! projections, FFN projections, norms), its embeddings and its output heads from the graph's
//! shape alone. Names are used only to attach labels afterwards.
//!
//! The passes, each in its own file: `linear` finds every linear (`MatMul`/`Gemm` with a
//! weight initializer); `attention` finds each `Softmax` between two `MatMul`s and traces the
//! linears feeding its query, key and value operands and the one reading its output; `ffn`
//! finds linears joined by an activation; `norm` finds LayerNorm and RMSNorm, fused or
//! decomposed; `stacks` chains the blocks along the residual stream into layers and stacks and
//! names them; `embeddings` finds token, position, token-type and patch embeddings and the
//! heads after the last layer. [`Structure`] is the documented `graft inspect --json` schema.

mod attention;
mod context;
mod embeddings;
mod ffn;
mod linear;
mod norm;
mod stacks;

use serde::{Deserialize, Serialize};

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
}

/// A chain of transformer layers along one residual stream (an encoder, a decoder, a tower).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stack {
    /// `encoder`, `decoder`, `text` or `vision` (with a `_1`, `_2` suffix if repeated).
    pub name: String,
    /// The number of layers; equals `layers.len()`.
    pub n_layers: usize,
    /// The width of the residual stream.
    pub hidden_size: usize,
    /// The number of query heads.
    pub n_heads: usize,
    /// The number of key/value heads (fewer than `n_heads` under grouped-query attention).
    pub n_kv_heads: usize,
    /// The width of one head, when the attention's shapes give it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// The layers, in execution order.
    pub layers: Vec<Layer>,
}

/// One transformer layer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Layer {
    /// The zero-based position of the layer in its stack.
    pub index: usize,
    /// The layer's sites, in graph order.
    pub sites: Vec<Site>,
}

/// The role of a site in its layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SiteKind {
    /// Query projection.
    Q,
    /// Key projection.
    K,
    /// Value projection.
    V,
    /// Attention output projection.
    O,
    /// One projection computing query, key and value (split afterwards).
    Qkv,
    /// Feed-forward up projection (the one the activation reads, or the ungated branch).
    FfnUp,
    /// Feed-forward gate projection (the activated branch of a gated FFN).
    FfnGate,
    /// Feed-forward down projection.
    FfnDown,
    /// One projection computing gate and up (split afterwards).
    FfnGateUp,
    /// A LayerNorm or RMSNorm; `weight` is its scale.
    Norm,
}

/// Which attention an attention site belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AttentionKind {
    /// Queries, keys and values read the same stream.
    #[serde(rename = "self")]
    SelfAttention,
    /// Keys and values read another stack's output.
    #[serde(rename = "cross")]
    Cross,
}

/// How a linear's weight is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightLayout {
    /// `[in, out]`: `MatMul(x, W)` or `Gemm` with `transB = 0`.
    InOut,
    /// `[out, in]`: `Gemm` with `transB = 1`, or `MatMul(x, Transpose(W))`.
    OutIn,
}

/// One adaptable place in a layer: a linear projection or a normalization.
///
/// For a linear, `output = input · W (+ bias)` with `W` stored in `layout`. For a norm, `weight`
/// is the scale, `bias` the shift, `in_features = out_features` the normalized width, and
/// `layout` is `in_out`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Site {
    /// The site's role.
    pub kind: SiteKind,
    /// Self or cross attention, on attention sites only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention: Option<AttentionKind>,
    /// The name of the `MatMul`/`Gemm` node, or of the norm's last node.
    pub node: String,
    /// The name of the weight (or scale) initializer.
    pub weight: String,
    /// The module path (e.g. `bert.encoder.layer.0.attention.self.query`), when names allow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// The width of the input's last axis.
    pub in_features: usize,
    /// The width of the output's last axis.
    pub out_features: usize,
    /// How `weight` is stored.
    pub layout: WeightLayout,
    /// The bias (or shift) initializer, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bias: Option<String>,
    /// The value the site reads.
    pub input: String,
    /// The value the site's consumers read: after the bias `Add` when the bias is separate.
    pub output: String,
    /// On `k` and `qkv` sites: the `[batch, heads, seq, head_dim]` key tensor entering the
    /// attention `MatMul`s (after any past concatenation), where one exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_states: Option<String>,
    /// On `v` and `qkv` sites: the `[batch, heads, seq, head_dim]` value tensor entering the
    /// attention `MatMul`s (after any past concatenation), where one exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_states: Option<String>,
}

/// What an embedding looks up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EmbeddingKind {
    /// Token ids to vectors.
    Token,
    /// Learned absolute positions (a lookup, or a table added as a whole).
    Position,
    /// Segment (token type) ids.
    TokenType,
    /// Image patches (a strided convolution).
    Patch,
}

/// An embedding: a `Gather` from a table, a position table added to the embeddings, or a patch
/// convolution.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Embedding {
    /// What is embedded.
    pub kind: EmbeddingKind,
    /// The `Gather`, `Add` or `Conv` node.
    pub node: String,
    /// The table (or kernel) initializer.
    pub weight: String,
    /// The value the node produces.
    pub output: String,
    /// The module path, when names allow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// Rows of the table (vocabulary, positions, token types); for patches, the number of
    /// patches per image, 0 when not static.
    pub n_embeddings: usize,
    /// The width of each embedding vector.
    pub dim: usize,
}

/// A linear after the last layer of a stack: LM head, classifier, pooler, projection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Head {
    /// The `MatMul`/`Gemm` node.
    pub node: String,
    /// The weight initializer.
    pub weight: String,
    /// The module path (e.g. `lm_head`), when names allow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// The width of the input's last axis.
    pub in_features: usize,
    /// The width of the output's last axis.
    pub out_features: usize,
    /// How `weight` is stored.
    pub layout: WeightLayout,
    /// The bias initializer, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bias: Option<String>,
    /// The value the head reads.
    pub input: String,
    /// The value its consumers read: after the bias `Add` when the bias is separate.
    pub output: String,
}

/// Finds `model`'s transformer structure from the graph's shape.
///
/// A model without attention yields a [`Structure`] with no stacks; detection fails only if
/// shape inference does.
pub fn detect(model: &Model) -> Result<Structure> {
    let context = context::Context::new(model)?;
    let linears = linear::find_linears(&context);
    let cores = attention::find_attention(&context, &linears);
    let ffns = ffn::find_ffns(&context, &linears, &cores);
    let norms = norm::find_norms(&context);
    let stacks = stacks::build_stacks(&context, &linears, &cores, &ffns, &norms);
    let embeddings = embeddings::find_embeddings(&context, &stacks);
    let heads = embeddings::find_heads(&context, &linears, &stacks);
    Ok(Structure {
        opset: model.opset(),
        producer: model.producer_name.clone(),
        n_params: model.n_params(),
        stacks: stacks.into_iter().map(|s| s.stack).collect(),
        embeddings,
        heads,
    })
}
