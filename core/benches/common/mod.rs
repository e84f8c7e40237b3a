//! Shared by the 7B-scale benchmarks: a LLaMA-7B-shaped graph whose float16 weights live in a
//! sparse external-data file, and the timing and peak-memory helpers their reports use.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use graft::ir::{DataType, Dim, Graph, MappedFile, Model, Node, Tensor, TensorData, ValueInfo};
use graft::onnx::{self, SaveOptions};
use onnx_protobuf::AttributeProto;

/// Transformer layers.
pub const N_LAYERS: usize = 32;
/// Width of the residual stream.
pub const HIDDEN: i64 = 4096;
/// Width of the feed-forward layer.
pub const FFN: i64 = 11008;
/// Attention heads.
pub const N_HEADS: i64 = 32;
/// Vocabulary size.
pub const VOCAB: i64 = 32000;
/// The external-data file, beside `model.onnx`.
pub const DATA_FILE: &str = "model.onnx.data";

/// Builds the graph node by node, laying weights out in the external-data file as it goes.
struct Builder {
    nodes: Vec<Node>,
    initializers: Vec<Tensor>,
    data: Arc<MappedFile>,
    data_len: usize,
    n_values: usize,
}

impl Builder {
    fn fresh(&mut self, hint: &str) -> String {
        self.n_values += 1;
        format!("/{hint}_output_{}", self.n_values)
    }

    fn node(
        &mut self,
        name: String,
        op: &str,
        inputs: &[&str],
        attributes: Vec<AttributeProto>,
    ) -> String {
        let output = self.fresh(&name);
        self.node_into(name, op, inputs, attributes, output)
    }

    fn node_into(
        &mut self,
        name: String,
        op: &str,
        inputs: &[&str],
        attributes: Vec<AttributeProto>,
        output: String,
    ) -> String {
        let mut node = Node::new(
            name,
            op,
            inputs.iter().map(|s| s.to_string()).collect(),
            vec![output.clone()],
        );
        node.attributes = attributes;
        self.nodes.push(node);
        output
    }

    /// A float16 weight stored in the external file, 4 KiB aligned as graft's saver lays it out.
    fn weight(&mut self, name: String, dims: Vec<i64>) -> String {
        let length = dims.iter().product::<i64>() as usize * 2;
        let offset = self.data_len.next_multiple_of(4096);
        self.data_len = offset + length;
        self.initializers.push(Tensor {
            name: name.clone(),
            dtype: DataType::Float16,
            dims,
            data: TensorData::External {
                file: self.data.clone(),
                location: DATA_FILE.into(),
                offset,
                length,
            },
            doc_string: String::new(),
        });
        name
    }

    fn constant_f16(&mut self, name: &str, value: f32) -> String {
        let bytes = half::f16::from_f32(value).to_le_bytes().to_vec();
        self.initializers
            .push(Tensor::from_raw(name, DataType::Float16, vec![], bytes));
        name.into()
    }

    fn rms_norm(&mut self, scope: &str, x: &str, weight_name: String) -> String {
        let squared = self.node(format!("{scope}/Pow"), "Pow", &[x, "two"], vec![]);
        let mean = self.node(
            format!("{scope}/ReduceMean"),
            "ReduceMean",
            &[&squared],
            vec![ints("axes", &[-1]), int("keepdims", 1)],
        );
        let shifted = self.node(format!("{scope}/Add"), "Add", &[&mean, "eps"], vec![]);
        let root = self.node(format!("{scope}/Sqrt"), "Sqrt", &[&shifted], vec![]);
        let inverse = self.node(
            format!("{scope}/Reciprocal"),
            "Reciprocal",
            &[&root],
            vec![],
        );
        let normalized = self.node(format!("{scope}/Mul"), "Mul", &[x, &inverse], vec![]);
        let weight = self.weight(weight_name, vec![HIDDEN]);
        self.node(
            format!("{scope}/Mul_1"),
            "Mul",
            &[&weight, &normalized],
            vec![],
        )
    }

    fn linear(&mut self, scope: &str, x: &str, n_in: i64, n_out: i64) -> String {
        let weight_name = format!("onnx::MatMul_{}", 10_000 + self.initializers.len());
        let weight = self.weight(weight_name, vec![n_in, n_out]);
        self.node(format!("{scope}/MatMul"), "MatMul", &[x, &weight], vec![])
    }

    /// [batch, seq, hidden] → [batch, heads, seq, head_dim].
    fn split_heads(&mut self, scope: &str, x: &str) -> String {
        let reshaped = self.node(
            format!("{scope}/Reshape"),
            "Reshape",
            &[x, "heads_shape"],
            vec![],
        );
        self.node(
            format!("{scope}/Transpose"),
            "Transpose",
            &[&reshaped],
            vec![ints("perm", &[0, 2, 1, 3])],
        )
    }

    fn layer(&mut self, index: usize, residual: &str) -> String {
        let scope = format!("/model/layers.{index}");
        let normed = self.rms_norm(
            &format!("{scope}/input_layernorm"),
            residual,
            format!("model.layers.{index}.input_layernorm.weight"),
        );
        let attention = format!("{scope}/self_attn");
        let q = self.linear(&format!("{attention}/q_proj"), &normed, HIDDEN, HIDDEN);
        let k = self.linear(&format!("{attention}/k_proj"), &normed, HIDDEN, HIDDEN);
        let v = self.linear(&format!("{attention}/v_proj"), &normed, HIDDEN, HIDDEN);
        let q = self.split_heads(&format!("{attention}/q"), &q);
        let k = self.split_heads(&format!("{attention}/k"), &k);
        let v = self.split_heads(&format!("{attention}/v"), &v);
        let k_transposed = self.node(
            format!("{attention}/Transpose_k"),
            "Transpose",
            &[&k],
            vec![ints("perm", &[0, 1, 3, 2])],
        );
        let scores = self.node(
            format!("{attention}/MatMul"),
            "MatMul",
            &[&q, &k_transposed],
            vec![],
        );
        let scaled = self.node(
            format!("{attention}/Mul"),
            "Mul",
            &[&scores, "attention_scale"],
            vec![],
        );
        let weights = self.node(
            format!("{attention}/Softmax"),
            "Softmax",
            &[&scaled],
            vec![int("axis", -1)],
        );
        let context = self.node(
            format!("{attention}/MatMul_1"),
            "MatMul",
            &[&weights, &v],
            vec![],
        );
        let merged = self.node(
            format!("{attention}/Transpose"),
            "Transpose",
            &[&context],
            vec![ints("perm", &[0, 2, 1, 3])],
        );
        let merged = self.node(
            format!("{attention}/Reshape"),
            "Reshape",
            &[&merged, "hidden_shape"],
            vec![],
        );
        let projected = self.linear(&format!("{attention}/o_proj"), &merged, HIDDEN, HIDDEN);
        let residual = self.node(
            format!("{scope}/Add"),
            "Add",
            &[residual, &projected],
            vec![],
        );

        let normed = self.rms_norm(
            &format!("{scope}/post_attention_layernorm"),
            &residual,
            format!("model.layers.{index}.post_attention_layernorm.weight"),
        );
        let mlp = format!("{scope}/mlp");
        let gate = self.linear(&format!("{mlp}/gate_proj"), &normed, HIDDEN, FFN);
        let up = self.linear(&format!("{mlp}/up_proj"), &normed, HIDDEN, FFN);
        let sigmoid = self.node(format!("{mlp}/act_fn/Sigmoid"), "Sigmoid", &[&gate], vec![]);
        let activated = self.node(
            format!("{mlp}/act_fn/Mul"),
            "Mul",
            &[&gate, &sigmoid],
            vec![],
        );
        let product = self.node(format!("{mlp}/Mul"), "Mul", &[&activated, &up], vec![]);
        let down = self.linear(&format!("{mlp}/down_proj"), &product, FFN, HIDDEN);
        self.node(format!("{scope}/Add_1"), "Add", &[&residual, &down], vec![])
    }
}

fn int(name: &str, value: i64) -> AttributeProto {
    let mut attribute = AttributeProto::new();
    attribute.name = name.into();
    attribute.type_ = onnx_protobuf::attribute_proto::AttributeType::INT.into();
    attribute.i = value;
    attribute
}

fn ints(name: &str, values: &[i64]) -> AttributeProto {
    let mut attribute = AttributeProto::new();
    attribute.name = name.into();
    attribute.type_ = onnx_protobuf::attribute_proto::AttributeType::INTS.into();
    attribute.ints = values.to_vec();
    attribute
}

/// Writes `dir/model.onnx` and a sparse `dir/model.onnx.data` of the full weight size; returns
/// the model path and the data file's length.
pub fn generate(dir: &Path) -> (PathBuf, u64) {
    let data_path = dir.join(DATA_FILE);
    let data_file = std::fs::File::create(&data_path).expect("create the data file");
    let total = layout_len();
    data_file.set_len(total).expect("size the sparse data file");
    let data =
        Arc::new(MappedFile::open(data_path.canonicalize().unwrap()).expect("map the data file"));
    assert_eq!(
        data.path.parent(),
        Some(dir.canonicalize().unwrap().as_path()),
        "the data file must sit beside the model for Auto placement to keep it"
    );
    let mut builder = Builder {
        nodes: Vec::new(),
        initializers: Vec::new(),
        data,
        data_len: 0,
        n_values: 0,
    };
    builder.constant_f16("two", 2.0);
    builder.constant_f16("eps", 1e-6);
    builder.constant_f16("attention_scale", 1.0 / ((HIDDEN / N_HEADS) as f32).sqrt());
    builder.initializers.push(Tensor::from_i64(
        "heads_shape",
        vec![4],
        &[0, 0, N_HEADS, HIDDEN / N_HEADS],
    ));
    builder
        .initializers
        .push(Tensor::from_i64("hidden_shape", vec![3], &[0, 0, HIDDEN]));

    let embedding = builder.weight("model.embed_tokens.weight".into(), vec![VOCAB, HIDDEN]);
    let mut hidden = builder.node(
        "/model/embed_tokens/Gather".into(),
        "Gather",
        &[&embedding, "input_ids"],
        vec![],
    );
    for index in 0..N_LAYERS {
        hidden = builder.layer(index, &hidden);
    }
    let normed = builder.rms_norm("/model/norm", &hidden, "model.norm.weight".into());
    let head = builder.weight("lm_head.weight_t".into(), vec![HIDDEN, VOCAB]);
    builder.node_into(
        "/lm_head/MatMul".into(),
        "MatMul",
        &[&normed, &head],
        vec![],
        "logits".into(),
    );
    assert_eq!(builder.data_len as u64, total);

    let batch_seq = [Dim::Symbol("batch".into()), Dim::Symbol("sequence".into())];
    let model = Model {
        ir_version: 8,
        opset_imports: vec![(String::new(), 17)],
        producer_name: "graft scale_7b bench".into(),
        graph: Graph {
            name: "llama_7b_shaped".into(),
            nodes: builder.nodes,
            inputs: vec![ValueInfo::tensor("input_ids", DataType::Int64, &batch_seq)],
            outputs: vec![ValueInfo::tensor(
                "logits",
                DataType::Float16,
                &[
                    batch_seq[0].clone(),
                    batch_seq[1].clone(),
                    Dim::Fixed(VOCAB),
                ],
            )],
            initializers: builder.initializers,
            ..Graph::default()
        },
        base_dir: Some(dir.to_path_buf()),
        ..Model::default()
    };
    let path = dir.join("model.onnx");
    onnx::save(&model, &path, &SaveOptions::default()).expect("save the generated model");
    (path, total)
}

/// The byte length of the external-data file: every weight, 4 KiB aligned, in build order.
pub fn layout_len() -> u64 {
    let mut sizes = vec![VOCAB * HIDDEN];
    for _ in 0..N_LAYERS {
        sizes.push(HIDDEN);
        sizes.extend([HIDDEN * HIDDEN; 4]);
        sizes.push(HIDDEN);
        sizes.extend([HIDDEN * FFN; 3]);
    }
    sizes.extend([HIDDEN, HIDDEN * VOCAB]);
    let mut end = 0u64;
    for elements in sizes {
        end = end.next_multiple_of(4096) + elements as u64 * 2;
    }
    end
}

/// Peak resident set size of this process so far, in KiB.
pub fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Resets the peak RSS to the current RSS (Linux ≥ 4.0); false where the kernel refuses.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Runs `f` and returns its value with the wall time it took.
pub fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let start = Instant::now();
    let value = f();
    (value, start.elapsed())
}

/// Converts KiB to MiB.
pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}
