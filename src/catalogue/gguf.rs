//! What a GGUF file holds besides tensor data: ggml types, metadata values, the tensor table
//! (read by [`crate::formats::gguf`]).

use crate::dtype::DType;

/// GGUF's default data alignment.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// A ggml tensor type: its GGUF id, name, elements per block and bytes per block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GgmlType {
    /// The id in the file.
    pub id: u32,
    /// ggml's name (`Q8_0`).
    pub name: &'static str,
    /// Elements per block (1 for plain types).
    pub block: u64,
    /// Bytes per block.
    pub bytes: u64,
}

/// ggml's types (`GGML_QUANT_SIZES`).
const GGML_TYPES: &[(u32, &str, u64, u64)] = &[
    (0, "F32", 1, 4),
    (1, "F16", 1, 2),
    (2, "Q4_0", 32, 18),
    (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24),
    (8, "Q8_0", 32, 34),
    (9, "Q8_1", 32, 40),
    (10, "Q2_K", 256, 84),
    (11, "Q3_K", 256, 110),
    (12, "Q4_K", 256, 144),
    (13, "Q5_K", 256, 176),
    (14, "Q6_K", 256, 210),
    (15, "Q8_K", 256, 292),
    (16, "IQ2_XXS", 256, 66),
    (17, "IQ2_XS", 256, 74),
    (18, "IQ3_XXS", 256, 98),
    (19, "IQ1_S", 256, 50),
    (20, "IQ4_NL", 32, 18),
    (21, "IQ3_S", 256, 110),
    (22, "IQ2_S", 256, 82),
    (23, "IQ4_XS", 256, 136),
    (24, "I8", 1, 1),
    (25, "I16", 1, 2),
    (26, "I32", 1, 4),
    (27, "I64", 1, 8),
    (28, "F64", 1, 8),
    (29, "IQ1_M", 256, 56),
    (30, "BF16", 1, 2),
    (34, "TQ1_0", 256, 54),
    (35, "TQ2_0", 256, 66),
    (39, "MXFP4", 32, 17),
];

impl GgmlType {
    /// The type with GGUF id `id`.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        GGML_TYPES
            .iter()
            .find(|t| t.0 == id)
            .map(|&(id, name, block, bytes)| GgmlType {
                id,
                name,
                block,
                bytes,
            })
    }

    /// The plain element type it stores, if it is one.
    pub fn dtype(self) -> Option<DType> {
        Some(match self.name {
            "F32" => DType::F32,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            "F64" => DType::F64,
            "I8" => DType::I8,
            "I16" => DType::I16,
            "I32" => DType::I32,
            "I64" => DType::I64,
            _ => return None,
        })
    }
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// An unsigned integer (uint8/16/32/64).
    U(u64, &'static str),
    /// A signed integer (int8/16/32/64).
    I(i64, &'static str),
    /// A float64 (`F(x, "float64")`); a float32 is [`Value::F32`].
    F(f64, &'static str),
    /// A float32, its bits as stored (a NaN's payload kept).
    F32(f32),
    /// A bool.
    Bool(bool),
    /// A string (UTF-8, invalid bytes replaced).
    Str(String),
    /// An array: its item type's name and its items.
    Array(&'static str, Vec<Value>),
}

impl Value {
    /// GGUF's name of the type.
    pub fn type_name(&self) -> String {
        match self {
            Value::U(_, t) | Value::I(_, t) | Value::F(_, t) => t.to_string(),
            Value::F32(_) => "float32".into(),
            Value::Bool(_) => "bool".into(),
            Value::Str(_) => "string".into(),
            Value::Array(t, v) => format!("array[{t}; {}]", v.len()),
        }
    }

    /// As JSON; arrays longer than `max` show their first `max` items and their length.
    pub fn to_json(&self, max: usize) -> serde_json::Value {
        use serde_json::json;
        match self {
            Value::U(v, _) => json!(v),
            Value::I(v, _) => json!(v),
            Value::F(v, _) => json!(v),
            Value::F32(v) => json!(v),
            Value::Bool(b) => json!(b),
            Value::Str(s) => json!(s),
            Value::Array(t, v) if v.len() > max => json!({
                "type": t, "len": v.len(),
                "first": v.iter().take(max).map(|x| x.to_json(max)).collect::<Vec<_>>(),
            }),
            Value::Array(_, v) => json!(v.iter().map(|x| x.to_json(max)).collect::<Vec<_>>()),
        }
    }

    /// The string, if it is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// One tensor of the table.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensor {
    /// Its name.
    pub name: String,
    /// Its ggml type.
    pub ggml: GgmlType,
    /// Dimensions as GGUF lists them (fastest first).
    pub dims: Vec<u64>,
    /// Absolute byte offset of its data.
    pub offset: u64,
    /// Bytes of its data.
    pub nbytes: u64,
}

/// What a GGUF file holds besides tensor data.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufDoc {
    /// Format version (2 or 3).
    pub version: u32,
    /// Data alignment (`general.alignment`, 32 by default).
    pub alignment: u64,
    /// Where tensor data starts.
    pub data_offset: u64,
    /// Every metadata key, in file order.
    pub metadata: Vec<(String, Value)>,
    /// Every tensor, in table order.
    pub tensors: Vec<GgufTensor>,
}

impl GgufDoc {
    /// Metadata value `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Option<&str> {
        self.get("general.architecture").and_then(Value::as_str)
    }

    /// The tensors stored in block-quantized ggml types (not read as values yet).
    pub fn quantized(&self) -> impl Iterator<Item = &GgufTensor> {
        self.tensors.iter().filter(|t| t.ggml.dtype().is_none())
    }
}
