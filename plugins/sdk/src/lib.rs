//! The graft plugin SDK: everything needed to write a fine-tuning method as a plugin, and
//! the types the core uses to talk to one.
//!
//! # Plugins describe, the core applies
//!
//! A method plugin (LoRA, IA³, adapters, prompt tuning, ...) never edits a model. It receives
//! a [`GraphView`] — the transformer stacks, their adaptable [`Site`]s, the embeddings, heads,
//! initializers and value types the core found — and answers with a [`Patch`]: new
//! parameters, new nodes, [`Rewire`]s of existing consumers, parameters to train in place,
//! and [`Fold`]s saying how `graft merge` folds each branch back into base weights. The core
//! validates the patch against the real graph (names, types, shapes, cycles, opset), applies
//! it atomically — all of it or nothing — and builds training, inference and merged graphs
//! from it. Because merge reads only folds, it is generic: a plugin that records folds is
//! mergeable without the core knowing the method.
//!
//! # Taking part in training
//!
//! Most methods act while they train, not only when they are grafted. A [`Patch`] may declare,
//! besides its graph edits:
//!
//! - **loss terms** ([`LossTerm`]): scalars the training graph adds, weighted, to the task loss
//!   (AdaLoRA's orthogonality regularizer), logged per step in `metrics.jsonl`;
//! - **host-fed inputs** ([`HostInput`]): graph inputs the host feeds at every step —
//!   training or evaluation mode, the step, the run's progress, seeded uniform draws, or
//!   values the method's step hook chooses (masks, gates, skip switches); outside training
//!   they are overridable initializers holding their defaults, so exports run without graft;
//! - **a step hook** ([`StepHook`]): after every optimizer step the host calls
//!   [`Plugin::step`] with the step, the values and gradients of the tensors the hook asked
//!   for, and the state the hook returned last time ([`StepRequest`]); the [`StepReply`] sets
//!   tensors and value inputs for the next step, reports figures, and carries the next state,
//!   which the host checkpoints so that `graft train --resume` continues bit for bit;
//! - **PEFT files** ([`PeftFiles`]): where its tensors go in HF PEFT's adapter files.
//!
//! Dropout needs nothing declared: a standard ONNX `Dropout` node without a training-mode
//! input is the identity in exported graphs, and in training graphs the host replaces it by a
//! product with masks drawn from graft's own seeded generator. A later method sees what earlier
//! ones grafted in [`GraphView::record`] ([`GraftRecord`]: methods, configs, tensors, nodes,
//! folds), and `graft train --train METHOD` trains some methods while the others stay frozen.
//! Besides [`Fold::LowRank`] and the scale folds, [`Fold::Delta`] folds any branch whose weight
//! update a small side subgraph of parameters computes, and [`Fold::Bake`] turns a
//! parameter-only subgraph (a prefix MLP) into a tensor at merge time. `plugins/adalora` uses all
//! of it; `examples/plugin-rust` shows a step hook in a few lines.
//!
//! # The ABI in a paragraph
//!
//! A plugin is a shared library (a Rust `cdylib`) exporting one C symbol,
//! `graft_plugin_entry`, which returns a static [`abi::GraftPluginTable`]: ABI version
//! ([`abi::GRAFT_PLUGIN_ABI_VERSION`], 2; the host still loads version 1), table size,
//! NUL-terminated name and version, and two functions. `call(host, request, request_len,
//! reply)` takes a request — a frame (JSON, then a safetensors blob) under ABI 2, plain UTF-8
//! JSON under ABI 1 — and stores a plugin-allocated buffer in `*reply`: on 0 a response frame,
//! otherwise a UTF-8 error message. `free(reply)` gives that buffer back to the plugin. During a call the
//! plugin may borrow the bytes of existing initializers through the [`abi::GraftHost`]
//! callback `tensor_view` (wrapped as [`Host`]); the view lives until `call` returns. The C
//! header is `include/graft_plugin.h`; [`abi`] mirrors it.
//!
//! # Requests and responses
//!
//! The core first sends `{"op":"describe"}`; the plugin answers with a
//! [`PluginDescription`]: its methods and, for each, every config key with its kind, default
//! and help. To adapt a model the core sends
//! `{"op":"patch","method":"lora","config":{...},"graph":{...}}` ([`Request`]); during
//! training, `{"op":"step",...}` with the tensors in the blob ([`StepRequest::encode`]). Every
//! successful answer is a response frame ([`encode_frame`], [`decode_frame`]): an 8-byte
//! little-endian length `N`, `N` bytes of JSON, then a safetensors blob, empty unless the
//! patch has [`Init::Data`] parameters whose bytes it carries ([`PatchReply`]). The core's
//! side of this exchange is [`PluginClient`].
//!
//! # A complete plugin
//!
//! Implement [`Plugin`] on a unit struct and export it with [`export_plugin!`]; build the
//! crate with `crate-type = ["cdylib"]` under `[lib]`. Helpers on [`PatchBuilder`] emit the
//! usual insertions; this plugin adds LoRA branches to the sites the user targets:
//!
//! ```
//! use graft_plugin_sdk::{
//!     export_plugin, ConfigKey, GraphView, Host, Init, MethodConfig, MethodDescription,
//!     PatchBuilder, PatchReply, Plugin,
//! };
//!
//! pub struct TinyLora;
//!
//! impl Plugin for TinyLora {
//!     const NAME: &'static str = "tiny-lora";
//!     const VERSION: &'static str = "0.1.0"; // usually env!("CARGO_PKG_VERSION")
//!
//!     fn methods() -> Vec<MethodDescription> {
//!         vec![MethodDescription::new(
//!             "tiny_lora",
//!             "low-rank updates on the targeted linear sites",
//!             vec![
//!                 ConfigKey::int("r", 8, "rank of the update"),
//!                 ConfigKey::float("alpha", 16.0, "the update is scaled by alpha / r"),
//!                 ConfigKey::list("targets", &["q", "v"], "site kinds, groups or label patterns"),
//!                 ConfigKey::int("seed", 0, "seed for the A matrices"),
//!             ],
//!         )]
//!     }
//!
//!     fn patch(
//!         _host: &Host<'_>,
//!         method: &str,
//!         config: &MethodConfig,
//!         graph: &GraphView,
//!     ) -> Result<PatchReply, String> {
//!         let r = config.get_usize("r")?;
//!         if r == 0 {
//!             return Err(format!("{method}: r must be at least 1"));
//!         }
//!         let scale = config.get_f32("alpha")? / r as f32;
//!         let mut b = PatchBuilder::new(graph, "lora").with_seed(config.get_usize("seed")? as u64);
//!         for s in config.get_sites("targets")?.select(graph) {
//!             let init_a = Init::linear_default(s.site.in_features, b.next_seed());
//!             b.low_rank_branch(s.site, r, scale, init_a, Init::Zeros, None)?;
//!         }
//!         Ok(b.finish())
//!     }
//! }
//!
//! export_plugin!(TinyLora);
//!
//! # fn main() {
//! // What the core does after loading the library and resolving `graft_plugin_entry`:
//! let client = unsafe { graft_plugin_sdk::PluginClient::from_raw(graft_plugin_entry()) }.unwrap();
//! assert_eq!(client.describe().unwrap().methods[0].name, "tiny_lora");
//! let config = serde_json::json!({ "rr": 4 });
//! let error = client
//!     .patch(&graft_plugin_sdk::NoTensors, "tiny_lora", &config, &GraphView::default())
//!     .unwrap_err();
//! assert_eq!(
//!     error.to_string(),
//!     "unknown config key \"rr\" for method tiny_lora; valid keys: r, alpha, targets, seed"
//! );
//! # }
//! ```
//!
//! # A walk-through outside the workspace
//!
//! `examples/plugin-rust` in graft's repository is a plugin as a third party writes it: a
//! crate with its own `[workspace]` that depends on this crate alone, implements a method graft
//! does not ship (`lora_scaled`, LoRA with a learned per-rank scale), makes it mergeable by
//! recording two of the existing [`Fold`]s, and is built with `cargo build --manifest-path` and
//! loaded with `graft apply --plugin`. `examples/plugin-c` speaks the same ABI from plain C.
//!
//! # Configs and errors
//!
//! Config values reach the plugin as JSON, typed when they come from a TOML recipe
//! (`r = 8`) and as strings when they come from the command line (`--set r=8`).
//! [`MethodConfig`] checks them against the method's declared [`ConfigKey`]s before
//! [`Plugin::patch`] runs — an undeclared key or a value of the wrong kind never reaches the
//! plugin — and its getters (`get_usize`, `get_f32`, `get_bool`, `get_string`, `get_list`,
//! `get_map`, ...) accept both forms, fall back to declared defaults, and fail with messages
//! written for users. `?` turns any SDK [`Error`] into the `String` a plugin returns. An
//! `Err` from [`Plugin::patch`] reaches the user verbatim; a panic is caught at the
//! boundary and reported as `plugin <name> panicked: <message>`. A plugin must not print,
//! exit, or keep state between calls (a step hook's state travels through the host).
//!
//! # Writing patches
//!
//! New names must not clash with existing ones; [`PatchBuilder`] derives them from the
//! method prefix and the site label and checks them. Helpers compose in call order (a value
//! rewired by one helper is what the next reads), only standard ONNX ops are emitted, and
//! every random [`Init`] carries a seed so patches are reproducible. Record a [`Fold`] for
//! every branch that can be folded into base weights. [`Patch::check`] verifies the names a
//! patch uses and the tensors it makes trainable; the host runs the same check on every patch
//! before applying it (then checks element types, shapes and cycles on the patched graph), so
//! it is also a good assertion in plugin tests.

#![warn(missing_docs)]

pub mod abi;
mod builder;
mod client;
mod config;
mod describe;
mod dtype;
mod error;
mod export;
mod graph;
mod host;
mod patch;
mod protocol;
pub mod quant;
mod record;
mod select;
mod training;

pub use builder::{
    Activation, Bottleneck, BottleneckNames, DeltaNames, DequantNames, GateNames, LowRankNames,
    MaskNames, PatchBuilder, Placement, PrefixNames, PromptNames, ResidualNames, ScaleNames,
    SequenceFill,
};
pub use client::PluginClient;
pub use config::MethodConfig;
pub use describe::{ConfigKey, ConfigKind, MethodDescription, PeftImport, PluginDescription};
pub use dtype::{
    bytes_to_f32, bytes_to_f32_into, f16_bits_to_f32, f32_to_bf16_bits, f32_to_bytes,
    f32_to_bytes_into, f32_to_f16_bits, DType,
};
pub use error::{Error, Result};
#[doc(hidden)]
pub use export::__private;
pub use export::Plugin;
pub use graph::{
    Attention, AttentionKind, BlockKind, Dim, Embedding, EmbeddingKind, GraphInput, GraphView,
    Head, InputRole, Layer, NormInfo, NormKind, NormPlacement, ResidualBlock, Site, SiteKind,
    SiteRef, SplitPart, Stack, StackKind, TensorInfo, ValueInfo, WeightLayout,
};
pub use host::{raw_host, Host, NoTensors, TensorSource};
pub use patch::{
    AttributeValue, Branch, Fold, Init, NewNode, NewParameter, NewValue, OutputRewire, Patch,
    QuantizedStorage, Rewire, StoredScales,
};
pub use protocol::{decode_frame, encode_frame, PatchReply, Request, TensorPayload};
pub use record::{AppliedMethod, GraftRecord};
pub use select::{PatternMap, SiteSelector};
/// The JSON library of the SDK's messages (configs, step-hook state), re-exported so that a
/// plugin needs no dependency of its own to build them.
pub use serde_json;
pub use training::{
    AdapterHubFolder, AdapterHubKind, HostArray, HostInput, HostInputKind, LossTerm, PeftFiles,
    PeftTensor, StepHook, StepReply, StepRequest, TrainingSpec,
};
