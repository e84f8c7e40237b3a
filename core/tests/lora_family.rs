//! The LoRA family beyond LoRA — the `lycoris` plugin's `loha` and `lokr`, the `lora` plugin's
//! `dora` — and IA³'s PEFT files: exact no-ops at init, exact merges on both exporters'
//! encoders and decoders, gradients against central differences, training through `graft
//! train`, and HF PEFT parity both ways (adapters PEFT saved, recorded by
//! models/record_references.py: `peft-loha-*`, `peft-lokr-*`, `peft-dora-*`, `peft-ia3-*`).

mod common;

use std::path::Path;

use common::*;
use graft::ir::Model;
use graft::plugins::{apply_method as apply_in_process, PluginRegistry};
use graft::runtime::read_npz;
use graft_plugin_sdk::Fold;
use serde_json::json;

/// PyTorch and ONNX Runtime sum in different orders; PEFT's own merged and unmerged outputs
/// differ by up to 5.7e-6 on these models (models/references/README.md).
const TOLERANCE: f64 = 1e-5;

fn registry() -> PluginRegistry {
    PluginRegistry::discover(&[
        plugin_library("graft_plugin_lycoris"),
        plugin_library("graft_plugin_lora"),
        plugin_library("graft_plugin_ia3"),
    ])
    .unwrap()
}

fn applied(fixture: &str, method: &str, settings: serde_json::Value) -> Model {
    let mut model = graft::onnx::load(&fixture_model(fixture)).unwrap();
    apply_in_process(&registry(), &mut model, method, &settings)
        .unwrap_or_else(|e| panic!("{fixture} {method} {settings}: {e}"));
    model
}

/// Method settings covering each factor layout: LoHa; LoKr with a full first factor and a
/// rank-r second one; both factored (`decompose_both`); both full (a rank above half the
/// dimensions); a fixed split (`decompose_factor`); DoRA, with and without rsLoRA.
fn variants() -> Vec<(&'static str, serde_json::Value)> {
    vec![
        ("loha", json!({"targets": "all-linear", "r": 4, "alpha": 6})),
        ("lokr", json!({"targets": "all-linear", "r": 2, "alpha": 3})),
        (
            "lokr",
            json!({"targets": "all-linear", "r": 1, "decompose_both": true}),
        ),
        ("lokr", json!({"targets": "q,v,ffn_down", "r": 16})),
        (
            "lokr",
            json!({"targets": "all-linear", "r": 1, "decompose_factor": 4}),
        ),
        ("dora", json!({"targets": "all-linear", "r": 4, "alpha": 8})),
        (
            "dora",
            json!({"targets": "attention", "r": 2, "alpha": 4, "rslora": true}),
        ),
    ]
}

/// At PEFT's init (one factor zero) every variant leaves the outputs as they were; with every
/// factor non-zero the outputs move, and `graft merge` folds the update into the weights
/// exactly, leaving the base graph's topology.
#[test]
fn lora_family_starts_as_no_ops_and_merges_exactly() {
    for fixture in [
        "bert-legacy",
        "bert-dynamo",
        "llama-legacy",
        "llama-dynamo",
        "gpt2-legacy",
        "t5-legacy",
    ] {
        let inputs = fixture_inputs(fixture);
        let base = fixture_outputs(fixture);
        let base_ops = op_types(&graft::onnx::load(&fixture_model(fixture)).unwrap());
        for (method, settings) in variants() {
            let mut model = applied(fixture, method, settings.clone());
            // Adding an exact zero can still move ONNX Runtime's fused kernels by an ulp or two.
            let at_init = max_diff(&run_model(&model, &inputs), &base);
            assert!(
                at_init <= TOLERANCE,
                "{fixture} {method} {settings}: changes the outputs at init by {at_init}"
            );
            randomize_trainable(&mut model);
            let unmerged = run_model(&model, &inputs);
            let moved = max_diff(&unmerged, &base);
            assert!(moved > 1e-3, "{fixture} {method} {settings}: moved {moved}");
            let mut merged = model.clone();
            graft::merge::merge(&mut merged).unwrap();
            let drift = max_diff(&run_model(&merged, &inputs), &unmerged);
            assert!(
                drift <= TOLERANCE,
                "{fixture} {method} {settings}: merged differs by {drift}"
            );
            assert_eq!(
                op_types(&merged),
                base_ops,
                "{fixture} {method} {settings}: the merged graph keeps method nodes"
            );
        }
    }
}

/// The Hadamard and Kronecker subgraphs' gradients agree with central differences of the loss
/// on an encoder and a decoder.
#[test]
fn lora_family_gradients_match_central_differences() {
    let cases = [
        ("bert-legacy", graft::train::Task::SeqCls),
        ("llama-legacy", graft::train::Task::CausalLm),
    ];
    for (fixture, task) in cases {
        for (method, settings) in [
            ("loha", json!({"targets": "q,v", "r": 2})),
            (
                "lokr",
                json!({"targets": "q,ffn_down", "r": 1, "decompose_both": true}),
            ),
            ("lokr", json!({"targets": "v", "r": 16})),
            ("dora", json!({"targets": "q,ffn_down", "r": 2})),
        ] {
            let mut model = applied(fixture, method, settings.clone());
            randomize_trainable(&mut model);
            let (_, gradients) = loss_and_gradients(&model, fixture, task, &[]);
            assert!(!gradients.is_empty(), "{fixture} {method}: no gradients");
            let mut seen_kinds = Vec::new();
            for (name, analytic) in &gradients {
                let kind = name.rsplit('.').next().unwrap().to_owned();
                if seen_kinds.contains(&kind) {
                    continue;
                }
                seen_kinds.push(kind);
                let values = model.graph.initializer(name).unwrap().to_f32().unwrap();
                let h = 1e-3f32;
                for index in [0, values.len() / 2, values.len() - 1] {
                    let loss_with = |delta: f32| {
                        let mut v = values.clone();
                        v[index] += delta;
                        loss_and_gradients(&model, fixture, task, &[(name.clone(), v)]).0
                    };
                    let numeric = (loss_with(h) - loss_with(-h)) / (2.0 * h as f64);
                    let got = analytic[index];
                    assert!(
                        (got - numeric).abs() <= 2e-3 + 1e-2 * numeric.abs(),
                        "{fixture} {method} {name}[{index}]: gradient {got} vs central difference {numeric}"
                    );
                }
            }
        }
    }
}

/// `graft train` trains LoHa, LoKr, DoRA and IA³ on the shipped sentiment data (the loss
/// falls); the trained model merges to the same outputs, and its PEFT export loads back onto the
/// base model with the same outputs.
#[test]
fn lora_family_trains_merges_and_exports_to_peft() {
    for (method, settings) in [
        ("loha", ["loha.r=4", "loha.targets=q,v,ffn_down"]),
        ("lokr", ["lokr.r=2", "lokr.targets=q,v,ffn_down"]),
        ("dora", ["dora.r=4", "dora.targets=q,v,ffn_down"]),
        (
            "ia3",
            ["ia3.targets=k,v,ffn_down", "ia3.feedforward=ffn_down"],
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let patched = dir.path().join("patched.onnx");
        apply_method("bert-legacy", method, &settings, &patched);
        let run = dir.path().join("run");
        let (code, stdout, stderr) =
            train_seq_cls(&patched, "examples/data/sentiment.jsonl", 30, &run, &[]);
        assert_eq!(code, 0, "{method}: {stdout}{stderr}");
        assert_loss_falls(&metrics(&run));
        let adapter = run.join("adapter.safetensors");
        let mut trained = graft::onnx::load(&patched).unwrap();
        graft::adapter::load_into(&mut trained, &adapter).unwrap();
        let inputs = fixture_inputs("bert-legacy");
        let trained_outputs = run_model(&trained, &inputs);
        assert!(
            max_diff(&trained_outputs, &fixture_outputs("bert-legacy")) > 1e-3,
            "{method}: training left the outputs as they were"
        );

        let merged = dir.path().join("merged.onnx");
        let (code, stdout, stderr) = run_graft(&[
            "merge",
            patched.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "-o",
            merged.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{method}: {stdout}{stderr}");
        let drift = max_diff(
            &run_model(&graft::onnx::load(&merged).unwrap(), &inputs),
            &trained_outputs,
        );
        assert!(drift <= TOLERANCE, "{method}: merged differs by {drift}");

        let exported = dir.path().join("peft");
        let (code, stdout, stderr) = run_graft(&[
            "export",
            patched.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--format",
            "peft",
            "-o",
            exported.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{method}: {stdout}{stderr}");
        let reimported = dir.path().join("reimported.onnx");
        import_peft("bert-legacy", &exported, &reimported);
        let diff = max_diff(
            &run_model(&graft::onnx::load(&reimported).unwrap(), &inputs),
            &trained_outputs,
        );
        assert!(
            diff <= TOLERANCE,
            "{method}: re-imported export differs by {diff}"
        );
    }
}

/// `graft apply FIXTURE --from-peft ADAPTER -o OUT`, asserting success; returns stdout.
fn import_peft(fixture: &str, adapter: &Path, out: &Path) -> String {
    let (code, stdout, stderr) = run_graft(&[
        "apply",
        fixture_model(fixture).to_str().unwrap(),
        "--from-peft",
        adapter.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    stdout
}

/// Settings that PEFT has and graft does not reproduce are refused by name.
#[test]
fn unsupported_settings_are_refused_by_name() {
    let mut model = graft::onnx::load(&fixture_model("bert-legacy")).unwrap();
    for (method, settings, needle) in [
        ("loha", json!({"rank_dropout": 0.1}), "rank_dropout"),
        ("lokr", json!({"module_dropout": 0.5}), "module_dropout"),
        ("lokr", json!({"decompose_factor": 0}), "decompose_factor"),
        ("loha", json!({"targets": "gate_proj_nowhere"}), "match no"),
        ("dora", json!({"dropout": 0.1}), "dropout"),
    ] {
        let error = apply_in_process(&registry(), &mut model, method, &settings).unwrap_err();
        assert!(error.to_string().contains(needle), "{method}: {error}");
    }
}

/// The PEFT recordings: (fixture architecture, method).
const RECORDINGS: &[(&str, &str)] = &[
    ("bert", "loha"),
    ("llama", "loha"),
    ("bert", "lokr"),
    ("llama", "lokr"),
    ("bert", "dora"),
    ("llama", "dora"),
    ("bert", "ia3"),
    ("llama", "ia3"),
];

/// Adapters HF PEFT saved load through `graft apply --from-peft` onto both exporters' fixtures
/// and compute what PEFT computed, unmerged and merged; `graft export --format peft` writes
/// the same tensors back (keys, shapes, values), and the export imports to the same outputs.
#[test]
fn peft_adapters_of_the_lora_family_match_peft_both_ways() {
    for (arch, method) in RECORDINGS {
        let recording = format!("peft-{method}-{arch}");
        let adapter = reference(&recording);
        let peft_unmerged = read_npz(&adapter.join("outputs.npz")).unwrap();
        let peft_merged = read_npz(&adapter.join("merged_outputs.npz")).unwrap();
        for exporter in ["legacy", "dynamo"] {
            let fixture = format!("{arch}-{exporter}");
            let dir = tempfile::tempdir().unwrap();
            let patched = dir.path().join("patched.onnx");
            let stdout = import_peft(&fixture, &adapter, &patched);
            assert!(stdout.contains(method), "{fixture} {recording}: {stdout}");
            let inputs = fixture_inputs(&fixture);
            let model = graft::onnx::load(&patched).unwrap();
            let unmerged = run_model(&model, &inputs);
            let base_diff = max_diff(&unmerged, &fixture_outputs(&fixture));
            let unmerged_diff = max_diff(&unmerged, &peft_unmerged);
            let mut merged = model.clone();
            graft::merge::merge(&mut merged).unwrap();
            let merged_diff = max_diff(&run_model(&merged, &inputs), &peft_merged);
            println!(
                "{fixture} + {recording}: imported vs PEFT {unmerged_diff:.2e}, merged vs PEFT merged {merged_diff:.2e} (adapter moves the outputs by {base_diff:.2e})"
            );
            assert!(
                base_diff > 1e-2,
                "{fixture} {recording}: the adapter does nothing"
            );
            assert!(
                unmerged_diff <= TOLERANCE,
                "{fixture} {recording}: imported vs PEFT {unmerged_diff}"
            );
            assert!(
                merged_diff <= TOLERANCE,
                "{fixture} {recording}: merged vs PEFT merged {merged_diff}"
            );

            let exported = dir.path().join("exported");
            let (code, stdout, stderr) = run_graft(&[
                "export",
                patched.to_str().unwrap(),
                "--format",
                "peft",
                "-o",
                exported.to_str().unwrap(),
            ]);
            assert_eq!(code, 0, "{fixture} {recording}: {stdout}{stderr}");
            let method_tensors = |path: &Path| -> Vec<(String, Vec<usize>, Vec<f32>)> {
                read_tensors(&path.join("adapter_model.safetensors"))
                    .into_iter()
                    .filter(|(key, _, _)| !key.contains("classifier") && !key.contains("score"))
                    .map(|(key, shape, values)| {
                        (key.trim_end_matches(".weight").to_owned(), shape, values)
                    })
                    .collect()
            };
            assert_eq!(
                method_tensors(&exported),
                method_tensors(&adapter),
                "{fixture} {recording}: the export holds other tensors than PEFT's file"
            );
            let config = read_json(&exported.join("adapter_config.json"));
            let recorded = read_json(&adapter.join("adapter_config.json"));
            for field in [
                "peft_type",
                "r",
                "alpha",
                "lora_alpha",
                "use_dora",
                "decompose_both",
                "decompose_factor",
            ] {
                if let Some(value) = recorded.get(field) {
                    assert_eq!(
                        config[field]
                            .as_f64()
                            .map(serde_json::Value::from)
                            .unwrap_or_else(|| config[field].clone()),
                        value
                            .as_f64()
                            .map(serde_json::Value::from)
                            .unwrap_or_else(|| value.clone()),
                        "{fixture} {recording}: {field}"
                    );
                }
            }
        }
    }
}

/// The base model with every linear weight replaced, on the host, by what QLoRA stores: NF4
/// codes in blocks of 64 times block scales rebuilt from their 8-bit double quantization in
/// groups of 256 (the SDK's reference codecs, independent of the graph).
fn host_quantized(fixture: &str) -> Model {
    use graft_plugin_sdk::quant::{double_quantize, quantize_blockwise, NF4_CODEBOOK};
    let mut model = graft::onnx::load(&fixture_model(fixture)).unwrap();
    let view = graft::plugins::graph_view(&model).unwrap();
    for site_ref in view.sites().filter(|s| s.site.kind.is_linear()) {
        let name = &site_ref.site.weight;
        let tensor = model.graph.initializer(name).unwrap();
        let values = tensor.to_f32().unwrap();
        let q = quantize_blockwise(&values, 64, &NF4_CODEBOOK).unwrap();
        let scales = double_quantize(&q.absmax, 256).unwrap().decode();
        let codes = graft_plugin_sdk::quant::unpack_nibbles(&q.codes);
        let rebuilt: Vec<f32> = codes
            .iter()
            .enumerate()
            .map(|(i, c)| NF4_CODEBOOK[*c as usize] * scales[i / 64])
            .collect();
        let dims = tensor.dims.clone();
        let index = model
            .graph
            .initializers
            .iter()
            .position(|t| &t.name == name)
            .unwrap();
        model.graph.initializers[index] = graft::ir::Tensor::from_f32(name, dims, &rebuilt);
    }
    model
}

/// QLoRA stores every linear weight as NF4 codes with double-quantized scales — 4.127 bits
/// per weight — and computes, at init, what the host-side reconstruction of those weights
/// computes; with trained LoRA factors `graft merge` folds into float weights exactly, leaving
/// the base topology.
#[test]
fn qlora_dequantizes_in_the_graph_and_merges_into_float() {
    for fixture in ["llama-legacy", "bert-dynamo", "gpt2-legacy"] {
        let inputs = fixture_inputs(fixture);
        let mut model = applied(fixture, "qlora", json!({"r": 4}));
        let reference = run_model(&host_quantized(fixture), &inputs);
        let at_init = max_diff(&run_model(&model, &inputs), &reference);
        assert!(
            at_init <= TOLERANCE,
            "{fixture}: qlora at init differs from the host's NF4 reconstruction by {at_init}"
        );
        let quantization_error = max_diff(&reference, &fixture_outputs(fixture));
        assert!(quantization_error > 0.0, "{fixture}: nothing was quantized");

        // Storage: packed codes, 8-bit scale codes, float32 group scales and offsets, over
        // the weights they replace.
        let view = graft::plugins::graph_view(&graft::onnx::load(&fixture_model(fixture)).unwrap())
            .unwrap();
        let quantized_elements: usize = view
            .sites()
            .filter(|s| s.site.kind.is_linear())
            .map(|s| s.site.in_features * s.site.out_features)
            .sum();
        let stored_bytes: usize = model
            .graph
            .initializers
            .iter()
            .filter(|t| {
                t.name.starts_with("qlora.") && !t.name.ends_with(".A") && !t.name.ends_with(".B")
            })
            .map(|t| t.raw_bytes().unwrap().len())
            .sum();
        let bits = stored_bytes as f64 * 8.0 / quantized_elements as f64;
        println!("{fixture}: {bits:.3} bits per quantized weight, quantization moves the outputs by {quantization_error:.3}");
        // Partial scale groups on these small models cost a little more than QLoRA's 4.127.
        assert!(bits <= 4.2, "{fixture}: {bits} bits per weight");

        randomize_trainable(&mut model);
        let unmerged = run_model(&model, &inputs);
        assert!(
            max_diff(&unmerged, &reference) > 1e-3,
            "{fixture}: LoRA does nothing"
        );
        let mut merged = model.clone();
        graft::merge::merge(&mut merged).unwrap();
        let drift = max_diff(&run_model(&merged, &inputs), &unmerged);
        assert!(drift <= TOLERANCE, "{fixture}: merged differs by {drift}");
        assert_eq!(
            op_types(&merged),
            op_types(&graft::onnx::load(&fixture_model(fixture)).unwrap()),
            "{fixture}: the merged graph keeps dequantization or LoRA nodes"
        );
    }
}

/// The weight a quantized storage holds, decoded on the host from the model's initializers
/// by the storage's definition (element `i` = `codebook[code_i] · scale[i / block]`, a
/// double-quantized scale `code · group_scale / 127 + offset`).
fn decode_storage(model: &Model, storage: &graft_plugin_sdk::QuantizedStorage) -> Vec<f32> {
    use graft_plugin_sdk::StoredScales;
    let bytes = |name: &str| {
        model
            .graph
            .initializer(name)
            .unwrap()
            .raw_bytes()
            .unwrap()
            .to_vec()
    };
    let floats = |name: &str| model.graph.initializer(name).unwrap().to_f32().unwrap();
    let scales: Vec<f32> = match &storage.scales {
        StoredScales::Float { absmax } => floats(absmax),
        StoredScales::Double {
            codes,
            scales,
            offset,
            block_size,
        } => {
            let (group_scales, offset) = (floats(scales), floats(offset)[0]);
            bytes(codes)
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    (*c as i8) as f32 * group_scales[i / block_size] * (1.0 / 127.0) + offset
                })
                .collect()
        }
    };
    bytes(&storage.codes)
        .iter()
        .flat_map(|byte| [byte >> 4, byte & 0x0f])
        .enumerate()
        .map(|(i, code)| storage.codebook[code as usize] * scales[i / storage.block_size])
        .collect()
}

/// `merge --requantize` keeps QLoRA's base weights in NF4: each merged weight is written back
/// into codes and scales of the same layout (untrained, the codes come back unchanged), the
/// dequantization nodes stay, the LoRA branches go, and the reported error is the distance
/// between the host's decoding of the new storage and the float merge.
#[test]
fn qlora_merges_back_into_nf4_with_its_error_reported() {
    for fixture in ["llama-legacy", "bert-dynamo"] {
        let inputs = fixture_inputs(fixture);
        let model = applied(fixture, "qlora", json!({"r": 4}));
        let requantize = graft::merge::MergeOptions { requantize: true };
        let storages: Vec<(String, graft_plugin_sdk::QuantizedStorage)> =
            graft::patch::read_record(&model)
                .unwrap()
                .folds
                .iter()
                .filter_map(|fold| match fold {
                    Fold::Bake {
                        value,
                        storage: Some(storage),
                        ..
                    } => Some((value.clone(), storage.clone())),
                    _ => None,
                })
                .collect();
        assert!(
            !storages.is_empty(),
            "{fixture}: no quantized storage recorded"
        );

        // Untrained (B = 0): the same codes, and the outputs of the patched model.
        let mut untouched = model.clone();
        let report = graft::merge::merge_with(&mut untouched, &requantize).unwrap();
        assert_eq!(report.requantized.len(), storages.len(), "{fixture}");
        for (_, storage) in &storages {
            let codes = |m: &Model| {
                m.graph
                    .initializer(&storage.codes)
                    .unwrap()
                    .raw_bytes()
                    .unwrap()
                    .to_vec()
            };
            assert!(
                codes(&untouched) == codes(&model),
                "{fixture}: {} changed",
                storage.codes
            );
        }
        // Only the 8-bit scales are re-encoded (around new means): a small fraction of what
        // quantizing the base did.
        let quantization_error = max_diff(
            &run_model(&host_quantized(fixture), &inputs),
            &fixture_outputs(fixture),
        );
        let drift = max_diff(&run_model(&untouched, &inputs), &run_model(&model, &inputs));
        println!("{fixture}: requantizing untrained moves the outputs by {drift:.3e}");
        assert!(drift <= 0.1 * quantization_error, "{fixture}: requantizing an untrained model moves the outputs by {drift} (quantizing: {quantization_error})");

        let mut trained = model.clone();
        randomize_trainable(&mut trained);
        let mut float = trained.clone();
        graft::merge::merge(&mut float).unwrap();
        let mut quantized = trained.clone();
        let report = graft::merge::merge_with(&mut quantized, &requantize).unwrap();
        assert!(
            quantized
                .graph
                .initializers
                .iter()
                .all(|t| !t.name.ends_with(".A") && !t.name.ends_with(".B")),
            "{fixture}: LoRA factors left in the requantized model"
        );
        let count = |m: &Model, op: &str| op_types(m).iter().filter(|t| *t == op).count();
        assert_eq!(
            count(&quantized, "BitShift"),
            count(&model, "BitShift"),
            "{fixture}: dequantization nodes"
        );
        assert_eq!(
            count(&quantized, "MatMul") + count(&quantized, "Gemm"),
            count(&float, "MatMul") + count(&float, "Gemm"),
            "{fixture}: LoRA MatMuls left"
        );
        for (value, storage) in &storages {
            let reported = report
                .requantized
                .iter()
                .find(|r| &r.value == value)
                .unwrap();
            let want = float
                .graph
                .initializer(value)
                .unwrap()
                .float_values()
                .unwrap();
            let got = decode_storage(&quantized, storage);
            let max_abs = got
                .iter()
                .zip(&want)
                .fold(0f64, |m, (g, w)| m.max((*g as f64 - *w as f64).abs()));
            let (err, norm) = got.iter().zip(&want).fold((0f64, 0f64), |(e, n), (g, w)| {
                (e + (*g as f64 - *w as f64).powi(2), n + (*w as f64).powi(2))
            });
            let relative = (err / norm).sqrt();
            assert!(
                (reported.max_abs_error - max_abs).abs() <= 1e-7 * max_abs.max(1.0),
                "{fixture} {value}: max error {} reported, {max_abs} decoded",
                reported.max_abs_error
            );
            assert!(
                (reported.relative_rms_error - relative).abs() <= 1e-6,
                "{fixture} {value}: relative error {} reported, {relative} decoded",
                reported.relative_rms_error
            );
            // NF4 of a roughly Gaussian weight: about 0.1 relative RMS error.
            assert!(
                relative > 1e-4 && relative < 0.2,
                "{fixture} {value}: relative error {relative}"
            );
        }
        let float_outputs = run_model(&float, &inputs);
        let moved = max_diff(&run_model(&quantized, &inputs), &float_outputs);
        println!("{fixture}: requantized merge moves the outputs by {moved:.3e} from the float merge (quantizing the base moved them by {quantization_error:.3e})");
        assert!(
            moved > 0.0 && moved <= 4.0 * quantization_error,
            "{fixture}: requantized outputs moved by {moved}"
        );
    }

    // Through the command line: one line per requantized weight; a model without quantized
    // weights is refused by name, and nothing is written.
    let dir = tempfile::tempdir().unwrap();
    let quantized = dir.path().join("qlora.onnx");
    apply_method("bert-legacy", "qlora", &["qlora.r=4"], &quantized);
    let merged = dir.path().join("nf4.onnx");
    let (code, stdout, stderr) = run_graft(&[
        "merge",
        quantized.to_str().unwrap(),
        "--requantize",
        "-o",
        merged.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("relative RMS error"), "{stdout}");
    let nf4 = graft::onnx::load(&merged).unwrap();
    assert!(
        op_types(&nf4).iter().any(|t| t == "BitShift"),
        "the merged model is not NF4"
    );
    let patched = dir.path().join("lora.onnx");
    apply_lora("bert-legacy", &[], &patched);
    let out = dir.path().join("merged.onnx");
    let (code, stdout, stderr) = run_graft(&[
        "merge",
        patched.to_str().unwrap(),
        "--requantize",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{stdout}{stderr}");
    assert!(stderr.contains("--requantize"), "{stderr}");
    assert!(!out.exists());
}

/// `graft train` trains QLoRA's factors through the dequantization on the shipped data (the
/// loss falls); the 4-bit codes stay as they were, and the factors are written as PEFT LoRA
/// files.
#[test]
fn qlora_trains_through_the_dequantization() {
    let dir = tempfile::tempdir().unwrap();
    let patched = dir.path().join("patched.onnx");
    apply_method("bert-legacy", "qlora", &["qlora.r=4"], &patched);
    let run = dir.path().join("run");
    let (code, stdout, stderr) =
        train_seq_cls(&patched, "examples/data/sentiment.jsonl", 30, &run, &[]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert_loss_falls(&metrics(&run));
    let trained = read_tensors(&run.join("adapter.safetensors"));
    assert!(!trained.is_empty());
    assert!(
        trained
            .iter()
            .all(|(name, _, _)| name.ends_with(".A") || name.ends_with(".B")),
        "only the LoRA factors train: {:?}",
        trained.iter().map(|t| &t.0).collect::<Vec<_>>()
    );
    // The LoRA factors are a PEFT LORA adapter (PEFT puts them on its own 4-bit base); graft
    // loads them onto the float model.
    let config = read_json(&run.join("adapter_config.json"));
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["r"], 4);
    let keys = read_tensors(&run.join("adapter_model.safetensors"));
    assert_eq!(keys.len(), trained.len());
    import_peft("bert-legacy", &run, &dir.path().join("float-base.onnx"));
}
