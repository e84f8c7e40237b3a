//! The second runtime: tract, a pure-Rust ONNX engine, behind the same [`HostTensor`] interface
//! as ONNX Runtime, so that exported graphs can be shown to run outside ONNX Runtime.

use std::path::Path;

use tract_onnx::prelude::*;

use super::HostTensor;
use crate::{Error, Result};

type Plan = Arc<TypedRunnableModel>;

/// A model loaded into tract, ready to run.
///
/// tract plans are specialised to concrete shapes: the graph is parsed once, and each run whose
/// input shapes differ from the previous run's fixes every input's element type and shape,
/// infers the rest of the graph from them and optimises a new plan (the last plan is kept for
/// runs with the same shapes). The value types the file declares for intermediate values and
/// outputs are not used, since their symbolic dimensions are what the inputs now determine.
pub struct TractSession {
    model: InferenceModel,
    /// The graph's input names, in order (initializers listed as inputs are constants in tract
    /// and are not among them).
    pub input_names: Vec<String>,
    /// The graph's output names, in order.
    pub output_names: Vec<String>,
    cached: Option<(Vec<Vec<usize>>, Plan)>,
}

fn tract_error(context: impl std::fmt::Display) -> impl Fn(TractError) -> Error {
    move |e| Error::Tract(format!("{context}: {e:#}"))
}

fn parser() -> tract_onnx::Onnx {
    tract_onnx::onnx()
        .with_ignore_value_info(true)
        .with_ignore_output_shapes(true)
}

impl TractSession {
    /// Parses a serialized model (all tensor data inline).
    pub fn from_bytes(model_bytes: &[u8]) -> Result<Self> {
        let model = parser()
            .model_for_read(&mut &model_bytes[..])
            .map_err(tract_error("cannot load the model"))?;
        Self::new(model)
    }

    /// Parses a model file (external data is resolved next to it).
    pub fn from_file(path: &Path) -> Result<Self> {
        let model = parser()
            .model_for_path(path)
            .map_err(tract_error(format_args!("cannot load {}", path.display())))?;
        Self::new(model)
    }

    fn new(model: InferenceModel) -> Result<Self> {
        let input_names = model
            .input_outlets()
            .map_err(tract_error("graph inputs"))?
            .iter()
            .map(|o| model.node(o.node).name.clone())
            .collect();
        let output_names = model
            .output_outlets()
            .map_err(tract_error("graph outputs"))?
            .iter()
            .map(|outlet| {
                model
                    .outlet_label(*outlet)
                    .map(str::to_owned)
                    .unwrap_or_else(|| model.node(outlet.node).name.clone())
            })
            .collect();
        Ok(TractSession {
            model,
            input_names,
            output_names,
            cached: None,
        })
    }

    /// Runs the model on named inputs (every graph input must be given; extra names are an
    /// error) and returns every output, in graph order.
    pub fn run(&mut self, inputs: &[(String, HostTensor)]) -> Result<Vec<(String, HostTensor)>> {
        if let Some((name, _)) = inputs
            .iter()
            .find(|(name, _)| !self.input_names.contains(name))
        {
            return Err(Error::Tract(format!(
                "the model has no input {name:?} (its inputs: {})",
                self.input_names.join(", ")
            )));
        }
        let mut ordered = Vec::with_capacity(self.input_names.len());
        for name in &self.input_names {
            let (_, tensor) = inputs
                .iter()
                .find(|(n, _)| n == name)
                .ok_or_else(|| Error::Tract(format!("input {name:?} was not given")))?;
            ordered.push(tensor);
        }
        let shapes: Vec<Vec<usize>> = ordered.iter().map(|t| t.shape().to_vec()).collect();
        let plan = match &self.cached {
            Some((cached_shapes, plan)) if *cached_shapes == shapes => plan.clone(),
            _ => {
                let plan = self.plan_for(&ordered)?;
                self.cached = Some((shapes, plan.clone()));
                plan
            }
        };
        let values: TVec<TValue> = ordered.iter().map(|t| to_tract(t).into()).collect();
        let outputs = plan.run(values).map_err(tract_error("run failed"))?;
        self.output_names
            .iter()
            .zip(outputs.iter())
            .map(|(name, value)| Ok((name.clone(), from_tract(name, value)?)))
            .collect()
    }

    /// Fixes every input's element type and shape and optimises the graph for them.
    fn plan_for(&self, inputs: &[&HostTensor]) -> Result<Plan> {
        let mut model = self.model.clone();
        for (index, (tensor, name)) in inputs.iter().zip(&self.input_names).enumerate() {
            let declared = model
                .input_fact(index)
                .map_err(tract_error(format_args!("input {name:?}")))?
                .datum_type();
            if declared.is_some_and(|d| d != datum_type(tensor)) {
                return Err(Error::Tract(format!(
                    "input {name:?} is {:?}, the model declares {:?}",
                    datum_type(tensor),
                    declared.unwrap_or(DatumType::F32)
                )));
            }
            let fact = InferenceFact::dt_shape(datum_type(tensor), tensor.shape());
            model
                .set_input_fact(index, fact)
                .map_err(tract_error(format_args!("input {name:?}")))?;
        }
        model
            .into_optimized()
            .map_err(tract_error("cannot prepare the model"))?
            .into_runnable()
            .map_err(tract_error("cannot plan the model"))
    }
}

fn datum_type(tensor: &HostTensor) -> DatumType {
    match tensor {
        HostTensor::F32(_) => DatumType::F32,
        HostTensor::F64(_) => DatumType::F64,
        HostTensor::I64(_) => DatumType::I64,
        HostTensor::I32(_) => DatumType::I32,
        HostTensor::Bool(_) => DatumType::Bool,
    }
}

fn to_tract(tensor: &HostTensor) -> Tensor {
    match tensor {
        HostTensor::F32(a) => a.clone().into(),
        HostTensor::F64(a) => a.clone().into(),
        HostTensor::I64(a) => a.clone().into(),
        HostTensor::I32(a) => a.clone().into(),
        HostTensor::Bool(a) => a.clone().into(),
    }
}

fn from_tract(name: &str, value: &TValue) -> Result<HostTensor> {
    let fail = tract_error(format!("output {name:?}"));
    Ok(match value.datum_type() {
        DatumType::F32 => HostTensor::F32(
            value
                .to_plain_array_view::<f32>()
                .map_err(&fail)?
                .to_owned(),
        ),
        DatumType::F64 => HostTensor::F64(
            value
                .to_plain_array_view::<f64>()
                .map_err(&fail)?
                .to_owned(),
        ),
        DatumType::I64 => HostTensor::I64(
            value
                .to_plain_array_view::<i64>()
                .map_err(&fail)?
                .to_owned(),
        ),
        DatumType::I32 => HostTensor::I32(
            value
                .to_plain_array_view::<i32>()
                .map_err(&fail)?
                .to_owned(),
        ),
        DatumType::Bool => HostTensor::Bool(
            value
                .to_plain_array_view::<bool>()
                .map_err(&fail)?
                .to_owned(),
        ),
        other => {
            return Err(Error::Tract(format!(
                "output {name:?} has element type {other:?}, which graft does not read back"
            )))
        }
    })
}
