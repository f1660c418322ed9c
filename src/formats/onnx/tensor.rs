//! One `TensorProto`: its fields read (no values), its data type mapped to ours, its dims checked
//! against where its values are, and the values of the typed fields that hold them as varints
//! decoded into memory.

use super::wire::{Msg, Value, Wire};
use crate::dtype::DType;
use crate::error::{Error, Result};

/// `TensorProto` fields holding typed values: float_data, int32_data, string_data, int64_data,
/// double_data, uint64_data.
const TYPED: [u32; 6] = [4, 5, 6, 7, 10, 11];
/// Most dimensions a tensor may declare.
const MAX_DIMS: usize = 64;

/// ONNX's data types (`TensorProto.DataType`): id, name, our dtype (`None`: not read), and the
/// typed field that holds its values when `raw_data` does not.
const TYPES: &[(i32, &str, Option<DType>, u32)] = &[
    (0, "UNDEFINED", None, 0),
    (1, "FLOAT", Some(DType::F32), 4),
    (2, "UINT8", Some(DType::U8), 5),
    (3, "INT8", Some(DType::I8), 5),
    (4, "UINT16", Some(DType::U16), 5),
    (5, "INT16", Some(DType::I16), 5),
    (6, "INT32", Some(DType::I32), 5),
    (7, "INT64", Some(DType::I64), 7),
    (8, "STRING", None, 6),
    (9, "BOOL", Some(DType::Bool), 5),
    (10, "FLOAT16", Some(DType::F16), 5),
    (11, "DOUBLE", Some(DType::F64), 10),
    (12, "UINT32", Some(DType::U32), 11),
    (13, "UINT64", Some(DType::U64), 11),
    (14, "COMPLEX64", Some(DType::C64), 4),
    (15, "COMPLEX128", None, 10),
    (16, "BFLOAT16", Some(DType::BF16), 5),
    (17, "FLOAT8E4M3FN", Some(DType::F8E4M3), 5),
    (18, "FLOAT8E4M3FNUZ", Some(DType::F8E4M3Fnuz), 5),
    (19, "FLOAT8E5M2", Some(DType::F8E5M2), 5),
    (20, "FLOAT8E5M2FNUZ", Some(DType::F8E5M2Fnuz), 5),
    (21, "UINT4", None, 5),
    (22, "INT4", None, 5),
    (23, "FLOAT4E2M1", None, 5),
    (24, "FLOAT8E8M0", Some(DType::F8E8M0), 5),
    (25, "UINT2", None, 5),
    (26, "INT2", None, 5),
    (27, "FLOAT6E2M3", None, 5),
    (28, "FLOAT6E3M2", None, 5),
];

/// The name ONNX gives data type `id`.
pub fn type_name(id: i32) -> Option<&'static str> {
    TYPES.iter().find(|t| t.0 == id).map(|t| t.1)
}

/// What one typed field holds: how many entries (a packed run counts once) and the first packed
/// run's span.
#[derive(Debug, Clone, Copy, Default)]
struct Typed {
    entries: u64,
    span: Option<(u64, u64)>,
}

/// A `TensorProto`'s fields, its values left where they are.
#[derive(Debug, Clone, Default)]
pub struct Proto {
    /// The message's span in the file.
    pub msg: (u64, u64),
    /// `name`.
    pub name: String,
    /// `dims`.
    pub dims: Vec<u64>,
    /// `data_type`.
    pub data_type: i32,
    /// `raw_data`'s span.
    pub raw: Option<(u64, u64)>,
    /// `data_location`.
    pub location: u64,
    /// `external_data`: key, value.
    pub external: Vec<(String, String)>,
    /// A `segment` is set.
    pub segment: bool,
    typed: [Typed; 6],
}

/// Where a tensor's values are, once checked against its dims and type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Data {
    /// `nbytes` at `offset` in the model file (`raw_data`, or packed float_data/double_data:
    /// `packed`).
    InFile {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        nbytes: u64,
        /// Packed float_data/double_data rather than raw_data.
        packed: bool,
    },
    /// `nbytes` at `offset` in the external file `location`.
    External {
        /// The location as the model gives it.
        location: String,
        /// Byte offset in that file.
        offset: u64,
        /// Byte length.
        nbytes: u64,
    },
    /// Values in typed field `field`, to decode into `nbytes` bytes of elements of `size`
    /// bytes.
    Decode {
        /// The field number.
        field: u32,
        /// Bytes of one element.
        size: usize,
        /// Bytes once decoded.
        nbytes: u64,
    },
}

/// A tensor read: its dtype, shape and data; or why it is not read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    /// Read.
    Read(DType, Vec<u64>, Data),
    /// Not read (a string or a type weightcast has no dtype for): the reason.
    Skip(String),
}

fn err(w: &Wire<'_>, name: &str, at: u64, what: impl std::fmt::Display) -> Error {
    Error::invalid(
        w.path(),
        format!("ONNX tensor `{name}` at byte offset {at}: {what}"),
    )
}

/// Reads the fields of the `TensorProto` `m` (its values are not read).
pub fn parse(w: &mut Wire<'_>, m: Msg) -> Result<Proto> {
    let mut p = Proto {
        msg: (m.pos, m.end - m.pos),
        ..Proto::default()
    };
    let mut it = m;
    while let Some(f) = w.next(&mut it)? {
        match (f.number, f.value) {
            (1, _) => {
                let mut dims = std::mem::take(&mut p.dims);
                w.varints(&f, |d| {
                    if dims.len() >= MAX_DIMS {
                        return w_bad(f.at, format!("more than {MAX_DIMS} dims"));
                    }
                    dims.push(d);
                    Ok(())
                })
                .map_err(|e| relabel(w, e))?;
                p.dims = dims;
            }
            (2, Value::Varint(v)) => p.data_type = v as i32,
            (3, Value::Len { .. }) => p.segment = true,
            (8, Value::Len { .. }) => p.name = w.string(&f)?,
            (9, Value::Len { at, len }) => p.raw = Some((at, len)),
            (13, Value::Len { .. }) => {
                let entry = w.enter(&f, &it)?;
                p.external.push(key_value(w, entry)?);
            }
            (14, Value::Varint(v)) => p.location = v,
            (n, v) => {
                if let Some(i) = TYPED.iter().position(|&t| t == n) {
                    let t = &mut p.typed[i];
                    t.entries += 1;
                    if let (None, Value::Len { at, len }) = (t.span, v) {
                        t.span = Some((at, len));
                    }
                }
            }
        }
    }
    // a negative dim reads as a huge varint
    if let Some(d) = p.dims.iter().find(|&&d| d > i64::MAX as u64) {
        return Err(err(
            w,
            &p.name,
            p.msg.0,
            format!("negative dim {}", *d as i64),
        ));
    }
    Ok(p)
}

/// An error raised inside a closure, before the path is known: relabelled by [`relabel`].
fn w_bad<T>(at: u64, what: String) -> Result<T> {
    Err(Error::Usage(format!("{what} at byte offset {at}")))
}

fn relabel(w: &Wire<'_>, e: Error) -> Error {
    match e {
        Error::Usage(m) => Error::invalid(w.path(), format!("ONNX: {m}")),
        e => e,
    }
}

/// A `StringStringEntryProto`: (key, value).
pub fn key_value(w: &mut Wire<'_>, m: Msg) -> Result<(String, String)> {
    let (mut k, mut v) = (String::new(), String::new());
    let mut it = m;
    while let Some(f) = w.next(&mut it)? {
        match f.number {
            1 => k = w.string(&f)?,
            2 => v = w.string(&f)?,
            _ => {}
        }
    }
    Ok((k, v))
}

/// Checks `p` against its dims and type: where its values are, or why it is not read. `label`
/// names it in messages.
pub fn resolve(w: &Wire<'_>, p: &Proto, label: &str) -> Result<Resolved> {
    let at = p.msg.0;
    let bad = |what: String| err(w, label, at, what);
    let Some(&(_, tname, dtype, field)) = TYPES.iter().find(|t| t.0 == p.data_type) else {
        return Err(bad(format!("unknown ONNX data type {}", p.data_type)));
    };
    let Some(dtype) = dtype else {
        return Ok(Resolved::Skip(format!("{tname}: not read")));
    };
    if p.segment {
        return Err(bad(
            "segmented tensors (TensorProto.segment) are not read".into()
        ));
    }
    let numel = p
        .dims
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad(format!("dims {:?} overflow", p.dims)))?;
    let nbytes = dtype
        .bytes_for(numel)
        .ok_or_else(|| bad(format!("dims {:?} of {tname} overflow", p.dims)))?;
    let shape = p.dims.clone();
    let need = || format!("dims {:?} of {tname} need {nbytes} bytes", p.dims);
    if p.location == 1 {
        return external(p, dtype, nbytes).map_err(|e| bad(format!("{e}; {}", need())));
    }
    if p.location != 0 {
        return Err(bad(format!("unknown data_location {}", p.location)));
    }
    let typed = TYPED
        .iter()
        .position(|&t| t == field)
        .map(|i| p.typed[i])
        .unwrap_or_default();
    if let Some((offset, len)) = p.raw.filter(|r| r.1 > 0 || typed.entries == 0) {
        if len != nbytes {
            return Err(bad(format!("raw_data holds {len} bytes where {}", need())));
        }
        let data = Data::InFile {
            offset,
            nbytes,
            packed: false,
        };
        return Ok(Resolved::Read(dtype, shape, data));
    }
    let fixed = matches!(field, 4 | 10);
    let data = match typed.span {
        _ if nbytes == 0 => Data::InFile {
            offset: at,
            nbytes: 0,
            packed: false,
        },
        Some((offset, len)) if fixed && typed.entries == 1 => {
            if len != nbytes {
                return Err(bad(format!(
                    "{} holds {len} bytes where {}",
                    field_name(field),
                    need()
                )));
            }
            Data::InFile {
                offset,
                nbytes,
                packed: true,
            }
        }
        _ if typed.entries == 0 => {
            return Err(bad(format!(
                "holds no values (no raw_data, no {}) where {}",
                field_name(field),
                need()
            )))
        }
        _ => Data::Decode {
            field,
            size: dtype.bitsize() / 8,
            nbytes,
        },
    };
    Ok(Resolved::Read(dtype, shape, data))
}

/// External data: location, offset and length, the length checked against `nbytes`.
fn external(p: &Proto, dtype: DType, nbytes: u64) -> std::result::Result<Resolved, String> {
    let get = |k: &str| {
        p.external
            .iter()
            .rev()
            .find(|e| e.0 == k)
            .map(|e| e.1.as_str())
    };
    let Some(location) = get("location").filter(|l| !l.is_empty()) else {
        return Err("external data without a location".into());
    };
    let number = |k: &str| -> std::result::Result<Option<u64>, String> {
        get(k)
            .map(|v| {
                v.trim()
                    .parse::<u64>()
                    .map_err(|_| format!("external data {k} `{v}` is not a number"))
            })
            .transpose()
    };
    let offset = number("offset")?.unwrap_or(0);
    if let Some(length) = number("length")? {
        if length != nbytes {
            return Err(format!("external data length {length}"));
        }
    }
    let data = Data::External {
        location: location.to_string(),
        offset,
        nbytes,
    };
    Ok(Resolved::Read(dtype, p.dims.clone(), data))
}

fn field_name(field: u32) -> &'static str {
    match field {
        4 => "float_data",
        5 => "int32_data",
        6 => "string_data",
        7 => "int64_data",
        10 => "double_data",
        11 => "uint64_data",
        _ => "typed data",
    }
}

/// Appends the values of typed field `field` of the `TensorProto` `m` to `out`: fixed-width
/// fields (float_data, double_data) as their bytes, varint fields as the low `size` bytes of
/// each value (little-endian: an int32_data entry holds a FLOAT16's bits, an INT8's value...).
/// Exactly `nbytes` bytes, or an error naming `label`.
pub fn decode(
    w: &mut Wire<'_>,
    m: Msg,
    label: &str,
    (field, size, nbytes): (u32, usize, u64),
    out: &mut Vec<u8>,
) -> Result<()> {
    let start = out.len() as u64;
    let too_many = |w: &Wire<'_>| {
        err(
            w,
            label,
            m.pos,
            format!(
                "{} holds more than {nbytes} bytes of values",
                field_name(field)
            ),
        )
    };
    let mut it = m;
    while let Some(f) = w.next(&mut it)? {
        if f.number != field {
            continue;
        }
        let have = out.len() as u64 - start;
        match (field, f.value) {
            (4 | 10, Value::Len { at, len }) => {
                if len > nbytes - have {
                    return Err(too_many(w));
                }
                w.copy_into(at, len, out)?;
            }
            (4, Value::Fixed32(v)) if have + 4 <= nbytes => out.extend_from_slice(&v.to_le_bytes()),
            (10, Value::Fixed64(v)) if have + 8 <= nbytes => {
                out.extend_from_slice(&v.to_le_bytes())
            }
            (4 | 10, Value::Fixed32(_) | Value::Fixed64(_)) => return Err(too_many(w)),
            (4 | 10, _) => {
                return Err(err(
                    w,
                    label,
                    f.at,
                    format!("{} holds a varint", field_name(field)),
                ))
            }
            _ => {
                let mut full = false;
                w.varints(&f, |v| {
                    if out.len() as u64 - start + size as u64 > nbytes {
                        full = true;
                        return w_bad(f.at, "too many values".into());
                    }
                    out.extend_from_slice(&v.to_le_bytes()[..size]);
                    Ok(())
                })
                .map_err(|e| if full { too_many(w) } else { relabel(w, e) })?;
            }
        }
    }
    let got = out.len() as u64 - start;
    if got != nbytes {
        return Err(err(
            w,
            label,
            m.pos,
            format!(
                "{} holds {got} bytes of values where its dims need {nbytes}",
                field_name(field)
            ),
        ));
    }
    Ok(())
}
