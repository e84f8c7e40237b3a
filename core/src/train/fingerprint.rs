//! Stable 64-bit fingerprints (FNV-1a, the same on every platform and build) of what shapes a
//! training trajectory besides the flags: the patched model and the examples. A checkpoint
//! records them so that `--resume` can tell that it is fed the same model and data.

use std::hash::Hasher;

use fnv::FnvHasher;
use onnx_protobuf::Message;

use super::data::{Example, Target};
use crate::ir::{Model, TensorData};

/// Feeds variable-length fields with their lengths first, so that field boundaries count.
struct Fingerprint(FnvHasher);

impl Fingerprint {
    fn new() -> Self {
        Fingerprint(FnvHasher::default())
    }

    fn bytes(&mut self, bytes: &[u8]) {
        self.0.write(&(bytes.len() as u64).to_le_bytes());
        self.0.write(bytes);
    }

    fn text(&mut self, text: &str) {
        self.bytes(text.as_bytes());
    }

    fn number(&mut self, value: i64) {
        self.0.write(&value.to_le_bytes());
    }

    fn finish(&self) -> String {
        format!("{:016x}", self.0.finish())
    }
}

/// The fingerprint of `model`'s graph: every node (name, op, wiring, attributes), every graph
/// input and output name, and every initializer's name, type, shape and bytes (tensors the IR
/// keeps opaque count by name and shape only).
pub fn model(model: &Model) -> String {
    let mut print = Fingerprint::new();
    let graph = &model.graph;
    for node in &graph.nodes {
        print.text(&node.name);
        print.text(&node.domain);
        print.text(&node.op_type);
        for value in node.inputs.iter().chain(&node.outputs) {
            print.text(value);
        }
        for attribute in &node.attributes {
            print.bytes(&attribute.write_to_bytes().unwrap_or_default());
        }
    }
    for value in graph.inputs.iter().chain(&graph.outputs) {
        print.text(&value.name);
    }
    for tensor in &graph.initializers {
        print.text(&tensor.name);
        print.text(&tensor.dtype.to_string());
        tensor.dims.iter().for_each(|&d| print.number(d));
        if !matches!(tensor.data, TensorData::Opaque(_)) {
            print.bytes(tensor.raw_bytes().unwrap_or_default());
        }
    }
    print.finish()
}

/// The fingerprint of `examples` in order: their sequences, features and targets, so that it
/// changes with the data file, the tokenizer and `--max-len` alike.
pub fn examples(examples: &[Example]) -> String {
    let mut print = Fingerprint::new();
    for example in examples {
        for (name, sequence) in &example.sequences {
            print.text(name);
            print.number(sequence.len() as i64);
            sequence.iter().for_each(|&v| print.number(v));
        }
        for (name, feature) in &example.features {
            print.text(name);
            feature.shape.iter().for_each(|&d| print.number(d as i64));
            feature
                .values
                .iter()
                .for_each(|v| print.0.write(&v.to_le_bytes()));
        }
        match &example.target {
            Target::Class(class) => {
                print.number(0);
                print.number(*class);
            }
            Target::Value(value) => {
                print.number(1);
                print.0.write(&value.to_le_bytes());
            }
            Target::Tokens(labels) => {
                print.number(2);
                print.number(labels.len() as i64);
                labels.iter().for_each(|&v| print.number(v));
            }
        }
    }
    print.finish()
}
