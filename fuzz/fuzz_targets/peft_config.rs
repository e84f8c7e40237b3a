//! Fuzz target: HF PEFT `adapter_config.json`, read as `graft apply --peft DIR` reads it.
//!
//! The bytes are the config of an adapter folder whose `adapter_model.safetensors` is the
//! committed PEFT recording `models/references/peft-bert`; `peft::import` reads and checks the
//! config (`peft/config.rs`), compiles `target_modules`, `rank_pattern` and `alpha_pattern`,
//! selects the sites of `bert-legacy`, and resolves the file's tensors against the model. The
//! registry holds no plugin, so a config that passes every check stops with "unknown method
//! lora" where the LoRA plugin would be asked for branches. No config may panic.
#![no_main]

use std::sync::OnceLock;

use graft::ir::Model;
use graft::plugins::PluginRegistry;
use libfuzzer_sys::fuzz_target;

struct Fixture {
    model: Model,
    dir: std::path::PathBuf,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = graft_fuzz::scratch("peft-adapter");
        std::fs::create_dir_all(&dir).expect("the adapter folder");
        let weights = graft_fuzz::repo_path("models/references/peft-bert/adapter_model.safetensors");
        std::fs::copy(&weights, dir.join(graft::peft::WEIGHTS_FILE)).expect("the PEFT weights");
        Fixture {
            model: graft_fuzz::fixture("bert-legacy"),
            dir,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let fixture = fixture();
    std::fs::write(fixture.dir.join(graft::peft::CONFIG_FILE), data).expect("the config");
    let mut model = fixture.model.clone();
    let _ = graft::peft::import(&PluginRegistry::default(), &mut model, &fixture.dir);
});
