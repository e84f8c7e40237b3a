//! Fuzz target: safetensors adapter files loaded into a patched model.
//!
//! The bytes are an adapter file given to `graft merge / export / run --adapter`
//! (`adapter::load_into`: graft's tensor names) and to `graft train --init-adapter`
//! (`peft::load_values`: HF PEFT's `lora_A` / `lora_B` keys), each into a fresh copy of
//! `bert-legacy` with rank-2 LoRA branches on `q` and `v`. Either may refuse the file; neither
//! may panic. A file `load_into` accepts leaves tensors that `adapter::save` writes and
//! `load_into` reads back.
#![no_main]


use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = graft_fuzz::scratch_file("adapter.safetensors", data);
    let mut model = graft_fuzz::patched_bert().clone();
    if graft::adapter::load_into(&mut model, &path).is_ok() {
        let saved = graft_fuzz::scratch("saved.safetensors");
        graft::adapter::save(&model, &saved).expect("a loaded adapter saves");
        let mut again = graft_fuzz::patched_bert().clone();
        graft::adapter::load_into(&mut again, &saved).expect("a saved adapter loads");
    }
    let mut model = graft_fuzz::patched_bert().clone();
    let _ = graft::peft::load_values(&mut model, &path);
});
