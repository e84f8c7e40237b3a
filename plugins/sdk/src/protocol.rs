//! Requests, response frames, and the patch reply with its tensor payloads.

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::graph::GraphView;
use crate::patch::{Init, Patch};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// A request from the core, as the JSON the plugin receives. Tagged by `"op"`:
/// `{"op":"describe"}` or `{"op":"patch","method":"lora","config":{...},"graph":{...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Asks for the [`crate::PluginDescription`].
    Describe,
    /// Asks for the patch of `method` with `config` on `graph`.
    Patch {
        /// The method's name.
        method: String,
        /// The user's config, a JSON object (absent or `null` means all defaults).
        #[serde(default)]
        config: Value,
        /// The model.
        graph: Box<GraphView>,
    },
}

/// Builds a response frame: `json.len()` as a little-endian `u64`, `json`, then `blob` (a
/// safetensors file image, or empty).
pub fn encode_frame(json: &[u8], blob: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(8 + json.len() + blob.len());
    frame.extend_from_slice(&(json.len() as u64).to_le_bytes());
    frame.extend_from_slice(json);
    frame.extend_from_slice(blob);
    frame
}

/// Splits a response frame into its JSON and its (possibly empty) blob. Errors
/// ([`Error::Frame`]) when the frame is shorter than its length prefix says.
pub fn decode_frame(frame: &[u8]) -> Result<(&[u8], &[u8])> {
    let prefix: [u8; 8] = frame
        .get(..8)
        .and_then(|p| p.try_into().ok())
        .ok_or_else(|| {
            Error::Frame(format!(
                "frame of {} bytes has no 8-byte length prefix",
                frame.len()
            ))
        })?;
    let n = u64::from_le_bytes(prefix);
    let end = usize::try_from(n)
        .ok()
        .and_then(|n| n.checked_add(8))
        .filter(|end| *end <= frame.len())
        .ok_or_else(|| {
            Error::Frame(format!(
                "frame declares {n} bytes of JSON but holds {}",
                frame.len() - 8
            ))
        })?;
    Ok((&frame[8..end], &frame[end..]))
}

/// The bytes of one [`Init::Data`] parameter, carried in the frame's safetensors blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorPayload {
    /// The key [`Init::Data`] names.
    pub key: String,
    /// Element type; equals the parameter's.
    pub dtype: DType,
    /// Shape; equals the parameter's.
    pub shape: Vec<usize>,
    /// Raw little-endian bytes, `dtype.byte_len(shape.product())` of them.
    pub data: Vec<u8>,
}

/// A plugin's answer to a patch request: the patch and the payloads of its
/// [`Init::Data`] parameters.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PatchReply {
    /// The graph edits.
    pub patch: Patch,
    /// One payload per distinct [`Init::Data`] key, in any order.
    pub tensors: Vec<TensorPayload>,
}

impl PatchReply {
    /// A reply with no payloads.
    pub fn new(patch: Patch) -> PatchReply {
        PatchReply {
            patch,
            tensors: Vec::new(),
        }
    }

    /// Checks that payload keys are unique, that each [`Init::Data`] key has a payload of the
    /// parameter's type and shape with the right byte length, and that every payload is used.
    pub fn check_payloads(&self) -> Result<()> {
        let mut by_key: BTreeMap<&str, &TensorPayload> = BTreeMap::new();
        for t in &self.tensors {
            if t.dtype.byte_len_of_shape(&t.shape) != Some(t.data.len()) {
                return Err(Error::Frame(format!(
                    "payload \"{}\" holds {} bytes, not the size of {} {:?}",
                    t.key,
                    t.data.len(),
                    t.dtype,
                    t.shape
                )));
            }
            if by_key.insert(&t.key, t).is_some() {
                return Err(Error::Frame(format!("payload \"{}\" appears twice", t.key)));
            }
        }
        let mut used = std::collections::BTreeSet::new();
        for p in &self.patch.parameters {
            if let Init::Data { key } = &p.init {
                let t = by_key.get(key.as_str()).ok_or_else(|| {
                    Error::Frame(format!(
                        "parameter \"{}\" names missing payload \"{key}\"",
                        p.name
                    ))
                })?;
                if t.dtype != p.dtype || t.shape != p.shape {
                    return Err(Error::Frame(format!(
                        "parameter \"{}\" is {} {:?} but payload \"{key}\" is {} {:?}",
                        p.name, p.dtype, p.shape, t.dtype, t.shape
                    )));
                }
                used.insert(key.as_str());
            }
        }
        if let Some(unused) = by_key.keys().find(|k| !used.contains(*k)) {
            return Err(Error::Frame(format!(
                "payload \"{unused}\" is not used by any parameter"
            )));
        }
        Ok(())
    }

    /// Encodes the reply as a response frame: the patch's JSON, then a safetensors blob of the
    /// payloads (empty when there are none). Errors when a payload's type has no safetensors
    /// equivalent or its bytes do not match its shape.
    pub fn to_frame(&self) -> Result<Vec<u8>> {
        let json = serde_json::to_vec(&self.patch)
            .map_err(|e| Error::Frame(format!("cannot encode patch: {e}")))?;
        if self.tensors.is_empty() {
            return Ok(encode_frame(&json, &[]));
        }
        let views = self
            .tensors
            .iter()
            .map(|t| {
                let dtype = t.dtype.to_safetensors().ok_or_else(|| {
                    Error::Frame(format!(
                        "payload \"{}\" has type {}, which safetensors cannot carry",
                        t.key, t.dtype
                    ))
                })?;
                let view = safetensors::tensor::TensorView::new(dtype, t.shape.clone(), &t.data)
                    .map_err(|e| Error::Frame(format!("payload \"{}\": {e:?}", t.key)))?;
                Ok((t.key.as_str(), view))
            })
            .collect::<Result<Vec<_>>>()?;
        let blob = safetensors::tensor::serialize(views, &None)
            .map_err(|e| Error::Frame(format!("cannot encode payloads: {e:?}")))?;
        Ok(encode_frame(&json, &blob))
    }

    /// Decodes a response frame made by [`PatchReply::to_frame`]; payloads come back sorted by
    /// key.
    pub fn from_frame(frame: &[u8]) -> Result<PatchReply> {
        let (json, blob) = decode_frame(frame)?;
        let patch: Patch = serde_json::from_slice(json)
            .map_err(|e| Error::Frame(format!("invalid patch JSON: {e}")))?;
        let mut tensors = Vec::new();
        if !blob.is_empty() {
            let st = safetensors::SafeTensors::deserialize(blob)
                .map_err(|e| Error::Frame(format!("invalid safetensors blob: {e:?}")))?;
            for (key, view) in st.tensors() {
                let dtype = DType::from_safetensors(view.dtype()).ok_or_else(|| {
                    Error::Frame(format!(
                        "payload \"{key}\" has unsupported type {:?}",
                        view.dtype()
                    ))
                })?;
                tensors.push(TensorPayload {
                    dtype,
                    shape: view.shape().to_vec(),
                    data: view.data().to_vec(),
                    key,
                });
            }
            tensors.sort_by(|a, b| a.key.cmp(&b.key));
        }
        Ok(PatchReply { patch, tensors })
    }
}
