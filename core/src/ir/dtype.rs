//! ONNX element types: codes, names and sizes.

use serde::{Deserialize, Serialize};

/// An ONNX tensor element type (`TensorProto.DataType`). Codes the IR does not know are kept as
/// [`DataType::Other`] so that a model using them still round-trips.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataType {
    Float,
    Uint8,
    Int8,
    Uint16,
    Int16,
    Int32,
    Int64,
    String,
    Bool,
    Float16,
    Double,
    Uint32,
    Uint64,
    Complex64,
    Complex128,
    Bfloat16,
    Float8e4m3fn,
    Float8e4m3fnuz,
    Float8e5m2,
    Float8e5m2fnuz,
    Uint4,
    Int4,
    /// A code this version of graft does not know.
    Other(i32),
}

impl DataType {
    /// The type for an ONNX `data_type` / `elem_type` code; `None` for 0 (undefined).
    pub fn from_code(code: i32) -> Option<Self> {
        use DataType::*;
        Some(match code {
            0 => return None,
            1 => Float,
            2 => Uint8,
            3 => Int8,
            4 => Uint16,
            5 => Int16,
            6 => Int32,
            7 => Int64,
            8 => String,
            9 => Bool,
            10 => Float16,
            11 => Double,
            12 => Uint32,
            13 => Uint64,
            14 => Complex64,
            15 => Complex128,
            16 => Bfloat16,
            17 => Float8e4m3fn,
            18 => Float8e4m3fnuz,
            19 => Float8e5m2,
            20 => Float8e5m2fnuz,
            21 => Uint4,
            22 => Int4,
            other => Other(other),
        })
    }

    /// The plugin SDK's name for this type, when the SDK has one.
    pub fn sdk(self) -> Option<graft_plugin_sdk::DType> {
        graft_plugin_sdk::DType::from_onnx_code(self.code())
    }

    /// The ONNX code of this type.
    pub fn code(self) -> i32 {
        use DataType::*;
        match self {
            Float => 1,
            Uint8 => 2,
            Int8 => 3,
            Uint16 => 4,
            Int16 => 5,
            Int32 => 6,
            Int64 => 7,
            String => 8,
            Bool => 9,
            Float16 => 10,
            Double => 11,
            Uint32 => 12,
            Uint64 => 13,
            Complex64 => 14,
            Complex128 => 15,
            Bfloat16 => 16,
            Float8e4m3fn => 17,
            Float8e4m3fnuz => 18,
            Float8e5m2 => 19,
            Float8e5m2fnuz => 20,
            Uint4 => 21,
            Int4 => 22,
            Other(code) => code,
        }
    }

    /// Bits per element in raw (little-endian, packed) storage; `None` for strings and unknown types.
    pub fn size_bits(self) -> Option<usize> {
        use DataType::*;
        Some(match self {
            Uint4 | Int4 => 4,
            Uint8 | Int8 | Bool | Float8e4m3fn | Float8e4m3fnuz | Float8e5m2 | Float8e5m2fnuz => 8,
            Uint16 | Int16 | Float16 | Bfloat16 => 16,
            Int32 | Uint32 | Float => 32,
            Int64 | Uint64 | Double | Complex64 => 64,
            Complex128 => 128,
            String | Other(_) => return None,
        })
    }

    /// Bytes needed to store `n_elements` of this type in raw form (4-bit types packed two per byte).
    pub fn storage_bytes(self, n_elements: usize) -> Option<usize> {
        self.size_bits().map(|bits| (n_elements * bits).div_ceil(8))
    }

    /// Whether this is a floating-point type (the types gradients flow through).
    pub fn is_float(self) -> bool {
        use DataType::*;
        matches!(
            self,
            Float
                | Float16
                | Bfloat16
                | Double
                | Float8e4m3fn
                | Float8e4m3fnuz
                | Float8e5m2
                | Float8e5m2fnuz
        )
    }

    /// The lower-case ONNX name (`float`, `int64`, `bfloat16`, ...).
    pub fn name(self) -> std::string::String {
        match self {
            DataType::Other(code) => format!("type{code}"),
            other => serde_json::to_value(other)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
        }
    }
}

impl std::fmt::Display for DataType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for code in 1..=25 {
            assert_eq!(DataType::from_code(code).unwrap().code(), code);
        }
        assert_eq!(DataType::from_code(0), None);
    }

    #[test]
    fn four_bit_types_pack_two_per_byte() {
        assert_eq!(DataType::Int4.storage_bytes(5), Some(3));
        assert_eq!(DataType::Float.storage_bytes(5), Some(20));
        assert_eq!(DataType::String.storage_bytes(5), None);
    }
}
