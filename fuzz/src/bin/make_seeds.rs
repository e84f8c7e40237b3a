//! Writes the seeds that no committed file provides, each made by graft's own writers from a
//! committed fixture: `make_seeds CORPUS_ROOT` (built with the fuzz targets by `cargo fuzz
//! build`, which builds every binary of this package; see `seed-corpus.sh`).
//!
//! * `adapter_safetensors/`: the trainable tensors of `bert-legacy` with LoRA branches, as
//!   `adapter::save` writes them (graft's names) and as `peft::export` writes them (PEFT's);
//! * `onnx_adapter/`: the same tensors as `OnnxAdapter::to_bytes` writes them;
//! * `plugin_reply/`: patch replies as plugins send them (LoRA with and without payloads, on
//!   `bert-legacy` and `gpt2-legacy`; output scales), a step-hook reply, and a description in
//!   both of its forms (plain JSON and frame);
//! * `npz/`: one array of each element type `graft run` reads, as `runtime::write_npz` writes
//!   them;
//! * `jsonl/`: two pre-tokenized lines with a float feature, from `bert-legacy`'s inputs.

use std::collections::BTreeMap;
use std::path::Path;

use graft_fuzz::{fixture, lora_patched, lora_reply, scale_reply, BInit};
use graft_plugin_sdk::{
    encode_frame, ConfigKey, ConfigKind, HostArray, MethodDescription, PluginDescription,
    StepReply,
};

fn write(root: &Path, target: &str, name: &str, bytes: &[u8]) {
    let dir = root.join(target);
    std::fs::create_dir_all(&dir).expect("the corpus folder");
    std::fs::write(dir.join(name), bytes).expect("a seed");
}

fn main() {
    let root = std::env::args_os()
        .nth(1)
        .expect("usage: make_seeds CORPUS_ROOT");
    let root = Path::new(&root);
    let bert = fixture("bert-legacy");
    let gpt2 = fixture("gpt2-legacy");

    let patched = lora_patched(bert.clone(), BInit::Payload);
    let scratch = tempfile::tempdir().expect("a temporary folder");
    let file = scratch.path().join("adapter.safetensors");
    graft::adapter::save(&patched, &file).expect("adapter::save");
    write(root, "adapter_safetensors", "graft-bert-lora.safetensors", &std::fs::read(&file).unwrap());
    let peft_dir = scratch.path().join("peft");
    graft::peft::export(&patched, &peft_dir).expect("peft::export");
    let peft_file = peft_dir.join(graft::peft::WEIGHTS_FILE);
    write(root, "adapter_safetensors", "graft-bert-lora-peft.safetensors", &std::fs::read(&peft_file).unwrap());
    let config = std::fs::read(peft_dir.join(graft::peft::CONFIG_FILE)).unwrap();
    write(root, "peft_config", "graft-export-bert-lora.json", &config);

    let adapter = graft::onnx_adapter::OnnxAdapter::from_trainable(&patched).expect("from_trainable");
    write(root, "onnx_adapter", "bert-lora.onnx_adapter", &adapter.to_bytes());

    let frame = |reply: graft_plugin_sdk::PatchReply| reply.to_frame().expect("a frame");
    write(root, "plugin_reply", "lora-bert-payload.frame", &frame(lora_reply(&bert, &["q", "v"], BInit::Payload)));
    write(root, "plugin_reply", "lora-bert-zeros.frame", &frame(lora_reply(&bert, &["q", "v"], BInit::Zeros)));
    write(root, "plugin_reply", "lora-gpt2-payload.frame", &frame(lora_reply(&gpt2, &["qkv"], BInit::Payload)));
    write(root, "plugin_reply", "ia3-bert.frame", &frame(scale_reply(&bert)));

    let array = |n: usize| HostArray::new(vec![n], (0..n).map(|i| i as f32 * 0.25).collect()).unwrap();
    let step = StepReply {
        state: serde_json::json!({ "step": 3, "ranks": [2, 1] }),
        state_tensors: BTreeMap::from([("ema".to_owned(), array(4))]),
        set: BTreeMap::from([("lora.mask".to_owned(), array(2))]),
        metrics: BTreeMap::from([("budget".to_owned(), 3.0)]),
    };
    write(root, "plugin_reply", "step.frame", &step.to_frame().expect("a step frame"));

    let description = PluginDescription {
        name: "lora".into(),
        version: "0.1.0".into(),
        methods: vec![MethodDescription::new(
            "lora",
            "low-rank adaptation",
            vec![
                ConfigKey::new("targets", ConfigKind::List, "q,v".into(), "site kinds"),
                ConfigKey::int("r", 8, "rank"),
                ConfigKey::float("alpha", 8.0, "scale numerator"),
                ConfigKey::bool("rslora", false, "alpha/sqrt(r)"),
                ConfigKey::string("init", "kaiming", "A's init"),
                ConfigKey::map("rank_pattern", &[("q", "4")], "per-site ranks"),
            ],
        )],
    };
    let json = serde_json::to_vec(&description).unwrap();
    write(root, "plugin_reply", "describe.json", &json);
    write(root, "plugin_reply", "describe.frame", &encode_frame(&json, &[]));

    use graft::runtime::HostTensor;
    use ndarray::{ArrayD, IxDyn};
    let arrays = vec![
        ("f32".to_owned(), HostTensor::F32(ArrayD::from_elem(IxDyn(&[2, 3]), 0.5))),
        ("f64".to_owned(), HostTensor::F64(ArrayD::from_elem(IxDyn(&[3]), -1.25))),
        ("i64".to_owned(), HostTensor::I64(ArrayD::from_elem(IxDyn(&[1, 4]), 7))),
        ("i32".to_owned(), HostTensor::I32(ArrayD::from_elem(IxDyn(&[]), 3))),
        ("bool".to_owned(), HostTensor::Bool(ArrayD::from_elem(IxDyn(&[2]), true))),
    ];
    let npz = scratch.path().join("types.npz");
    graft::runtime::write_npz(&npz, &arrays).expect("write_npz");
    write(root, "npz", "types.npz", &std::fs::read(&npz).unwrap());

    let inputs = graft::runtime::read_npz(&graft_fuzz::repo_path("models/fixtures/bert-legacy/inputs.npz"))
        .expect("the fixture's inputs");
    let mut lines = String::new();
    let ids = inputs.iter().find(|(n, _)| n == "input_ids").expect("input_ids").1.to_f64();
    for (row, label) in [(0usize, 1), (1, 0)] {
        let half = ids.len() / 2;
        let row_ids: Vec<i64> = ids[row * half..(row + 1) * half].iter().map(|&v| v as i64).collect();
        let line = serde_json::json!({
            "input_ids": row_ids,
            "attention_mask": vec![1; row_ids.len()],
            "extra": [[0.5, -0.25, 1.0], [0.125, 2.0, -1.5]],
            "label": label,
        });
        lines.push_str(&format!("{line}\n"));
    }
    write(root, "jsonl", "bert-features.jsonl", lines.as_bytes());
}
