//! Malformed inputs: the `graft` binary and `onnx::load` refuse them with a message naming the
//! file, the tensor and the problem, exit with status 2, never panic, and leave no output behind.

mod common;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::fixture_model;
use graft::onnx::{self, DataPlacement, SaveOptions};
use onnx_protobuf::tensor_proto::DataLocation;
use onnx_protobuf::{Message, ModelProto, StringStringEntryProto, TensorProto};

const FIXTURE: &str = "bert-legacy";

/// Runs the `graft` binary with `args`.
fn run_graft<S: AsRef<OsStr>>(args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_graft"))
        .args(args)
        .output()
        .expect("the graft binary runs")
}

/// Runs `graft ARGS`, checks that it failed cleanly (status 2, an `error:` line, no panic) and
/// that its stderr contains every one of `needles`; returns stderr.
fn assert_cli_rejects<S: AsRef<OsStr>>(args: &[S], needles: &[&str]) -> String {
    let output = run_graft(args);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let shown: Vec<_> = args.iter().map(|a| a.as_ref().to_string_lossy()).collect();
    assert_eq!(
        output.status.code(),
        Some(2),
        "graft {shown:?} should exit with 2; stderr:\n{stderr}"
    );
    assert!(
        !stderr.contains("panicked"),
        "graft {shown:?} panicked:\n{stderr}"
    );
    assert!(
        stderr.starts_with("error: "),
        "graft {shown:?}: stderr should start with `error: `:\n{stderr}"
    );
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "graft {shown:?}: stderr should mention {needle:?}:\n{stderr}"
        );
    }
    stderr
}

/// Checks that `graft convert MODEL -o OUT` and `onnx::load(MODEL)` both refuse `model` with
/// messages containing the model's path and every one of `needles`, and that the output folder
/// stays empty (no output, no temporary file).
fn assert_rejected(model: &Path, needles: &[&str]) {
    let path = model.display().to_string();
    let needles: Vec<&str> = std::iter::once(path.as_str())
        .chain(needles.iter().copied())
        .collect();

    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("out.onnx");
    assert_cli_rejects(
        &[
            OsStr::new("convert"),
            model.as_os_str(),
            OsStr::new("-o"),
            out.as_os_str(),
        ],
        &needles,
    );
    let left: Vec<_> = std::fs::read_dir(out_dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        left.is_empty(),
        "{path}: convert left files behind: {left:?}"
    );

    let message = match onnx::load(model) {
        Ok(_) => panic!("onnx::load accepted {path}"),
        Err(error) => error.to_string(),
    };
    for needle in &needles {
        assert!(
            message.contains(needle),
            "onnx::load({path}): error should mention {needle:?}: {message}"
        );
    }
}

fn write(path: &Path, bytes: &[u8]) -> PathBuf {
    std::fs::write(path, bytes).unwrap();
    path.to_path_buf()
}

fn fixture_proto() -> ModelProto {
    ModelProto::parse_from_bytes(&std::fs::read(fixture_model(FIXTURE)).unwrap()).unwrap()
}

/// The fixture saved into `dir` as `model.onnx` with its tensors of 1 KiB or more in `w.data`.
fn save_with_external_data(dir: &Path) -> PathBuf {
    let model = onnx::load(&fixture_model(FIXTURE)).unwrap();
    let path = dir.join("model.onnx");
    onnx::save(
        &model,
        &path,
        &SaveOptions {
            placement: DataPlacement::External("w.data".into()),
        },
    )
    .unwrap();
    path
}

/// The name of the model's first tensor stored externally, quoted as messages quote it.
fn first_external_name(model: &Path) -> String {
    let proto = ModelProto::parse_from_bytes(&std::fs::read(model).unwrap()).unwrap();
    let first = (proto.graph.initializer.iter())
        .find(|t| t.data_location.enum_value() == Ok(DataLocation::EXTERNAL))
        .expect("the saved fixture has external tensors");
    format!("{:?}", first.name)
}

/// Rewrites the model at `path` after `edit` has changed the first tensor stored externally;
/// returns that tensor's name.
fn edit_first_external(path: &Path, edit: impl FnOnce(&mut TensorProto)) -> String {
    let mut proto = ModelProto::parse_from_bytes(&std::fs::read(path).unwrap()).unwrap();
    let tensor = proto
        .graph
        .mut_or_insert_default()
        .initializer
        .iter_mut()
        .find(|t| t.data_location.enum_value() == Ok(DataLocation::EXTERNAL))
        .expect("the saved fixture has external tensors");
    edit(tensor);
    let name = tensor.name.clone();
    std::fs::write(path, proto.write_to_bytes().unwrap()).unwrap();
    name
}

fn entry(tensor: &TensorProto, key: &str) -> String {
    tensor
        .external_data
        .iter()
        .find(|e| e.key == key)
        .map(|e| e.value.clone())
        .unwrap_or_default()
}

fn set_entry(tensor: &mut TensorProto, key: &str, value: String) {
    match tensor.external_data.iter_mut().find(|e| e.key == key) {
        Some(entry) => entry.value = value,
        None => {
            let mut entry = StringStringEntryProto::new();
            entry.key = key.into();
            entry.value = value;
            tensor.external_data.push(entry);
        }
    }
}

/// A model with external data whose first external tensor has `key` set to `value`, checked to
/// be rejected with a message naming that tensor and containing `needles`.
fn assert_external_entry_rejected(
    key: &str,
    value: impl Fn(&TensorProto, u64) -> String,
    needles: &[&str],
) {
    let dir = tempfile::tempdir().unwrap();
    let model = save_with_external_data(dir.path());
    let data_len = std::fs::metadata(dir.path().join("w.data")).unwrap().len();
    let tensor = edit_first_external(&model, |t| {
        let v = value(t, data_len);
        set_entry(t, key, v);
    });
    let quoted = format!("{tensor:?}");
    let needles: Vec<&str> = std::iter::once(quoted.as_str())
        .chain(needles.iter().copied())
        .collect();
    assert_rejected(&model, &needles);
}

/// The fixture with `edit` applied to its first initializer that holds at least 16 bytes inline.
fn inline_model_with(dir: &Path, edit: impl FnOnce(&mut TensorProto)) -> (PathBuf, String) {
    let mut proto = fixture_proto();
    let tensor = proto
        .graph
        .mut_or_insert_default()
        .initializer
        .iter_mut()
        .find(|t| t.raw_data.len() >= 16)
        .expect("the fixture has raw initializers");
    edit(tensor);
    let name = tensor.name.clone();
    let path = write(&dir.join("model.onnx"), &proto.write_to_bytes().unwrap());
    (path, name)
}

#[test]
fn text_file_is_not_a_model() {
    let dir = tempfile::tempdir().unwrap();
    let model = write(
        &dir.path().join("readme.onnx"),
        b"This is not an ONNX model, just some text.\n",
    );
    assert_rejected(&model, &["not a valid ONNX model"]);
}

#[test]
fn png_file_is_not_a_model() {
    let dir = tempfile::tempdir().unwrap();
    let mut png =
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10\x00\x00\x00\x10\x08\x06\x00\x00\x00"
            .to_vec();
    png.extend_from_slice(&[
        0x1f, 0xf3, 0xff, 0x61, 0, 0, 0, 0, b'I', b'E', b'N', b'D', 0xae, 0x42, 0x60, 0x82,
    ]);
    let model = write(&dir.path().join("image.onnx"), &png);
    assert_rejected(&model, &["not a valid ONNX model"]);
}

#[test]
fn empty_file_is_not_a_model() {
    let dir = tempfile::tempdir().unwrap();
    let model = write(&dir.path().join("empty.onnx"), b"");
    assert_rejected(&model, &["not a valid ONNX model", "empty"]);
}

#[test]
fn truncated_models_are_refused() {
    let bytes = std::fs::read(fixture_model(FIXTURE)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for length in [10, bytes.len() / 2, bytes.len() - 1] {
        let model = write(
            &dir.path().join(format!("cut-{length}.onnx")),
            &bytes[..length],
        );
        assert_rejected(&model, &["not a valid ONNX model", "truncated"]);
    }
}

#[test]
fn nonexistent_model_path_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("no-such-model.onnx");
    assert_rejected(&model, &["No such file or directory"]);
}

#[test]
fn model_path_that_is_a_folder_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("folder.onnx");
    std::fs::create_dir(&model).unwrap();
    assert_rejected(&model, &["Is a directory"]);
}

#[test]
fn missing_external_data_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = save_with_external_data(dir.path());
    std::fs::remove_file(dir.path().join("w.data")).unwrap();
    let tensor = first_external_name(&model);
    assert_rejected(
        &model,
        &[
            &tensor,
            "\"w.data\"",
            "cannot open",
            "No such file or directory",
        ],
    );
}

#[test]
fn external_data_location_with_parent_component_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("model");
    std::fs::create_dir(&model_dir).unwrap();
    let model = save_with_external_data(&model_dir);
    std::fs::rename(model_dir.join("w.data"), dir.path().join("x.data")).unwrap();
    let tensor = edit_first_external(&model, |t| set_entry(t, "location", "../x.data".into()));
    assert_rejected(
        &model,
        &[
            &format!("{tensor:?}"),
            "\"../x.data\"",
            "inside the model's folder",
        ],
    );
}

#[test]
fn absolute_external_data_location_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = save_with_external_data(dir.path());
    let absolute = dir.path().join("w.data").display().to_string();
    let tensor = edit_first_external(&model, |t| set_entry(t, "location", absolute.clone()));
    assert_rejected(
        &model,
        &[
            &format!("{tensor:?}"),
            &format!("{absolute:?}"),
            "inside the model's folder",
        ],
    );
}

#[test]
fn external_data_symlink_pointing_outside_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("model");
    let outside = dir.path().join("outside");
    std::fs::create_dir(&model_dir).unwrap();
    std::fs::create_dir(&outside).unwrap();
    let model = save_with_external_data(&model_dir);
    std::fs::rename(model_dir.join("w.data"), outside.join("w.data")).unwrap();
    std::os::unix::fs::symlink(outside.join("w.data"), model_dir.join("w.data")).unwrap();
    let first = first_external_name(&model);
    assert_rejected(
        &model,
        &[&first, "\"w.data\"", "outside the model's folder"],
    );
}

#[test]
fn external_data_offset_beyond_the_file_is_refused() {
    assert_external_entry_rejected(
        "offset",
        |_, len| (len + 4096).to_string(),
        &["beyond the end"],
    );
}

#[test]
fn external_data_range_ending_past_the_file_is_refused() {
    assert_external_entry_rejected(
        "offset",
        |t, len| {
            let length: u64 = entry(t, "length").parse().unwrap();
            (len - length + 1).to_string()
        },
        &["beyond the end"],
    );
}

#[test]
fn external_data_offset_that_overflows_is_refused() {
    assert_external_entry_rejected("offset", |_, _| u64::MAX.to_string(), &["beyond the end"]);
}

#[test]
fn external_data_offset_that_is_not_a_number_is_refused() {
    assert_external_entry_rejected("offset", |_, _| "-1".into(), &["\"-1\" is not a number"]);
}

#[test]
fn external_data_length_not_matching_dims_is_refused() {
    assert_external_entry_rejected(
        "length",
        |t, _| {
            let length: u64 = entry(t, "length").parse().unwrap();
            (length - 4).to_string()
        },
        &["does not match"],
    );
}

#[test]
fn external_data_in_a_truncated_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = save_with_external_data(dir.path());
    let data = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join("w.data"))
        .unwrap();
    data.set_len(0).unwrap();
    let tensor = first_external_name(&model);
    assert_rejected(&model, &[&tensor, "beyond the end of the 0-byte file"]);
}

#[test]
fn external_tensor_with_negative_dims_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = save_with_external_data(dir.path());
    let tensor = edit_first_external(&model, |t| t.dims[0] = -t.dims[0]);
    assert_rejected(&model, &[&format!("{tensor:?}"), "invalid dims"]);
}

#[test]
fn inline_tensor_with_negative_dims_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (model, tensor) = inline_model_with(dir.path(), |t| t.dims = vec![-1, 4]);
    assert_rejected(&model, &[&format!("{tensor:?}"), "invalid dims [-1, 4]"]);
}

#[test]
fn inline_tensor_with_overflowing_element_count_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (model, tensor) = inline_model_with(dir.path(), |t| t.dims = vec![i64::MAX, i64::MAX]);
    assert_rejected(&model, &[&format!("{tensor:?}"), "invalid dims"]);
}

#[test]
fn inline_tensor_with_overflowing_byte_count_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (model, tensor) = inline_model_with(dir.path(), |t| {
        t.data_type = onnx_protobuf::tensor_proto::DataType::FLOAT as i32;
        t.dims = vec![1 << 62];
    });
    assert_rejected(&model, &[&format!("{tensor:?}"), "invalid dims"]);
}

#[test]
fn inline_tensor_bytes_not_matching_dims_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (model, tensor) = inline_model_with(dir.path(), |t| {
        t.data_type = onnx_protobuf::tensor_proto::DataType::FLOAT as i32;
        t.dims = vec![3];
    });
    assert_rejected(&model, &[&format!("{tensor:?}"), "needs 12"]);
}

#[test]
fn external_tensor_length_disagreeing_with_dims_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = save_with_external_data(dir.path());
    let tensor = edit_first_external(&model, |t| t.dims = vec![3]);
    assert_rejected(
        &model,
        &[&format!("{tensor:?}"), "does not match the 12 bytes"],
    );
}

/// Item 15: while another thread keeps swapping the folder that holds the external data for
/// a symbolic link to a folder outside (a file of the same size, other bytes), every load
/// either reads the model's own data or fails naming the link: the location is opened beneath
/// the model's folder in one step, so nothing can be swapped in between a check and the open.
#[test]
fn a_folder_swapped_for_a_symlink_during_loads_never_leaks_outside_data() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("model");
    std::fs::create_dir(&dir).unwrap();
    let path = save_with_external_data(&dir);
    let real = dir.join("sub");
    std::fs::create_dir(&real).unwrap();
    std::fs::rename(dir.join("w.data"), real.join("w.data")).unwrap();
    let mut proto = ModelProto::parse_from_bytes(&std::fs::read(&path).unwrap()).unwrap();
    for tensor in proto.graph.mut_or_insert_default().initializer.iter_mut() {
        if tensor.data_location.enum_value() == Ok(DataLocation::EXTERNAL) {
            set_entry(tensor, "location", "sub/w.data".into());
        }
    }
    std::fs::write(&path, proto.write_to_bytes().unwrap()).unwrap();
    let own = std::fs::read(real.join("w.data")).unwrap();
    let outside = root.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let secret: Vec<u8> = own.iter().map(|b| b ^ 0x5a).collect();
    std::fs::write(outside.join("w.data"), &secret).unwrap();

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let swapper = {
        let (stop, real, outside) = (stop.clone(), real.clone(), outside.clone());
        let aside = dir.join("sub.aside");
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                std::fs::rename(&real, &aside).unwrap();
                std::os::unix::fs::symlink(&outside, &real).unwrap();
                std::thread::yield_now();
                std::fs::remove_file(&real).unwrap();
                std::fs::rename(&aside, &real).unwrap();
                std::thread::yield_now();
            }
        })
    };
    let (mut loaded, mut refused) = (0, 0);
    for _ in 0..500 {
        match onnx::load(&path) {
            Ok(model) => {
                loaded += 1;
                for tensor in &model.graph.initializers {
                    if let graft::ir::TensorData::External { offset, length, .. } = &tensor.data {
                        let bytes = tensor.raw_bytes().unwrap();
                        assert_eq!(bytes, &own[*offset..*offset + *length], "{}", tensor.name);
                    }
                }
            }
            Err(e) => {
                refused += 1;
                let message = e.to_string();
                assert!(
                    message.contains("symbolic link") || message.contains("No such file"),
                    "{message}"
                );
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    swapper.join().unwrap();
    eprintln!("{loaded} loads read the model's own data, {refused} were refused");
    assert_eq!(loaded + refused, 500);
    assert!(refused > 0, "the swap never raced a load");
}

/// A committed malformed input under `core/tests/data/`.
fn bad_input_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

/// `runtime::read_npz` (`graft run --inputs`) refuses `name` with an [`graft::Error::Config`]
/// naming the file, the array and every one of `needles`, without allocating what the file
/// declares.
fn assert_npz_refused(name: &str, array: &str, needles: &[&str]) {
    let path = bad_input_file(name);
    let error = graft::runtime::read_npz(&path).expect_err("a malformed .npz is refused");
    let message = error.to_string();
    assert!(matches!(error, graft::Error::Config(_)), "{message}");
    let path = path.display().to_string();
    let array = format!("array {array:?}");
    for needle in [path.as_str(), array.as_str()].iter().chain(needles) {
        assert!(
            message.contains(needle),
            "{message:?} should mention {needle:?}"
        );
    }
}

/// Found by the `npz` fuzz target (its crash input, kept as is): the second member's `.npy`
/// header is version 3 with a header length of about 3.2 GB, which ndarray-npy allocated
/// before reading (an out-of-memory abort). The mutated member also fails its zip CRC, which
/// `read_npz` now checks before the `.npy` header is parsed.
#[test]
fn npz_from_fuzzing_with_a_3gb_npy_header_is_refused() {
    assert_npz_refused("npz-npy-header-length-3gb.npz", "attention_mask", &[]);
}

/// The same fault with a sound zip member (CRC correct): a version-2 `.npy` header that
/// declares 4 GB of header in a member of a few bytes.
#[test]
fn npz_with_a_header_longer_than_its_member_is_refused() {
    assert_npz_refused(
        "npz-npy-header-length-4gb.npz",
        "x",
        &["declares 4026531840 bytes of header"],
    );
}

/// Its sibling, found while fixing it: a header declaring float64 shape `(1000000000,)` with
/// no data after it made ndarray-npy allocate 8 GB before reading; the element count is now
/// checked against the bytes that follow.
#[test]
fn npz_with_more_elements_than_bytes_is_refused() {
    assert_npz_refused(
        "npz-npy-shape-1e9-no-data.npz",
        "x",
        &["shape [1000000000]", "more elements than the 0 bytes"],
    );
}

/// Found while checking what the `plugin_reply` fuzz target reaches: a patch reply whose new
/// parameter (LoRA's B, `Init::Zeros`) has shape `[2^62, 4]` made `patch::materialize`
/// overflow the element count, a panic in debug builds (a wrapped count in release); a shape
/// of `[2, 10^12]` made it abort allocating 8 TB. The count is checked, and both buffers are
/// reserved fallibly.
#[test]
fn plugin_reply_with_an_overflowing_parameter_shape_is_refused() {
    let frame = std::fs::read(bad_input_file("plugin-reply-shape-overflow.frame")).unwrap();
    let reply = graft_plugin_sdk::PatchReply::from_frame(&frame).expect("the frame decodes");
    reply.check_payloads().expect("its payloads are sound");
    let mut model = onnx::load(&fixture_model(FIXTURE)).unwrap();
    let error =
        graft::patch::apply_patch(&mut model, &reply, graft::patch::AppliedMethod::default())
            .expect_err("the reply is refused");
    let message = error.to_string();
    assert!(matches!(error, graft::Error::Tensor { .. }), "{message}");
    for needle in [
        "lora.bert.encoder.layer.0.attention.self.query.B",
        "more elements than a tensor can hold",
    ] {
        assert!(
            message.contains(needle),
            "{message:?} should mention {needle:?}"
        );
    }
}

/// The other shapes a plugin could ask `patch::materialize` for that no tensor can have: more
/// elements than memory can be reserved for, and a dimension beyond int64 (which a zero
/// elsewhere in the shape used to let through as a negative dimension).
#[test]
fn generated_parameters_with_impossible_shapes_are_refused() {
    for (shape, needle) in [
        (vec![1usize << 61], "too large to allocate"),
        (vec![0, 1usize << 63], "beyond the int64 range"),
    ] {
        let parameter = graft_plugin_sdk::NewParameter {
            name: "p".into(),
            dtype: graft_plugin_sdk::DType::Float,
            shape: shape.clone(),
            init: graft_plugin_sdk::Init::Zeros,
            trainable: true,
        };
        let error = graft::patch::materialize(&parameter, &[], &graft::ir::Graph::default())
            .expect_err("an impossible shape is refused");
        let message = error.to_string();
        assert!(
            matches!(error, graft::Error::Tensor { .. }),
            "{shape:?}: {message}"
        );
        assert!(
            message.contains(needle),
            "{shape:?}: {message:?} should mention {needle:?}"
        );
    }
}
