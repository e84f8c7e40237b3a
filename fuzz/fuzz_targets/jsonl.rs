//! Fuzz target: training data in pre-tokenized JSONL, read as `graft train` reads it.
//!
//! The bytes are a data file: `train::data::read_data` (format `auto`, no tokenizer, bad lines
//! skipped) sniffs the format and parses every line into an example, `read_jsonl` parses them
//! again stopping at the first bad line, `train::prepare_data` checks the examples against a
//! fixture model for one of the four tasks, chosen by the input's length (labels against the
//! logits, ids against the embedding tables, lengths against the positions), and `collate`
//! batches them as the training loop does.
//! Each step may refuse the data with an error; none may panic.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use graft::ir::Model;
use graft::train::data::{collate, read_data, read_jsonl, DataFormat, DataOptions};
use graft::train::{prepare_data, Task};
use libfuzzer_sys::fuzz_target;

fn model() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| graft_fuzz::fixture("bert-legacy"))
}

const TASKS: [Task; 4] = [Task::SeqCls, Task::Regression, Task::TokenCls, Task::CausalLm];

fuzz_target!(|data: &[u8]| {
    let model = model();
    let path = graft_fuzz::scratch_file("data.jsonl", data);
    let options = DataOptions {
        format: DataFormat::Auto,
        tokenizer: None,
        max_len: 128,
        skip_bad_lines: true,
    };
    if let Ok(dataset) = read_data(&path, &options) {
        assert!(!dataset.examples.is_empty(), "a dataset without examples was accepted");
        assert_eq!(dataset.examples.len(), dataset.lines.len());
        // One task per input (reading the model's limits is the costly part of the check).
        let task = TASKS[data.len() % TASKS.len()];
        let mut checked = dataset;
        if prepare_data(model, task, Path::new("data.jsonl"), &mut checked).is_ok() {
            for batch in checked.examples.chunks(3) {
                let batch: Vec<_> = batch.iter().collect();
                collate(&batch);
            }
        }
    }
    let _ = read_jsonl(&path, false);
});
