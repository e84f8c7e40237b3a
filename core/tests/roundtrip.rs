//! Load → save round trips: every fixture gives bit-identical ONNX Runtime outputs after passing
//! through the IR, inline and with external data, and matches the PyTorch reference.

mod common;

use common::*;
use graft::onnx::{self, DataPlacement, SaveOptions};

#[test]
fn round_trip_is_exact_in_onnx_runtime() {
    for name in FIXTURES {
        let original_bytes = std::fs::read(fixture_model(name)).unwrap();
        let inputs = fixture_inputs(name);
        let model = onnx::load(&fixture_model(name)).unwrap();
        let reference = run_bytes(&original_bytes, &inputs).unwrap();
        let round_tripped = run_model(&model, &inputs);
        assert_eq!(
            max_diff(&reference, &round_tripped),
            0.0,
            "{name}: outputs changed after load → save"
        );
        // ORT versus the PyTorch reference recorded by the generator: kernels differ, so allow
        // float32 rounding accumulated over a few layers.
        let torch = fixture_outputs(name);
        let diff = max_diff(&torch, &round_tripped);
        assert!(diff <= 1e-4, "{name}: ORT differs from PyTorch by {diff}");
    }
}

#[test]
fn external_data_round_trip_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["bert-dynamo", "llama-legacy", "clip-dynamo"] {
        let model = onnx::load(&fixture_model(name)).unwrap();
        let out = dir.path().join(format!("{name}.onnx"));
        let data = format!("{name}.weights");
        onnx::save(
            &model,
            &out,
            &SaveOptions {
                placement: DataPlacement::External(data.clone()),
            },
        )
        .unwrap();
        assert!(dir.path().join(&data).is_file());
        let reloaded = onnx::load(&out).unwrap();
        assert!(reloaded.graph.initializers.iter().any(|t| t.is_external()));
        // Saving again in the same folder keeps the external references without copying.
        let again = dir.path().join(format!("{name}-again.onnx"));
        onnx::save(&reloaded, &again, &SaveOptions::default()).unwrap();
        let reloaded_again = onnx::load(&again).unwrap();
        let inputs = fixture_inputs(name);
        let expected = run_model(&model, &inputs);
        assert_eq!(
            max_diff(&expected, &run_model(&reloaded, &inputs)),
            0.0,
            "{name}"
        );
        assert_eq!(
            max_diff(&expected, &run_model(&reloaded_again, &inputs)),
            0.0,
            "{name}"
        );
        // Back to inline.
        let inline = dir.path().join(format!("{name}-inline.onnx"));
        onnx::save(
            &reloaded_again,
            &inline,
            &SaveOptions {
                placement: DataPlacement::Inline,
            },
        )
        .unwrap();
        let inline_model = onnx::load(&inline).unwrap();
        assert!(inline_model
            .graph
            .initializers
            .iter()
            .all(|t| !t.is_external()));
        assert_eq!(
            max_diff(&expected, &run_model(&inline_model, &inputs)),
            0.0,
            "{name}"
        );
    }
}

#[test]
fn everything_the_file_carries_survives() {
    for name in FIXTURES {
        let model = onnx::load(&fixture_model(name)).unwrap();
        let bytes = onnx::to_bytes(&model).unwrap();
        let again = onnx::load_from_bytes(&bytes, None, std::path::Path::new(name)).unwrap();
        assert_eq!(model.opset_imports, again.opset_imports, "{name}");
        assert_eq!(model.ir_version, again.ir_version, "{name}");
        assert_eq!(model.producer_name, again.producer_name, "{name}");
        // Every entry survives; graft adds the checksums it records on every save.
        let (checksums, carried): (Vec<_>, Vec<_>) = again
            .metadata
            .iter()
            .cloned()
            .partition(|(key, _)| key == onnx::checksum::METADATA_KEY);
        assert_eq!(model.metadata, carried, "{name}");
        assert_eq!(checksums.len(), 1, "{name}: no checksums recorded");
        assert_eq!(model.functions, again.functions, "{name}");
        assert_eq!(model.graph.nodes.len(), again.graph.nodes.len(), "{name}");
        for (a, b) in model.graph.nodes.iter().zip(&again.graph.nodes) {
            assert_eq!(
                (
                    &a.name,
                    &a.op_type,
                    &a.domain,
                    &a.inputs,
                    &a.outputs,
                    &a.attributes,
                    &a.metadata
                ),
                (
                    &b.name,
                    &b.op_type,
                    &b.domain,
                    &b.inputs,
                    &b.outputs,
                    &b.attributes,
                    &b.metadata
                ),
                "{name}"
            );
        }
        let names = |m: &graft::ir::Model| -> Vec<(String, i32, Vec<i64>)> {
            m.graph
                .initializers
                .iter()
                .map(|t| (t.name.clone(), t.dtype.code(), t.dims.clone()))
                .collect()
        };
        assert_eq!(names(&model), names(&again), "{name}");
        let value_infos = |m: &graft::ir::Model| -> Vec<String> {
            m.graph
                .value_infos
                .iter()
                .map(|v| format!("{:?}", v.proto))
                .collect()
        };
        assert_eq!(value_infos(&model), value_infos(&again), "{name}");
    }
}
