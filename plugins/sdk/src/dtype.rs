//! Element types, named and numbered as ONNX names and numbers them, with byte conversions.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// An ONNX tensor element type. Serialized as the lowercase ONNX name (`"float"`, `"float16"`,
/// `"int64"`, ...); [`DType::onnx_code`] gives the `TensorProto.DataType` number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum DType {
    /// 32-bit IEEE float (code 1).
    #[serde(rename = "float")]
    Float,
    /// Unsigned 8-bit integer (code 2).
    #[serde(rename = "uint8")]
    Uint8,
    /// Signed 8-bit integer (code 3).
    #[serde(rename = "int8")]
    Int8,
    /// Unsigned 16-bit integer (code 4).
    #[serde(rename = "uint16")]
    Uint16,
    /// Signed 16-bit integer (code 5).
    #[serde(rename = "int16")]
    Int16,
    /// Signed 32-bit integer (code 6).
    #[serde(rename = "int32")]
    Int32,
    /// Signed 64-bit integer (code 7).
    #[serde(rename = "int64")]
    Int64,
    /// Variable-length string (code 8); has no fixed size.
    #[serde(rename = "string")]
    String,
    /// Boolean stored in one byte (code 9).
    #[serde(rename = "bool")]
    Bool,
    /// 16-bit IEEE half float (code 10).
    #[serde(rename = "float16")]
    Float16,
    /// 64-bit IEEE float (code 11).
    #[serde(rename = "double")]
    Double,
    /// Unsigned 32-bit integer (code 12).
    #[serde(rename = "uint32")]
    Uint32,
    /// Unsigned 64-bit integer (code 13).
    #[serde(rename = "uint64")]
    Uint64,
    /// Complex of two 32-bit floats (code 14).
    #[serde(rename = "complex64")]
    Complex64,
    /// Complex of two 64-bit floats (code 15).
    #[serde(rename = "complex128")]
    Complex128,
    /// Brain float: the top 16 bits of a 32-bit float (code 16).
    #[serde(rename = "bfloat16")]
    Bfloat16,
    /// 8-bit float E4M3, finite only (code 17).
    #[serde(rename = "float8e4m3fn")]
    Float8E4M3Fn,
    /// 8-bit float E4M3, finite only, no negative zero (code 18).
    #[serde(rename = "float8e4m3fnuz")]
    Float8E4M3FnUz,
    /// 8-bit float E5M2 (code 19).
    #[serde(rename = "float8e5m2")]
    Float8E5M2,
    /// 8-bit float E5M2, no negative zero (code 20).
    #[serde(rename = "float8e5m2fnuz")]
    Float8E5M2FnUz,
    /// Unsigned 4-bit integer, two per byte (code 21).
    #[serde(rename = "uint4")]
    Uint4,
    /// Signed 4-bit integer, two per byte (code 22).
    #[serde(rename = "int4")]
    Int4,
    /// 4-bit float E2M1, two per byte (code 23).
    #[serde(rename = "float4e2m1")]
    Float4E2M1,
}

const ALL: [DType; 23] = [
    DType::Float,
    DType::Uint8,
    DType::Int8,
    DType::Uint16,
    DType::Int16,
    DType::Int32,
    DType::Int64,
    DType::String,
    DType::Bool,
    DType::Float16,
    DType::Double,
    DType::Uint32,
    DType::Uint64,
    DType::Complex64,
    DType::Complex128,
    DType::Bfloat16,
    DType::Float8E4M3Fn,
    DType::Float8E4M3FnUz,
    DType::Float8E5M2,
    DType::Float8E5M2FnUz,
    DType::Uint4,
    DType::Int4,
    DType::Float4E2M1,
];

impl DType {
    /// Every element type, in ONNX code order (1 to 23).
    pub fn all() -> &'static [DType] {
        &ALL
    }

    /// The ONNX `TensorProto.DataType` number of this type (1 for `float`, 10 for `float16`, ...).
    pub fn onnx_code(self) -> i32 {
        ALL.iter()
            .position(|d| *d == self)
            .map_or(0, |i| i as i32 + 1)
    }

    /// The type with ONNX `TensorProto.DataType` number `code`; `None` for 0 (UNDEFINED) and
    /// for numbers this SDK does not know.
    pub fn from_onnx_code(code: i32) -> Option<DType> {
        usize::try_from(code)
            .ok()
            .and_then(|c| c.checked_sub(1))
            .and_then(|i| ALL.get(i).copied())
    }

    /// The lowercase ONNX name, as used in JSON (`"float"`, `"bfloat16"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            DType::Float => "float",
            DType::Uint8 => "uint8",
            DType::Int8 => "int8",
            DType::Uint16 => "uint16",
            DType::Int16 => "int16",
            DType::Int32 => "int32",
            DType::Int64 => "int64",
            DType::String => "string",
            DType::Bool => "bool",
            DType::Float16 => "float16",
            DType::Double => "double",
            DType::Uint32 => "uint32",
            DType::Uint64 => "uint64",
            DType::Complex64 => "complex64",
            DType::Complex128 => "complex128",
            DType::Bfloat16 => "bfloat16",
            DType::Float8E4M3Fn => "float8e4m3fn",
            DType::Float8E4M3FnUz => "float8e4m3fnuz",
            DType::Float8E5M2 => "float8e5m2",
            DType::Float8E5M2FnUz => "float8e5m2fnuz",
            DType::Uint4 => "uint4",
            DType::Int4 => "int4",
            DType::Float4E2M1 => "float4e2m1",
        }
    }

    /// Bits per element; `None` for `string`, whose elements have no fixed size.
    pub fn size_bits(self) -> Option<u32> {
        Some(match self {
            DType::String => return None,
            DType::Uint4 | DType::Int4 | DType::Float4E2M1 => 4,
            DType::Uint8
            | DType::Int8
            | DType::Bool
            | DType::Float8E4M3Fn
            | DType::Float8E4M3FnUz
            | DType::Float8E5M2
            | DType::Float8E5M2FnUz => 8,
            DType::Uint16 | DType::Int16 | DType::Float16 | DType::Bfloat16 => 16,
            DType::Float | DType::Int32 | DType::Uint32 => 32,
            DType::Double | DType::Int64 | DType::Uint64 | DType::Complex64 => 64,
            DType::Complex128 => 128,
        })
    }

    /// Bytes taken by a tensor of `shape` ([`DType::byte_len`] of its element count);
    /// `None` for `string` or on overflow.
    pub fn byte_len_of_shape(self, shape: &[usize]) -> Option<usize> {
        let elements = shape.iter().try_fold(1usize, |a, d| a.checked_mul(*d))?;
        self.byte_len(elements)
    }

    /// Bytes taken by `elements` packed elements (4-bit types round up to whole bytes);
    /// `None` for `string` or on overflow.
    pub fn byte_len(self, elements: usize) -> Option<usize> {
        let bits = elements.checked_mul(self.size_bits()? as usize)?;
        Some(bits.div_ceil(8))
    }

    /// True for the real floating-point types this SDK converts to and from `f32`:
    /// `float`, `float16`, `bfloat16` and `double`.
    pub fn is_float(self) -> bool {
        matches!(
            self,
            DType::Float | DType::Float16 | DType::Bfloat16 | DType::Double
        )
    }

    /// The safetensors type of the same layout; `None` where safetensors has none
    /// (string, complex, 4-bit types, the `fnuz` float8 variants).
    pub fn to_safetensors(self) -> Option<safetensors::Dtype> {
        use safetensors::Dtype as S;
        Some(match self {
            DType::Float => S::F32,
            DType::Uint8 => S::U8,
            DType::Int8 => S::I8,
            DType::Uint16 => S::U16,
            DType::Int16 => S::I16,
            DType::Int32 => S::I32,
            DType::Int64 => S::I64,
            DType::Bool => S::BOOL,
            DType::Float16 => S::F16,
            DType::Double => S::F64,
            DType::Uint32 => S::U32,
            DType::Uint64 => S::U64,
            DType::Bfloat16 => S::BF16,
            DType::Float8E4M3Fn => S::F8_E4M3,
            DType::Float8E5M2 => S::F8_E5M2,
            _ => return None,
        })
    }

    /// The element type for a safetensors type; `None` for types ONNX has no name for.
    pub fn from_safetensors(dtype: safetensors::Dtype) -> Option<DType> {
        DType::all()
            .iter()
            .copied()
            .find(|d| d.to_safetensors() == Some(dtype))
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DType {
    type Err = String;

    /// Parses the lowercase ONNX name (`"float"`, `"int64"`, ...).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ALL.iter()
            .copied()
            .find(|d| d.name() == s)
            .ok_or_else(|| format!("unknown element type \"{s}\""))
    }
}

/// Decodes little-endian `bytes` of a floating type into `f32` values. `None` when `dtype` is
/// not one of `float`, `float16`, `bfloat16`, `double`, or `bytes` is not a whole number of
/// elements. `double` values are rounded to nearest.
pub fn bytes_to_f32(dtype: DType, bytes: &[u8]) -> Option<Vec<f32>> {
    let mut values = vec![0f32; bytes.len() / float_width(dtype)?];
    bytes_to_f32_into(dtype, bytes, &mut values).then_some(values)
}

/// [`bytes_to_f32`] into `values`, which must hold exactly the elements of `bytes`; false
/// (and nothing written) when `dtype` is not a floating type or the lengths do not match.
pub fn bytes_to_f32_into(dtype: DType, bytes: &[u8], values: &mut [f32]) -> bool {
    let Some(width) = float_width(dtype) else {
        return false;
    };
    if bytes.len() != width * values.len() {
        return false;
    }
    let pairs = values.iter_mut().zip(bytes.chunks_exact(width));
    match dtype {
        DType::Float => pairs.for_each(|(v, c)| *v = f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        DType::Float16 => {
            pairs.for_each(|(v, c)| *v = f16_bits_to_f32(u16::from_le_bytes([c[0], c[1]])))
        }
        DType::Bfloat16 => pairs.for_each(|(v, c)| {
            *v = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16)
        }),
        _ => pairs.for_each(|(v, c)| {
            *v = f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32
        }),
    }
    true
}

/// Encodes `values` as little-endian bytes of a floating type, rounding to nearest even for
/// `float16` and `bfloat16`. `None` when `dtype` is not `float`, `float16`, `bfloat16` or
/// `double`.
pub fn f32_to_bytes(dtype: DType, values: &[f32]) -> Option<Vec<u8>> {
    let mut bytes = vec![0u8; values.len() * float_width(dtype)?];
    f32_to_bytes_into(dtype, values, &mut bytes).then_some(bytes)
}

/// [`f32_to_bytes`] into `bytes`, which must hold exactly the encoded `values`; false (and
/// nothing written) when `dtype` is not a floating type or the lengths do not match.
pub fn f32_to_bytes_into(dtype: DType, values: &[f32], bytes: &mut [u8]) -> bool {
    let Some(width) = float_width(dtype) else {
        return false;
    };
    if bytes.len() != width * values.len() {
        return false;
    }
    let pairs = bytes.chunks_exact_mut(width).zip(values);
    match dtype {
        DType::Float => pairs.for_each(|(c, v)| c.copy_from_slice(&v.to_le_bytes())),
        DType::Float16 => {
            pairs.for_each(|(c, v)| c.copy_from_slice(&f32_to_f16_bits(*v).to_le_bytes()))
        }
        DType::Bfloat16 => {
            pairs.for_each(|(c, v)| c.copy_from_slice(&f32_to_bf16_bits(*v).to_le_bytes()))
        }
        _ => pairs.for_each(|(c, v)| c.copy_from_slice(&(*v as f64).to_le_bytes())),
    }
    true
}

/// Bytes per element of the floating types [`bytes_to_f32`] and [`f32_to_bytes`] convert.
fn float_width(dtype: DType) -> Option<usize> {
    match dtype {
        DType::Float => Some(4),
        DType::Float16 | DType::Bfloat16 => Some(2),
        DType::Double => Some(8),
        _ => None,
    }
}

/// Widens IEEE half-float bits to `f32` exactly.
pub fn f16_bits_to_f32(bits: u16) -> f32 {
    let sign = ((bits as u32) & 0x8000) << 16;
    let exp = ((bits >> 10) & 0x1f) as u32;
    let man = (bits & 0x03ff) as u32;
    match exp {
        0 => {
            let magnitude = man as f32 * f32::from_bits(0x3380_0000);
            f32::from_bits(sign | magnitude.to_bits())
        }
        0x1f => f32::from_bits(sign | 0x7f80_0000 | (man << 13)),
        _ => f32::from_bits(sign | ((exp + 112) << 23) | (man << 13)),
    }
}

/// Narrows `value` to IEEE half-float bits, rounding to nearest even; overflow gives infinity,
/// NaN stays NaN.
pub fn f32_to_f16_bits(value: f32) -> u16 {
    let x = value.to_bits();
    let sign = (x & 0x8000_0000) >> 16;
    let exp = x & 0x7f80_0000;
    let man = x & 0x007f_ffff;
    if exp == 0x7f80_0000 {
        let nan = if man == 0 { 0 } else { 0x0200 };
        return (sign | 0x7c00 | nan | (man >> 13)) as u16;
    }
    let half_exp = ((exp >> 23) as i32) - 127 + 15;
    if half_exp >= 0x1f {
        return (sign | 0x7c00) as u16;
    }
    if half_exp <= 0 {
        if 14 - half_exp > 24 {
            return sign as u16;
        }
        let man = man | 0x0080_0000;
        let mut half_man = man >> (14 - half_exp);
        let round_bit = 1 << (13 - half_exp);
        if (man & round_bit) != 0 && (man & (3 * round_bit - 1)) != 0 {
            half_man += 1;
        }
        return (sign | half_man) as u16;
    }
    let bits = sign | ((half_exp as u32) << 10) | (man >> 13);
    let round_bit = 0x0000_1000;
    if (man & round_bit) != 0 && (man & (3 * round_bit - 1)) != 0 {
        (bits + 1) as u16
    } else {
        bits as u16
    }
}

/// Narrows `value` to bfloat16 bits, rounding to nearest even; NaN stays NaN.
pub fn f32_to_bf16_bits(value: f32) -> u16 {
    let x = value.to_bits();
    if value.is_nan() {
        return ((x >> 16) | 0x0040) as u16;
    }
    ((x + 0x7fff + ((x >> 16) & 1)) >> 16) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_names_round_trip() {
        for (i, d) in DType::all().iter().enumerate() {
            assert_eq!(d.onnx_code(), i as i32 + 1);
            assert_eq!(DType::from_onnx_code(d.onnx_code()), Some(*d));
            assert_eq!(d.name().parse::<DType>().unwrap(), *d);
            assert_eq!(
                serde_json::to_string(d).unwrap(),
                format!("\"{}\"", d.name())
            );
        }
        assert_eq!(DType::Float.onnx_code(), 1);
        assert_eq!(DType::Int64.onnx_code(), 7);
        assert_eq!(DType::Float16.onnx_code(), 10);
        assert_eq!(DType::Bfloat16.onnx_code(), 16);
        assert_eq!(DType::Int4.onnx_code(), 22);
        assert_eq!(DType::from_onnx_code(0), None);
        assert_eq!(DType::from_onnx_code(24), None);
        assert_eq!(DType::from_onnx_code(-1), None);
    }

    #[test]
    fn sizes() {
        assert_eq!(DType::Float.size_bits(), Some(32));
        assert_eq!(DType::Int4.size_bits(), Some(4));
        assert_eq!(DType::String.size_bits(), None);
        assert_eq!(DType::Uint4.byte_len(3), Some(2));
        assert_eq!(DType::Float16.byte_len(3), Some(6));
    }

    #[test]
    fn half_conversions() {
        for v in [
            0.0f32,
            -0.0,
            1.0,
            -2.5,
            65504.0,
            6.1035156e-5,
            5.9604645e-8,
            0.33325195,
        ] {
            assert_eq!(f16_bits_to_f32(f32_to_f16_bits(v)), v, "{v}");
        }
        assert_eq!(f32_to_f16_bits(1.0), 0x3c00);
        assert_eq!(f32_to_f16_bits(65520.0), 0x7c00);
        assert!(f16_bits_to_f32(f32_to_f16_bits(f32::NAN)).is_nan());
        assert_eq!(f32_to_f16_bits(1.0 + 1.0 / 2048.0), 0x3c00);
        assert_eq!(f32_to_f16_bits(1.0 + 3.0 / 2048.0), 0x3c02);
        assert_eq!(f32_to_bf16_bits(1.0), 0x3f80);
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3f80_8000)), 0x3f80);
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3f81_8000)), 0x3f82);
        let values = [1.5f32, -3.25, 0.0];
        for d in [DType::Float, DType::Float16, DType::Bfloat16, DType::Double] {
            let bytes = f32_to_bytes(d, &values).unwrap();
            assert_eq!(bytes.len(), d.byte_len(3).unwrap());
            assert_eq!(bytes_to_f32(d, &bytes).unwrap(), values);
        }
        assert!(bytes_to_f32(DType::Int32, &[0; 4]).is_none());
        assert!(bytes_to_f32(DType::Float, &[0; 3]).is_none());
    }
}
