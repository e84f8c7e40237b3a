//! The `Plugin` trait and the `export_plugin!` macro that turns an implementation into the
//! C entry point.

use crate::abi::{GraftBytes, GraftHost};
use crate::config::MethodConfig;
use crate::describe::{MethodDescription, PluginDescription};
use crate::graph::GraphView;
use crate::host::Host;
use crate::protocol::{decode_frame, encode_frame, PatchReply, Request};
use crate::training::{StepReply, StepRequest};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// A method plugin. Implement it on a unit struct and pass the struct to
/// [`export_plugin!`](crate::export_plugin).
pub trait Plugin {
    /// The plugin's name, as shown to users and put in its table; no NUL bytes.
    const NAME: &'static str;
    /// The plugin's version (usually `env!("CARGO_PKG_VERSION")`); no NUL bytes.
    const VERSION: &'static str;

    /// The methods this plugin implements, with their config keys.
    fn methods() -> Vec<MethodDescription>;

    /// Builds the patch for `method` (one of [`Plugin::methods`]) with its validated `config`
    /// on `graph`. Reads base tensors through `host` only. Errors are shown to the user as
    /// written; panics are caught and reported as errors.
    fn patch(
        host: &Host<'_>,
        method: &str,
        config: &MethodConfig,
        graph: &GraphView,
    ) -> Result<PatchReply, String>;

    /// The step hook (ABI 2): called after every optimizer step of a run that trains a
    /// method whose patch declared a [`crate::StepHook`]. Plugins without step hooks keep
    /// this default, which refuses. `config` is the method's recorded config, checked like
    /// [`Plugin::patch`]'s (`request.config` holds the same as raw JSON).
    fn step(
        _host: &Host<'_>,
        _config: &MethodConfig,
        request: &StepRequest,
    ) -> Result<StepReply, String> {
        Err(format!(
            "plugin {} has no step hook for method {}",
            Self::NAME,
            request.method
        ))
    }

    /// The full description: [`Plugin::NAME`], [`Plugin::VERSION`], [`Plugin::methods`].
    fn describe() -> PluginDescription {
        PluginDescription {
            name: Self::NAME.into(),
            version: Self::VERSION.into(),
            methods: Self::methods(),
        }
    }
}

/// Exports a [`Plugin`] implementation as this library's `graft_plugin_entry`.
///
/// `export_plugin!(MyPlugin);` generates the `#[no_mangle] extern "C" fn graft_plugin_entry`
/// returning a static table whose `name` and `version` are `MyPlugin::NAME` and
/// `MyPlugin::VERSION` (NUL-terminated at compile time; a NUL inside either fails the build),
/// whose `call` parses the request, runs the plugin under `catch_unwind` and encodes the
/// reply frame, and whose `free` releases that reply. Use it once per library, in a crate
/// built as a `cdylib`.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        /// The plugin entry point: returns this library's static plugin table.
        #[unsafe(no_mangle)]
        pub extern "C" fn graft_plugin_entry() -> *const $crate::abi::GraftPluginTable {
            const NAME_LEN: usize = <$plugin as $crate::Plugin>::NAME.len() + 1;
            const VERSION_LEN: usize = <$plugin as $crate::Plugin>::VERSION.len() + 1;
            static NAME: [u8; NAME_LEN] =
                $crate::__private::c_string(<$plugin as $crate::Plugin>::NAME);
            static VERSION: [u8; VERSION_LEN] =
                $crate::__private::c_string(<$plugin as $crate::Plugin>::VERSION);
            unsafe extern "C" fn call(
                host: *const $crate::abi::GraftHost,
                request: *const u8,
                request_len: usize,
                reply: *mut $crate::abi::GraftBytes,
            ) -> i32 {
                // SAFETY: the core calls with pointers honouring the ABI.
                unsafe { $crate::__private::dispatch::<$plugin>(host, request, request_len, reply) }
            }
            static TABLE: $crate::abi::GraftPluginTable = $crate::abi::GraftPluginTable {
                abi_version: $crate::abi::GRAFT_PLUGIN_ABI_VERSION,
                table_size: ::std::mem::size_of::<$crate::abi::GraftPluginTable>() as u32,
                name: NAME.as_ptr() as *const ::std::ffi::c_char,
                version: VERSION.as_ptr() as *const ::std::ffi::c_char,
                call: Some(call),
                free: Some($crate::__private::free_reply),
            };
            &TABLE
        }
    };
}

/// Support for [`export_plugin!`](crate::export_plugin); not a stable API.
#[doc(hidden)]
pub mod __private {
    use super::*;

    /// `text` followed by a NUL, as an array of exactly `N = text.len() + 1` bytes; panics
    /// (at compile time in a const context) on a NUL inside `text` or a wrong `N`.
    pub const fn c_string<const N: usize>(text: &str) -> [u8; N] {
        let bytes = text.as_bytes();
        assert!(bytes.len() + 1 == N, "c_string: wrong length");
        let mut out = [0u8; N];
        let mut i = 0;
        while i < bytes.len() {
            assert!(
                bytes[i] != 0,
                "plugin name and version must not contain NUL"
            );
            out[i] = bytes[i];
            i += 1;
        }
        out
    }

    /// The body of a plugin's `call`: handles the request, catching panics, and stores the
    /// reply. Returns 0 with a frame, 1 with an error message, 2 if `reply` is null.
    ///
    /// # Safety
    /// Pointers as the ABI requires: `request[..request_len]` readable, `host` null or valid
    /// for the call, `reply` null or writable.
    pub unsafe fn dispatch<P: Plugin>(
        host: *const GraftHost,
        request: *const u8,
        request_len: usize,
        reply: *mut GraftBytes,
    ) -> i32 {
        if reply.is_null() {
            return 2;
        }
        let request = if request.is_null() || request_len == 0 {
            &[][..]
        } else {
            std::slice::from_raw_parts(request, request_len)
        };
        let host = Host::from_raw(host);
        let outcome = catch_unwind(AssertUnwindSafe(|| handle::<P>(&host, request)));
        let (status, bytes) = match outcome {
            Ok(Ok(frame)) => (0, frame),
            Ok(Err(message)) => (1, message.into_bytes()),
            Err(panic) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic payload".into());
                (
                    1,
                    format!("plugin {} panicked: {message}", P::NAME).into_bytes(),
                )
            }
        };
        *reply = into_raw(bytes);
        status
    }

    /// The `free` of every plugin table: drops a buffer made by [`dispatch`].
    ///
    /// # Safety
    /// `reply` must come from this library's `call` and be freed once.
    pub unsafe extern "C" fn free_reply(reply: GraftBytes) {
        if !reply.ptr.is_null() {
            drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                reply.ptr, reply.len,
            )));
        }
    }

    fn into_raw(bytes: Vec<u8>) -> GraftBytes {
        let boxed: Box<[u8]> = bytes.into_boxed_slice();
        let len = boxed.len();
        GraftBytes {
            ptr: Box::into_raw(boxed) as *mut u8,
            len,
        }
    }

    fn find_method<'m, P: Plugin>(
        methods: &'m [MethodDescription],
        method: &str,
    ) -> Result<&'m MethodDescription, String> {
        methods.iter().find(|m| m.name == method).ok_or_else(|| {
            let names: Vec<&str> = methods.iter().map(|m| m.name.as_str()).collect();
            format!(
                "unknown method \"{method}\" for plugin {}; valid methods: {}",
                P::NAME,
                names.join(", ")
            )
        })
    }

    fn handle<P: Plugin>(host: &Host<'_>, request: &[u8]) -> Result<Vec<u8>, String> {
        let invalid =
            |e: &dyn std::fmt::Display| format!("plugin {} got an invalid request: {e}", P::NAME);
        let (json, blob) = decode_frame(request).map_err(|e| invalid(&e))?;
        let json: serde_json::Value = serde_json::from_slice(json).map_err(|e| invalid(&e))?;
        if json["op"] == "step" {
            let request = StepRequest::decode(&json, blob).map_err(|e| invalid(&e))?;
            let methods = P::methods();
            let config = MethodConfig::new(
                find_method::<P>(&methods, &request.method)?,
                &request.config,
            )?;
            return Ok(P::step(host, &config, &request)?.to_frame()?);
        }
        let request: Request = serde_json::from_value(json).map_err(|e| invalid(&e))?;
        match request {
            Request::Describe => {
                let json = serde_json::to_vec(&P::describe()).map_err(|e| e.to_string())?;
                Ok(encode_frame(&json, &[]))
            }
            Request::Patch {
                method,
                config,
                graph,
            } => {
                let methods = P::methods();
                let description = find_method::<P>(&methods, &method)?;
                let config = MethodConfig::new(description, &config)?;
                let reply = P::patch(host, &method, &config, &graph)?;
                reply.check_payloads()?;
                Ok(reply.to_frame()?)
            }
        }
    }
}
