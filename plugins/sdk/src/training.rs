//! How a method takes part in training (ABI version 2): loss terms, host-fed inputs, and the
//! step hook with its request and reply.
//!
//! A patch declares these next to its graph edits; the core records them in the model's
//! `graft.record`, so that `graft train` (a later process) knows them without asking the
//! plugin again. Only the step hook calls the plugin during training.

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::patch::Init;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// What a method contributes to training and to PEFT files beside its graph edits: part of
/// its [`crate::Patch`] and, once applied, of its [`crate::AppliedMethod`] record.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainingSpec {
    /// Scalars the training graph adds to the task loss (ABI 2).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loss_terms: Vec<LossTerm>,
    /// Inputs the host feeds at every training and evaluation step (ABI 2); outside training
    /// they are overridable initializers holding their defaults.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub host_inputs: Vec<HostInput>,
    /// Asks the host to call the plugin after every optimizer step (ABI 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_hook: Option<StepHook>,
    /// How the method's tensors are written as (and read from) HF PEFT adapter files, for
    /// methods other than LoRA (ABI 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peft: Option<PeftFiles>,
    /// How the method's tensors are written as (and read from) an AdapterHub adapter folder
    /// (`adapter_config.json`, `adapter.safetensors`); its keys are complete, with no prefix
    /// added (ABI 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapterhub: Option<PeftFiles>,
    /// Further AdapterHub folders the method's tensors fill, besides
    /// [`TrainingSpec::adapterhub`]: an AdapterFusion method's fused adapters and its fusion
    /// layer (ABI 2).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub adapterhub_folders: Vec<AdapterHubFolder>,
}

/// What an AdapterHub folder holds, which decides its file names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdapterHubKind {
    /// A bottleneck adapter: `adapter_config.json` and `adapter.safetensors`.
    Adapter,
    /// An AdapterFusion layer: `adapter_fusion_config.json` and
    /// `model_adapter_fusion.safetensors`.
    Fusion,
}

/// One AdapterHub folder that a method's tensors fill.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterHubFolder {
    /// The adapter's name, or the fusion's (`a,b`: the fused adapters' names).
    pub name: String,
    /// What the folder holds.
    pub kind: AdapterHubKind,
    /// The config file's content and the weights' keys, with no prefix added.
    pub files: PeftFiles,
}

impl TrainingSpec {
    /// True when the method contributes nothing beyond its graph edits.
    pub fn is_empty(&self) -> bool {
        self.loss_terms.is_empty()
            && self.host_inputs.is_empty()
            && self.step_hook.is_none()
            && self.peft.is_none()
            && self.adapterhub.is_none()
            && self.adapterhub_folders.is_empty()
    }
}

/// A scalar the training graph adds to the task loss: `loss = task_loss + Σ weight · value`.
/// Its value (unweighted) is logged per step in `metrics.jsonl` under `loss_terms.<name>`.
/// Evaluation graphs score the task loss only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossTerm {
    /// A short label (`"orthogonality"`), unique within the method.
    pub name: String,
    /// The graph value holding the term: a float32 scalar (shape `[]` or `[1]`; it is summed
    /// to `[]`) that the patch computes, usually from its own parameters. The task loss is
    /// float32 too; a term of another type must be cast by the patch.
    pub value: String,
    /// The factor the term is multiplied by before it is added.
    pub weight: f64,
}

/// What the host feeds into a [`HostInput`] at each training or evaluation step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostInputKind {
    /// `true` in training graphs, `false` in evaluation graphs (and, through the default, in
    /// every exported graph). Type `bool`, shape `[]`.
    TrainingMode,
    /// The 1-based optimizer step being computed (the last finished step during evaluation).
    /// A float type or `int64`, shape `[]` or `[1]`.
    Step,
    /// `(step − 1) / total_steps`, in `[0, 1)`: how far the run is. A float type, shape `[]`
    /// or `[1]`.
    Progress,
    /// Fresh draws from U[0, 1) at every micro-batch, from graft's own generator seeded by the
    /// run's seed, the step, the micro-batch and the input's name — the same draws on every
    /// execution provider and after `--resume`. A float type, any fixed shape.
    Uniform,
    /// A value the method's step hook sets (a mask, a gate, a skip switch); it starts at the
    /// input's default and keeps the last value the hook set, which is checkpointed.
    Value,
}

/// A graph input the host feeds at every step and the patch's nodes may read. Outside
/// training (in exported and merged graphs) it is an overridable initializer holding
/// `default`, so an exported graph runs without the host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostInput {
    /// The input's name; new, like a parameter's.
    pub name: String,
    /// What the host feeds.
    pub kind: HostInputKind,
    /// Element type (see [`HostInputKind`] for the types each kind allows).
    pub dtype: DType,
    /// Fixed shape.
    pub shape: Vec<usize>,
    /// The value outside training, and the first value of a [`HostInputKind::Value`]. For
    /// [`HostInputKind::TrainingMode`] it must be [`Init::Zeros`] (false).
    pub default: Init,
}

/// The method asks to be called after every optimizer step (see [`StepRequest`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StepHook {
    /// Tensors whose current values (and gradients, for trainable ones) the hook receives:
    /// the method's own parameters, or anything else the view knows.
    #[serde(default)]
    pub tensors: Vec<String>,
    /// The hook's first state, handed back at the first step (anything the hook needs to know
    /// about the patch, such as which parameters form one module).
    #[serde(default)]
    pub state: Value,
}

/// A tensor at the step hook's boundary: float32 values in row-major order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostArray {
    /// Shape; `[]` for a scalar.
    pub shape: Vec<usize>,
    /// `shape.iter().product()` values.
    pub data: Vec<f32>,
}

impl HostArray {
    /// An array of `shape` holding `data`; errors when the lengths disagree.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<HostArray> {
        let expected: usize = shape.iter().product();
        if expected != data.len() {
            return Err(Error::Frame(format!(
                "an array of shape {shape:?} needs {expected} values, not {}",
                data.len()
            )));
        }
        Ok(HostArray { shape, data })
    }
}

/// What the host tells the step hook after optimizer step `step`. The values are those after
/// the update; the gradients are the ones the update used (averaged over micro-batches,
/// after clipping).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepRequest {
    /// The method's name.
    pub method: String,
    /// The method's recorded config (after defaults), as given to [`crate::Plugin::patch`].
    pub config: Value,
    /// The 1-based optimizer step just finished.
    pub step: u64,
    /// The run's total optimizer steps.
    pub total_steps: u64,
    /// A seed for any random choice the hook makes at this step, derived from the run's seed
    /// and the step, so that a resumed run makes the same choices.
    pub seed: u64,
    /// The state the hook returned at the previous step ([`StepHook::state`] at the first).
    pub state: Value,
    /// Tensors of the state the hook returned at the previous step.
    pub state_tensors: BTreeMap<String, HostArray>,
    /// Current values of the [`StepHook::tensors`] and of the method's host inputs.
    pub values: BTreeMap<String, HostArray>,
    /// Gradients of those tensors that are trained in this run.
    pub gradients: BTreeMap<String, HostArray>,
}

/// The step hook's answer: its next state and the values to set before the next step.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepReply {
    /// The state handed back at the next step; checkpointed with the run.
    pub state: Value,
    /// Tensors of that state; checkpointed bit for bit.
    pub state_tensors: BTreeMap<String, HostArray>,
    /// New values, by name, for [`StepHook::tensors`] (a trainable tensor changed here keeps
    /// its optimizer state) and for the method's [`HostInputKind::Value`] inputs.
    pub set: BTreeMap<String, HostArray>,
    /// Figures logged in `metrics.jsonl` under `plugin.<method>.<name>`.
    pub metrics: BTreeMap<String, f64>,
}

#[derive(Serialize, Deserialize)]
struct StepRequestJson {
    method: String,
    #[serde(default)]
    config: Value,
    step: u64,
    total_steps: u64,
    seed: u64,
    #[serde(default)]
    state: Value,
}

#[derive(Serialize, Deserialize)]
struct StepReplyJson {
    #[serde(default)]
    state: Value,
    #[serde(default)]
    metrics: BTreeMap<String, f64>,
}

const VALUE: &str = "value/";
const GRADIENT: &str = "grad/";
const STATE: &str = "state/";
const SET: &str = "set/";

impl StepRequest {
    /// The request's JSON (`{"op":"step", ...}`) and its safetensors blob: `value/<name>`,
    /// `grad/<name>` and `state/<key>` float32 tensors.
    pub fn encode(&self) -> Result<(Vec<u8>, Vec<u8>)> {
        let mut json = serde_json::to_value(StepRequestJson {
            method: self.method.clone(),
            config: self.config.clone(),
            step: self.step,
            total_steps: self.total_steps,
            seed: self.seed,
            state: self.state.clone(),
        })
        .map_err(|e| Error::Frame(format!("cannot encode step request: {e}")))?;
        json["op"] = Value::from("step");
        let json = serde_json::to_vec(&json)
            .map_err(|e| Error::Frame(format!("cannot encode step request: {e}")))?;
        let blob = encode_arrays(&[
            (VALUE, &self.values),
            (GRADIENT, &self.gradients),
            (STATE, &self.state_tensors),
        ])?;
        Ok((json, blob))
    }

    /// Decodes what [`StepRequest::encode`] made (the JSON may carry the `"op"` tag).
    pub fn decode(json: &Value, blob: &[u8]) -> Result<StepRequest> {
        let head: StepRequestJson = serde_json::from_value(json.clone())
            .map_err(|e| Error::Frame(format!("invalid step request: {e}")))?;
        let mut groups = decode_arrays(blob, &[VALUE, GRADIENT, STATE])?;
        Ok(StepRequest {
            method: head.method,
            config: head.config,
            step: head.step,
            total_steps: head.total_steps,
            seed: head.seed,
            state: head.state,
            state_tensors: groups.remove(STATE).unwrap_or_default(),
            gradients: groups.remove(GRADIENT).unwrap_or_default(),
            values: groups.remove(VALUE).unwrap_or_default(),
        })
    }
}

impl StepReply {
    /// The reply as a response frame: JSON `{"state":..., "metrics":...}`, then a safetensors
    /// blob of `state/<key>` and `set/<name>` float32 tensors.
    pub fn to_frame(&self) -> Result<Vec<u8>> {
        let json = serde_json::to_vec(&StepReplyJson {
            state: self.state.clone(),
            metrics: self.metrics.clone(),
        })
        .map_err(|e| Error::Frame(format!("cannot encode step reply: {e}")))?;
        let blob = encode_arrays(&[(STATE, &self.state_tensors), (SET, &self.set)])?;
        Ok(crate::protocol::encode_frame(&json, &blob))
    }

    /// Decodes a frame made by [`StepReply::to_frame`].
    pub fn from_frame(frame: &[u8]) -> Result<StepReply> {
        let (json, blob) = crate::protocol::decode_frame(frame)?;
        let head: StepReplyJson = serde_json::from_slice(json)
            .map_err(|e| Error::Frame(format!("invalid step reply: {e}")))?;
        let mut groups = decode_arrays(blob, &[STATE, SET])?;
        Ok(StepReply {
            state: head.state,
            metrics: head.metrics,
            state_tensors: groups.remove(STATE).unwrap_or_default(),
            set: groups.remove(SET).unwrap_or_default(),
        })
    }
}

fn encode_arrays(groups: &[(&str, &BTreeMap<String, HostArray>)]) -> Result<Vec<u8>> {
    let mut bytes: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (prefix, arrays) in groups {
        for (name, array) in arrays.iter() {
            HostArray::new(array.shape.clone(), array.data.clone())?;
            bytes.push((
                format!("{prefix}{name}"),
                array.shape.clone(),
                crate::dtype::f32_to_bytes(DType::Float, &array.data).unwrap_or_default(),
            ));
        }
    }
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    let views = bytes
        .iter()
        .map(|(key, shape, data)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                .map(|view| (key.as_str(), view))
                .map_err(|e| Error::Frame(format!("tensor \"{key}\": {e:?}")))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::tensor::serialize(views, &None)
        .map_err(|e| Error::Frame(format!("cannot encode step tensors: {e:?}")))
}

fn decode_arrays(
    blob: &[u8],
    prefixes: &[&'static str],
) -> Result<BTreeMap<&'static str, BTreeMap<String, HostArray>>> {
    let mut groups = BTreeMap::new();
    if blob.is_empty() {
        return Ok(groups);
    }
    let tensors = safetensors::SafeTensors::deserialize(blob)
        .map_err(|e| Error::Frame(format!("invalid safetensors blob: {e:?}")))?;
    for (key, view) in tensors.tensors() {
        if view.dtype() != safetensors::Dtype::F32 {
            return Err(Error::Frame(format!(
                "step tensor \"{key}\" is {:?}, not float32",
                view.dtype()
            )));
        }
        let prefix = prefixes
            .iter()
            .find(|p| key.starts_with(**p))
            .ok_or_else(|| Error::Frame(format!("unexpected step tensor \"{key}\"")))?;
        let data = crate::dtype::bytes_to_f32(DType::Float, view.data()).unwrap_or_default();
        groups.entry(*prefix).or_insert_with(BTreeMap::new).insert(
            key[prefix.len()..].to_owned(),
            HostArray::new(view.shape().to_vec(), data)?,
        );
    }
    Ok(groups)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_messages_round_trip() {
        let array = |n: usize| HostArray::new(vec![n], (0..n).map(|i| i as f32 * 0.5).collect());
        let request = StepRequest {
            method: "adalora".into(),
            config: serde_json::json!({"target_r": 3}),
            step: 7,
            total_steps: 24,
            seed: 99,
            state: serde_json::json!({"k": [1, 2]}),
            state_tensors: [("ema".to_owned(), array(3).unwrap())].into(),
            values: [("a".to_owned(), array(4).unwrap())].into(),
            gradients: [("a".to_owned(), array(4).unwrap())].into(),
        };
        let (json, blob) = request.encode().unwrap();
        let json: Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(json["op"], "step");
        assert_eq!(StepRequest::decode(&json, &blob).unwrap(), request);

        let reply = StepReply {
            state: Value::from(3),
            state_tensors: [("ema".to_owned(), array(2).unwrap())].into(),
            set: [("e".to_owned(), array(1).unwrap())].into(),
            metrics: [("budget".to_owned(), 12.0)].into(),
        };
        assert_eq!(
            StepReply::from_frame(&reply.to_frame().unwrap()).unwrap(),
            reply
        );
        assert!(HostArray::new(vec![2, 2], vec![0.0; 3]).is_err());
    }
}

/// Where one of a method's tensors goes in HF PEFT's adapter files, for methods the core's
/// LoRA export does not cover (AdaLoRA, LoHa, ...): `graft export --format peft` and
/// `graft train` write it, `graft train --init-adapter` reads it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeftTensor {
    /// The key in `adapter_model.safetensors` without PEFT's `base_model.model.` prefix, e.g.
    /// `bert.encoder.layer.0.attention.self.query.lora_A` (a `.weight` suffix is accepted on
    /// reading).
    pub key: String,
    /// The graft tensor.
    pub tensor: String,
    /// The PEFT tensor is the transpose of the (2-D) graft tensor.
    #[serde(default)]
    pub transpose: bool,
    /// The PEFT tensor's shape (same element count as the graft tensor).
    pub shape: Vec<usize>,
    /// The axis of the PEFT shape that PEFT truncates to the kept ranks when the config has a
    /// `rank_pattern` of booleans per module (AdaLoRA); reading such a file puts the kept
    /// ranks back in place and zeros in the pruned ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank_axis: Option<usize>,
}

/// A method's adapter files in another library's layout (HF PEFT, or AdapterHub for
/// [`TrainingSpec::adapterhub`]): the whole `adapter_config.json` and the tensor map.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PeftFiles {
    /// `adapter_config.json`, as PEFT reads it (`peft_type` included).
    pub config: Value,
    /// The tensors.
    pub tensors: Vec<PeftTensor>,
    /// The keys are written as given, without PEFT's `base_model.model.` prefix (PEFT saves
    /// prompt-learning tensors such as `prompt_embeddings` so); either form is read.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub bare_keys: bool,
}
