//! Fuzz target: `.npz` inputs, read as `graft run --inputs` reads them
//! (`runtime::read_npz`: a zip archive of `.npy` arrays of float32, float64, int64, int32 or
//! bool). Every array it returns must have as many elements as its shape says.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = graft_fuzz::scratch_file("inputs.npz", data);
    if let Ok(arrays) = graft::runtime::read_npz(&path) {
        for (name, tensor) in &arrays {
            let elements: usize = tensor.shape().iter().product();
            assert_eq!(tensor.to_f64().len(), elements, "array {name:?}");
        }
    }
});
