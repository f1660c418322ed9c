//! Element types: the safetensors spellings, torch's names, sizes, and which ones weightcast casts.

use std::fmt;
use std::str::FromStr;

use crate::error::Error;

/// Every element type a safetensors file may declare, in the crate's increasing-alignment order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum DType {
    /// 1-byte boolean.
    Bool,
    /// 4-bit float (e2m1), packed two per byte.
    F4,
    /// 6-bit float e2m3.
    F6E2M3,
    /// 6-bit float e3m2.
    F6E3M2,
    /// Unsigned 8-bit integer.
    U8,
    /// Signed 8-bit integer.
    I8,
    /// 8-bit float e5m2 (`torch.float8_e5m2`).
    F8E5M2,
    /// 8-bit float e4m3fn (`torch.float8_e4m3fn`).
    F8E4M3,
    /// 8-bit exponent-only scale (`torch.float8_e8m0fnu`).
    F8E8M0,
    /// 8-bit float e4m3fnuz.
    F8E4M3Fnuz,
    /// 8-bit float e5m2fnuz.
    F8E5M2Fnuz,
    /// Signed 16-bit integer.
    I16,
    /// Unsigned 16-bit integer.
    U16,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
    /// Signed 32-bit integer.
    I32,
    /// Unsigned 32-bit integer.
    U32,
    /// IEEE single precision.
    F32,
    /// Complex of two f32.
    C64,
    /// IEEE double precision.
    F64,
    /// Signed 64-bit integer.
    I64,
    /// Unsigned 64-bit integer.
    U64,
}

impl DType {
    /// The dtype of a storage class (`FloatStorage`, C++ `Float8_e4m3fnStorage`), as torch
    /// names them.
    pub fn from_storage_name(name: &str) -> Option<DType> {
        Some(match name.strip_suffix("Storage")? {
            "Double" => DType::F64,
            "Float" => DType::F32,
            "Half" => DType::F16,
            "BFloat16" => DType::BF16,
            "Long" => DType::I64,
            "Int" => DType::I32,
            "Short" => DType::I16,
            "Char" => DType::I8,
            "Byte" => DType::U8,
            "Bool" => DType::Bool,
            "ComplexFloat" => DType::C64,
            "Float8_e4m3fn" => DType::F8E4M3,
            "Float8_e5m2" => DType::F8E5M2,
            "Float8_e4m3fnuz" => DType::F8E4M3Fnuz,
            "Float8_e5m2fnuz" => DType::F8E5M2Fnuz,
            "Float8_e8m0fnu" => DType::F8E8M0,
            "UInt16" => DType::U16,
            "UInt32" => DType::U32,
            "UInt64" => DType::U64,
            _ => return None,
        })
    }

    /// Every variant, for tables and tests.
    pub const ALL: [DType; 22] = [
        DType::Bool,
        DType::F4,
        DType::F6E2M3,
        DType::F6E3M2,
        DType::U8,
        DType::I8,
        DType::F8E5M2,
        DType::F8E4M3,
        DType::F8E8M0,
        DType::F8E4M3Fnuz,
        DType::F8E5M2Fnuz,
        DType::I16,
        DType::U16,
        DType::F16,
        DType::BF16,
        DType::I32,
        DType::U32,
        DType::F32,
        DType::C64,
        DType::F64,
        DType::I64,
        DType::U64,
    ];

    /// Size of one element in bits.
    pub fn bitsize(self) -> usize {
        match self {
            DType::F4 => 4,
            DType::F6E2M3 | DType::F6E3M2 => 6,
            DType::Bool
            | DType::U8
            | DType::I8
            | DType::F8E5M2
            | DType::F8E4M3
            | DType::F8E8M0
            | DType::F8E4M3Fnuz
            | DType::F8E5M2Fnuz => 8,
            DType::I16 | DType::U16 | DType::F16 | DType::BF16 => 16,
            DType::I32 | DType::U32 | DType::F32 => 32,
            DType::C64 | DType::F64 | DType::I64 | DType::U64 => 64,
        }
    }

    /// The spelling in a safetensors header (`F16`, `BF16`, `F8_E4M3`, ...).
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::Bool => "BOOL",
            DType::F4 => "F4",
            DType::F6E2M3 => "F6_E2M3",
            DType::F6E3M2 => "F6_E3M2",
            DType::U8 => "U8",
            DType::I8 => "I8",
            DType::F8E5M2 => "F8_E5M2",
            DType::F8E4M3 => "F8_E4M3",
            DType::F8E8M0 => "F8_E8M0",
            DType::F8E4M3Fnuz => "F8_E4M3FNUZ",
            DType::F8E5M2Fnuz => "F8_E5M2FNUZ",
            DType::I16 => "I16",
            DType::U16 => "U16",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::I32 => "I32",
            DType::U32 => "U32",
            DType::F32 => "F32",
            DType::C64 => "C64",
            DType::F64 => "F64",
            DType::I64 => "I64",
            DType::U64 => "U64",
        }
    }

    /// Parses a safetensors header spelling (case-sensitive, as the reference crate is).
    pub fn from_safetensors_name(name: &str) -> Option<DType> {
        DType::ALL
            .into_iter()
            .find(|d| d.safetensors_name() == name)
    }

    /// torch's name for the dtype, as written in `config.json` (`float16`, `bfloat16`, ...).
    pub fn torch_name(self) -> &'static str {
        match self {
            DType::Bool => "bool",
            DType::F4 => "float4_e2m1fn_x2",
            DType::F6E2M3 => "float6_e2m3fn",
            DType::F6E3M2 => "float6_e3m2fn",
            DType::U8 => "uint8",
            DType::I8 => "int8",
            DType::F8E5M2 => "float8_e5m2",
            DType::F8E4M3 => "float8_e4m3fn",
            DType::F8E8M0 => "float8_e8m0fnu",
            DType::F8E4M3Fnuz => "float8_e4m3fnuz",
            DType::F8E5M2Fnuz => "float8_e5m2fnuz",
            DType::I16 => "int16",
            DType::U16 => "uint16",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::I32 => "int32",
            DType::U32 => "uint32",
            DType::F32 => "float32",
            DType::C64 => "complex64",
            DType::F64 => "float64",
            DType::I64 => "int64",
            DType::U64 => "uint64",
        }
    }

    /// A floating-point type (real, not complex). Only these are ever candidates for a cast.
    pub fn is_float(self) -> bool {
        matches!(
            self,
            DType::F4
                | DType::F6E2M3
                | DType::F6E3M2
                | DType::F8E5M2
                | DType::F8E4M3
                | DType::F8E8M0
                | DType::F8E4M3Fnuz
                | DType::F8E5M2Fnuz
                | DType::F16
                | DType::BF16
                | DType::F32
                | DType::F64
        )
    }

    /// A type the cast kernels read and write: f64, f32, f16, bf16, f8e4m3fn, f8e5m2, AMD's
    /// f8e4m3fnuz and f8e5m2fnuz, and f8e8m0fnu (MX scales): the [`CASTABLE`] table.
    pub fn is_castable(self) -> bool {
        CASTABLE.iter().any(|(d, _)| *d == self)
    }

    /// Bytes taken by `numel` elements, or `None` on overflow or a partial byte.
    pub fn bytes_for(self, numel: u64) -> Option<u64> {
        let bits = numel.checked_mul(self.bitsize() as u64)?;
        (bits % 8 == 0).then_some(bits / 8)
    }

    /// The largest finite value of a castable float type.
    pub fn max_finite(self) -> Option<f64> {
        match self {
            DType::F64 => Some(f64::MAX),
            DType::F32 => Some(f32::MAX as f64),
            DType::F16 => Some(65504.0),
            DType::BF16 => Some(3.3895313892515355e38),
            DType::F8E4M3 => Some(448.0),
            DType::F8E5M2 => Some(57344.0),
            DType::F8E4M3Fnuz => Some(240.0),
            DType::F8E5M2Fnuz => Some(57344.0),
            DType::F8E8M0 => Some(2f64.powi(127)),
            _ => None,
        }
    }
}

/// The dtypes weightcast casts to and from, with the names users type for each (torch's name
/// first, then the short one help shows, then other spellings). Parsing, `--to`'s help and the
/// error messages are generated from this table.
pub const CASTABLE: &[(DType, &[&str])] = &[
    (DType::F16, &["float16", "f16", "half", "fp16"]),
    (DType::BF16, &["bfloat16", "bf16"]),
    (DType::F32, &["float32", "f32", "float", "fp32"]),
    (DType::F64, &["float64", "f64", "double", "fp64"]),
    (
        DType::F8E4M3,
        &[
            "float8_e4m3fn",
            "f8e4m3",
            "f8e4m3fn",
            "fp8e4m3",
            "f8_e4m3",
            "e4m3",
        ],
    ),
    (
        DType::F8E5M2,
        &["float8_e5m2", "f8e5m2", "fp8e5m2", "f8_e5m2", "e5m2"],
    ),
    (
        DType::F8E4M3Fnuz,
        &["float8_e4m3fnuz", "f8e4m3fnuz", "e4m3fnuz"],
    ),
    (
        DType::F8E5M2Fnuz,
        &["float8_e5m2fnuz", "f8e5m2fnuz", "e5m2fnuz"],
    ),
    (
        DType::F8E8M0,
        &["float8_e8m0fnu", "f8e8m0", "f8e8m0fnu", "e8m0"],
    ),
];

/// The castable dtypes as help and messages name them: `float16|f16, bfloat16|bf16, ...`.
pub fn castable_names() -> String {
    CASTABLE
        .iter()
        .map(|(_, n)| format!("{}|{}", n[0], n[1]))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The short names of the castable dtypes: `f16, bf16, ...`.
pub fn castable_short_names() -> String {
    CASTABLE
        .iter()
        .map(|(_, n)| n[1])
        .collect::<Vec<_>>()
        .join(", ")
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.safetensors_name())
    }
}

impl FromStr for DType {
    type Err = Error;

    /// Parses the names users type: torch's (`float16`, `half`, `bfloat16`, `float8_e4m3fn`),
    /// short ones (`f16`, `fp16`, `bf16`, `f8e4m3`) and the safetensors spellings.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.trim().to_ascii_lowercase();
        let lower = lower.strip_prefix("torch.").unwrap_or(&lower);
        if let Some((d, _)) = CASTABLE.iter().find(|(_, names)| names.contains(&lower)) {
            return Ok(*d);
        }
        match lower {
            // Two fp8 formats answer to this name, with different trade-offs; guessing would
            // silently pick one for the user.
            "fp8" | "f8" | "float8" => Err(Error::usage(format!(
                "`{s}` is ambiguous: use f8e4m3 (float8_e4m3fn: more precision, max 448; what \
                 serving engines load for weights) or f8e5m2 (float8_e5m2: more range, max 57344)"
            ))),
            _ => DType::from_safetensors_name(&s.trim().to_ascii_uppercase())
                .or_else(|| DType::ALL.into_iter().find(|d| d.torch_name() == lower))
                .ok_or_else(|| {
                    Error::usage(format!("unknown dtype `{s}`: use {}", castable_names()))
                }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for d in DType::ALL {
            assert_eq!(DType::from_safetensors_name(d.safetensors_name()), Some(d));
        }
        assert_eq!(
            DType::from_safetensors_name("f32"),
            None,
            "case-sensitive like the crate"
        );
    }

    #[test]
    fn user_names() {
        for (s, d) in [
            ("half", DType::F16),
            ("fp16", DType::F16),
            ("torch.bfloat16", DType::BF16),
            ("float", DType::F32),
            ("double", DType::F64),
            ("float8_e4m3fn", DType::F8E4M3),
            ("f8e5m2", DType::F8E5M2),
            ("F8_E4M3", DType::F8E4M3),
        ] {
            assert_eq!(s.parse::<DType>().unwrap(), d, "{s}");
        }
        let err = "float17".parse::<DType>().unwrap_err().to_string();
        assert!(err.contains("float17") && err.contains("bf16"), "{err}");
    }

    #[test]
    fn sizes() {
        assert_eq!(DType::F4.bytes_for(3), None);
        assert_eq!(DType::F4.bytes_for(4), Some(2));
        assert_eq!(DType::BF16.bytes_for(10), Some(20));
        assert_eq!(DType::F64.bytes_for(u64::MAX), None);
    }
}
