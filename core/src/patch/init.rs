//! Filling new parameters: the SDK's [`Init`] specifications turned into tensor bytes.

use graft_plugin_sdk::{DType, Init, NewParameter, TensorPayload};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::ir::{DataType, Graph, Tensor};
use crate::{Error, Result};

/// The IR element type for an SDK element type.
pub fn data_type(dtype: DType) -> Result<DataType> {
    DataType::from_code(dtype.onnx_code())
        .ok_or_else(|| Error::Config(format!("element type {} has no ONNX code", dtype.name())))
}

/// Builds the tensor for `parameter`, drawing random inits from a generator seeded by the init's
/// seed (the same seed always gives the same values), taking `Init::Data` bytes from
/// `payloads` and `Init::Rows` from the initializers of `base` (the graph being patched).
///
/// The shape is a plugin's to choose and is not trusted: one with a dimension beyond int64, an
/// element count that overflows, or more elements than memory can be reserved for is an
/// [`Error::Tensor`] naming the parameter, never a panic or an allocation abort.
pub fn materialize(
    parameter: &NewParameter,
    payloads: &[TensorPayload],
    base: &Graph,
) -> Result<Tensor> {
    let dtype = data_type(parameter.dtype)?;
    let fail = |reason: String| Error::Tensor {
        name: parameter.name.clone(),
        reason,
    };
    // The shape comes from a plugin's reply: its dimensions and element count are checked, not
    // trusted (an overflowing product, or a dimension beyond int64, is refused by name).
    let dims = parameter
        .shape
        .iter()
        .map(|&d| i64::try_from(d))
        .collect::<std::result::Result<Vec<i64>, _>>()
        .map_err(|_| {
            fail(format!(
                "shape {:?} has a dimension beyond the int64 range",
                parameter.shape
            ))
        })?;
    let n_elements = parameter
        .shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| {
            fail(format!(
                "shape {:?} has more elements than a tensor can hold",
                parameter.shape
            ))
        })?;
    if let Init::Data { key } = &parameter.init {
        let payload = payloads
            .iter()
            .find(|p| &p.key == key)
            .ok_or_else(|| fail(format!("no payload {key:?} in the plugin's reply")))?;
        if payload.dtype != parameter.dtype || payload.shape != parameter.shape {
            return Err(fail(format!(
                "payload {key:?} is {} {:?}, the parameter is {} {:?}",
                payload.dtype.name(),
                payload.shape,
                parameter.dtype.name(),
                parameter.shape
            )));
        }
        return Ok(Tensor::from_raw(
            &parameter.name,
            dtype,
            dims,
            payload.data.clone(),
        ));
    }
    if let Init::Rows { table, rows } = &parameter.init {
        return copy_rows(parameter, dtype, dims, base, table, rows).map_err(fail);
    }
    // Both buffers are reserved fallibly, so that a shape no memory can hold is an error naming
    // the parameter, not an abort of graft (a plugin's reply must not be able to end the host).
    let too_large = || {
        fail(format!(
            "shape {:?} ({n_elements} elements) is too large to allocate",
            parameter.shape
        ))
    };
    let mut values: Vec<f64> = Vec::new();
    values
        .try_reserve_exact(n_elements)
        .map_err(|_| too_large())?;
    let mut bytes = Vec::new();
    bytes
        .try_reserve_exact(parameter.dtype.byte_len(n_elements).unwrap_or(0))
        .map_err(|_| too_large())?;
    match &parameter.init {
        Init::Zeros => values.resize(n_elements, 0.0),
        Init::Ones => values.resize(n_elements, 1.0),
        Init::Constant { value } => values.resize(n_elements, *value),
        Init::Uniform { low, high, seed } => values.extend(uniform(*seed, *low, *high, n_elements)),
        Init::KaimingUniform { fan_in, a, seed } => {
            let bound = Init::kaiming_uniform_bound(*fan_in, *a);
            values.extend(uniform(*seed, -bound, bound, n_elements))
        }
        Init::Normal { mean, std, seed } => {
            values.extend(normal_values(*seed, *mean, *std, n_elements))
        }
        Init::Data { .. } | Init::Rows { .. } => unreachable!("handled above"),
    };
    encode(dtype, &values, &mut bytes).ok_or_else(|| {
        fail(format!(
            "graft cannot fill a {dtype} parameter with {:?}",
            parameter.init
        ))
    })?;
    Ok(Tensor::from_raw(&parameter.name, dtype, dims, bytes))
}

/// The rows `rows` of the 2-D initializer `table` of `base`, as the parameter `[rows, width]`.
fn copy_rows(
    parameter: &NewParameter,
    dtype: DataType,
    dims: Vec<i64>,
    base: &Graph,
    table: &str,
    rows: &[u64],
) -> std::result::Result<Tensor, String> {
    let source = base
        .initializer(table)
        .ok_or_else(|| format!("the rows init reads {table:?}, which is no initializer"))?;
    let [n_rows, width] = source.dims[..] else {
        return Err(format!(
            "the rows init reads {table:?}, which is not 2-D: {:?}",
            source.dims
        ));
    };
    if source.dtype != dtype || dims != [rows.len() as i64, width] {
        return Err(format!(
            "the rows init copies {} {table:?} rows of width {width} into a {dtype} {dims:?}",
            source.dtype
        ));
    }
    let bytes = source.raw_bytes().map_err(|e| e.to_string())?;
    let row_bytes = bytes.len() / n_rows.max(1) as usize;
    let mut out = Vec::with_capacity(rows.len() * row_bytes);
    for &row in rows {
        if row >= n_rows as u64 {
            return Err(format!(
                "row {row} is beyond the {n_rows} rows of {table:?}"
            ));
        }
        let start = row as usize * row_bytes;
        out.extend_from_slice(&bytes[start..start + row_bytes]);
    }
    Ok(Tensor::from_raw(&parameter.name, dtype, dims, out))
}

/// `n_elements` draws from N(`mean`, `std`²), the same for the same seed.
pub fn normal_values(
    seed: u64,
    mean: f64,
    std: f64,
    n_elements: usize,
) -> impl Iterator<Item = f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n_elements).map(move |_| {
        // Box–Muller; 1 - u keeps the logarithm's argument in (0, 1].
        let u1: f64 = 1.0 - rng.gen::<f64>();
        let u2: f64 = rng.gen::<f64>();
        mean + std * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    })
}

fn uniform(seed: u64, low: f64, high: f64, n_elements: usize) -> impl Iterator<Item = f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n_elements).map(move |_| low + (high - low) * rng.gen::<f64>())
}

/// Appends `values` to `out` as raw little-endian bytes of `dtype` (floats rounded, integers
/// truncated); `None` for a type graft cannot fill.
fn encode(dtype: DataType, values: &[f64], out: &mut Vec<u8>) -> Option<()> {
    let values = values.iter().copied();
    match dtype {
        DataType::Float => out.extend(values.flat_map(|v| (v as f32).to_le_bytes())),
        DataType::Double => out.extend(values.flat_map(f64::to_le_bytes)),
        DataType::Float16 => out.extend(values.flat_map(|v| half::f16::from_f64(v).to_le_bytes())),
        DataType::Bfloat16 => {
            out.extend(values.flat_map(|v| half::bf16::from_f64(v).to_le_bytes()))
        }
        DataType::Int64 => out.extend(values.flat_map(|v| (v as i64).to_le_bytes())),
        DataType::Int32 => out.extend(values.flat_map(|v| (v as i32).to_le_bytes())),
        DataType::Int8 => out.extend(values.map(|v| v as i8 as u8)),
        DataType::Uint8 | DataType::Bool => out.extend(values.map(|v| v as u8)),
        _ => return None,
    }
    Some(())
}

/// Builds the default tensor of a host-fed input (see [`graft_plugin_sdk::HostInput`]), after
/// checking that its type and shape suit its kind.
pub fn materialize_host_input(input: &graft_plugin_sdk::HostInput) -> Result<Tensor> {
    use graft_plugin_sdk::HostInputKind as Kind;
    // `[]` or `[1]`; written without a product, which a plugin's shape could overflow.
    let scalar = input.shape.len() <= 1 && input.shape.iter().all(|&d| d == 1);
    let fits = match input.kind {
        Kind::TrainingMode => {
            input.dtype == DType::Bool && input.shape.is_empty() && input.default == Init::Zeros
        }
        Kind::Step => scalar && (input.dtype.is_float() || input.dtype == DType::Int64),
        Kind::Progress => scalar && input.dtype.is_float(),
        Kind::Uniform => input.dtype.is_float(),
        Kind::Value => true,
    };
    if !fits {
        return Err(Error::Tensor {
            name: input.name.clone(),
            reason: format!(
                "a {:?} host input cannot be {} {:?} with default {:?} (training_mode: bool [] \
                 zeros; step: a float or int64 scalar; progress and uniform: float types)",
                input.kind,
                input.dtype.name(),
                input.shape,
                input.default
            ),
        });
    }
    let parameter = NewParameter {
        name: input.name.clone(),
        dtype: input.dtype,
        shape: input.shape.clone(),
        init: input.default.clone(),
        trainable: false,
    };
    materialize(&parameter, &[], &Graph::default())
}
