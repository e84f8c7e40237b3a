//! The `#[repr(C)]` mirror of `include/graft_plugin.h`: the whole binary contract between the
//! core and a plugin library.

use std::ffi::{c_char, c_void};

/// The ABI version this SDK speaks. Version 2 sends every request as a frame (JSON, then a
/// safetensors blob, like a reply) and adds the `step` request; version 1 sends requests as
/// plain JSON and knows `describe` and `patch` only.
pub const GRAFT_PLUGIN_ABI_VERSION: u32 = 2;

/// The oldest ABI version the host still speaks; a table carrying a number outside
/// `GRAFT_PLUGIN_ABI_MIN_VERSION..=GRAFT_PLUGIN_ABI_VERSION` is refused.
pub const GRAFT_PLUGIN_ABI_MIN_VERSION: u32 = 1;

/// The one symbol a plugin library exports, NUL-terminated for `dlsym`-style lookups.
pub const ENTRY_SYMBOL: &[u8] = b"graft_plugin_entry\0";

/// A byte buffer handed across the boundary; owned by whoever allocated it and freed only by
/// that side (a plugin's replies go back through the table's `free`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct GraftBytes {
    /// Start of the buffer (may dangle when `len` is 0; null only for "no buffer").
    pub ptr: *mut u8,
    /// Length in bytes.
    pub len: usize,
}

impl GraftBytes {
    /// The empty buffer with a null pointer.
    pub const EMPTY: GraftBytes = GraftBytes {
        ptr: std::ptr::null_mut(),
        len: 0,
    };
}

/// Lends a read-only view of an existing initializer's raw little-endian bytes: returns 0 and
/// sets `*data`/`*len` on success, non-zero if the tensor is unknown. The view stays valid
/// until the plugin's `call` returns.
pub type TensorViewFn = unsafe extern "C" fn(
    ctx: *const c_void,
    name: *const u8,
    name_len: usize,
    data: *mut *const u8,
    len: *mut usize,
) -> i32;

/// What the core lends a plugin for the duration of one `call`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct GraftHost {
    /// Opaque core state, passed back to the callbacks.
    pub ctx: *const c_void,
    /// See [`TensorViewFn`]; may be null when the core lends no tensors.
    pub tensor_view: Option<TensorViewFn>,
}

/// Handles one request: `request` is UTF-8 JSON; on return `*reply` holds a buffer allocated
/// by the plugin. Returns 0 with `reply` = a response frame, or non-zero with `reply` = a
/// UTF-8 error message.
pub type CallFn = unsafe extern "C" fn(
    host: *const GraftHost,
    request: *const u8,
    request_len: usize,
    reply: *mut GraftBytes,
) -> i32;

/// Frees a reply buffer allocated by the same plugin's `call`.
pub type FreeFn = unsafe extern "C" fn(reply: GraftBytes);

/// The table a plugin's entry point returns; static, immutable, valid while the library is
/// loaded.
#[repr(C)]
#[derive(Debug)]
pub struct GraftPluginTable {
    /// [`GRAFT_PLUGIN_ABI_VERSION`].
    pub abi_version: u32,
    /// `size_of::<GraftPluginTable>()` as the plugin was built; at least this SDK's size.
    pub table_size: u32,
    /// The plugin's name, NUL-terminated, static.
    pub name: *const c_char,
    /// The plugin's version, NUL-terminated, static.
    pub version: *const c_char,
    /// See [`CallFn`].
    pub call: Option<CallFn>,
    /// See [`FreeFn`].
    pub free: Option<FreeFn>,
}

// SAFETY: a table is immutable and its pointers refer to static, read-only data and
// thread-safe functions.
unsafe impl Sync for GraftPluginTable {}

/// The signature of the exported `graft_plugin_entry`.
pub type EntryFn = unsafe extern "C" fn() -> *const GraftPluginTable;

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn layout_matches_the_header() {
        let header = include_str!("../include/graft_plugin.h");
        assert!(header.contains(&format!(
            "#define GRAFT_PLUGIN_ABI_VERSION {GRAFT_PLUGIN_ABI_VERSION}"
        )));
        assert!(header.contains("graft_plugin_entry(void)"));
        let word = size_of::<usize>();
        assert_eq!(size_of::<GraftBytes>(), 2 * word);
        assert_eq!(size_of::<GraftHost>(), 2 * word);
        assert_eq!(offset_of!(GraftPluginTable, name), 8);
        assert_eq!(offset_of!(GraftPluginTable, call), 8 + 2 * word);
        assert_eq!(size_of::<GraftPluginTable>(), 8 + 4 * word);
    }
}
