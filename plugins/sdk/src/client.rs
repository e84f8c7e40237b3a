//! The core's side of the ABI: validating a plugin table and calling through it safely.

use crate::abi::{
    GraftBytes, GraftPluginTable, GRAFT_PLUGIN_ABI_MIN_VERSION, GRAFT_PLUGIN_ABI_VERSION,
};
use crate::describe::PluginDescription;
use crate::error::{Error, Result};
use crate::graph::GraphView;
use crate::host::{raw_host, TensorSource};
use crate::protocol::{decode_frame, PatchReply};
use crate::training::{StepReply, StepRequest};
use serde::Serialize;
use serde_json::Value;
use std::ffi::{c_char, CStr};

/// A validated plugin table. The core obtains the table pointer from the library's
/// `graft_plugin_entry` and keeps the library loaded for `'lib`.
#[derive(Debug, Clone, Copy)]
pub struct PluginClient<'lib> {
    table: &'lib GraftPluginTable,
    name: &'lib str,
    version: &'lib str,
}

#[derive(Serialize)]
#[serde(tag = "op", rename = "patch")]
struct PatchRequestRef<'a> {
    method: &'a str,
    config: &'a Value,
    graph: &'a GraphView,
}

impl<'lib> PluginClient<'lib> {
    /// Validates the table: non-null, `abi_version` between [`GRAFT_PLUGIN_ABI_MIN_VERSION`]
    /// and [`GRAFT_PLUGIN_ABI_VERSION`],
    /// `table_size` at least this SDK's table size, non-null UTF-8 `name` and `version`,
    /// non-null `call` and `free`. Errors are [`Error::Abi`].
    ///
    /// # Safety
    /// `table` must be null or point to a table valid for `'lib` (the library stays loaded),
    /// whose string pointers, when non-null, are NUL-terminated and whose functions honour the
    /// ABI.
    pub unsafe fn from_raw(table: *const GraftPluginTable) -> Result<PluginClient<'lib>> {
        let table = table
            .as_ref()
            .ok_or_else(|| Error::Abi("graft_plugin_entry returned null".into()))?;
        if !(GRAFT_PLUGIN_ABI_MIN_VERSION..=GRAFT_PLUGIN_ABI_VERSION).contains(&table.abi_version) {
            let name = if table.name.is_null() {
                "(unnamed)".into()
            } else {
                CStr::from_ptr(table.name).to_string_lossy()
            };
            return Err(Error::Abi(format!(
                "plugin {name} speaks ABI version {}, this build speaks versions \
                 {GRAFT_PLUGIN_ABI_MIN_VERSION} to {GRAFT_PLUGIN_ABI_VERSION}",
                table.abi_version
            )));
        }
        if (table.table_size as usize) < std::mem::size_of::<GraftPluginTable>() {
            return Err(Error::Abi(format!(
                "plugin table is {} bytes, too small",
                table.table_size
            )));
        }
        let text = |ptr: *const c_char, what: &str| -> Result<&'lib str> {
            if ptr.is_null() {
                return Err(Error::Abi(format!("plugin table has a null {what}")));
            }
            CStr::from_ptr(ptr)
                .to_str()
                .map_err(|_| Error::Abi(format!("plugin {what} is not UTF-8")))
        };
        let name = text(table.name, "name")?;
        let version = text(table.version, "version")?;
        if table.call.is_none() || table.free.is_none() {
            return Err(Error::Abi(format!("plugin {name} has a null call or free")));
        }
        Ok(PluginClient {
            table,
            name,
            version,
        })
    }

    /// The plugin's name from its table.
    pub fn name(&self) -> &'lib str {
        self.name
    }

    /// The plugin's version from its table.
    pub fn version(&self) -> &'lib str {
        self.version
    }

    /// The ABI version the plugin speaks.
    pub fn abi_version(&self) -> u32 {
        self.table.abi_version
    }

    /// Sends a request given as JSON and a blob: as a frame to an ABI 2 plugin, as the JSON
    /// alone to an ABI 1 plugin (which cannot take a blob).
    fn request(&self, source: &dyn TensorSource, json: &[u8], blob: &[u8]) -> Result<Vec<u8>> {
        if self.table.abi_version >= 2 {
            self.call(source, &crate::protocol::encode_frame(json, blob))
        } else if blob.is_empty() {
            self.call(source, json)
        } else {
            Err(Error::Abi(format!(
                "plugin {} speaks ABI version 1, which cannot carry this request",
                self.name
            )))
        }
    }

    /// Sends a step request (ABI 2) and decodes the [`StepReply`]. An ABI 1 plugin has no
    /// step hook: the call fails with [`Error::Abi`] naming it.
    pub fn step(&self, request: &StepRequest) -> Result<StepReply> {
        if self.table.abi_version < 2 {
            return Err(Error::Abi(format!(
                "plugin {} speaks ABI version 1, which has no step hook",
                self.name
            )));
        }
        let (json, blob) = request.encode()?;
        StepReply::from_frame(&self.request(&crate::host::NoTensors, &json, &blob)?)
    }

    /// Sends raw request bytes (a frame for ABI 2, JSON for ABI 1), lending `source`'s tensors for the call, and returns a copy of
    /// the response frame after handing the plugin's buffer back to its `free`. An error reply
    /// becomes [`Error::Plugin`] with the plugin's message.
    pub fn call(&self, source: &dyn TensorSource, request: &[u8]) -> Result<Vec<u8>> {
        let (Some(call), Some(free)) = (self.table.call, self.table.free) else {
            return Err(Error::Abi(format!(
                "plugin {} has a null call or free",
                self.name
            )));
        };
        let host = raw_host(&source);
        let mut reply = GraftBytes::EMPTY;
        // SAFETY: the table honours the ABI (contract of `from_raw`); `host` and `source`
        // outlive the call; `reply` is a valid out-pointer.
        let status = unsafe { call(&host, request.as_ptr(), request.len(), &mut reply) };
        let bytes = if reply.ptr.is_null() || reply.len == 0 {
            Vec::new()
        } else {
            // SAFETY: the plugin hands over `reply.len` readable bytes at `reply.ptr`.
            unsafe { std::slice::from_raw_parts(reply.ptr, reply.len) }.to_vec()
        };
        if !reply.ptr.is_null() {
            // SAFETY: the buffer came from this plugin's `call` and is freed once.
            unsafe { free(reply) };
        }
        if status == 0 {
            Ok(bytes)
        } else {
            Err(Error::Plugin(String::from_utf8_lossy(&bytes).into_owned()))
        }
    }

    /// Sends `{"op":"describe"}` and decodes the [`PluginDescription`].
    pub fn describe(&self) -> Result<PluginDescription> {
        let frame = self.request(&crate::host::NoTensors, br#"{"op":"describe"}"#, &[])?;
        let (json, _) = decode_frame(&frame)?;
        serde_json::from_slice(json)
            .map_err(|e| Error::Frame(format!("invalid description from {}: {e}", self.name)))
    }

    /// Sends a patch request for `method` with `config` on `graph`, lending `source`'s
    /// tensors, and decodes the [`PatchReply`] (payloads checked against the parameters).
    pub fn patch(
        &self,
        source: &dyn TensorSource,
        method: &str,
        config: &Value,
        graph: &GraphView,
    ) -> Result<PatchReply> {
        let request = serde_json::to_vec(&PatchRequestRef {
            method,
            config,
            graph,
        })
        .map_err(|e| Error::Frame(format!("cannot encode request: {e}")))?;
        let reply = PatchReply::from_frame(&self.request(source, &request, &[])?)?;
        reply.check_payloads()?;
        Ok(reply)
    }
}
