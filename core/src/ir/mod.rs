//! The intermediate representation graft edits: [`Model`], [`Graph`], [`Node`], [`Tensor`], and
//! [`GraphIndex`], the producer/consumer lookups used by analyses.

pub mod attributes;
mod dtype;
mod graph;
mod index;
mod tensor;

pub use dtype::DataType;
pub(crate) use graph::{entries_from_proto, entries_to_proto};
pub use graph::{Dim, Graph, Model, Node, ValueInfo, ValueType};
pub use index::GraphIndex;
pub use tensor::{MappedFile, Tensor, TensorData};
