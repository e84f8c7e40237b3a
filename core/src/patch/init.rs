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
pub fn materialize(
    parameter: &NewParameter,
    payloads: &[TensorPayload],
    base: &Graph,
) -> Result<Tensor> {
    let dtype = data_type(parameter.dtype)?;
    let dims: Vec<i64> = parameter.shape.iter().map(|&d| d as i64).collect();
    let n_elements: usize = parameter.shape.iter().product();
    let fail = |reason: String| Error::Tensor {
        name: parameter.name.clone(),
        reason,
    };
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
    let values: Vec<f64> = match &parameter.init {
        Init::Zeros => vec![0.0; n_elements],
        Init::Ones => vec![1.0; n_elements],
        Init::Constant { value } => vec![*value; n_elements],
        Init::Uniform { low, high, seed } => uniform(*seed, *low, *high, n_elements),
        Init::KaimingUniform { fan_in, a, seed } => {
            let bound = Init::kaiming_uniform_bound(*fan_in, *a);
            uniform(*seed, -bound, bound, n_elements)
        }
        Init::Normal { mean, std, seed } => {
            let mut rng = ChaCha8Rng::seed_from_u64(*seed);
            (0..n_elements)
                .map(|_| {
                    // Box–Muller; 1 - u keeps the logarithm's argument in (0, 1].
                    let u1: f64 = 1.0 - rng.gen::<f64>();
                    let u2: f64 = rng.gen::<f64>();
                    mean + std * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
                })
                .collect()
        }
        Init::Data { .. } | Init::Rows { .. } => unreachable!("handled above"),
    };
    let bytes = encode(dtype, &values).ok_or_else(|| {
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

fn uniform(seed: u64, low: f64, high: f64, n_elements: usize) -> Vec<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n_elements)
        .map(|_| low + (high - low) * rng.gen::<f64>())
        .collect()
}

/// Encodes f64 values as raw little-endian bytes of `dtype` (floats rounded, integers truncated).
fn encode(dtype: DataType, values: &[f64]) -> Option<Vec<u8>> {
    Some(match dtype {
        DataType::Float => values
            .iter()
            .flat_map(|&v| (v as f32).to_le_bytes())
            .collect(),
        DataType::Double => values.iter().flat_map(|&v| v.to_le_bytes()).collect(),
        DataType::Float16 => values
            .iter()
            .flat_map(|&v| half::f16::from_f64(v).to_le_bytes())
            .collect(),
        DataType::Bfloat16 => values
            .iter()
            .flat_map(|&v| half::bf16::from_f64(v).to_le_bytes())
            .collect(),
        DataType::Int64 => values
            .iter()
            .flat_map(|&v| (v as i64).to_le_bytes())
            .collect(),
        DataType::Int32 => values
            .iter()
            .flat_map(|&v| (v as i32).to_le_bytes())
            .collect(),
        DataType::Int8 => values.iter().map(|&v| v as i8 as u8).collect(),
        DataType::Uint8 | DataType::Bool => values.iter().map(|&v| v as u8).collect(),
        _ => return None,
    })
}

/// Builds the default tensor of a host-fed input (see [`graft_plugin_sdk::HostInput`]), after
/// checking that its type and shape suit its kind.
pub fn materialize_host_input(input: &graft_plugin_sdk::HostInput) -> Result<Tensor> {
    use graft_plugin_sdk::HostInputKind as Kind;
    let scalar = input.shape.iter().product::<usize>() == 1 && input.shape.len() <= 1;
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
