//! `graft verify` tells a damaged model from a good one: models graft saves record a checksum
//! of every tensor, and a changed byte, a truncated or swapped data file, or a model saved by
//! another tool (no checksums) are each reported.

mod common;

use std::path::Path;

use common::*;

const FIXTURE: &str = "bert-legacy";

/// `graft verify --json MODEL`: the exit code and the parsed report.
fn verify_json(model: &Path, extra: &[&str]) -> (i32, serde_json::Value, String) {
    let mut args = vec!["verify", "--json", text(model)];
    args.extend_from_slice(extra);
    let (code, stdout, stderr) = run_graft(&args);
    assert!(!stderr.contains("panicked"), "{stderr}");
    let report = serde_json::from_str(&stdout).unwrap_or(serde_json::Value::Null);
    (code, report, stderr)
}

/// The fixture saved by `graft convert` with its weights in `model.onnx.data`.
fn saved_with_external_data(dir: &Path) -> std::path::PathBuf {
    let out = dir.join("model.onnx");
    let (code, stdout, stderr) = run_graft(&[
        "convert",
        text(&fixture_model(FIXTURE)),
        "-o",
        text(&out),
        "--external-data",
        "model.onnx.data",
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    out
}

#[test]
fn a_model_graft_saved_verifies_with_every_checksum() {
    let dir = tempfile::tempdir().unwrap();
    let model = saved_with_external_data(dir.path());
    let (code, report, stderr) = verify_json(&model, &["--require-checksums"]);
    assert_eq!(code, 0, "{report} {stderr}");
    let n = report["initializers"].as_u64().unwrap();
    assert!(n > 10, "{report}");
    assert_eq!(report["checksums_matched"].as_u64(), Some(n), "{report}");
    assert_eq!(report["problems"].as_array().map(Vec::len), Some(0));
    let files = report["external_files"].as_array().unwrap();
    assert_eq!(files.len(), 1, "{report}");
    assert_eq!(files[0]["location"], "model.onnx.data");

    // Saving again beside the data keeps the tensors in place (unread), and their checksums.
    let again = dir.path().join("again.onnx");
    let (code, _, stderr) = run_graft(&["convert", text(&model), "-o", text(&again)]);
    assert_eq!(code, 0, "{stderr}");
    let (code, report, stderr) = verify_json(&again, &["--require-checksums"]);
    assert_eq!(code, 0, "{report} {stderr}");
    assert_eq!(report["checksums_matched"].as_u64(), Some(n), "{report}");

    // The human form says so too.
    let (code, stdout, _) = run_graft(&["verify", text(&model)]);
    assert_eq!(code, 0);
    assert!(stdout.contains("intact"), "{stdout}");
    assert!(
        stdout.contains(&format!("{n} of {n} tensors match")),
        "{stdout}"
    );
}

#[test]
fn a_changed_byte_in_the_external_data_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let model = saved_with_external_data(dir.path());
    // Change the middle byte of the largest tensor in the data file.
    let loaded = graft::onnx::load(&model).unwrap();
    let (damaged, middle) = loaded
        .graph
        .initializers
        .iter()
        .filter_map(|t| match &t.data {
            graft::ir::TensorData::External { offset, length, .. } => {
                Some((t.name.clone(), *length, offset + length / 2))
            }
            _ => None,
        })
        .max_by_key(|(_, length, _)| *length)
        .map(|(name, _, middle)| (name, middle))
        .expect("the weights are external");
    drop(loaded);
    let data = dir.path().join("model.onnx.data");
    let mut bytes = std::fs::read(&data).unwrap();
    bytes[middle] ^= 0x10;
    std::fs::write(&data, &bytes).unwrap();

    let (code, report, stderr) = verify_json(&model, &[]);
    assert_eq!(code, 2, "{report}");
    let problems = report["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "{report}");
    let problem = problems[0].as_str().unwrap();
    assert!(problem.contains("model.onnx.data"), "{problem}");
    assert!(problem.contains("its bytes changed"), "{problem}");
    assert!(problem.contains(&format!("{damaged:?}")), "{problem}");
    assert!(stderr.contains("is damaged"), "{stderr}");
}

#[test]
fn a_changed_byte_in_an_inline_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model.onnx");
    let (code, _, stderr) = run_graft(&[
        "convert",
        text(&fixture_model(FIXTURE)),
        "-o",
        text(&model),
        "--inline",
    ]);
    assert_eq!(code, 0, "{stderr}");
    // Find the bytes of one weight in the file and change one of them.
    let loaded = graft::onnx::load(&model).unwrap();
    let tensor = loaded
        .graph
        .initializers
        .iter()
        .rev()
        .find(|t| t.byte_len() >= 256)
        .unwrap();
    let needle = tensor.raw_bytes().unwrap().to_vec();
    let mut bytes = std::fs::read(&model).unwrap();
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("the tensor's raw bytes are in the file");
    bytes[at + needle.len() / 2] ^= 0x01;
    std::fs::write(&model, &bytes).unwrap();

    let (code, report, _) = verify_json(&model, &[]);
    assert_eq!(code, 2, "{report}");
    let problem = report["problems"][0].as_str().unwrap();
    assert!(
        problem.contains(&format!("{:?} (inline)", tensor.name)),
        "{problem}"
    );
}

#[test]
fn a_truncated_or_swapped_data_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = saved_with_external_data(dir.path());
    let data = dir.path().join("model.onnx.data");
    let good = std::fs::read(&data).unwrap();

    // Another export's data file of the same size: every tensor loads, the checksums differ.
    let mut other = good.clone();
    for byte in other.iter_mut().step_by(4) {
        *byte = byte.wrapping_add(1);
    }
    std::fs::write(&data, &other).unwrap();
    let (code, report, _) = verify_json(&model, &[]);
    assert_eq!(code, 2);
    // Every tensor in the data file is named (the small ones stay inline, unchanged).
    let external = report["external_files"][0]["tensors"].as_u64().unwrap() as usize;
    let problems = report["problems"].as_array().unwrap().len();
    assert_eq!(problems, external, "{report}");
    let (_, stdout, stderr) = run_graft(&["verify", text(&model)]);
    assert!(stdout.contains("DAMAGED"), "{stdout}");
    assert!(stderr.contains(&format!("{problems} problems")), "{stderr}");

    // A truncated one does not load: the tensor reaching past the end is named.
    std::fs::write(&data, &good[..good.len() - 100]).unwrap();
    let (code, _, stderr) = run_graft(&["verify", text(&model)]);
    assert_eq!(code, 2);
    assert!(stderr.contains("beyond the end"), "{stderr}");
}

#[test]
fn a_model_from_another_tool_has_no_checksums_to_check() {
    // The fixtures come from PyTorch's exporter.
    let model = fixture_model(FIXTURE);
    let (code, report, _) = verify_json(&model, &[]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["checksums_matched"].as_u64(), Some(0));
    assert_eq!(
        report["checksums_missing"].as_array().map(Vec::len),
        report["initializers"].as_u64().map(|n| n as usize)
    );
    let (_, stdout, _) = run_graft(&["verify", text(&model)]);
    assert!(stdout.contains("none recorded"), "{stdout}");

    let (code, _, stderr) = run_graft(&["verify", "--require-checksums", text(&model)]);
    assert_eq!(code, 2);
    assert!(stderr.contains("no recorded checksum"), "{stderr}");
    assert!(stderr.contains("graft convert"), "{stderr}");
}
