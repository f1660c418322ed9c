//! llama.cpp's GGUF (versions 2 and 3, little-endian): the header, every metadata key and the
//! tensor table, read and checked against the file (no tensor data is read). Tensors of plain
//! element types (F32, F16, BF16, F64, I8, I16, I32, I64) enter the catalogue with torch's shape
//! (GGUF lists dimensions fastest first); block-quantized ones (Q8_0, Q4_K...) are listed with
//! their ggml type and refused, by name, by the commands that read values.
//!
//! Every length comes from the file and is checked against the bytes that remain before
//! anything is allocated for it.

/// The ggml block codecs (Q8_0 ... Q6_K, MXFP4), bit-identical to gguf-py.
pub mod ggml;
/// A Hugging Face folder to GGUF as convert_hf_to_gguf.py writes it, and back.
pub mod hf;
/// GGUF written: GGUF -> GGUF as llama_model_quantize writes it.
pub mod write;

use std::fs::File;
use std::io::Read;
use std::path::Path;

pub use crate::catalogue::gguf::{GgmlType, GgufDoc, GgufTensor, Value, DEFAULT_ALIGNMENT};
use crate::catalogue::{Blocks, Catalogue, InputKind, SourceFile, TensorEntry};
use crate::dtype::DType;
use crate::error::{Error, Result};

/// Most tensors and metadata keys a file may declare (llama.cpp's largest models hold a few
/// thousand tensors): a bound on what a header can make us allocate before reading it.
const MAX_ENTRIES: u64 = 1 << 20;
/// Deepest array nesting.
const MAX_DEPTH: usize = 4;

struct Reader<'a> {
    path: &'a Path,
    buf: &'a [u8],
    pos: usize,
    /// A read needed more than the buffer holds.
    ran_out: bool,
}

impl Reader<'_> {
    fn bad<T>(&self, what: impl std::fmt::Display) -> Result<T> {
        Err(Error::invalid(
            self.path,
            format!("GGUF byte {}: {what}", self.pos),
        ))
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&[u8]> {
        let left = (self.buf.len() - self.pos) as u64;
        if n > left {
            self.ran_out = true;
            return self.bad(format!(
                "{what} needs {n} bytes but only {left} remain (truncated?)"
            ));
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4, what)?.try_into().expect("4"),
        ))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8, what)?.try_into().expect("8"),
        ))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.u64(what)?;
        let b = self.take(n, what)?;
        Ok(String::from_utf8_lossy(b).into_owned())
    }

    fn value(&mut self, ty: u32, depth: usize) -> Result<Value> {
        let b = |r: &mut Self, n: u64| -> Result<Vec<u8>> { Ok(r.take(n, "a value")?.to_vec()) };
        Ok(match ty {
            0 => Value::U(b(self, 1)?[0] as u64, "uint8"),
            1 => Value::I(b(self, 1)?[0] as i8 as i64, "int8"),
            2 => Value::U(
                u16::from_le_bytes(b(self, 2)?.try_into().expect("2")) as u64,
                "uint16",
            ),
            3 => Value::I(
                i16::from_le_bytes(b(self, 2)?.try_into().expect("2")) as i64,
                "int16",
            ),
            4 => Value::U(self.u32("a value")? as u64, "uint32"),
            5 => Value::I(self.u32("a value")? as i32 as i64, "int32"),
            6 => Value::F32(f32::from_bits(self.u32("a value")?)),
            7 => match b(self, 1)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                x => return self.bad(format!("bool value {x}")),
            },
            8 => Value::Str(self.string("a string")?),
            9 => {
                if depth >= MAX_DEPTH {
                    return self.bad("arrays nested too deep");
                }
                let item = self.u32("an array type")?;
                let n = self.u64("an array length")?;
                // every item takes at least one byte: a length beyond what remains is a lie
                let left = (self.buf.len() - self.pos) as u64;
                if n > left {
                    self.ran_out = true;
                    return self.bad(format!("array of {n} items but only {left} bytes remain"));
                }
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(item, depth + 1)?);
                }
                Value::Array(type_name(item), v)
            }
            10 => Value::U(self.u64("a value")?, "uint64"),
            11 => Value::I(self.u64("a value")? as i64, "int64"),
            12 => Value::F(f64::from_bits(self.u64("a value")?), "float64"),
            t => return self.bad(format!("unknown value type {t}")),
        })
    }
}

fn type_name(t: u32) -> &'static str {
    match t {
        0 => "uint8",
        1 => "int8",
        2 => "uint16",
        3 => "int16",
        4 => "uint32",
        5 => "int32",
        6 => "float32",
        7 => "bool",
        8 => "string",
        9 => "array",
        10 => "uint64",
        11 => "int64",
        12 => "float64",
        _ => "unknown",
    }
}

/// Reads the header of GGUF file `path`: metadata and tensor table, every tensor's data checked
/// to lie inside the file. The header's size is known only once it is parsed: it is read in
/// growing chunks (8 MiB first; a vocabulary of a few hundred thousand tokens fits), at most
/// 1 GiB.
pub fn read(path: &Path) -> Result<GgufDoc> {
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    const MAX_HEADER: u64 = 1 << 30;
    let mut want = len.min(8 << 20);
    let mut buf = Vec::new();
    loop {
        let have = buf.len() as u64;
        (&mut f)
            .take(want - have)
            .read_to_end(&mut buf)
            .map_err(|e| Error::io(path, e))?;
        match parse(path, &buf, len) {
            Err((_, true)) if want < len.min(MAX_HEADER) => {
                want = (want * 4).min(len.min(MAX_HEADER))
            }
            Err((e, _)) => return Err(e),
            Ok(doc) => return Ok(doc),
        }
    }
}

/// Parses a GGUF header held whole in `buf`, for a file of `len` bytes (`len` >= `buf.len()`):
/// what [`read`] does once it has read enough of the file.
pub fn parse_header(path: &Path, buf: &[u8], len: u64) -> Result<GgufDoc> {
    parse(path, buf, len).map_err(|(e, _)| e)
}

/// Parses the header in `buf` (the file's first bytes; the file has `len`). The error says
/// whether it ran out of `buf` (more of the file may hold the rest).
fn parse(path: &Path, buf: &[u8], len: u64) -> std::result::Result<GgufDoc, (Error, bool)> {
    let mut r = Reader {
        path,
        buf,
        pos: 0,
        ran_out: false,
    };
    parse_with(&mut r, len).map_err(|e| (e, r.ran_out))
}

fn parse_with(r: &mut Reader<'_>, len: u64) -> Result<GgufDoc> {
    let path = r.path;
    if r.take(4, "the magic")? != b"GGUF" {
        return r.bad("not a GGUF file (no GGUF magic)");
    }
    let version = r.u32("the version")?;
    if !(2..=3).contains(&version) {
        return r.bad(format!(
            "GGUF version {version} (weightcast reads versions 2 and 3; a big-endian file reads as a huge version)"
        ));
    }
    let n_tensors = r.u64("the tensor count")?;
    let n_kv = r.u64("the metadata count")?;
    if n_tensors > MAX_ENTRIES || n_kv > MAX_ENTRIES {
        return r.bad(format!(
            "{n_tensors} tensors and {n_kv} metadata keys: more than {MAX_ENTRIES}"
        ));
    }
    let mut metadata = Vec::with_capacity(n_kv.min(4096) as usize);
    for _ in 0..n_kv {
        let key = r.string("a metadata key")?;
        let ty = r.u32("a value type")?;
        let v = r.value(ty, 0)?;
        metadata.push((key, v));
    }
    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some((_, Value::U(a, "uint32"))) if a.is_power_of_two() => *a,
        Some((_, v)) => {
            return r.bad(format!(
                "general.alignment must be a power of two as uint32, not {v:?}"
            ))
        }
    };
    let mut infos = Vec::with_capacity(n_tensors.min(65_536) as usize);
    for _ in 0..n_tensors {
        let name = r.string("a tensor name")?;
        let n_dims = r.u32("a dimension count")?;
        if n_dims > 8 {
            return r.bad(format!("tensor `{name}` has {n_dims} dimensions"));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(r.u64("a dimension")?);
        }
        let id = r.u32("a tensor type")?;
        let Some(ggml) = GgmlType::from_id(id) else {
            return r.bad(format!("tensor `{name}` has unknown ggml type {id}"));
        };
        let offset = r.u64("a tensor offset")?;
        infos.push((name, ggml, dims, offset));
    }
    let header_end = r.pos as u64;
    let data_offset = header_end.div_ceil(alignment) * alignment;
    let mut tensors = Vec::with_capacity(infos.len());
    for (name, ggml, dims, offset) in infos {
        let what = |m: String| Error::invalid(path, format!("GGUF tensor `{name}`: {m}"));
        let count = dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .ok_or_else(|| what(format!("dimensions {dims:?} overflow")))?;
        if dims.first().is_some_and(|&d| d % ggml.block != 0) {
            return Err(what(format!(
                "its first dimension {} is not a multiple of {}'s block of {}",
                dims[0], ggml.name, ggml.block
            )));
        }
        let nbytes = (count / ggml.block)
            .checked_mul(ggml.bytes)
            .ok_or_else(|| what("its size overflows".into()))?;
        if offset % alignment != 0 {
            return Err(what(format!(
                "data offset {offset} is not aligned to {alignment}"
            )));
        }
        let start = data_offset
            .checked_add(offset)
            .filter(|s| s.checked_add(nbytes).is_some_and(|e| e <= len))
            .ok_or_else(|| {
                what(format!(
                    "{nbytes} bytes at data offset {offset} run past the end of the file ({len} bytes; truncated?)"
                ))
            })?;
        tensors.push(GgufTensor {
            name,
            ggml,
            dims,
            offset: start,
            nbytes,
        });
    }
    let mut sorted: Vec<&GgufTensor> = tensors.iter().collect();
    sorted.sort_by_key(|t| t.offset);
    for w in sorted.windows(2) {
        if w[0].offset + w[0].nbytes > w[1].offset {
            return Err(Error::invalid(
                path,
                format!("GGUF tensors `{}` and `{}` overlap", w[0].name, w[1].name),
            ));
        }
    }
    let mut names = std::collections::HashSet::new();
    if let Some(dup) = tensors.iter().find(|t| !names.insert(t.name.as_str())) {
        return Err(Error::invalid(
            path,
            format!("GGUF tensor `{}` appears twice", dup.name),
        ));
    }
    Ok(GgufDoc {
        version,
        alignment,
        data_offset,
        metadata,
        tensors,
    })
}

/// Opens a GGUF file as a catalogue: its plain tensors (torch's shape, GGUF's names), the
/// document in [`Catalogue::gguf`].
pub fn open(path: &Path) -> Result<Catalogue> {
    let doc = read(path)?;
    let len = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();
    let tensors = doc
        .tensors
        .iter()
        .filter_map(|t| {
            let count = t.dims.iter().product::<u64>();
            let (dtype, nbytes, blocks) = match t.ggml.dtype() {
                Some(d) => (d, t.nbytes, None),
                None if crate::formats::gguf::ggml::supported(t.ggml.id) => (
                    DType::F32,
                    count.checked_mul(4)?,
                    Some(Blocks {
                        ggml: t.ggml,
                        nbytes: t.nbytes,
                    }),
                ),
                None => return None,
            };
            Some(
                TensorEntry::new(
                    t.name.clone(),
                    dtype,
                    t.dims.iter().rev().copied().collect(),
                    0,
                    t.offset,
                    nbytes,
                )
                .with_blocks(blocks),
            )
        })
        .collect();
    let mut cat = Catalogue::new(
        path.to_path_buf(),
        InputKind::Gguf,
        vec![SourceFile::local(path, len)],
        tensors,
    );
    let (read, unread): (Vec<&GgufTensor>, Vec<&GgufTensor>) = doc
        .quantized()
        .partition(|t| crate::formats::gguf::ggml::supported(t.ggml.id));
    let counts = |v: &[&GgufTensor]| {
        type_counts(v)
            .into_iter()
            .map(|(n, c)| format!("{c} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if !read.is_empty() {
        cat.notes.push(format!(
            "{} tensors are block-quantized ({}): they read as the f32 values gguf.quants.dequantize gives",
            read.len(),
            counts(&read)
        ));
    }
    if !unread.is_empty() {
        cat.notes.push(format!(
            "{} tensors are in ggml types weightcast does not dequantize ({}): listed, not read",
            unread.len(),
            counts(&unread)
        ));
    }
    cat.gguf = Some(std::sync::Arc::new(doc));
    Ok(cat)
}

/// `(ggml type name, count)` of `tensors`, in order of first appearance.
pub fn type_counts(tensors: &[&GgufTensor]) -> Vec<(&'static str, usize)> {
    let mut out: Vec<(&'static str, usize)> = Vec::new();
    for t in tensors {
        match out.iter_mut().find(|(n, _)| *n == t.ggml.name) {
            Some(e) => e.1 += 1,
            None => out.push((t.ggml.name, 1)),
        }
    }
    out
}

/// Refuses a GGUF input whose values a command must read when some tensors are in ggml types
/// weightcast does not dequantize: naming the first of them and its type.
pub fn refuse_quantized(cat: &Catalogue, command: &str) -> Result<()> {
    let Some(doc) = &cat.gguf else {
        return Ok(());
    };
    let unread: Vec<&GgufTensor> = doc
        .quantized()
        .filter(|t| !crate::formats::gguf::ggml::supported(t.ggml.id))
        .collect();
    match unread.first() {
        None => Ok(()),
        Some(t) => Err(Error::usage(format!(
            "{}: {command} of this GGUF file is not supported: `{}` is {} ({} tensors in types \
             weightcast does not dequantize; it reads F32, F16, BF16, F64, integers, Q8_0, Q4_0, \
             Q4_1, Q5_0, Q5_1, Q2_K to Q6_K and MXFP4)",
            cat.path.display(),
            t.name,
            t.ggml.name,
            unread.len()
        ))),
    }
}

/// A GGUF output of a model folder: tensors named, ordered and typed as llama.cpp's converter
/// writes them (1-D tensors, norms and biases in F32; the others in the file type, Q8_0 rows of
/// no whole block in F16); rules decide on top of the file type.
pub fn plan_from_folder(
    cat: &Catalogue,
    plan: &mut crate::plan::Plan,
    ftype: hf::FileType,
) -> Result<()> {
    use hf::FileType;
    let out = hf::describe(cat, ftype, &plan.config)?;
    plan.remove(&out.skipped);
    let f32_only: std::collections::HashSet<usize> = out
        .tensors
        .iter()
        .filter(|t| t.f32_only)
        .map(|t| t.source)
        .collect();
    let shapes: Vec<Vec<u64>> = cat.tensors.iter().map(|t| t.shape.clone()).collect();
    plan.update(cat, |ts| {
        for p in ts.iter_mut() {
            let shape = &shapes[p.tensor.0];
            let numel: u64 = shape.iter().product();
            if f32_only.contains(&p.tensor.0) {
                p.set_target(DType::F32, numel);
                p.reason = "F32, as llama.cpp reads 1-D tensors, norms and biases".into();
                p.by_default = false;
            } else if ftype == FileType::Q8_0 && p.by_default {
                if shape.last().is_some_and(|&n| n % 32 == 0) {
                    p.set_target(DType::F32, numel);
                    p.ggml = crate::catalogue::gguf::GgmlType::from_id(8);
                    p.bytes_out = numel / 32 * 34;
                    p.reason = "--to q8_0: ggml Q8_0, quantized from its float32 values".into();
                } else {
                    p.set_target(DType::F16, numel);
                    p.reason = "f16: its rows are no whole number of Q8_0 blocks (as llama.cpp \
                                falls back)"
                        .into();
                }
            }
        }
    });
    plan.gguf_hf = Some(std::sync::Arc::new(out));
    Ok(())
}

/// Whether llama.cpp's quantizer (`llama_model_quantize`, llama-cpp-python 0.3.36's
/// `tensor_allows_quantization`) retypes tensor `name` of `n_dims` dimensions; the others it
/// copies as they are (1-D tensors, norms, expert gates, positional and token-type embeddings,
/// small conv1d and RWKV weights, T5's relative bias, multimodal position and patch tensors).
pub fn llama_retypes(name: &str, n_dims: usize) -> bool {
    const SKIP: &[&str] = &[
        "_norm.weight",
        "ffn_gate_inp.weight",
        "ffn_gate_tid2eid.weight",
        "altup",
        "laurel",
        "per_layer_model_proj",
        "ssm_conv1d",
        "shortconv.conv.weight",
        "indexer.k_proj.weight",
        "indexer.q_proj.weight",
        "time_mix_first.weight",
        "time_mix_w0.weight",
        "time_mix_w1.weight",
        "time_mix_w2.weight",
        "time_mix_v0.weight",
        "time_mix_v1.weight",
        "time_mix_v2.weight",
        "time_mix_a0.weight",
        "time_mix_a1.weight",
        "time_mix_a2.weight",
        "time_mix_g1.weight",
        "time_mix_g2.weight",
        "time_mix_decay_w1.weight",
        "time_mix_decay_w2.weight",
        "time_mix_lerp_fused.weight",
        "attn_rel_b.weight",
        ".position_embd",
        "sam.pos_embd",
        "sam.neck.",
        "sam.net_",
        ".rel_pos",
        ".patch_embd",
        ".patch_merger",
        "a.rvq.codebook",
        "mm.a.code_embd",
    ];
    n_dims >= 2
        && name.ends_with("weight")
        && name != "position_embd.weight"
        && name != "token_types.weight"
        && !SKIP.iter().any(|s| name.contains(s))
}

/// llama.cpp's tensor order in a file it writes (`weight_name_comparer`): by the layer number
/// of `blk.N.` (-1 for the others), then by name.
pub fn llama_order(a: &str, b: &str) -> std::cmp::Ordering {
    let layer = |n: &str| -> i64 {
        n.strip_prefix("blk.")
            .and_then(|r| {
                let d: String = r.chars().take_while(char::is_ascii_digit).collect();
                (r[d.len()..].starts_with('.') && !d.is_empty()).then(|| d.parse().ok())?
            })
            .unwrap_or(-1)
    };
    layer(a).cmp(&layer(b)).then_with(|| a.cmp(b))
}

/// Whether a GGUF output copies plan entry `p` of tensor `t` as its stored blocks: a
/// block-quantized tensor that is not cast, or that a rule (not the default `--to`) kept.
pub fn copies_blocks(t: &TensorEntry, p: &crate::plan::TensorPlan) -> bool {
    t.blocks.is_some()
        && (!p.is_cast() && (!p.by_default || !llama_retypes(&t.name, t.shape.len())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(kv: &[u8], n_kv: u64, tensors: &[u8], n_t: u64) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(n_t.to_le_bytes());
        b.extend(n_kv.to_le_bytes());
        b.extend(kv);
        b.extend(tensors);
        b
    }

    fn string(s: &str) -> Vec<u8> {
        let mut b = (s.len() as u64).to_le_bytes().to_vec();
        b.extend(s.as_bytes());
        b
    }

    #[test]
    fn reads_a_table_and_checks_it() {
        let mut kv = string("general.architecture");
        kv.extend(8u32.to_le_bytes());
        kv.extend(string("llama"));
        let mut t = string("w");
        t.extend(2u32.to_le_bytes());
        t.extend(32u64.to_le_bytes());
        t.extend(2u64.to_le_bytes());
        t.extend(8u32.to_le_bytes()); // Q8_0
        t.extend(0u64.to_le_bytes());
        let mut b = header(&kv, 1, &t, 1);
        let data = b.len().div_ceil(32) * 32;
        b.resize(data + 2 * 34, 0);
        let p = Path::new("x.gguf");
        let doc = parse(p, &b, b.len() as u64).unwrap();
        assert_eq!(doc.architecture(), Some("llama"));
        assert_eq!(doc.data_offset, data as u64);
        assert_eq!(doc.tensors[0].nbytes, 68);
        // what the writer makes of it reads back the same
        let outs: Vec<crate::formats::gguf::write::OutTensor> = doc
            .tensors
            .iter()
            .map(|t| crate::formats::gguf::write::OutTensor {
                name: t.name.clone(),
                dims: t.dims.clone(),
                ggml: t.ggml,
                nbytes: t.nbytes,
            })
            .collect();
        let head = crate::formats::gguf::write::header(&doc, &[], &outs);
        let back = parse(p, &head.bytes, head.len).unwrap();
        assert_eq!(
            (back.metadata, back.data_offset),
            (doc.metadata.clone(), doc.data_offset)
        );
        assert_eq!(back.tensors, doc.tensors);
        // one byte short: the tensor runs past the end
        let e = parse(p, &b[..b.len() - 1], b.len() as u64 - 1)
            .unwrap_err()
            .0;
        assert!(e.to_string().contains("run past the end"), "{e}");
    }

    #[test]
    fn hostile_headers_never_panic_nor_allocate_by_length() {
        let p = Path::new("x.gguf");
        // an array claiming 2^60 items
        let mut kv = string("a");
        kv.extend(9u32.to_le_bytes());
        kv.extend(0u32.to_le_bytes());
        kv.extend((1u64 << 60).to_le_bytes());
        let b = header(&kv, 1, &[], 0);
        assert!(parse(p, &b, b.len() as u64).is_err());
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        for _ in 0..20_000 {
            let mut b = header(&[], 0, &[], 0);
            b.truncate(8);
            for _ in 0..(x % 96) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b.push((x & 0xFF) as u8);
            }
            let _ = parse(p, &b, b.len() as u64);
        }
    }

    #[test]
    fn llama_cpp_rules() {
        assert!(llama_retypes("blk.0.attn_q.weight", 2));
        assert!(llama_retypes("output.weight", 2));
        assert!(!llama_retypes("blk.0.attn_norm.weight", 1));
        assert!(!llama_retypes("blk.0.attn_q.bias", 2));
        assert!(!llama_retypes("blk.3.ffn_gate_inp.weight", 2));
        assert!(!llama_retypes("token_types.weight", 2));
        let mut v = [
            "blk.10.a.weight",
            "output.weight",
            "blk.2.b.weight",
            "blk.2.a.weight",
        ];
        v.sort_by(|a, b| llama_order(a, b));
        assert_eq!(
            v,
            [
                "output.weight",
                "blk.2.a.weight",
                "blk.2.b.weight",
                "blk.10.a.weight"
            ]
        );
    }
}
