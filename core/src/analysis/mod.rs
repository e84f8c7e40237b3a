//! Analyses of a loaded model: shape and type inference ([`shapes`]), structural detection of
//! transformer stacks, layers and adaptable sites ([`sites`]), and module-path labels recovered
//! from exporter names ([`labels`]).

pub mod labels;
pub mod shapes;
pub mod sites;

pub use shapes::{infer_shapes, ShapeConflict, ShapeMap};
pub use sites::{
    detect, Attention, AttentionKind, Embedding, EmbeddingKind, GraphInput, Head, InputRole, Layer,
    NormPlacement, Site, SiteKind, SplitPart, Stack, StackKind, Structure, WeightLayout,
};
