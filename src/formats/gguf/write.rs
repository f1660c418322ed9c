//! Writing a GGUF file (version 3) from a GGUF input: its metadata passed through in order
//! (`general.file_type` and `general.quantization_version` set as llama.cpp's quantizer sets
//! them), the tensor table with each tensor's new ggml type, data aligned as the input's
//! alignment says. The executor streams the tensors after [`GgufHeader::bytes`].

use crate::catalogue::gguf::{GgmlType, GgufDoc, Value};
use crate::dtype::DType;

/// `GGML_QNT_VERSION`, which llama.cpp's quantizer writes as `general.quantization_version`.
pub const QNT_VERSION: u64 = 2;

/// One tensor of the output table.
#[derive(Debug, Clone, PartialEq)]
pub struct OutTensor {
    /// Its name.
    pub name: String,
    /// GGUF dims (fastest first).
    pub dims: Vec<u64>,
    /// Its ggml type in the output.
    pub ggml: GgmlType,
    /// Its bytes.
    pub nbytes: u64,
}

/// The output's header and where each tensor's data goes.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufHeader {
    /// Header bytes, padded to the alignment (tensor data follows).
    pub bytes: Vec<u8>,
    /// Each tensor's absolute offset in the file.
    pub offsets: Vec<u64>,
    /// The file's length.
    pub len: u64,
}

/// The ggml type that stores `d` as it is (GGUF's plain types).
pub fn ggml_of(d: DType) -> Option<GgmlType> {
    let id = match d {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 30,
        DType::F64 => 28,
        DType::I8 => 24,
        DType::I16 => 25,
        DType::I32 => 26,
        DType::I64 => 27,
        _ => return None,
    };
    GgmlType::from_id(id)
}

/// llama.cpp's `llama_ftype` of a file whose retyped tensors are `d` (`--to`).
pub fn file_type(d: DType) -> Option<u64> {
    Some(match d {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 32,
        _ => return None,
    })
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend((s.len() as u64).to_le_bytes());
    b.extend(s.as_bytes());
}

fn type_id(v: &Value) -> u32 {
    match v {
        Value::U(_, "uint8") => 0,
        Value::I(_, "int8") => 1,
        Value::U(_, "uint16") => 2,
        Value::I(_, "int16") => 3,
        Value::U(_, "uint32") => 4,
        Value::I(_, "int32") => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::Str(_) => 8,
        Value::Array(..) => 9,
        Value::U(..) => 10,
        Value::I(..) => 11,
        Value::F(..) => 12,
    }
}

fn item_type(name: &str) -> u32 {
    match name {
        "uint8" => 0,
        "int8" => 1,
        "uint16" => 2,
        "int16" => 3,
        "uint32" => 4,
        "int32" => 5,
        "float32" => 6,
        "bool" => 7,
        "string" => 8,
        "array" => 9,
        "uint64" => 10,
        "int64" => 11,
        _ => 12,
    }
}

fn put_value(b: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U(x, t) => match *t {
            "uint8" => b.push(*x as u8),
            "uint16" => b.extend((*x as u16).to_le_bytes()),
            "uint32" => b.extend((*x as u32).to_le_bytes()),
            _ => b.extend(x.to_le_bytes()),
        },
        Value::I(x, t) => match *t {
            "int8" => b.push(*x as i8 as u8),
            "int16" => b.extend((*x as i16).to_le_bytes()),
            "int32" => b.extend((*x as i32).to_le_bytes()),
            _ => b.extend(x.to_le_bytes()),
        },
        Value::F32(x) => b.extend(x.to_bits().to_le_bytes()),
        Value::F(x, _) => b.extend(x.to_le_bytes()),
        Value::Bool(x) => b.push(*x as u8),
        Value::Str(s) => put_str(b, s),
        Value::Array(t, items) => {
            b.extend(item_type(t).to_le_bytes());
            b.extend((items.len() as u64).to_le_bytes());
            for i in items {
                put_value(b, i);
            }
        }
    }
}

/// The header of a GGUF file holding `doc`'s metadata (each `set` key removed and appended
/// with its new value, as llama.cpp's `gguf_set_val_*` does; `split.*` keys removed) and
/// `tensors` (in that order), aligned as `doc` says.
pub fn header(doc: &GgufDoc, set: &[(&str, Value)], tensors: &[OutTensor]) -> GgufHeader {
    // as gguf_set_val_* does: the key removed, then appended; split keys removed
    let mut kv: Vec<(String, Value)> = doc
        .metadata
        .iter()
        .filter(|(k, _)| {
            !matches!(
                k.as_str(),
                "split.no" | "split.count" | "split.tensors.count"
            )
        })
        .cloned()
        .collect();
    for (k, v) in set {
        kv.retain(|(key, _)| key != k);
        kv.push((k.to_string(), v.clone()));
    }
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend((kv.len() as u64).to_le_bytes());
    for (k, v) in &kv {
        put_str(&mut b, k);
        b.extend(type_id(v).to_le_bytes());
        put_value(&mut b, v);
    }
    let align = doc.alignment;
    let mut rel = 0u64;
    let mut rels = Vec::with_capacity(tensors.len());
    for t in tensors {
        put_str(&mut b, &t.name);
        b.extend((t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            b.extend(d.to_le_bytes());
        }
        b.extend(t.ggml.id.to_le_bytes());
        b.extend(rel.to_le_bytes());
        rels.push(rel);
        rel = (rel + t.nbytes).div_ceil(align) * align;
    }
    let data = (b.len() as u64).div_ceil(align) * align;
    b.resize(data as usize, 0);
    // every tensor's data is padded to the alignment, the last one too (as ggml and gguf-py
    // write it)
    let len = data + rel;
    GgufHeader {
        offsets: rels.iter().map(|r| data + r).collect(),
        bytes: b,
        len,
    }
}

/// The plan of a GGUF -> GGUF output, as llama.cpp's quantizer decides: what it leaves as it is
/// (1-D tensors, norms, its named exceptions) is kept, block-quantized tensors kept are written
/// as their blocks, and with `q8` (`--to q8_0`) what it retypes becomes Q8_0 (rows of no whole
/// block in f16, its fallback).
pub fn plan_retype(cat: &crate::catalogue::Catalogue, plan: &mut crate::plan::Plan, q8: bool) {
    // what llama.cpp's quantizer leaves as it is, a GGUF output leaves too
    let tensors = cat.tensors.clone();
    plan.update(cat, |ts| {
        for p in ts.iter_mut() {
            let t = &tensors[p.tensor.0];
            if p.by_default && !super::llama_retypes(&t.name, t.shape.len()) {
                p.keep();
                p.reason = "kept as llama.cpp's quantizer keeps it (1-D, norm, or one of \
                            its named exceptions)"
                    .into();
                p.by_default = false;
            }
            // a block-quantized tensor kept is written as its blocks
            if let Some(b) = t.blocks.filter(|_| super::copies_blocks(t, p)) {
                p.bytes_out = b.nbytes;
            }
            // Q8_0: what llama.cpp retypes, rows of whole blocks; other rows in f16 (its
            // fallback for a shape no 32-block type fits)
            if q8 && p.by_default {
                let numel: u64 = t.shape.iter().product();
                if t.shape.last().is_some_and(|&n| n % 32 == 0) {
                    p.to = DType::F32;
                    p.ggml = crate::catalogue::gguf::GgmlType::from_id(8);
                    p.bytes_out = numel / 32 * 34;
                } else {
                    p.set_target(DType::F16, numel);
                    p.reason = "f16: its rows are no whole number of Q8_0 blocks (as \
                                llama.cpp falls back)"
                        .into();
                }
            }
        }
    });
}
