//! The read-only description of a model graph that the core hands to plugins.

use crate::dtype::DType;
use crate::record::GraftRecord;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// What the core found in a model: its transformer stacks with the sites a method may adapt,
/// its embeddings and heads, every initializer and value with its type and shape where known,
/// and every node's name. Plugins read it; they never see the ONNX protobuf.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GraphView {
    /// The model's default-domain opset version.
    pub opset: i64,
    /// The ONNX `producer_name` (for example `"pytorch"`), empty if unset.
    #[serde(default)]
    pub producer: String,
    /// The transformer stacks (an encoder-decoder model has two), in graph order.
    #[serde(default)]
    pub stacks: Vec<Stack>,
    /// The embedding lookups found (token, position, token type, patch).
    #[serde(default)]
    pub embeddings: Vec<Embedding>,
    /// The output projections found after the last stack (LM head, classifier, pooler).
    #[serde(default)]
    pub heads: Vec<Head>,
    /// Every initializer: name, element type, shape.
    #[serde(default)]
    pub tensors: Vec<TensorInfo>,
    /// Every initializer, node output and tensor-typed graph input, with its element type and
    /// shape where known.
    #[serde(default)]
    pub values: Vec<ValueInfo>,
    /// The name of every node, in graph order (unnamed nodes left out).
    #[serde(default)]
    pub node_names: Vec<String>,
    /// The graph input names, in order, initializers excluded.
    #[serde(default)]
    pub inputs: Vec<String>,
    /// The graph output names, in order.
    #[serde(default)]
    pub outputs: Vec<String>,
    /// The graph inputs whose role the core found from what they feed, in graph-input order;
    /// inputs of unknown role are absent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub input_roles: Vec<GraphInput>,
    /// What earlier methods grafted onto this model (empty for an unpatched model).
    #[serde(default, skip_serializing_if = "GraftRecord::is_empty")]
    pub record: GraftRecord,
}

/// A run of identical transformer layers (an encoder, a decoder, a vision tower).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stack {
    /// A short name for the stack (`"encoder"`, `"decoder"`, ...), unique within the view.
    pub name: String,
    /// Number of layers; equals `layers.len()`.
    pub n_layers: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Number of query heads.
    pub n_heads: usize,
    /// Number of key/value heads (`n_heads` unless grouped-query or multi-query attention).
    pub n_kv_heads: usize,
    /// Per-head width, when the core found it; absent means `hidden_size / n_heads`
    /// (see [`Stack::head_dim`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// The layers, in execution order.
    pub layers: Vec<Layer>,
    /// Whether the stack's self-attention is bidirectional (encoder) or causal (decoder),
    /// when the core could tell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<StackKind>,
    /// Whether the stack's layers also attend to another stack's output.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cross_attention: bool,
    /// The residual stream entering layer 0 (the embeddings' sum, before any norm).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<String>,
    /// The stream leaving the stack: after the last layer and the final norm when the core
    /// found one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
}

/// The kind of a stack's self-attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StackKind {
    /// Bidirectional self-attention.
    Encoder,
    /// Causal self-attention.
    Decoder,
}

/// Where a layer's norms sit relative to its residual adds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NormPlacement {
    /// Each block normalizes its input; the residual adds sum unnormalized values (GPT-2,
    /// Llama, T5, ViT, CLIP).
    Pre,
    /// Each residual sum is normalized before the next block reads it (BERT).
    Post,
}

impl Stack {
    /// The per-head width: `head_dim` when known, else `hidden_size / n_heads` (0 when
    /// `n_heads` is 0).
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or_else(|| self.hidden_size.checked_div(self.n_heads).unwrap_or(0))
    }
}

/// One transformer layer and the sites found in it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Layer {
    /// Zero-based position of the layer in its stack.
    pub index: usize,
    /// The adaptable sites of this layer, in graph order.
    pub sites: Vec<Site>,
    /// The residual stream entering the layer (view ops peeled off): what its first block adds
    /// back onto, the previous layer's `output`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<String>,
    /// The residual stream leaving the layer: its last residual sum, or that sum normalized in
    /// a post-norm layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// The residual sum after the self-attention block.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_sum: Option<String>,
    /// The residual sum after the feed-forward block.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ffn_sum: Option<String>,
    /// Where the layer's norms sit, when it has any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub norm_placement: Option<NormPlacement>,
    /// The layer's attention blocks (self-attention, then cross-attention), in graph order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attention: Vec<Attention>,
    /// The layer's residual blocks (self-attention, cross-attention, feed-forward), in graph
    /// order: where each sublayer's result meets the residual stream, and the norms around it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blocks: Vec<ResidualBlock>,
}

impl Layer {
    /// The layer's first block of `kind`, if it has one.
    pub fn block(&self, kind: BlockKind) -> Option<&ResidualBlock> {
        self.blocks.iter().find(|b| b.kind == kind)
    }
}

/// What a residual block's sublayer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockKind {
    /// Self-attention.
    SelfAttention,
    /// Cross-attention over an encoder's output.
    CrossAttention,
    /// The feed-forward network.
    Ffn,
}

/// One sublayer and the residual sum that adds its result back onto the stream:
/// `sum = branch + skip`, where `branch` is the sublayer's result (its output projection, with
/// bias, dropout and constant scaling) and `skip` is the stream it adds onto. In a post-norm
/// layer `post_norm` normalizes `sum` and the next block reads that; in a pre-norm layer
/// `pre_norm` normalizes `skip` into the sublayer's `input`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResidualBlock {
    /// The sublayer.
    pub kind: BlockKind,
    /// What the sublayer's projections read (the normalized stream in a pre-norm layer).
    pub input: String,
    /// The sublayer's result: the operand of the residual `Add` that is not the stream.
    pub branch: String,
    /// The stream operand of the residual `Add`.
    pub skip: String,
    /// The residual sum.
    pub sum: String,
    /// The norm the sublayer's input passes through (pre-norm), when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_norm: Option<NormInfo>,
    /// The norm applied to the sum (post-norm), when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_norm: Option<NormInfo>,
}

/// What a normalization computes, enough to apply the same norm to another value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NormInfo {
    /// The node computing it (the fused node, or a decomposition's last node).
    pub node: String,
    /// LayerNorm (mean subtracted) or RMSNorm.
    pub kind: NormKind,
    /// The scale vector.
    pub scale: String,
    /// The shift vector (LayerNorm with a bias).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shift: Option<String>,
    /// The epsilon added to the variance, where the core could read it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epsilon: Option<f32>,
    /// The value normalized.
    pub input: String,
    /// The normalized, scaled (and shifted) value.
    pub output: String,
}

/// The kind of a normalization.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NormKind {
    /// `(x − mean) / √(var + ε) · scale (+ shift)` over the last axis.
    LayerNorm,
    /// `x / √(mean(x²) + ε) · scale` over the last axis.
    RmsNorm,
}

/// One attention block of a layer: the values a method attaching to the attention itself
/// (prefix tuning, attention-score adapters) needs. Its projections are the layer's sites.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attention {
    /// Self- or cross-attention.
    pub kind: AttentionKind,
    /// Whether a query may only attend to keys at or before its position: a causal mask built
    /// in the graph (triangular constant, `Trilu`, a comparison of positions), or the
    /// self-attention of a stack that cross-attends (an encoder-decoder's decoder).
    pub causal: bool,
    /// The value added to the scores before `Softmax` nearest to it (the additive attention
    /// mask, which may include a position bias), when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<String>,
    /// The `Softmax` input: the masked, scaled scores `[batch, heads, query, key]`.
    pub scores: String,
    /// The `Softmax` output: the attention probabilities.
    pub probabilities: String,
    /// The per-head key tensor entering attention (as on the `k`/`qkv` site), where found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_states: Option<String>,
    /// The per-head value tensor entering attention (as on the `v`/`qkv` site), where found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_states: Option<String>,
    /// The residual sum after this block, when found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sum: Option<String>,
}

/// What a graph input carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputRole {
    /// Token ids read by the token embedding of an encoder or decoder-only stack.
    TokenIds,
    /// The padding mask that reaches the attention scores.
    AttentionMask,
    /// Position ids read by a position embedding.
    PositionIds,
    /// Segment ids read by the token-type embedding.
    TokenTypeIds,
    /// Token ids read by the token embedding of a cross-attending decoder.
    DecoderInputIds,
    /// Images read by the patch embedding.
    PixelValues,
    /// A cached key tensor concatenated in front of a layer's keys.
    PastKey,
    /// A cached value tensor concatenated in front of a layer's values.
    PastValue,
}

/// A graph input and the role the core found for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GraphInput {
    /// The graph input's name.
    pub name: String,
    /// What it carries.
    pub role: InputRole,
    /// For `past_key`/`past_value`: the stack holding the layer whose cache it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stack: Option<String>,
    /// For `past_key`/`past_value`: the layer whose cache it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer: Option<usize>,
    /// For `past_key`/`past_value`: the graph output that returns this cache with the step's
    /// keys or values appended (`present`), when the core found it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub present: Option<String>,
}

/// The role of a site in its layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
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
    /// Fused query-key-value projection.
    Qkv,
    /// Feed-forward up projection.
    FfnUp,
    /// Feed-forward gate projection (gated FFNs such as SwiGLU).
    FfnGate,
    /// Feed-forward down projection.
    FfnDown,
    /// Fused feed-forward gate and up projection.
    FfnGateUp,
    /// A normalization (LayerNorm or RMSNorm) whose scale is `weight`.
    Norm,
}

impl SiteKind {
    /// Every site kind.
    pub const ALL: [SiteKind; 10] = [
        SiteKind::Q,
        SiteKind::K,
        SiteKind::V,
        SiteKind::O,
        SiteKind::Qkv,
        SiteKind::FfnUp,
        SiteKind::FfnGate,
        SiteKind::FfnDown,
        SiteKind::FfnGateUp,
        SiteKind::Norm,
    ];

    /// The serialized name (`"q"`, `"ffn_up"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            SiteKind::Q => "q",
            SiteKind::K => "k",
            SiteKind::V => "v",
            SiteKind::O => "o",
            SiteKind::Qkv => "qkv",
            SiteKind::FfnUp => "ffn_up",
            SiteKind::FfnGate => "ffn_gate",
            SiteKind::FfnDown => "ffn_down",
            SiteKind::FfnGateUp => "ffn_gate_up",
            SiteKind::Norm => "norm",
        }
    }

    /// Parses a serialized name; `None` if `name` is not one.
    pub fn from_name(name: &str) -> Option<SiteKind> {
        SiteKind::ALL.into_iter().find(|k| k.name() == name)
    }

    /// True for every kind but `norm`: the site is a linear projection.
    pub fn is_linear(self) -> bool {
        self != SiteKind::Norm
    }

    /// True for the attention projections `q`, `k`, `v`, `o`, `qkv`.
    pub fn is_attention(self) -> bool {
        matches!(
            self,
            SiteKind::Q | SiteKind::K | SiteKind::V | SiteKind::O | SiteKind::Qkv
        )
    }

    /// True for the feed-forward projections `ffn_up`, `ffn_gate`, `ffn_down`, `ffn_gate_up`.
    pub fn is_ffn(self) -> bool {
        matches!(
            self,
            SiteKind::FfnUp | SiteKind::FfnGate | SiteKind::FfnDown | SiteKind::FfnGateUp
        )
    }
}

/// Which attention an attention site belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AttentionKind {
    /// Self-attention (serialized `"self"`).
    #[serde(rename = "self")]
    SelfAttention,
    /// Cross-attention over an encoder's output (serialized `"cross"`).
    #[serde(rename = "cross")]
    Cross,
}

/// How a linear weight is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightLayout {
    /// Stored `[in, out]`: `y = x · W` (a `MatMul`, or a `Gemm` without `transB`).
    InOut,
    /// Stored `[out, in]`: `y = x · Wᵀ` (a `Gemm` with `transB = 1`, PyTorch's `nn.Linear`).
    OutIn,
}

/// One place a method may adapt: a linear projection (or a normalization) of a layer.
///
/// For a linear site `output = input · W (+ bias)` with `W` in `layout`. For a `norm` site,
/// `weight` is the scale, `bias` the shift (LayerNorm), `in_features = out_features` is the
/// normalized width and `layout` is `in_out` and carries no meaning.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Site {
    /// The site's role.
    pub kind: SiteKind,
    /// For attention sites, which attention; absent for the others or when unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention: Option<AttentionKind>,
    /// Name of the node computing the projection (`MatMul`, `Gemm`, or the normalization).
    pub node: String,
    /// Name of the weight initializer.
    pub weight: String,
    /// A readable, stable name such as `"decoder.layers.3.self_attn.q_proj"`, when the core
    /// could derive one; plugins match user patterns against it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// Width of the input's last axis.
    pub in_features: usize,
    /// Width of the output's last axis.
    pub out_features: usize,
    /// How `weight` is stored.
    pub layout: WeightLayout,
    /// Name of the bias initializer, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bias: Option<String>,
    /// The value the projection reads.
    pub input: String,
    /// The value the projection's consumers read: after the bias `Add` if there is one.
    pub output: String,
    /// On `k` and `qkv` sites: the per-head key tensor `[batch, heads, seq, head_dim]` that
    /// enters attention, where the core found it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_states: Option<String>,
    /// On `v` and `qkv` sites: the per-head value tensor `[batch, heads, seq, head_dim]` that
    /// enters attention, where the core found it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_states: Option<String>,
    /// On a fused site whose output the graph splits into parts along its last axis (a `qkv`
    /// site's queries, keys and values, an `ffn_gate_up` site's gate and up halves): the parts
    /// in output-column order, their widths adding up to `out_features`; empty where the core
    /// found no such split.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub split: Vec<SplitPart>,
}

/// One part of a fused site's output: `width` consecutive output columns that play the role of
/// a `kind` projection (`q`, `k`, `v` for a `qkv` site; `ffn_gate`, `ffn_up` for an
/// `ffn_gate_up` site).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitPart {
    /// The role of these columns.
    pub kind: SiteKind,
    /// The number of columns.
    pub width: usize,
}

impl Site {
    /// Fails, naming the site, unless `r` is a usable rank for a low-rank branch on this
    /// linear site: at least 1 and at most `min(in_features, out_features)`, the highest rank
    /// the weight's update can have (a larger rank only adds parameters).
    pub fn check_rank(&self, r: usize) -> Result<(), String> {
        let max = self.in_features.min(self.out_features);
        if r == 0 {
            return Err(format!(
                "site {}: rank must be at least 1",
                self.display_name()
            ));
        }
        if r > max {
            return Err(format!(
                "site {}: rank {r} exceeds min(in, out) = min({}, {}) = {max}, the highest rank \
                 an update of this weight can have",
                self.display_name(),
                self.in_features,
                self.out_features
            ));
        }
        Ok(())
    }

    /// The label if there is one, else the node name: the name to show and to build
    /// parameter names from.
    pub fn display_name(&self) -> &str {
        self.label.as_deref().unwrap_or(&self.node)
    }
}

/// What an embedding looks up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EmbeddingKind {
    /// Token ids to vectors.
    Token,
    /// Learned absolute positions.
    Position,
    /// Segment (token type) ids.
    TokenType,
    /// Image patches (a strided convolution).
    Patch,
}

/// An embedding: a `Gather` from a table (or, for patches, a convolution).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Embedding {
    /// What is embedded.
    pub kind: EmbeddingKind,
    /// Name of the `Gather` (or `Conv`) node.
    pub node: String,
    /// Name of the table (or convolution kernel) initializer.
    pub weight: String,
    /// The value the node produces, `[batch, seq, dim]` for lookups.
    pub output: String,
    /// A readable name such as `"embeddings.word_embeddings"`, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// Rows of the table: vocabulary size, number of positions or of token types; for
    /// patch embeddings the number of patches per image, 0 when not static.
    pub n_embeddings: usize,
    /// Width of each embedding vector.
    pub dim: usize,
}

/// An output projection after the last stack (LM head, classifier, pooler dense).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Head {
    /// Name of the projection node.
    pub node: String,
    /// Name of the weight initializer (may be shared with the token embedding when tied).
    pub weight: String,
    /// Width of the input's last axis.
    pub in_features: usize,
    /// Width of the output's last axis (vocabulary size, number of classes).
    pub out_features: usize,
    /// How `weight` is stored.
    pub layout: WeightLayout,
    /// Name of the bias initializer, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bias: Option<String>,
    /// The value the projection reads.
    pub input: String,
    /// The value its consumers read: after the bias `Add` if there is one.
    pub output: String,
    /// A readable name such as `"lm_head"`, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

/// An initializer's name, element type and shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorInfo {
    /// The initializer's name.
    pub name: String,
    /// Its element type.
    pub dtype: DType,
    /// Its shape; `[]` for a scalar.
    pub shape: Vec<i64>,
}

impl TensorInfo {
    /// Number of elements (product of `shape`, 1 for a scalar); `None` if a dimension is
    /// negative or the product overflows.
    pub fn numel(&self) -> Option<usize> {
        self.shape
            .iter()
            .try_fold(1usize, |acc, d| acc.checked_mul(usize::try_from(*d).ok()?))
    }
}

/// One dimension of a value's shape.
///
/// Serialized untagged: a JSON integer for a fixed size, a string for a symbolic size
/// (`"batch"`), `null` for a dimension that is neither known nor named.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Dim {
    /// A fixed size.
    Fixed(i64),
    /// A named, symbolic size.
    Symbolic(String),
    /// An unknown, unnamed size.
    Unknown,
}

/// A value's name with its element type and shape, each where known.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValueInfo {
    /// The value's name.
    pub name: String,
    /// Its element type, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<DType>,
    /// Its shape, when the rank is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shape: Option<Vec<Dim>>,
}

/// A site together with the stack and layer it belongs to.
#[derive(Debug, Clone, Copy)]
pub struct SiteRef<'g> {
    /// The stack holding the layer.
    pub stack: &'g Stack,
    /// The layer holding the site.
    pub layer: &'g Layer,
    /// The site.
    pub site: &'g Site,
}

impl GraphView {
    /// Every site of every layer of every stack, in order.
    pub fn sites(&self) -> impl Iterator<Item = SiteRef<'_>> {
        self.stacks.iter().flat_map(|stack| {
            stack.layers.iter().flat_map(move |layer| {
                layer
                    .sites
                    .iter()
                    .map(move |site| SiteRef { stack, layer, site })
            })
        })
    }

    /// The initializer named `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The value info named `name`.
    pub fn value(&self, name: &str) -> Option<&ValueInfo> {
        self.values.iter().find(|v| v.name == name)
    }

    /// The graph inputs found to carry `role`, in graph-input order.
    pub fn inputs_with_role(&self, role: InputRole) -> impl Iterator<Item = &GraphInput> {
        self.input_roles.iter().filter(move |i| i.role == role)
    }

    /// The element type of `name`: from its value info, else from the initializer of that name.
    pub fn dtype_of(&self, name: &str) -> Option<DType> {
        self.value(name)
            .and_then(|v| v.dtype)
            .or_else(|| self.tensor(name).map(|t| t.dtype))
    }

    /// Every name the view mentions: initializers, values, node names, graph inputs and
    /// outputs, and the nodes, weights, biases and values named by sites, embeddings and heads.
    pub fn known_names(&self) -> BTreeSet<&str> {
        let mut names: BTreeSet<&str> = BTreeSet::new();
        names.extend(self.tensors.iter().map(|t| t.name.as_str()));
        names.extend(self.values.iter().map(|v| v.name.as_str()));
        names.extend(self.node_names.iter().map(String::as_str));
        names.extend(self.inputs.iter().map(String::as_str));
        names.extend(self.outputs.iter().map(String::as_str));
        for s in self.sites() {
            let site = s.site;
            names.extend([&site.node, &site.weight, &site.input, &site.output].map(String::as_str));
            names.extend(
                [&site.bias, &site.key_states, &site.value_states]
                    .into_iter()
                    .flatten()
                    .map(String::as_str),
            );
        }
        for stack in &self.stacks {
            names.extend(
                [&stack.input, &stack.output]
                    .into_iter()
                    .flatten()
                    .map(String::as_str),
            );
            for layer in &stack.layers {
                names.extend(
                    [
                        &layer.input,
                        &layer.output,
                        &layer.attention_sum,
                        &layer.ffn_sum,
                    ]
                    .into_iter()
                    .flatten()
                    .map(String::as_str),
                );
                for attention in &layer.attention {
                    names.extend([&attention.scores, &attention.probabilities].map(String::as_str));
                    names.extend(
                        [
                            &attention.mask,
                            &attention.key_states,
                            &attention.value_states,
                            &attention.sum,
                        ]
                        .into_iter()
                        .flatten()
                        .map(String::as_str),
                    );
                }
            }
        }
        names.extend(self.input_roles.iter().map(|i| i.name.as_str()));
        for e in &self.embeddings {
            names.extend([&e.node, &e.weight, &e.output].map(String::as_str));
        }
        for h in &self.heads {
            names.extend([&h.node, &h.weight, &h.input, &h.output].map(String::as_str));
            names.extend(h.bias.as_deref());
        }
        names
    }
}
