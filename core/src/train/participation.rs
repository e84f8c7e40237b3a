//! How grafted methods take part in a run (SDK ABI 2): the inputs the host feeds them at every
//! step, their step hooks, and the state both keep between steps, which checkpoints carry so
//! that `--resume` continues bit for bit.
//!
//! The trainer sees plugins only through [`StepHooks`]: the CLI passes an implementation backed
//! by loaded plugin libraries, and nothing here knows how a plugin is reached.

use std::collections::BTreeMap;

use graft_plugin_sdk::{
    AppliedMethod, DType, GraftRecord, HostArray, HostInput, HostInputKind, StepReply, StepRequest,
};
use ndarray::{ArrayD, IxDyn};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::parameters::ParameterStore;
use crate::ir::{DataType, Model};
use crate::runtime::HostTensor;
use crate::{Error, Result};

/// Calls a method's step hook; implemented by the plugin host.
pub trait StepHooks {
    /// Sends `request` to the plugin that provided `method` and returns its reply.
    fn step(&self, method: &AppliedMethod, request: &StepRequest) -> Result<StepReply>;
}

/// For runs whose methods have no step hooks: any call is an error naming the method.
pub struct NoStepHooks;

impl StepHooks for NoStepHooks {
    fn step(&self, method: &AppliedMethod, _request: &StepRequest) -> Result<StepReply> {
        Err(Error::Config(format!(
            "method {} (plugin {}) has a step hook, but no plugins were loaded for this run",
            method.method, method.plugin
        )))
    }
}

/// One host-fed input and its current value.
struct FedInput {
    input: HostInput,
    /// The value a [`HostInputKind::Value`] input holds now (its default at first).
    current: HostArray,
}

/// The state of one method's step hook between steps.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct HookState {
    method: String,
    state: serde_json::Value,
    /// Shapes of the state tensors; their values travel in the checkpoint's tensor file.
    shapes: BTreeMap<String, Vec<usize>>,
    #[serde(skip)]
    tensors: BTreeMap<String, HostArray>,
}

/// The host's side of method participation in one run.
pub struct Participation {
    methods: Vec<AppliedMethod>,
    inputs: Vec<FedInput>,
    hooks: Vec<HookState>,
    seed: u64,
}

/// What a step hook pass reports for `metrics.jsonl`.
pub type HookMetrics = BTreeMap<String, f64>;

/// Named float32 tensors with their shapes, as a checkpoint stores them.
pub type NamedTensors = Vec<(String, Vec<usize>, Vec<f32>)>;

impl Participation {
    /// Collects the host inputs and step hooks that `record`'s `trained` methods declared
    /// (host inputs of every method are fed; only trained methods' hooks run), with their
    /// defaults from `model`.
    pub fn new(model: &Model, record: &GraftRecord, trained: &[&str], seed: u64) -> Result<Self> {
        let mut inputs = Vec::new();
        for input in record.methods.iter().flat_map(|m| &m.training.host_inputs) {
            let tensor = model
                .graph
                .initializer(&input.name)
                .ok_or_else(|| Error::Tensor {
                    name: input.name.clone(),
                    reason: "host input missing from the model".into(),
                })?;
            let shape = tensor.dims.iter().map(|&d| d as usize).collect();
            let data = numeric_values(tensor)?;
            inputs.push(FedInput {
                input: input.clone(),
                current: HostArray::new(shape, data).map_err(|e| Error::Tensor {
                    name: input.name.clone(),
                    reason: e.to_string(),
                })?,
            });
        }
        let methods: Vec<AppliedMethod> = record
            .methods
            .iter()
            .filter(|m| trained.contains(&m.method.as_str()))
            .cloned()
            .collect();
        let hooks = methods
            .iter()
            .filter_map(|m| {
                m.training.step_hook.as_ref().map(|hook| HookState {
                    method: m.method.clone(),
                    state: hook.state.clone(),
                    ..HookState::default()
                })
            })
            .collect();
        Ok(Participation {
            methods,
            inputs,
            hooks,
            seed,
        })
    }

    /// The names of the host-fed inputs, which the training and evaluation graphs take as
    /// plain graph inputs.
    pub fn input_names(&self) -> Vec<String> {
        self.inputs.iter().map(|f| f.input.name.clone()).collect()
    }

    /// Errors unless `name` is a host input of kind [`HostInputKind::Value`], naming the ones
    /// there are.
    pub fn check_value_input(&self, name: &str) -> Result<()> {
        let values: Vec<&str> = self
            .inputs
            .iter()
            .filter(|f| f.input.kind == HostInputKind::Value)
            .map(|f| f.input.name.as_str())
            .collect();
        if values.contains(&name) {
            return Ok(());
        }
        Err(Error::Config(format!(
            "{name} is not a value input of the model's methods; they are: {}",
            if values.is_empty() {
                "none".to_owned()
            } else {
                values.join(", ")
            }
        )))
    }

    /// The feeds of the host inputs for micro-batch `micro` of step `step` (1-based) of
    /// `total_steps`, in a training graph or (with `training` false) an evaluation graph.
    pub fn feeds(
        &self,
        training: bool,
        step: u64,
        total_steps: u64,
        micro: usize,
    ) -> Result<Vec<(String, HostTensor)>> {
        self.inputs
            .iter()
            .map(|fed| {
                let input = &fed.input;
                let count: usize = input.shape.iter().product();
                let values: Vec<f64> = match input.kind {
                    HostInputKind::TrainingMode => vec![f64::from(u8::from(training))],
                    HostInputKind::Step => vec![step as f64],
                    HostInputKind::Progress => {
                        vec![step.saturating_sub(1) as f64 / total_steps.max(1) as f64]
                    }
                    HostInputKind::Uniform => {
                        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(mix(&[
                            self.seed,
                            step,
                            micro as u64,
                            name_hash(&input.name),
                        ]));
                        (0..count).map(|_| rng.gen::<f64>()).collect()
                    }
                    HostInputKind::Value => fed.current.data.iter().map(|&v| v as f64).collect(),
                };
                Ok((input.name.clone(), host_tensor(input, values)?))
            })
            .collect()
    }

    /// Runs the trained methods' step hooks after optimizer step `step`: each sees its
    /// tensors' values (from `store` for the trained tensors, else from `model`) and
    /// gradients, and may set trained tensors (in `store`) and its value inputs.
    /// Returns the hooks' metrics keyed `<method>.<name>`.
    #[allow(clippy::too_many_arguments)]
    pub fn after_step(
        &mut self,
        hooks: &dyn StepHooks,
        model: &Model,
        step: u64,
        total_steps: u64,
        store: &mut ParameterStore,
        gradients: &[Vec<f32>],
    ) -> Result<HookMetrics> {
        let mut metrics = HookMetrics::new();
        for hook_index in 0..self.hooks.len() {
            let method_name = self.hooks[hook_index].method.clone();
            let method = self
                .methods
                .iter()
                .find(|m| m.method == method_name)
                .cloned()
                .unwrap_or_default();
            let wanted = method
                .training
                .step_hook
                .as_ref()
                .map(|h| h.tensors.clone())
                .unwrap_or_default();
            let mut request = StepRequest {
                method: method.method.clone(),
                config: method.config.clone(),
                step,
                total_steps,
                seed: mix(&[self.seed, step, name_hash(&method.method)]),
                state: self.hooks[hook_index].state.clone(),
                state_tensors: std::mem::take(&mut self.hooks[hook_index].tensors),
                ..StepRequest::default()
            };
            for tensor in &wanted {
                if let Some(index) = store.position(tensor) {
                    let shape = store.shape(index);
                    request.values.insert(
                        tensor.clone(),
                        HostArray {
                            shape: shape.clone(),
                            data: store.values[index].clone(),
                        },
                    );
                    request.gradients.insert(
                        tensor.clone(),
                        HostArray {
                            shape,
                            data: gradients[index].clone(),
                        },
                    );
                } else if let Some(initializer) = model.graph.initializer(tensor) {
                    let shape = initializer.dims.iter().map(|&d| d as usize).collect();
                    request.values.insert(
                        tensor.clone(),
                        HostArray {
                            shape,
                            data: initializer.float_values()?,
                        },
                    );
                }
            }
            for fed in self.inputs.iter().filter(|f| {
                f.input.kind == HostInputKind::Value
                    && method
                        .training
                        .host_inputs
                        .iter()
                        .any(|i| i.name == f.input.name)
            }) {
                request
                    .values
                    .insert(fed.input.name.clone(), fed.current.clone());
            }
            let reply = hooks.step(&method, &request)?;
            let refuse = |name: &str, reason: String| Error::Plugin {
                plugin: method.plugin.clone(),
                reason: format!(
                    "the step hook of method {} set {name:?}: {reason}",
                    method.method
                ),
            };
            for (name, array) in &reply.set {
                if let Some(index) = store.position(name) {
                    if array.data.len() != store.values[index].len() {
                        return Err(refuse(
                            name,
                            format!(
                                "{} values for a tensor of {}",
                                array.data.len(),
                                store.values[index].len()
                            ),
                        ));
                    }
                    store.values[index].clone_from(&array.data);
                } else if let Some(fed) = self
                    .inputs
                    .iter_mut()
                    .find(|f| &f.input.name == name && f.input.kind == HostInputKind::Value)
                {
                    if array.data.len() != fed.current.data.len() {
                        return Err(refuse(
                            name,
                            format!(
                                "{} values for an input of {}",
                                array.data.len(),
                                fed.current.data.len()
                            ),
                        ));
                    }
                    fed.current.data.clone_from(&array.data);
                } else {
                    return Err(refuse(
                        name,
                        "it is neither a tensor trained in this run nor a value input".into(),
                    ));
                }
            }
            let hook = &mut self.hooks[hook_index];
            hook.state = reply.state;
            hook.tensors = reply.state_tensors;
            hook.shapes = hook
                .tensors
                .iter()
                .map(|(k, v)| (k.clone(), v.shape.clone()))
                .collect();
            for (key, value) in reply.metrics {
                metrics.insert(format!("{}.{key}", method.method), value);
            }
        }
        Ok(metrics)
    }

    /// The state to checkpoint: JSON (hook states and shapes) and the tensors (hook state
    /// tensors and the current value inputs), which the checkpoint stores bit for bit.
    pub fn snapshot(&self) -> (serde_json::Value, NamedTensors) {
        let mut tensors = Vec::new();
        for (index, hook) in self.hooks.iter().enumerate() {
            for (key, array) in &hook.tensors {
                tensors.push((
                    format!("hook{index}.{key}"),
                    array.shape.clone(),
                    array.data.clone(),
                ));
            }
        }
        for fed in self
            .inputs
            .iter()
            .filter(|f| f.input.kind == HostInputKind::Value)
        {
            tensors.push((
                format!("input.{}", fed.input.name),
                fed.current.shape.clone(),
                fed.current.data.clone(),
            ));
        }
        let json = serde_json::to_value(&self.hooks).unwrap_or_default();
        (json, tensors)
    }

    /// Restores what [`Participation::snapshot`] gave; `tensors` are by name, in any order.
    pub fn restore(
        &mut self,
        json: &serde_json::Value,
        tensors: &[(String, Vec<f32>)],
    ) -> Result<()> {
        let corrupt = |reason: String| Error::Config(format!("checkpoint: {reason}"));
        if json.is_null() && self.hooks.is_empty() {
            return Ok(());
        }
        let mut hooks: Vec<HookState> = serde_json::from_value(json.clone())
            .map_err(|e| corrupt(format!("the step-hook state is unreadable: {e}")))?;
        if hooks
            .iter()
            .map(|h| &h.method)
            .ne(self.hooks.iter().map(|h| &h.method))
        {
            return Err(corrupt(
                "it was written by a run with other step hooks".into(),
            ));
        }
        let find = |key: &str| tensors.iter().find(|(k, _)| k == key).map(|(_, v)| v);
        for (index, hook) in hooks.iter_mut().enumerate() {
            for (key, shape) in &hook.shapes {
                let data = find(&format!("hook{index}.{key}"))
                    .ok_or_else(|| corrupt(format!("step-hook tensor {key:?} is missing")))?;
                let array = HostArray::new(shape.clone(), data.clone())
                    .map_err(|e| corrupt(e.to_string()))?;
                hook.tensors.insert(key.clone(), array);
            }
        }
        self.hooks = hooks;
        for fed in self
            .inputs
            .iter_mut()
            .filter(|f| f.input.kind == HostInputKind::Value)
        {
            let data = find(&format!("input.{}", fed.input.name)).ok_or_else(|| {
                corrupt(format!(
                    "the value of input {:?} is missing",
                    fed.input.name
                ))
            })?;
            fed.current.data.clone_from(data);
        }
        Ok(())
    }

    /// Stores the current values of the value inputs in `model` (the trained model), in each
    /// input's element type, so that its exported graph runs with them.
    pub fn write_value_inputs(&self, model: &mut Model) -> Result<()> {
        for fed in self
            .inputs
            .iter()
            .filter(|f| f.input.kind == HostInputKind::Value)
        {
            let Some(tensor) = model.graph.initializer_mut(&fed.input.name) else {
                continue;
            };
            let dims = tensor.dims.clone();
            let values = &fed.current.data;
            match tensor.dtype {
                DataType::Int64 => {
                    let bytes = values
                        .iter()
                        .flat_map(|&v| (v as i64).to_le_bytes())
                        .collect();
                    *tensor =
                        crate::ir::Tensor::from_raw(&fed.input.name, DataType::Int64, dims, bytes);
                }
                DataType::Bool => {
                    let bytes = values.iter().map(|&v| u8::from(v != 0.0)).collect();
                    *tensor =
                        crate::ir::Tensor::from_raw(&fed.input.name, DataType::Bool, dims, bytes);
                }
                _ => tensor.set_float_values(dims, values)?,
            }
        }
        Ok(())
    }
}

/// A host input's stored values as f32: float types decoded, int64 and bool converted.
fn numeric_values(tensor: &crate::ir::Tensor) -> Result<Vec<f32>> {
    match tensor.dtype {
        DataType::Int64 => Ok(tensor
            .raw_bytes()?
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32)
            .collect()),
        DataType::Bool => Ok(tensor.raw_bytes()?.iter().map(|&b| f32::from(b)).collect()),
        _ => tensor.float_values(),
    }
}

fn host_tensor(input: &HostInput, values: Vec<f64>) -> Result<HostTensor> {
    let shape = IxDyn(&input.shape);
    let wrong = |e: ndarray::ShapeError| Error::Tensor {
        name: input.name.clone(),
        reason: e.to_string(),
    };
    Ok(match input.dtype {
        DType::Float => HostTensor::F32(
            ArrayD::from_shape_vec(shape, values.iter().map(|&v| v as f32).collect())
                .map_err(wrong)?,
        ),
        DType::Double => HostTensor::F64(ArrayD::from_shape_vec(shape, values).map_err(wrong)?),
        DType::Int64 => HostTensor::I64(
            ArrayD::from_shape_vec(shape, values.iter().map(|&v| v as i64).collect())
                .map_err(wrong)?,
        ),
        DType::Bool => HostTensor::Bool(
            ArrayD::from_shape_vec(shape, values.iter().map(|&v| v != 0.0).collect())
                .map_err(wrong)?,
        ),
        other => {
            return Err(Error::Tensor {
                name: input.name.clone(),
                reason: format!(
                    "host inputs of type {} are not fed yet (float, double, int64, bool)",
                    other.name()
                ),
            })
        }
    })
}

/// A seed mixed from several words (splitmix64 steps), so that nearby words give unrelated
/// streams.
pub(crate) fn mix(words: &[u64]) -> u64 {
    let mut z = 0x9E37_79B9_7F4A_7C15u64;
    for &w in words {
        z = (z ^ w).wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
    }
    z
}

/// FNV-1a of a name: stable across runs and platforms.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
