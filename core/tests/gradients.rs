//! Gradient graphs checked against central finite differences, both computed by ONNX Runtime:
//! one tiny graph per rule (with broadcasting and symbolic dimensions), the losses against
//! independent computations, and whole fixtures with sampled coordinates.

mod common;

use common::*;
use graft::autodiff::{gradient_graph, loss, GradientGraph};
use graft::ir::{DataType, Dim, Model, Node, Tensor, ValueInfo};
use graft::runtime::{HostTensor, OrtSession, SessionOptions};
use ndarray::{ArrayD, IxDyn};
use onnx_protobuf::attribute_proto::AttributeType;
use onnx_protobuf::AttributeProto;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

// ---------------------------------------------------------------------------------------------
// Building tiny graphs
// ---------------------------------------------------------------------------------------------

fn attribute(name: &str, kind: AttributeType) -> AttributeProto {
    let mut proto = AttributeProto::new();
    proto.name = name.to_owned();
    proto.type_ = kind.into();
    proto
}

fn int(name: &str, value: i64) -> AttributeProto {
    let mut proto = attribute(name, AttributeType::INT);
    proto.i = value;
    proto
}

fn ints(name: &str, values: &[i64]) -> AttributeProto {
    let mut proto = attribute(name, AttributeType::INTS);
    proto.ints = values.to_vec();
    proto
}

fn float(name: &str, value: f32) -> AttributeProto {
    let mut proto = attribute(name, AttributeType::FLOAT);
    proto.f = value;
    proto
}

fn string(name: &str, value: &str) -> AttributeProto {
    let mut proto = attribute(name, AttributeType::STRING);
    proto.s = value.as_bytes().to_vec();
    proto
}

fn node(op_type: &str, inputs: &[&str], outputs: &[&str], attributes: Vec<AttributeProto>) -> Node {
    let mut node = Node::new(
        format!("{}_node", outputs[0]),
        op_type,
        inputs.iter().map(|i| (*i).to_owned()).collect(),
        outputs.iter().map(|o| (*o).to_owned()).collect(),
    );
    node.attributes = attributes;
    node
}

fn int64s(name: &str, values: &[i64]) -> Tensor {
    Tensor::from_i64(name, vec![values.len() as i64], values)
}

fn int64_scalar(name: &str, value: i64) -> Tensor {
    Tensor::from_i64(name, vec![], &[value])
}

fn int64_tensor(name: &str, dims: &[i64], values: &[i64]) -> Tensor {
    Tensor::from_i64(name, dims.to_vec(), values)
}

fn bools(name: &str, dims: &[i64], values: &[bool]) -> Tensor {
    let bytes = values.iter().map(|&b| u8::from(b)).collect();
    Tensor::from_raw(name, DataType::Bool, dims.to_vec(), bytes)
}

fn float_tensor(name: &str, dtype: DataType, dims: &[usize], values: &[f64]) -> Tensor {
    let dims = dims.iter().map(|&d| d as i64).collect();
    let bytes = match dtype {
        DataType::Double => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        _ => values
            .iter()
            .flat_map(|v| (*v as f32).to_le_bytes())
            .collect(),
    };
    Tensor::from_raw(name, dtype, dims, bytes)
}

fn host(dtype: DataType, shape: &[usize], values: &[f64]) -> HostTensor {
    let shape = IxDyn(shape);
    match dtype {
        DataType::Double => {
            HostTensor::F64(ArrayD::from_shape_vec(shape, values.to_vec()).unwrap())
        }
        _ => HostTensor::F32(
            ArrayD::from_shape_vec(shape, values.iter().map(|&v| v as f32).collect()).unwrap(),
        ),
    }
}

fn dtype_of(tensor: &HostTensor) -> DataType {
    match tensor {
        HostTensor::F64(_) => DataType::Double,
        HostTensor::F32(_) => DataType::Float,
        other => panic!("not a float tensor: {other:?}"),
    }
}

/// A float tensor of a test graph: a graph input or an initializer, differentiated or not.
#[derive(Clone)]
struct Operand {
    name: &'static str,
    declared: Vec<Dim>,
    shape: Vec<usize>,
    low: f64,
    high: f64,
    /// Values within this distance of a kink are resampled, so that ±h stays on one side.
    kinks: Vec<f64>,
    initializer: bool,
    differentiate: bool,
}

fn operand(name: &'static str, shape: &[usize]) -> Operand {
    Operand {
        name,
        declared: shape.iter().map(|&d| Dim::Fixed(d as i64)).collect(),
        shape: shape.to_vec(),
        low: -1.0,
        high: 1.0,
        kinks: Vec::new(),
        initializer: false,
        differentiate: true,
    }
}

impl Operand {
    fn range(mut self, low: f64, high: f64) -> Self {
        self.low = low;
        self.high = high;
        self
    }

    /// Declares the dimensions named here (non-empty strings) as symbols.
    fn symbolic(mut self, names: &[&str]) -> Self {
        for (dim, name) in self.declared.iter_mut().zip(names) {
            if !name.is_empty() {
                *dim = Dim::Symbol((*name).to_owned());
            }
        }
        self
    }

    fn kinks(mut self, kinks: &[f64]) -> Self {
        self.kinks = kinks.to_vec();
        self
    }

    fn initializer(mut self) -> Self {
        self.initializer = true;
        self
    }

    fn constant(mut self) -> Self {
        self.differentiate = false;
        self
    }

    fn sample(&self, rng: &mut ChaCha8Rng) -> Vec<f64> {
        let count: usize = self.shape.iter().product();
        (0..count)
            .map(|_| loop {
                let value = rng.gen_range(self.low..self.high);
                if self.kinks.iter().all(|k| (value - k).abs() > 0.05) {
                    break value;
                }
            })
            .collect()
    }
}

/// One rule check: float operands, integer/boolean constants, the nodes, and the value whose
/// randomly weighted sum is the loss.
struct Case {
    name: String,
    dtype: DataType,
    /// Float32 tolerances for a double graph that computes part of its way in float32.
    float32_tolerance: bool,
    opset: i64,
    operands: Vec<Operand>,
    constants: Vec<Tensor>,
    nodes: Vec<Node>,
    output: &'static str,
}

fn case(
    name: impl Into<String>,
    operands: Vec<Operand>,
    nodes: Vec<Node>,
    output: &'static str,
) -> Case {
    Case {
        name: name.into(),
        dtype: DataType::Double,
        float32_tolerance: false,
        opset: 20,
        operands,
        constants: Vec::new(),
        nodes,
        output,
    }
}

impl Case {
    fn with(mut self, constants: Vec<Tensor>) -> Self {
        self.constants = constants;
        self
    }

    fn float32(mut self) -> Self {
        self.dtype = DataType::Float;
        self.float32_tolerance = true;
        self
    }

    fn float32_tolerance(mut self) -> Self {
        self.float32_tolerance = true;
        self
    }

    fn opset(mut self, opset: i64) -> Self {
        self.opset = opset;
        self
    }
}

/// A one-operator case: `y = op(operands...)`.
fn unary_case(op_type: &str, operands: Vec<Operand>, attributes: Vec<AttributeProto>) -> Case {
    let names: Vec<&str> = operands.iter().map(|o| o.name).collect();
    let nodes = vec![node(op_type, &names, &["y"], attributes)];
    case(op_type, operands, nodes, "y")
}

fn model_of(
    graph_inputs: Vec<ValueInfo>,
    initializers: Vec<Tensor>,
    nodes: Vec<Node>,
    opset: i64,
) -> Model {
    let mut model = Model {
        ir_version: 10,
        opset_imports: vec![(String::new(), opset)],
        producer_name: "graft-tests".into(),
        ..Model::default()
    };
    model.graph.name = "gradient_test".into();
    model.graph.inputs = graph_inputs;
    model.graph.initializers = initializers;
    model.graph.nodes = nodes;
    model
}

fn undeclared_shape(mut info: ValueInfo) -> ValueInfo {
    if let Some(onnx_protobuf::type_proto::Value::TensorType(tensor)) =
        info.proto.type_.as_mut().and_then(|t| t.value.as_mut())
    {
        tensor.shape.clear();
    }
    info
}

fn session(model: &Model) -> OrtSession {
    let bytes = graft::onnx::to_bytes(model).expect("serialize");
    OrtSession::from_bytes(
        &bytes,
        SessionOptions {
            threads: 1,
            ..Default::default()
        },
    )
    .expect("ORT session")
}

fn output<'a>(outputs: &'a [(String, HostTensor)], name: &str) -> &'a HostTensor {
    &outputs
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("output {name:?} missing"))
        .1
}

fn scalar_output(outputs: &[(String, HostTensor)], name: &str) -> f64 {
    output(outputs, name).to_f64()[0]
}

/// Appends `loss = ReduceSum(Cast(value, double) · weight)` with a random double weight of
/// `shape`, computing the sum in double so that float32 models add little rounding to it.
fn append_weighted_sum(
    model: &mut Model,
    value: &str,
    shape: &[usize],
    dtype: DataType,
    rng: &mut ChaCha8Rng,
) {
    let count: usize = shape.iter().product();
    let weights: Vec<f64> = (0..count).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let graph = &mut model.graph;
    graph.initializers.push(float_tensor(
        "loss_weight",
        DataType::Double,
        shape,
        &weights,
    ));
    let mut widened = value.to_owned();
    if dtype != DataType::Double {
        graph
            .nodes
            .push(node("Cast", &[value], &["loss_input"], vec![int("to", 11)]));
        widened = "loss_input".into();
    }
    graph.nodes.push(node(
        "Mul",
        &[&widened, "loss_weight"],
        &["loss_terms"],
        vec![],
    ));
    graph.nodes.push(node(
        "ReduceSum",
        &["loss_terms"],
        &["loss"],
        vec![int("keepdims", 0)],
    ));
    graph.outputs = vec![ValueInfo::tensor("loss", DataType::Double, &[])];
}

/// The training graph's model reduced to its loss output, for finite differences.
fn forward_only(training: &GradientGraph) -> Model {
    let mut forward = training.model.clone();
    forward.graph.outputs.truncate(1);
    forward
}

/// A tensor fed to a graph, as perturbed by [`central_difference`].
#[derive(Clone, Copy)]
struct Fed<'a> {
    name: &'a str,
    values: &'a [f64],
    shape: &'a [usize],
    dtype: DataType,
}

/// Central difference of `loss` along coordinate `index` of the fed tensor.
fn central_difference(
    forward: &mut OrtSession,
    feeds: &[(String, HostTensor)],
    fed: &Fed,
    index: usize,
    step: f64,
) -> f64 {
    let Fed {
        name,
        values,
        shape,
        dtype,
    } = *fed;
    let mut evaluate = |delta: f64| {
        let mut shifted = values.to_vec();
        shifted[index] += delta;
        let mut inputs = feeds.to_vec();
        let slot = inputs
            .iter()
            .position(|(n, _)| n == name)
            .expect("fed tensor");
        inputs[slot].1 = host(dtype, shape, &shifted);
        scalar_output(&forward.run(&inputs).expect("forward run"), "loss")
    };
    (evaluate(step) - evaluate(-step)) / (2.0 * step)
}

/// Finite-difference settings of one precision, with the tolerance they allow.
struct Precision {
    step: f64,
    absolute: f64,
    relative: f64,
}

/// Double: truncation error ≈ h²·|f'''|/6 ≈ 1e-12 and rounding ≈ 1e-16·|loss|/h ≈ 1e-10 for
/// h = 1e-6, so 1e-6 absolute plus 1e-6 relative leaves two orders of margin.
const DOUBLE: Precision = Precision {
    step: 1e-6,
    absolute: 1e-6,
    relative: 1e-6,
};

/// Float32 operators with a double loss sum: each output carries ≈ 6e-8 relative rounding, so
/// with h = 1e-3 the rounding term is ≈ 1e-4·|output| summed over a few terms and the truncation
/// term ≈ 1e-7·|f'''|; 2e-3 absolute plus 1e-2 relative covers both on O(1) graphs.
const FLOAT32: Precision = Precision {
    step: 1e-3,
    absolute: 2e-3,
    relative: 1e-2,
};

fn within(analytic: f64, numeric: f64, precision: &Precision) -> bool {
    (analytic - numeric).abs() <= precision.absolute + precision.relative * numeric.abs()
}

fn seed_of(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Builds the case, differentiates it, and compares every gradient coordinate with central
/// differences. Returns the failures as messages.
fn check(case: &Case) -> Vec<String> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed_of(&case.name));
    let values: Vec<Vec<f64>> = case.operands.iter().map(|o| o.sample(&mut rng)).collect();
    let mut graph_inputs = Vec::new();
    let mut initializers = case.constants.clone();
    let mut feeds = Vec::new();
    for (operand, values) in case.operands.iter().zip(&values) {
        if operand.initializer {
            initializers.push(float_tensor(
                operand.name,
                case.dtype,
                &operand.shape,
                values,
            ));
        } else {
            graph_inputs.push(ValueInfo::tensor(
                operand.name,
                case.dtype,
                &operand.declared,
            ));
            feeds.push((
                operand.name.to_owned(),
                host(case.dtype, &operand.shape, values),
            ));
        }
    }
    let mut model = model_of(graph_inputs, initializers, case.nodes.clone(), case.opset);
    let inferred = graft::analysis::infer_shapes(&model).unwrap();
    let output_dtype = inferred.dtype(case.output).unwrap_or(case.dtype);
    model.graph.outputs = vec![undeclared_shape(ValueInfo::tensor(
        case.output,
        output_dtype,
        &[],
    ))];
    let forward_outputs = session(&model)
        .run(&feeds)
        .unwrap_or_else(|e| panic!("{}: forward: {e}", case.name));
    let result = output(&forward_outputs, case.output);
    let shape = result.shape().to_vec();
    append_weighted_sum(&mut model, case.output, &shape, dtype_of(result), &mut rng);

    let wrt: Vec<String> = case
        .operands
        .iter()
        .filter(|o| o.differentiate)
        .map(|o| o.name.to_owned())
        .collect();
    let training =
        gradient_graph(&model, "loss", &wrt).unwrap_or_else(|e| panic!("{}: {e}", case.name));
    for (operand, values) in case.operands.iter().zip(&values) {
        if operand.initializer && operand.differentiate {
            feeds.push((
                operand.name.to_owned(),
                host(case.dtype, &operand.shape, values),
            ));
        }
    }
    let outputs = session(&training.model)
        .run(&feeds)
        .unwrap_or_else(|e| panic!("{}: training graph: {e}", case.name));
    let mut forward = session(&forward_only(&training));
    let precision = if case.float32_tolerance {
        FLOAT32
    } else {
        DOUBLE
    };

    let mut failures = Vec::new();
    for (operand, values) in case.operands.iter().zip(&values) {
        if !operand.differentiate {
            continue;
        }
        let gradient = output(&outputs, &format!("{}_grad", operand.name));
        assert_eq!(
            gradient.shape(),
            operand.shape.as_slice(),
            "{}: gradient shape of {}",
            case.name,
            operand.name
        );
        for (index, analytic) in gradient.to_f64().into_iter().enumerate() {
            let fed = Fed {
                name: operand.name,
                values,
                shape: &operand.shape,
                dtype: case.dtype,
            };
            let numeric = central_difference(&mut forward, &feeds, &fed, index, precision.step);
            if !within(analytic, numeric, &precision) {
                failures.push(format!(
                    "{}: d loss/d {}[{index}] = {analytic} by the graph, {numeric} by finite differences",
                    case.name, operand.name
                ));
            }
        }
    }
    failures
}

fn check_all(cases: Vec<Case>) {
    let mut failures = Vec::new();
    for case in &cases {
        failures.extend(check(case));
    }
    assert_no_failures(&failures);
}

// ---------------------------------------------------------------------------------------------
// One case per rule
// ---------------------------------------------------------------------------------------------

#[test]
fn elementwise_rules_match_finite_differences() {
    let x = || operand("x", &[2, 3]);
    let positive = || operand("x", &[2, 3]).range(0.5, 2.0);
    let mut cases = vec![
        case(
            "Add broadcast [2,3,4]+[4]",
            vec![operand("a", &[2, 3, 4]), operand("b", &[4])],
            vec![node("Add", &["a", "b"], &["y"], vec![])],
            "y",
        ),
        case(
            "Add symbolic batch",
            vec![
                operand("a", &[2, 3]).symbolic(&["batch", ""]),
                operand("b", &[3]).initializer(),
            ],
            vec![node("Add", &["a", "b"], &["y"], vec![])],
            "y",
        ),
        case(
            "Add symbolic size-1 dims",
            vec![
                operand("a", &[2, 3]).symbolic(&["batch", "width"]),
                operand("b", &[1, 3]).symbolic(&["", "width"]),
            ],
            vec![node("Add", &["a", "b"], &["y"], vec![])],
            "y",
        ),
        case(
            "Sub [2,3]-[2,1]",
            vec![operand("a", &[2, 3]), operand("b", &[2, 1])],
            vec![node("Sub", &["a", "b"], &["y"], vec![])],
            "y",
        ),
        case(
            "Mul [2,1,4]*[3,1]",
            vec![operand("a", &[2, 1, 4]), operand("b", &[3, 1])],
            vec![node("Mul", &["a", "b"], &["y"], vec![])],
            "y",
        ),
        case(
            "Div [2,3]/[3]",
            vec![operand("a", &[2, 3]), operand("b", &[3]).range(0.5, 2.0)],
            vec![node("Div", &["a", "b"], &["y"], vec![])],
            "y",
        ),
        case(
            "Pow constant exponent",
            vec![x()],
            vec![node("Pow", &["x", "p"], &["y"], vec![])],
            "y",
        )
        .with(vec![float_tensor("p", DataType::Double, &[], &[3.0])]),
        case(
            "Pow both operands",
            vec![positive(), operand("p", &[3]).range(0.5, 2.5)],
            vec![node("Pow", &["x", "p"], &["y"], vec![])],
            "y",
        ),
        unary_case("Neg", vec![x()], vec![]),
        unary_case("Sqrt", vec![positive()], vec![]),
        unary_case("Reciprocal", vec![positive()], vec![]),
        unary_case("Exp", vec![x()], vec![]),
        unary_case("Log", vec![positive()], vec![]),
        unary_case("Tanh", vec![x()], vec![]),
        unary_case("Sigmoid", vec![x()], vec![]),
        unary_case("Relu", vec![x().kinks(&[0.0])], vec![]),
        unary_case(
            "LeakyRelu",
            vec![x().kinks(&[0.0])],
            vec![float("alpha", 0.2)],
        )
        .float32(),
        unary_case("Sin", vec![x()], vec![]),
        unary_case("Cos", vec![x()], vec![]),
        unary_case("Abs", vec![x().kinks(&[0.0])], vec![]),
        unary_case("Erf", vec![x()], vec![]).float32(),
        unary_case("Gelu", vec![x().range(-3.0, 3.0)], vec![]).float32(),
        {
            let mut gelu = unary_case(
                "Gelu",
                vec![x().range(-3.0, 3.0)],
                vec![string("approximate", "tanh")],
            )
            .float32();
            gelu.name = "Gelu tanh".into();
            gelu
        },
        case(
            "Max broadcast",
            vec![operand("a", &[2, 3]), operand("b", &[3])],
            vec![node("Max", &["a", "b"], &["y"], vec![])],
            "y",
        ),
        case(
            "Min three inputs",
            vec![
                operand("a", &[2, 3]),
                operand("b", &[2, 3]),
                operand("c", &[1, 3]),
            ],
            vec![node("Min", &["a", "b", "c"], &["y"], vec![])],
            "y",
        ),
        case(
            "Sum broadcast",
            vec![
                operand("a", &[2, 3]),
                operand("b", &[3]),
                operand("c", &[2, 1]),
            ],
            vec![node("Sum", &["a", "b", "c"], &["y"], vec![])],
            "y",
        ),
        case(
            "Mean",
            vec![operand("a", &[2, 3]), operand("b", &[3])],
            vec![node("Mean", &["a", "b"], &["y"], vec![])],
            "y",
        )
        .float32(),
        case(
            "Clip",
            vec![
                x().range(-1.0, 1.0).kinks(&[-0.5, 0.5]),
                operand("low", &[])
                    .range(-0.5, -0.4999)
                    .constant()
                    .initializer(),
                operand("high", &[])
                    .range(0.5, 0.5001)
                    .constant()
                    .initializer(),
            ],
            vec![node("Clip", &["x", "low", "high"], &["y"], vec![])],
            "y",
        ),
        case(
            "Where broadcast",
            vec![operand("a", &[2, 3]), operand("b", &[3])],
            vec![node("Where", &["condition", "a", "b"], &["y"], vec![])],
            "y",
        )
        .with(vec![bools(
            "condition",
            &[2, 3],
            &[true, false, true, false, false, true],
        )]),
        case(
            "Cast and CastLike through float32",
            vec![x()],
            vec![
                node("Cast", &["x"], &["narrow"], vec![int("to", 1)]),
                node("Tanh", &["narrow"], &["bent"], vec![]),
                node("CastLike", &["bent", "like"], &["y"], vec![]),
            ],
            "y",
        )
        .with(vec![float_tensor("like", DataType::Double, &[], &[0.0])])
        .float32_tolerance(),
        unary_case("Identity", vec![x()], vec![]),
        case(
            "Dropout inference",
            vec![x()],
            vec![node("Dropout", &["x"], &["y"], vec![])],
            "y",
        ),
        case(
            "Dropout training_mode false",
            vec![x()],
            vec![node(
                "Dropout",
                &["x", "ratio", "training"],
                &["y", "mask"],
                vec![],
            )],
            "y",
        )
        .with(vec![
            float_tensor("ratio", DataType::Double, &[], &[0.3]),
            bools("training", &[], &[false]),
        ]),
        case(
            "fan-out: x·x + tanh(x)",
            vec![x()],
            vec![
                node("Mul", &["x", "x"], &["square"], vec![]),
                node("Tanh", &["x"], &["bent"], vec![]),
                node("Add", &["square", "bent"], &["y"], vec![]),
            ],
            "y",
        ),
        case(
            "no gradient through Floor",
            vec![x(), operand("b", &[2, 3])],
            vec![
                node("Floor", &["x"], &["floored"], vec![]),
                node("Add", &["floored", "b"], &["y"], vec![]),
            ],
            "y",
        ),
    ];
    for case in &mut cases {
        if case.name == "Dropout inference" {
            case.opset = 17;
        }
    }
    check_all(cases);
}

#[test]
fn linear_algebra_rules_match_finite_differences() {
    let matmul = |name: &str, a: Operand, b: Operand| {
        let (na, nb) = (a.name, b.name);
        case(
            format!("MatMul {name}"),
            vec![a, b],
            vec![node("MatMul", &[na, nb], &["y"], vec![])],
            "y",
        )
    };
    let gemm = |name: &str,
                a: &[usize],
                b: &[usize],
                c: Option<&[usize]>,
                attributes: Vec<AttributeProto>| {
        let mut operands = vec![operand("a", a), operand("b", b)];
        let mut inputs = vec!["a", "b"];
        if let Some(c) = c {
            operands.push(operand("c", c));
            inputs.push("c");
        }
        case(
            format!("Gemm {name}"),
            operands,
            vec![node("Gemm", &inputs, &["y"], attributes)],
            "y",
        )
    };
    let cases = vec![
        matmul(
            "[2,3,4,5]·[5,6]",
            operand("a", &[2, 3, 4, 5]),
            operand("w", &[5, 6]),
        ),
        matmul(
            "[3,4]·[2,4,5]",
            operand("a", &[3, 4]),
            operand("b", &[2, 4, 5]),
        ),
        matmul(
            "[2,1,3,4]·[3,4,2]",
            operand("a", &[2, 1, 3, 4]),
            operand("b", &[3, 4, 2]),
        ),
        matmul("[4]·[4,5]", operand("a", &[4]), operand("b", &[4, 5])),
        matmul("[2,3,4]·[4]", operand("a", &[2, 3, 4]), operand("b", &[4])),
        matmul("[4]·[4]", operand("a", &[4]), operand("b", &[4])),
        matmul(
            "[batch,seq,4]·[4,5] weight initializer",
            operand("a", &[2, 3, 4]).symbolic(&["batch", "sequence", ""]),
            operand("w", &[4, 5]).initializer(),
        ),
        matmul(
            "[batch,3,4]·[batch,4,2]",
            operand("a", &[2, 3, 4]).symbolic(&["batch", "", ""]),
            operand("b", &[2, 4, 2]).symbolic(&["batch", "", ""]),
        ),
        gemm("plain", &[3, 4], &[4, 5], Some(&[5]), vec![]),
        gemm(
            "transB with alpha, beta, C [3,5]",
            &[3, 4],
            &[5, 4],
            Some(&[3, 5]),
            vec![int("transB", 1), float("alpha", 0.7), float("beta", 1.5)],
        ),
        gemm(
            "transA",
            &[4, 3],
            &[4, 5],
            Some(&[1]),
            vec![int("transA", 1)],
        ),
        gemm(
            "transA transB no C",
            &[4, 3],
            &[5, 4],
            None,
            vec![int("transA", 1), int("transB", 1), float("alpha", -1.3)],
        ),
        case(
            "Conv stride 2, pads 1",
            vec![
                operand("x", &[2, 2, 5, 6]),
                operand("w", &[3, 2, 3, 3]),
                operand("b", &[3]),
            ],
            vec![node(
                "Conv",
                &["x", "w", "b"],
                &["y"],
                vec![ints("strides", &[2, 2]), ints("pads", &[1, 1, 1, 1])],
            )],
            "y",
        )
        .float32(),
        case(
            "Conv patch embedding",
            vec![
                operand("x", &[1, 3, 8, 8]),
                operand("w", &[4, 3, 4, 4]),
                operand("b", &[4]),
            ],
            vec![node(
                "Conv",
                &["x", "w", "b"],
                &["y"],
                vec![ints("strides", &[4, 4]), ints("kernel_shape", &[4, 4])],
            )],
            "y",
        )
        .float32(),
        case(
            "Conv dilated, asymmetric pads",
            vec![operand("x", &[1, 2, 7, 7]), operand("w", &[2, 2, 2, 3])],
            vec![node(
                "Conv",
                &["x", "w"],
                &["y"],
                vec![
                    ints("dilations", &[2, 1]),
                    ints("pads", &[0, 1, 1, 0]),
                    ints("strides", &[1, 2]),
                ],
            )],
            "y",
        )
        .float32(),
    ];
    check_all(cases);
}

#[test]
fn normalization_and_reduction_rules_match_finite_differences() {
    let cases = vec![
        unary_case(
            "Softmax",
            vec![operand("x", &[2, 3, 4])],
            vec![int("axis", 1)],
        ),
        unary_case("LogSoftmax", vec![operand("x", &[2, 3, 4])], vec![]),
        case(
            "LayerNormalization last axis",
            vec![
                operand("x", &[2, 3, 4]),
                operand("scale", &[4]),
                operand("bias", &[4]),
            ],
            vec![node(
                "LayerNormalization",
                &["x", "scale", "bias"],
                &["y"],
                vec![float("epsilon", 1e-3)],
            )],
            "y",
        ),
        case(
            "LayerNormalization axis 1, no bias",
            vec![
                operand("x", &[2, 3, 4]).symbolic(&["batch", "", ""]),
                operand("scale", &[3, 4]).initializer(),
            ],
            vec![node(
                "LayerNormalization",
                &["x", "scale"],
                &["y"],
                vec![int("axis", 1)],
            )],
            "y",
        ),
        case(
            "ReduceMean axes input",
            vec![operand("x", &[2, 3, 4])],
            vec![node(
                "ReduceMean",
                &["x", "axes"],
                &["y"],
                vec![int("keepdims", 0)],
            )],
            "y",
        )
        .with(vec![int64s("axes", &[-1, 0])]),
        case(
            "ReduceMean axes attribute (opset 17)",
            vec![operand("x", &[2, 3, 4]).symbolic(&["batch", "", ""])],
            vec![node("ReduceMean", &["x"], &["y"], vec![ints("axes", &[1])])],
            "y",
        )
        .opset(17),
        case(
            "ReduceSum keepdims",
            vec![operand("x", &[2, 3, 4])],
            vec![node("ReduceSum", &["x", "axes"], &["y"], vec![])],
            "y",
        )
        .with(vec![int64s("axes", &[0, 2])]),
        case(
            "ReduceSum all axes",
            vec![operand("x", &[2, 3, 4])],
            vec![node("ReduceSum", &["x"], &["y"], vec![int("keepdims", 0)])],
            "y",
        ),
    ];
    check_all(cases);
}

#[test]
fn movement_rules_match_finite_differences() {
    let x = || operand("x", &[2, 3, 4]);
    let cases = vec![
        unary_case("Transpose", vec![x()], vec![ints("perm", &[1, 2, 0])]),
        {
            let mut default = unary_case("Transpose", vec![x()], vec![]);
            default.name = "Transpose default perm".into();
            default
        },
        case(
            "Reshape",
            vec![x()],
            vec![node("Reshape", &["x", "shape"], &["y"], vec![])],
            "y",
        )
        .with(vec![int64s("shape", &[4, -1])]),
        unary_case("Flatten", vec![x()], vec![int("axis", 2)]),
        case(
            "Squeeze",
            vec![operand("x", &[2, 1, 3])],
            vec![node("Squeeze", &["x", "axes"], &["y"], vec![])],
            "y",
        )
        .with(vec![int64s("axes", &[1])]),
        case(
            "Unsqueeze",
            vec![operand("x", &[2, 3])],
            vec![node("Unsqueeze", &["x", "axes"], &["y"], vec![])],
            "y",
        )
        .with(vec![int64s("axes", &[0, -1])]),
        case(
            "Expand [3,1]→[2,3,4]",
            vec![operand("x", &[3, 1])],
            vec![node("Expand", &["x", "shape"], &["y"], vec![])],
            "y",
        )
        .with(vec![int64s("shape", &[2, 3, 4])]),
        case(
            "Concat axis 1",
            vec![operand("a", &[2, 2, 3]), operand("b", &[2, 1, 3])],
            vec![node("Concat", &["a", "b"], &["y"], vec![int("axis", 1)])],
            "y",
        ),
        case(
            "Concat symbolic sizes",
            vec![
                operand("a", &[2, 2, 3]).symbolic(&["", "past", ""]),
                operand("b", &[2, 1, 3]).symbolic(&["", "new", ""]),
            ],
            vec![node("Concat", &["a", "b"], &["y"], vec![int("axis", -2)])],
            "y",
        ),
        case(
            "Split with sizes",
            vec![operand("x", &[2, 4])],
            vec![
                node("Split", &["x", "sizes"], &["p", "q"], vec![int("axis", 1)]),
                node("Mul", &["p", "q"], &["y"], vec![]),
            ],
            "y",
        )
        .with(vec![int64s("sizes", &[1, 3])]),
        case(
            "Split with an unused output",
            vec![operand("x", &[4, 3])],
            vec![node(
                "Split",
                &["x"],
                &["y", "unused"],
                vec![int("num_outputs", 2)],
            )],
            "y",
        ),
        case(
            "Slice",
            vec![x()],
            vec![node(
                "Slice",
                &["x", "starts", "ends", "axes"],
                &["y"],
                vec![],
            )],
            "y",
        )
        .with(vec![
            int64s("starts", &[1, 0]),
            int64s("ends", &[100, -1]),
            int64s("axes", &[2, 1]),
        ]),
        case(
            "Slice negative step",
            vec![x()],
            vec![node(
                "Slice",
                &["x", "starts", "ends", "axes", "steps"],
                &["y"],
                vec![],
            )],
            "y",
        )
        .with(vec![
            int64s("starts", &[-1, 2]),
            int64s("ends", &[-100, 0]),
            int64s("axes", &[2, 1]),
            int64s("steps", &[-2, -1]),
        ]),
        case(
            "Gather axis 0, repeated indices (embedding)",
            vec![operand("table", &[4, 3])],
            vec![node("Gather", &["table", "ids"], &["y"], vec![])],
            "y",
        )
        .with(vec![int64_tensor("ids", &[2, 3], &[0, 2, 2, 1, 2, 0])]),
        case(
            "Gather axis 1, scalar index",
            vec![x()],
            vec![node(
                "Gather",
                &["x", "index"],
                &["y"],
                vec![int("axis", 1)],
            )],
            "y",
        )
        .with(vec![int64_scalar("index", 0)]),
        case(
            "Gather axis 2, negative indices",
            vec![x()],
            vec![node("Gather", &["x", "ids"], &["y"], vec![int("axis", 2)])],
            "y",
        )
        .with(vec![int64_tensor("ids", &[2, 2], &[-1, 0, 1, -1])]),
        case(
            "GatherElements",
            vec![operand("x", &[2, 3])],
            vec![node(
                "GatherElements",
                &["x", "ids"],
                &["y"],
                vec![int("axis", 1)],
            )],
            "y",
        )
        .with(vec![int64_tensor("ids", &[2, 2], &[0, 2, 1, 1])]),
        case(
            "GatherND",
            vec![x()],
            vec![node("GatherND", &["x", "ids"], &["y"], vec![])],
            "y",
        )
        .with(vec![int64_tensor("ids", &[3, 2], &[0, 1, 1, 2, 0, 1])]),
    ];
    check_all(cases);
}

// ---------------------------------------------------------------------------------------------
// Losses
// ---------------------------------------------------------------------------------------------

fn log_softmax_row(row: &[f64]) -> Vec<f64> {
    let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let log_sum = row.iter().map(|v| (v - max).exp()).sum::<f64>().ln() + max;
    row.iter().map(|v| v - log_sum).collect()
}

/// PyTorch's `F.cross_entropy(logits, labels, ignore_index=-100)`, written out.
fn reference_cross_entropy(logits: &[f64], classes: usize, labels: &[i64]) -> f64 {
    let mut total = 0.0;
    let mut count = 0;
    for (row, &label) in logits.chunks(classes).zip(labels) {
        if label == loss::IGNORE_INDEX {
            continue;
        }
        total -= log_softmax_row(row)[label as usize];
        count += 1;
    }
    total / f64::from(count)
}

/// Differentiates a loss over a `logits` graph input and checks its value against `reference`
/// and its gradient against central differences (double precision, see [`DOUBLE`]).
fn check_loss(
    name: &str,
    logits_shape: &[usize],
    declared: &[Dim],
    labels: HostTensor,
    add: impl Fn(&mut Model) -> String,
    reference: impl Fn(&[f64]) -> f64,
) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed_of(name));
    let count: usize = logits_shape.iter().product();
    let logits: Vec<f64> = (0..count).map(|_| rng.gen_range(-2.0..2.0)).collect();
    let mut model = model_of(
        vec![ValueInfo::tensor("logits", DataType::Double, declared)],
        vec![],
        vec![],
        20,
    );
    let loss_name = add(&mut model);
    let training = gradient_graph(&model, &loss_name, &["logits".to_owned()])
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let feeds = vec![
        (
            "logits".to_owned(),
            host(DataType::Double, logits_shape, &logits),
        ),
        ("labels".to_owned(), labels),
    ];
    let outputs = session(&training.model).run(&feeds).unwrap();
    let value = scalar_output(&outputs, &loss_name);
    let expected = reference(&logits);
    assert!(
        (value - expected).abs() < 1e-12,
        "{name}: loss {value}, reference {expected}"
    );
    let gradient = output(&outputs, "logits_grad").to_f64();
    let mut forward = session(&forward_only(&training));
    for (index, analytic) in gradient.into_iter().enumerate() {
        let mut shifted = |delta: f64| {
            let mut values = logits.clone();
            values[index] += delta;
            let mut inputs = feeds.clone();
            inputs[0].1 = host(DataType::Double, logits_shape, &values);
            scalar_output(&forward.run(&inputs).unwrap(), &loss_name)
        };
        let numeric = (shifted(DOUBLE.step) - shifted(-DOUBLE.step)) / (2.0 * DOUBLE.step);
        assert!(
            within(analytic, numeric, &DOUBLE),
            "{name}: d loss/d logits[{index}] = {analytic}, finite differences {numeric}"
        );
    }
}

fn labels(shape: &[usize], values: &[i64]) -> HostTensor {
    HostTensor::I64(ArrayD::from_shape_vec(IxDyn(shape), values.to_vec()).unwrap())
}

#[test]
fn cross_entropy_matches_pytorch_definition() {
    let values = [2, -100, 0, 4, 1];
    check_loss(
        "cross entropy",
        &[5, 5],
        &[Dim::Symbol("batch".into()), Dim::Fixed(5)],
        labels(&[5], &values),
        |model| loss::cross_entropy(model, "logits", "labels", loss::IGNORE_INDEX).unwrap(),
        |logits| reference_cross_entropy(logits, 5, &values),
    );
}

#[test]
fn causal_lm_loss_shifts_labels_like_hugging_face() {
    let (batch, sequence, vocabulary) = (2, 4, 6);
    let values = [3, 1, -100, 5, 0, 2, 4, -100];
    check_loss(
        "causal LM",
        &[batch, sequence, vocabulary],
        &[
            Dim::Symbol("batch".into()),
            Dim::Symbol("sequence".into()),
            Dim::Fixed(vocabulary as i64),
        ],
        labels(&[batch, sequence], &values),
        |model| loss::causal_lm(model, "logits", "labels").unwrap(),
        |logits| {
            // Hugging Face pads the labels with −100 and shifts them left by one.
            let mut shifted = Vec::new();
            for b in 0..batch {
                for s in 0..sequence {
                    shifted.push(if s + 1 < sequence {
                        values[b * sequence + s + 1]
                    } else {
                        loss::IGNORE_INDEX
                    });
                }
            }
            reference_cross_entropy(logits, vocabulary, &shifted)
        },
    );
}

#[test]
fn token_classification_loss_flattens_tokens() {
    let values = [1, 0, -100, 2, 2, 1];
    check_loss(
        "token classification",
        &[2, 3, 3],
        &[Dim::Fixed(2), Dim::Fixed(3), Dim::Fixed(3)],
        labels(&[2, 3], &values),
        |model| loss::token_classification(model, "logits", "labels").unwrap(),
        |logits| reference_cross_entropy(logits, 3, &values),
    );
}

#[test]
fn mean_squared_error_matches_definition() {
    let targets: Vec<f64> = (0..6).map(|i| f64::from(i) * 0.3 - 0.7).collect();
    let target_tensor = host(DataType::Double, &[2, 3], &targets);
    let mut model = model_of(
        vec![ValueInfo::tensor(
            "logits",
            DataType::Double,
            &[Dim::Fixed(2), Dim::Fixed(3)],
        )],
        vec![],
        vec![],
        20,
    );
    model
        .graph
        .nodes
        .push(node("Tanh", &["logits"], &["predictions"], vec![]));
    let loss_name = loss::mean_squared_error(&mut model, "predictions", "labels").unwrap();
    let logits: Vec<f64> = (0..6).map(|i| f64::from(i) * 0.25 - 0.6).collect();
    let training = gradient_graph(&model, &loss_name, &["logits".to_owned()]).unwrap();
    let feeds = vec![
        (
            "logits".to_owned(),
            host(DataType::Double, &[2, 3], &logits),
        ),
        ("labels".to_owned(), target_tensor),
    ];
    let outputs = session(&training.model).run(&feeds).unwrap();
    let expected: f64 = logits
        .iter()
        .zip(&targets)
        .map(|(l, t)| (l.tanh() - t).powi(2))
        .sum::<f64>()
        / 6.0;
    assert!((scalar_output(&outputs, &loss_name) - expected).abs() < 1e-12);
    let gradient = output(&outputs, "logits_grad").to_f64();
    for (index, analytic) in gradient.into_iter().enumerate() {
        let (l, t) = (logits[index], targets[index]);
        let exact = 2.0 * (l.tanh() - t) * (1.0 - l.tanh().powi(2)) / 6.0;
        assert!(
            (analytic - exact).abs() < 1e-12,
            "d mse/d logits[{index}] = {analytic}, expected {exact}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

fn single_node_model(op_type: &str, domain: &str) -> Model {
    let mut op = node(op_type, &["x"], &["y"], vec![]);
    op.name = "mystery".into();
    op.domain = domain.into();
    let mut model = model_of(
        vec![ValueInfo::tensor(
            "x",
            DataType::Float,
            &[Dim::Fixed(3), Dim::Fixed(3)],
        )],
        vec![],
        vec![
            op,
            node("ReduceSum", &["y"], &["loss"], vec![int("keepdims", 0)]),
        ],
        20,
    );
    if !domain.is_empty() {
        model.opset_imports.push((domain.into(), 1));
    }
    model
}

#[test]
fn an_op_without_a_rule_is_named_in_the_error() {
    let model = single_node_model("Atan", "");
    let error = gradient_graph(&model, "loss", &["x".to_owned()])
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("failed to compute gradient for node \"mystery\" (Atan)")
            && error.contains("no gradient rule"),
        "{error}"
    );
    let model = single_node_model("FusedMatMul", "com.microsoft");
    let error = gradient_graph(&model, "loss", &["x".to_owned()])
        .unwrap_err()
        .to_string();
    assert!(error.contains("(com.microsoft.FusedMatMul)"), "{error}");
}

#[test]
fn an_op_off_the_path_needs_no_rule() {
    let mut model = single_node_model("Atan", "");
    model.graph.inputs.push(ValueInfo::tensor(
        "bias",
        DataType::Float,
        &[Dim::Fixed(3), Dim::Fixed(3)],
    ));
    model
        .graph
        .nodes
        .insert(1, node("Add", &["y", "bias"], &["shifted"], vec![]));
    model.graph.nodes[2].inputs[0] = "shifted".into();
    let training =
        gradient_graph(&model, "loss", &["bias".to_owned()]).expect("Atan is upstream of bias");
    assert_eq!(
        training.gradients,
        vec![("bias".to_owned(), "bias_grad".to_owned())]
    );
    assert!(training
        .model
        .graph
        .nodes
        .iter()
        .all(|n| !n.name.starts_with("mystery_Grad")));
}

#[test]
fn unusable_losses_and_tensors_are_refused() {
    let model = single_node_model("Tanh", "");
    let refuse = |loss: &str, wrt: &[&str]| {
        let wrt: Vec<String> = wrt.iter().map(|w| (*w).to_owned()).collect();
        gradient_graph(&model, loss, &wrt).unwrap_err().to_string()
    };
    assert!(refuse("y", &["x"]).contains("must be a scalar"));
    assert!(refuse("nothing", &["x"]).contains("not a value of the graph"));
    assert!(refuse("loss", &["y"]).contains("not an initializer or a graph input"));
    assert!(refuse("loss", &["x", "x"]).contains("listed twice"));
    let mut old = model.clone();
    old.opset_imports = vec![(String::new(), 13)];
    assert!(gradient_graph(&old, "loss", &["x".to_owned()])
        .unwrap_err()
        .to_string()
        .contains("opset"));
}

#[test]
fn names_follow_onnx_runtime_conventions() {
    let mut model = single_node_model("Tanh", "");
    model
        .graph
        .initializers
        .push(float_tensor("unused", DataType::Float, &[2], &[1.0, 2.0]));
    // A trainable parameter as patches leave it: an initializer also listed as a graph input.
    model.graph.inputs.push(ValueInfo::tensor(
        "unused",
        DataType::Float,
        &[Dim::Fixed(2)],
    ));
    let training = gradient_graph(&model, "loss", &["x".to_owned(), "unused".to_owned()]).unwrap();
    let graph = &training.model.graph;
    assert_eq!(
        graph.inputs.iter().filter(|i| i.name == "unused").count(),
        1
    );
    let outputs: Vec<&str> = graph.outputs.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(outputs, ["loss", "x_grad", "unused_grad"]);
    assert!(graph.inputs.iter().any(|i| i.name == "unused"));
    assert!(graph.initializer("unused").is_none());
    assert!(graph
        .nodes
        .iter()
        .any(|n| n.name.starts_with("mystery_Grad/")));
    assert!(graph.nodes.iter().all(|n| n.domain.is_empty()));
    let outputs = session(&training.model)
        .run(&[
            ("x".to_owned(), host(DataType::Float, &[3, 3], &[0.5; 9])),
            (
                "unused".to_owned(),
                host(DataType::Float, &[2], &[1.0, 2.0]),
            ),
        ])
        .unwrap();
    assert_eq!(output(&outputs, "unused_grad").to_f64(), vec![0.0, 0.0]);
}

/// Dropout in training mode draws a new mask each run, so instead of finite differences: the
/// gradient must be the loss weight where the mask kept an element and zero elsewhere, scaled by
/// 1/(1 − ratio), and since the loss is linear in x it must equal Σ x·x_grad.
#[test]
fn dropout_in_training_mode_uses_its_mask() {
    let ratio = 0.25;
    let count = 64;
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let weights: Vec<f64> = (0..count).map(|_| rng.gen_range(0.5..1.5)).collect();
    let x: Vec<f64> = (0..count).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let mut model = model_of(
        vec![ValueInfo::tensor(
            "x",
            DataType::Float,
            &[Dim::Fixed(count as i64)],
        )],
        vec![
            float_tensor("ratio", DataType::Float, &[], &[ratio]),
            bools("training", &[], &[true]),
            float_tensor("weight", DataType::Float, &[count], &weights),
        ],
        vec![
            node(
                "Dropout",
                &["x", "ratio", "training"],
                &["dropped", "mask"],
                vec![],
            ),
            node("Mul", &["dropped", "weight"], &["terms"], vec![]),
            node("ReduceSum", &["terms"], &["loss"], vec![int("keepdims", 0)]),
        ],
        20,
    );
    model.graph.outputs = vec![ValueInfo::tensor("loss", DataType::Float, &[])];
    let training = gradient_graph(&model, "loss", &["x".to_owned()]).unwrap();
    let outputs = session(&training.model)
        .run(&[("x".to_owned(), host(DataType::Float, &[count], &x))])
        .unwrap();
    let gradient = output(&outputs, "x_grad").to_f64();
    let mut kept = 0;
    for (g, w) in gradient.iter().zip(&weights) {
        let scaled = w / (1.0 - ratio);
        assert!(
            g.abs() < 1e-7 || (g - scaled).abs() < 1e-5,
            "x_grad {g}, weight {w}"
        );
        kept += usize::from(g.abs() >= 1e-7);
    }
    assert!(kept > 0 && kept < count, "the mask kept {kept} of {count}");
    let linear: f64 = x.iter().zip(&gradient).map(|(x, g)| x * g).sum();
    let loss = scalar_output(&outputs, "loss");
    assert!(
        (loss - linear).abs() < 1e-4,
        "loss {loss}, Σ x·x_grad {linear}"
    );
}

// ---------------------------------------------------------------------------------------------
// Whole fixtures
// ---------------------------------------------------------------------------------------------

/// The first `count` MatMul weights: 2-D float initializers read as a MatMul's second input.
fn first_matmul_weights(model: &Model, count: usize) -> Vec<String> {
    let mut weights: Vec<String> = Vec::new();
    for node in model.graph.nodes.iter().filter(|n| n.is("MatMul")) {
        let Some(weight) = node.input(1) else {
            continue;
        };
        let is_matrix = model
            .graph
            .initializer(weight)
            .is_some_and(|t| t.dtype == DataType::Float && t.dims.len() == 2);
        if is_matrix && !weights.iter().any(|w| w == weight) {
            weights.push(weight.to_owned());
        }
        if weights.len() == count {
            break;
        }
    }
    weights
}

/// Float32 fixtures. The loss is summed in double, so its rounding comes from the model's float32
/// outputs (≈ 1e-7 relative each), which a step h turns into noise ≈ 1e-7·Σ|output|/h — an
/// absolute error that scales with the loss, hence with the gradient's magnitude — while
/// truncation grows as h² and a ReLU kink (T5) crossed within ±h costs O(h). The best step thus
/// differs per model and coordinate, so a coordinate passes when the central difference at one
/// of the steps is within 2e-3·max(1, largest sampled difference of the tensor) absolute plus
/// 1e-2 relative. A wrong rule disagrees at every step, since the three steps agree with one
/// another to far better than that.
const FIXTURE_STEPS: [f64; 3] = [1e-2, 3e-3, 1e-3];

const FIXTURE: Precision = Precision {
    step: 1e-2,
    absolute: 2e-3,
    relative: 1e-2,
};

/// Appends a loss to a fixture and returns its name with the extra inputs it needs.
type AddLoss<'a> = &'a dyn Fn(&mut Model) -> (String, Vec<(String, HostTensor)>);

/// Double-precision fixtures (every float32 tensor, constant and cast widened; ONNX Runtime has
/// double kernels for every op of the LLaMA and T5 exports): the rounding of the forward pass is
/// ≈ 1e-16·|loss|/h ≈ 1e-9 for h = 1e-6 and truncation ≈ h², so differences hold to 1e-6
/// absolute plus 1e-5 relative; a ReLU kink within ±1e-6 of an activation is improbable.
const FIXTURE_DOUBLE: Precision = Precision {
    step: 1e-6,
    absolute: 1e-6,
    relative: 1e-5,
};

/// The model with every float32 initializer, tensor attribute, cast target and graph input or
/// output widened to double.
fn to_double(model: &Model) -> Model {
    let widen = |tensor: &mut onnx_protobuf::TensorProto| {
        if tensor.data_type != DataType::Float.code() {
            return;
        }
        let values: Vec<f64> = if tensor.raw_data.is_empty() {
            tensor.float_data.iter().map(|&v| f64::from(v)).collect()
        } else {
            tensor
                .raw_data
                .chunks_exact(4)
                .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                .collect()
        };
        tensor.float_data.clear();
        tensor.raw_data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        tensor.data_type = DataType::Double.code();
    };
    let mut model = model.clone();
    let graph = &mut model.graph;
    for tensor in &mut graph.initializers {
        if tensor.dtype == DataType::Float {
            let values: Vec<f64> = tensor
                .to_f32()
                .unwrap()
                .into_iter()
                .map(f64::from)
                .collect();
            let dims: Vec<usize> = tensor.dims.iter().map(|&d| d as usize).collect();
            *tensor = float_tensor(&tensor.name, DataType::Double, &dims, &values);
        }
    }
    for node in &mut graph.nodes {
        for attribute in &mut node.attributes {
            if attribute.name == "to" && attribute.i == i64::from(DataType::Float.code()) {
                attribute.i = i64::from(DataType::Double.code());
            }
            if let Some(tensor) = attribute.t.as_mut() {
                widen(tensor);
            }
        }
    }
    for info in graph.inputs.iter_mut().chain(graph.outputs.iter_mut()) {
        if let Some(onnx_protobuf::type_proto::Value::TensorType(tensor)) =
            info.proto.type_.as_mut().and_then(|t| t.value.as_mut())
        {
            if tensor.elem_type == DataType::Float.code() {
                tensor.elem_type = DataType::Double.code();
            }
        }
    }
    graph.value_infos.clear();
    model
}

/// Fails the test with every mismatch listed.
fn assert_no_failures(failures: &[String]) {
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Differentiates `fixture` (widened to double when `dtype` is double) with respect to `wrt` and
/// compares `samples` coordinates of each gradient with central differences. The loss is the
/// first output's weighted sum, or what `add_loss` appends (returning the loss name and the
/// extra feeds).
fn check_fixture(
    fixture: &str,
    dtype: DataType,
    wrt: &[String],
    samples: usize,
    add_loss: Option<AddLoss>,
) -> Vec<String> {
    let mut model = graft::onnx::load(&fixture_model(fixture)).unwrap();
    if dtype == DataType::Double {
        model = to_double(&model);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed_of(fixture));
    let mut feeds: Vec<(String, HostTensor)> = fixture_inputs(fixture)
        .into_iter()
        .filter(|(name, _)| model.graph.inputs.iter().any(|i| &i.name == name))
        .map(|(name, tensor)| match tensor {
            HostTensor::F32(values) if dtype == DataType::Double => {
                (name, HostTensor::F64(values.mapv(f64::from)))
            }
            other => (name, other),
        })
        .collect();
    let loss_name = match add_loss {
        Some(add) => {
            let (name, extra) = add(&mut model);
            feeds.extend(extra);
            name
        }
        None => {
            let first = model.graph.outputs[0].name.clone();
            let outputs = run_model(&model, &feeds);
            let value = output(&outputs, &first);
            let (shape, output_dtype) = (value.shape().to_vec(), dtype_of(value));
            append_weighted_sum(&mut model, &first, &shape, output_dtype, &mut rng);
            "loss".to_owned()
        }
    };
    let tensors: Vec<(String, Vec<f64>, Vec<usize>)> = wrt
        .iter()
        .map(|name| {
            let tensor = model
                .graph
                .initializer(name)
                .unwrap_or_else(|| panic!("{fixture}: no initializer {name}"));
            let values = tensor
                .raw_bytes()
                .unwrap()
                .chunks_exact(if dtype == DataType::Double { 8 } else { 4 })
                .map(|c| match c.len() {
                    8 => f64::from_le_bytes(c.try_into().unwrap()),
                    _ => f64::from(f32::from_le_bytes(c.try_into().unwrap())),
                })
                .collect();
            let shape = tensor.dims.iter().map(|&d| d as usize).collect();
            (name.clone(), values, shape)
        })
        .collect();
    let training =
        gradient_graph(&model, &loss_name, wrt).unwrap_or_else(|e| panic!("{fixture}: {e}"));
    for (name, values, shape) in &tensors {
        feeds.push((name.clone(), host(dtype, shape, values)));
    }
    let outputs = session(&training.model)
        .run(&feeds)
        .unwrap_or_else(|e| panic!("{fixture}: training graph: {e}"));
    let mut forward = session(&forward_only(&training));
    let steps: &[f64] = if dtype == DataType::Double {
        &[FIXTURE_DOUBLE.step]
    } else {
        &FIXTURE_STEPS
    };
    let base = if dtype == DataType::Double {
        FIXTURE_DOUBLE
    } else {
        FIXTURE
    };
    let mut failures = Vec::new();
    for (name, values, shape) in &tensors {
        let gradient = output(&outputs, &format!("{name}_grad")).to_f64();
        assert_eq!(gradient.len(), values.len());
        assert!(
            gradient.iter().all(|g| g.is_finite()),
            "{fixture}: {name}_grad is not finite"
        );
        let mut sampled: Vec<(usize, Vec<f64>)> = Vec::new();
        for _ in 0..samples {
            let index = rng.gen_range(0..values.len());
            let numeric: Vec<f64> = steps
                .iter()
                .map(|&step| {
                    let fed = Fed {
                        name,
                        values,
                        shape,
                        dtype,
                    };
                    central_difference(&mut forward, &feeds, &fed, index, step)
                })
                .collect();
            sampled.push((index, numeric));
        }
        let scale = sampled
            .iter()
            .flat_map(|(_, numeric)| numeric.iter().map(|n| n.abs()))
            .fold(1.0, f64::max);
        let precision = Precision {
            absolute: base.absolute * scale,
            ..base
        };
        for (index, numeric) in sampled {
            if !numeric
                .iter()
                .any(|&n| within(gradient[index], n, &precision))
            {
                failures.push(format!(
                    "{fixture} ({dtype}): d loss/d {name}[{index}] = {} by the graph, {numeric:?} \
                     by finite differences with steps {steps:?}",
                    gradient[index]
                ));
            }
        }
    }
    failures
}

#[test]
fn fixture_gradients_match_finite_differences() {
    let mut failures = Vec::new();
    for fixture in ["bert-legacy", "llama-dynamo", "t5-legacy", "clip-legacy"] {
        let model = graft::onnx::load(&fixture_model(fixture)).unwrap();
        let wrt = first_matmul_weights(&model, 2);
        assert_eq!(wrt.len(), 2, "{fixture}: MatMul weights");
        failures.extend(check_fixture(fixture, DataType::Float, &wrt, 10, None));
    }
    assert_no_failures(&failures);
}

#[test]
fn fixture_gradients_match_finite_differences_in_double() {
    let mut failures = Vec::new();
    for fixture in ["llama-dynamo", "t5-legacy"] {
        let model = graft::onnx::load(&fixture_model(fixture)).unwrap();
        let wrt = first_matmul_weights(&model, 2);
        failures.extend(check_fixture(fixture, DataType::Double, &wrt, 10, None));
    }
    assert_no_failures(&failures);
}

#[test]
fn fixture_losses_differentiate_through_the_model() {
    let bert_labels = |model: &mut Model| {
        let name = loss::cross_entropy(model, "logits", "labels", loss::IGNORE_INDEX).unwrap();
        (name, vec![("labels".to_owned(), labels(&[2], &[1, 0]))])
    };
    let llama_labels = |model: &mut Model| {
        let name = loss::causal_lm(model, "logits", "labels").unwrap();
        let inputs = fixture_inputs("llama-dynamo");
        let ids = output(&inputs, "input_ids").clone();
        (name, vec![("labels".to_owned(), ids)])
    };
    let mut failures = Vec::new();
    for (fixture, add) in [
        ("bert-legacy", &bert_labels as AddLoss),
        ("llama-dynamo", &llama_labels),
    ] {
        let model = graft::onnx::load(&fixture_model(fixture)).unwrap();
        let wrt = first_matmul_weights(&model, 2);
        failures.extend(check_fixture(fixture, DataType::Float, &wrt, 6, Some(add)));
    }
    assert_no_failures(&failures);
}

/// Every float parameter of every fixture at once: exercises every op on every differentiable
/// path of the real exports (embeddings, rotary slices, GQA expands, patch convolutions, pooling
/// gathers), runs in ONNX Runtime, and spot-checks a few coordinates.
#[test]
fn every_fixture_differentiates_with_respect_to_all_parameters() {
    let mut failures = Vec::new();
    for fixture in FIXTURES {
        let model = graft::onnx::load(&fixture_model(fixture)).unwrap();
        let mut parameters: Vec<String> = model
            .graph
            .initializers
            .iter()
            .filter(|t| t.dtype == DataType::Float && !t.dims.is_empty() && t.n_elements() > 1)
            .map(|t| t.name.clone())
            .collect();
        parameters.sort();
        let mut rng = ChaCha8Rng::seed_from_u64(seed_of(fixture));
        failures.extend(check_fixture(
            fixture,
            DataType::Float,
            &parameters,
            0,
            None,
        ));
        let mut distinct: Vec<String> = (0..3)
            .map(|_| parameters[rng.gen_range(0..parameters.len())].clone())
            .collect();
        distinct.sort();
        distinct.dedup();
        failures.extend(check_fixture(fixture, DataType::Float, &distinct, 2, None));
    }
    assert_no_failures(&failures);
}
