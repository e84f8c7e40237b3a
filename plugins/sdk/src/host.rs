//! The host services a plugin may use during a call: read-only views of initializers.

use crate::abi::GraftHost;
use crate::dtype::bytes_to_f32;
use crate::graph::TensorInfo;
use std::collections::{BTreeMap, HashMap};
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Where the core's tensor bytes come from, on the core's side of the ABI.
pub trait TensorSource {
    /// The raw little-endian bytes of the initializer `name`, or `None` if there is none.
    fn tensor_bytes(&self, name: &str) -> Option<&[u8]>;
}

/// A source that knows no tensors.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoTensors;

impl TensorSource for NoTensors {
    fn tensor_bytes(&self, _name: &str) -> Option<&[u8]> {
        None
    }
}

impl TensorSource for HashMap<String, Vec<u8>> {
    fn tensor_bytes(&self, name: &str) -> Option<&[u8]> {
        self.get(name).map(Vec::as_slice)
    }
}

impl TensorSource for BTreeMap<String, Vec<u8>> {
    fn tensor_bytes(&self, name: &str) -> Option<&[u8]> {
        self.get(name).map(Vec::as_slice)
    }
}

/// The plugin's handle on the core during one call. Views borrow from the `Host` and so
/// cannot outlive the call.
#[derive(Debug, Clone, Copy)]
pub struct Host<'a> {
    raw: Option<&'a GraftHost>,
}

impl<'a> Host<'a> {
    /// Wraps the host pointer the core passed to `call`; null gives a host with no tensors.
    ///
    /// # Safety
    /// A non-null `raw` must point to a [`GraftHost`] valid for `'a` whose callback honours
    /// the ABI contract for that long.
    pub unsafe fn from_raw(raw: *const GraftHost) -> Host<'a> {
        Host { raw: raw.as_ref() }
    }

    /// A host with no tensors.
    pub fn empty() -> Host<'static> {
        Host { raw: None }
    }

    /// Runs `f` with a host serving `source`, through the same C callback the core installs;
    /// for testing a plugin's logic without loading it as a library.
    pub fn with_source<R>(source: &dyn TensorSource, f: impl FnOnce(&Host<'_>) -> R) -> R {
        let raw = raw_host(&source);
        f(&Host { raw: Some(&raw) })
    }

    /// The raw bytes of initializer `name`, or `None` if the core has none (or lends none).
    pub fn tensor_view(&self, name: &str) -> Option<&[u8]> {
        let raw = self.raw?;
        let view = raw.tensor_view?;
        let mut data: *const u8 = std::ptr::null();
        let mut len = 0usize;
        // SAFETY: `raw` is valid for 'a (contract of `from_raw`/`with_source`); the callback
        // receives a valid name slice and out-pointers to locals.
        let status = unsafe { view(raw.ctx, name.as_ptr(), name.len(), &mut data, &mut len) };
        if status != 0 {
            return None;
        }
        if len == 0 {
            return Some(&[]);
        }
        if data.is_null() {
            return None;
        }
        // SAFETY: the ABI guarantees `data[..len]` is readable until the call returns, and the
        // returned slice borrows `self`, which does not outlive the call.
        Some(unsafe { std::slice::from_raw_parts(data, len) })
    }

    /// The initializer described by `info` as `f32` values, converted from `float`,
    /// `float16`, `bfloat16` or `double`. Errors when the core lends no such tensor, the type
    /// is not one of those, or the byte length disagrees with `info`'s shape.
    pub fn tensor_f32(&self, info: &TensorInfo) -> Result<Vec<f32>, String> {
        let bytes = self
            .tensor_view(&info.name)
            .ok_or_else(|| format!("the host has no tensor \"{}\"", info.name))?;
        let expected = info.numel().and_then(|n| info.dtype.byte_len(n));
        if expected != Some(bytes.len()) {
            return Err(format!(
                "tensor \"{}\" has {} bytes, not the size of {} {:?}",
                info.name,
                bytes.len(),
                info.dtype,
                info.shape
            ));
        }
        bytes_to_f32(info.dtype, bytes).ok_or_else(|| {
            format!(
                "tensor \"{}\" is {}, not a float type",
                info.name, info.dtype
            )
        })
    }
}

/// Builds the [`GraftHost`] that serves `source` through a C callback. `ctx` points at the
/// `&dyn TensorSource` itself, so the result must not outlive that reference.
pub fn raw_host(source: &&dyn TensorSource) -> GraftHost {
    GraftHost {
        ctx: source as *const &dyn TensorSource as *const c_void,
        tensor_view: Some(tensor_view_trampoline),
    }
}

unsafe extern "C" fn tensor_view_trampoline(
    ctx: *const c_void,
    name: *const u8,
    name_len: usize,
    data: *mut *const u8,
    len: *mut usize,
) -> i32 {
    if ctx.is_null() || data.is_null() || len.is_null() || (name.is_null() && name_len != 0) {
        return 2;
    }
    let name = if name_len == 0 {
        &[][..]
    } else {
        std::slice::from_raw_parts(name, name_len)
    };
    let Ok(name) = std::str::from_utf8(name) else {
        return 3;
    };
    // SAFETY: `ctx` was made by `raw_host` from a `&&dyn TensorSource` that outlives the call.
    let source = &*(ctx as *const &dyn TensorSource);
    let found = catch_unwind(AssertUnwindSafe(|| {
        source.tensor_bytes(name).map(|b| (b.as_ptr(), b.len()))
    }));
    match found {
        Ok(Some((ptr, n))) => {
            *data = ptr;
            *len = n;
            0
        }
        Ok(None) => 1,
        Err(_) => 4,
    }
}
