//! A plugin built for a future ABI version: the host must refuse it before any call.

use graft_plugin_sdk::abi::{GraftBytes, GraftHost, GraftPluginTable};

unsafe extern "C" fn call(
    _host: *const GraftHost,
    _request: *const u8,
    _request_len: usize,
    _reply: *mut GraftBytes,
) -> i32 {
    std::process::abort()
}

unsafe extern "C" fn free(_reply: GraftBytes) {}

static TABLE: GraftPluginTable = GraftPluginTable {
    abi_version: 999,
    table_size: std::mem::size_of::<GraftPluginTable>() as u32,
    name: c"wrong-abi".as_ptr(),
    version: c"0.0.0".as_ptr(),
    call: Some(call),
    free: Some(free),
};

/// The plugin entry point.
#[unsafe(no_mangle)]
pub extern "C" fn graft_plugin_entry() -> *const GraftPluginTable {
    &TABLE
}
