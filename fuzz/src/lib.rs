//! Fixtures the fuzz targets and the seed generator share: committed fixture models, a LoRA
//! patch built with the plugin SDK and applied by graft itself, and a scratch folder for
//! parsers that only read from a path.
//!
//! Nothing here is fuzzed: these helpers build the known-good state that the fuzzed parsers
//! are pointed at, and every one of them panics if that state cannot be built (a broken
//! fixture, not a finding).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use graft::ir::Model;
use graft_plugin_sdk::{f32_to_bytes, Init, PatchBuilder, PatchReply, SiteSelector};

/// `relative` from the repository root.
pub fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(relative)
}

/// The committed fixture `models/fixtures/<name>/model.onnx`, loaded by graft.
pub fn fixture(name: &str) -> Model {
    let path = repo_path(&format!("models/fixtures/{name}/model.onnx"));
    graft::onnx::load(&path).unwrap_or_else(|e| panic!("fixture {}: {e}", path.display()))
}

/// How [`lora_reply`] initialises the B factors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BInit {
    /// Zeros, as the `lora` plugin does: the reply has no tensor payloads.
    Zeros,
    /// Small non-zero values carried as payloads, so the reply's frame has a safetensors blob.
    Payload,
}

/// A LoRA reply (rank 2, on the sites of the kinds `targets` names, e.g. `["q", "v"]`) built
/// with the SDK's [`PatchBuilder`], the helper every method plugin uses.
pub fn lora_reply(model: &Model, targets: &[&str], b_init: BInit) -> PatchReply {
    let view = graft::plugins::graph_view(model).expect("a view of the fixture");
    let selector = SiteSelector::parse(targets).expect("site kinds");
    let mut builder = PatchBuilder::new(&view, "lora").with_seed(7);
    let rank = 2;
    for site in selector.select(&view).into_iter().map(|s| s.site) {
        let init_a = Init::linear_default(site.in_features, builder.next_seed());
        let init_b = match b_init {
            BInit::Zeros => Init::Zeros,
            BInit::Payload => {
                let dtype = builder.value_dtype(&site.weight).expect("the weight's type");
                let values: Vec<f32> = (0..rank * site.out_features)
                    .map(|i| (i % 7) as f32 * 0.01 - 0.03)
                    .collect();
                let bytes = f32_to_bytes(dtype, &values).expect("a float weight");
                builder
                    .data("lora_b", dtype, vec![rank, site.out_features], bytes)
                    .expect("a payload of the right size")
            }
        };
        builder
            .low_rank_branch(site, rank, 1.0, init_a, init_b, None)
            .expect("a LoRA branch");
    }
    builder.finish()
}

/// An IA³-like reply (output scales on the `k` and `v` sites), for seed variety.
pub fn scale_reply(model: &Model) -> PatchReply {
    let view = graft::plugins::graph_view(model).expect("a view of the fixture");
    let selector = SiteSelector::parse(&["k", "v"]).expect("site kinds");
    let mut builder = PatchBuilder::new(&view, "ia3");
    for site in selector.select(&view).into_iter().map(|s| s.site) {
        builder.scale_output(site, Init::Ones).expect("a scale");
    }
    builder.finish()
}

/// `model` with [`lora_reply`] applied by [`graft::patch::apply_patch`], and the site labels of
/// the patched weights recorded as `graft apply` records them (so that PEFT-layout loading
/// finds the branches by module path).
pub fn lora_patched(mut model: Model, b_init: BInit) -> Model {
    let reply = lora_reply(&model, &["q", "v"], b_init);
    let view = graft::plugins::graph_view(&model).expect("a view of the fixture");
    let method = graft::patch::AppliedMethod {
        method: "lora".into(),
        plugin: "graft-fuzz".into(),
        plugin_version: "0".into(),
        config: serde_json::json!({ "r": 2, "targets": ["q", "v"] }),
        ..Default::default()
    };
    graft::patch::apply_patch(&mut model, &reply, method).expect("the LoRA patch applies");
    let mut record = graft::patch::read_record(&model).expect("a record");
    for site in view.sites().map(|s| s.site) {
        let Some(label) = &site.label else { continue };
        if record
            .folds
            .iter()
            .any(|fold| graft::plugins::fold_weight(fold) == Some(site.weight.as_str()))
        {
            record.labels.insert(site.weight.clone(), label.clone());
        }
    }
    graft::patch::write_record(&record, &mut model);
    model
}

/// `bert-legacy` with rank-2 LoRA branches on `q` and `v` (B = 0; [`lora_patched`]), built
/// once per process.
pub fn patched_bert() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| lora_patched(fixture("bert-legacy"), BInit::Zeros))
}

/// `name` in a scratch folder that lives as long as the process (one per fuzz process, so
/// parallel jobs do not share files).
pub fn scratch(name: &str) -> PathBuf {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("a temporary folder"))
        .path()
        .join(name)
}

/// Writes `data` to the scratch file `name` and returns its path.
pub fn scratch_file(name: &str, data: &[u8]) -> PathBuf {
    let path = scratch(name);
    std::fs::write(&path, data).expect("the scratch file");
    path
}
