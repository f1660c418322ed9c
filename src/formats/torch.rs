//! PyTorch checkpoints written by `torch.save` (the zip format of torch >= 1.6), read without
//! executing any pickle code: the archive's `data.pkl` goes through our own pickle engine, every
//! tensor is found by its rebuild call, and each one becomes a byte range of its storage record
//! in the catalogue, so conversion streams it like any other tensor.
//!
//! Read: `_rebuild_tensor_v2`/`_v3` (legacy typed storages and `UntypedStorage` + dtype, both
//! spellings torch uses for float8), `_rebuild_parameter(_with_state)`, `_rebuild_from_type_v2`,
//! storages saved on any device (the location is only a label), tied weights (written once),
//! state dicts nested in training checkpoints (found automatically or by `--key`) and pickled
//! modules (names as `state_dict()` gives them).
//! Non-contiguous views are gathered on read; big-endian storages are swapped.
//! Reported and left out: quantized and sparse tensors.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Read;
use std::path::Path;

use crate::audit::{classify, Class};
use crate::catalogue::{Catalogue, InputKind, Packed, SourceFile, Strided, TensorEntry};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::formats::pickle::{self, Call, Node, NodeId, Pickle};

/// Largest `data.pkl` read into memory.
const MAX_PICKLE: u64 = 1 << 30;
/// Largest storage span read at once to gather a non-contiguous view.
const MAX_GATHER: u64 = 1 << 30;
/// Deepest nesting followed when looking for tensors.
const MAX_DEPTH: usize = 256;
/// Entries of a training checkpoint that hold the model's state dict, in order of preference.
pub const STATE_DICT_KEYS: &[&str] = &[
    "state_dict",
    "model_state_dict",
    "model",
    "module",
    "net",
    "network",
];

/// One stored record of the archive.
#[derive(Debug, Clone)]
struct Record {
    data_start: u64,
    size: u64,
    stored: bool,
}

/// A torch.save archive: its records and its parsed pickle.
#[derive(Debug)]
pub struct Archive {
    /// The parsed `data.pkl`.
    pub pickle: Pickle,
    /// Record prefix (`model/`).
    pub prefix: String,
    /// Whether storages are big-endian (`byteorder` record).
    pub big_endian: bool,
    /// A TorchScript archive (`constants.pkl` present).
    pub torchscript: bool,
    /// A legacy (non-zip) file.
    pub legacy: bool,
    records: HashMap<String, Record>,
}

/// Whether the file starts like a zip archive.
pub fn is_zip(head: &[u8]) -> bool {
    head.starts_with(b"PK\x03\x04")
}

/// Whether the file starts like a legacy (non-zip) torch.save file: a pickled magic number.
pub fn is_legacy(head: &[u8]) -> bool {
    head.len() >= 3 && head[0] == 0x80 && head[1] <= 5 && head[2] == 0x8A
}

/// The magic number legacy torch.save files start with, as LONG1 bytes (little-endian).
const LEGACY_MAGIC: [u8; 10] = [0x6C, 0xFC, 0x9C, 0x46, 0xF9, 0x20, 0x6A, 0xA8, 0x50, 0x19];

/// Reads a legacy torch.save file: magic, protocol version, sys_info, the main pickle, the list
/// of storage keys, then each storage as an 8-byte element count and its bytes.
fn read_legacy(path: &Path, file: &File, file_len: u64) -> Result<Archive> {
    use std::os::unix::fs::FileExt;
    // The pickles come first; read a window that grows until they parse.
    let mut window = (64u64 << 20).min(file_len);
    let (pickles, mut pos) = loop {
        let mut buf = vec![0u8; window as usize];
        file.read_exact_at(&mut buf, 0)
            .map_err(|e| Error::io(path, e))?;
        match parse_stack(&buf) {
            Ok(r) => break r,
            Err(e) if window < file_len.min(MAX_PICKLE) => {
                let _ = e;
                window = (window * 2).min(file_len).min(MAX_PICKLE);
            }
            Err(e) => return Err(Error::invalid(path, e)),
        }
    };
    let [magic, proto, sys_info, main, keys] = pickles;
    match magic.node(magic.root) {
        Node::BigInt(b) if b.as_slice() == &LEGACY_MAGIC[..] => {}
        _ => {
            return Err(Error::invalid(
                path,
                "invalid magic number: not a torch.save file",
            ))
        }
    }
    if proto.int(proto.root) != Some(1001) {
        return Err(Error::invalid(
            path,
            "unsupported legacy protocol version (expected 1001)",
        ));
    }
    let big_endian = dict_get(&sys_info, sys_info.root, "little_endian")
        .is_some_and(|v| sys_info.node(v) == &Node::Bool(false));
    // Element size of each storage, from the persistent ids of the main pickle.
    let mut elsize: HashMap<String, u64> = HashMap::new();
    for n in &main.nodes {
        if let Node::PersId(t) = n {
            let Some(t) = main.seq(*t) else { continue };
            if t.len() >= 5 && main.str(t[0]) == Some("storage") {
                let key = match main.node(t[2]) {
                    Node::Str(s) => s.clone(),
                    Node::Int(i) => i.to_string(),
                    _ => continue,
                };
                if let Some((_, sname)) = main.global(t[1]) {
                    let size = storage_dtype(sname)
                        .map(|d| (d.bitsize() as u64 / 8).max(1))
                        .unwrap_or(1);
                    elsize.insert(key, size);
                }
            }
        }
    }
    let key_list: Vec<String> = keys
        .seq(keys.root)
        .ok_or_else(|| Error::invalid(path, "the storage key list is not a list"))?
        .iter()
        .map(|&k| {
            keys.str(k)
                .map(str::to_string)
                .ok_or_else(|| Error::invalid(path, "a storage key is not a string"))
        })
        .collect::<Result<_>>()?;
    let mut records = HashMap::new();
    for key in key_list {
        let mut count = [0u8; 8];
        file.read_exact_at(&mut count, pos as u64).map_err(|_| {
            Error::invalid(path, format!("storage `{key}`: the file ends at byte {file_len} before its size (truncated?)"))
        })?;
        let count = u64::from_le_bytes(count);
        let size = count
            .checked_mul(*elsize.get(&key).unwrap_or(&1))
            .filter(|s| (pos as u64 + 8).checked_add(*s).is_some_and(|e| e <= file_len))
            .ok_or_else(|| {
                Error::invalid(path, format!("storage `{key}` at byte {pos}: {count} elements run past the end of the file (truncated?)"))
            })?;
        records.insert(
            format!("data/{key}"),
            Record {
                data_start: pos as u64 + 8,
                size,
                stored: true,
            },
        );
        pos += 8 + size as usize;
    }
    Ok(Archive {
        pickle: main,
        prefix: String::new(),
        big_endian,
        torchscript: false,
        legacy: true,
        records,
    })
}

/// The five stacked pickles of a legacy file and where the raw storages begin.
fn parse_stack(buf: &[u8]) -> std::result::Result<([Pickle; 5], usize), String> {
    let mut pos = 0;
    let mut out = Vec::with_capacity(5);
    for what in [
        "magic number",
        "protocol version",
        "sys_info",
        "main pickle",
        "storage keys",
    ] {
        let (p, n) = pickle::parse_prefix(&buf[pos..], pickle::Limits::default())
            .map_err(|e| format!("{what} (from byte {pos}): {e}"))?;
        out.push(p);
        pos += n;
    }
    Ok((out.try_into().expect("five pickles"), pos))
}

/// Opens the archive and parses its `data.pkl` (or a legacy file's stacked pickles).
pub fn read_archive(path: &Path) -> Result<Archive> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    {
        use std::os::unix::fs::FileExt;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let mut head = [0u8; 3];
        let n = file.read_at(&mut head, 0).map_err(|e| Error::io(path, e))?;
        if is_legacy(&head[..n]) {
            return read_legacy(path, &file, len);
        }
    }
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| Error::invalid(path, format!("not a readable zip archive: {e}")))?;
    let mut records = HashMap::new();
    let mut prefix: Option<String> = None;
    for i in 0..zip.len() {
        let f = zip
            .by_index_raw(i)
            .map_err(|e| Error::invalid(path, format!("zip entry {i}: {e}")))?;
        let name = f.name().to_string();
        let Some((p, rest)) = name.split_once('/') else {
            return Err(Error::invalid(
                path,
                format!("zip entry `{name}` is not in a folder, as torch.save writes"),
            ));
        };
        let p = format!("{p}/");
        match &prefix {
            None => prefix = Some(p.clone()),
            Some(q) if *q != p => {
                return Err(Error::invalid(
                    path,
                    format!("zip entries under both `{q}` and `{p}`"),
                ))
            }
            _ => {}
        }
        let Some(data_start) = f.data_start() else {
            return Err(Error::invalid(
                path,
                format!("zip entry `{name}`: no data offset"),
            ));
        };
        if data_start
            .checked_add(f.compressed_size())
            .is_none_or(|end| end > file_len)
        {
            return Err(Error::invalid(
                path,
                format!(
                    "zip entry `{name}` runs past the end of the file (byte {data_start} + {} > {file_len}): truncated?",
                    f.compressed_size()
                ),
            ));
        }
        records.insert(
            rest.to_string(),
            Record {
                data_start,
                size: f.size(),
                stored: f.compression() == zip::CompressionMethod::Stored,
            },
        );
    }
    let prefix = prefix.unwrap_or_default();
    let torchscript = records.contains_key("constants.pkl");
    let read_record = |zip: &mut zip::ZipArchive<_>, rest: &str, limit: u64| -> Result<Vec<u8>> {
        let full = format!("{prefix}{rest}");
        let f = zip
            .by_name(&full)
            .map_err(|e| Error::invalid(path, format!("record `{full}`: {e}")))?;
        if f.size() > limit {
            return Err(Error::invalid(
                path,
                format!(
                    "record `{full}` is {} bytes, over the {limit}-byte limit",
                    f.size()
                ),
            ));
        }
        let mut buf = Vec::new();
        f.take(limit)
            .read_to_end(&mut buf)
            .map_err(|e| Error::invalid(path, format!("record `{full}`: {e}")))?;
        Ok(buf)
    };
    if !records.contains_key("data.pkl") {
        return Err(Error::invalid(
            path,
            format!("zip archive has no `{prefix}data.pkl`: not a torch.save checkpoint"),
        ));
    }
    let data = read_record(&mut zip, "data.pkl", MAX_PICKLE)?;
    let pickle =
        pickle::parse(&data).map_err(|e| Error::invalid(path, format!("{prefix}data.pkl: {e}")))?;
    let big_endian = match records.get("byteorder") {
        Some(_) => read_record(&mut zip, "byteorder", 16)? == b"big",
        None => false,
    };
    Ok(Archive {
        pickle,
        prefix,
        big_endian,
        torchscript,
        legacy: false,
        records,
    })
}

impl Archive {
    /// Size of record `name` (relative to the prefix), if present.
    pub fn records_size(&self, name: &str) -> Option<u64> {
        self.records.get(name).map(|r| r.size)
    }

    /// (data offset, size) of a stored record.
    pub fn record(&self, name: &str) -> Option<(u64, u64)> {
        self.records
            .get(name)
            .filter(|r| r.stored)
            .map(|r| (r.data_start, r.size))
    }

    /// The storage keys (`data/<key>` records).
    pub fn data_keys(&self) -> Vec<String> {
        self.records
            .keys()
            .filter_map(|k| k.strip_prefix("data/"))
            .map(str::to_string)
            .collect()
    }
}

/// Every tensor below `root` with its `state_dict()`-style name.
pub fn tensors_in(path: &Path, pk: &Pickle, root: NodeId) -> Result<Vec<(String, NodeId)>> {
    let mut found = Vec::new();
    walk(
        path,
        pk,
        root,
        &mut Vec::new(),
        &mut found,
        0,
        &mut HashSet::new(),
    )?;
    Ok(found.into_iter().map(|f| (f.name, f.node)).collect())
}

/// A tensor found in the pickle.
#[derive(Debug, Clone)]
struct Found {
    name: String,
    node: NodeId,
}

/// Opens a torch.save zip checkpoint as a catalogue. `key` selects the entry holding the state
/// dict (dotted, e.g. `model_state_dict`); without it, a training checkpoint's state dict is
/// found by [`STATE_DICT_KEYS`].
pub fn open(path: &Path, key: Option<&str>) -> Result<Catalogue> {
    let ar = read_archive(path)?;
    let pk = &ar.pickle;
    let len = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();
    let mut notes = Vec::new();
    let (root, prefix) = select_root(path, pk, key)?;
    if let Some(p) = &prefix {
        let dropped = dropped_entries(&ar, p);
        notes.push(format!(
            "tensors taken from the entry `{p}` (use --key to choose another){}",
            if dropped.is_empty() {
                String::new()
            } else {
                format!("; left out: {}", describe_dropped(&dropped))
            }
        ));
    }
    let found = tensors_in(path, pk, root)?;
    let mut tensors = Vec::new();
    type ViewKey = (u64, u64, DType, Vec<u64>, Option<Strided>, Option<Packed>);
    let mut seen: HashMap<ViewKey, String> = HashMap::new();
    let mut aliases = Vec::new();
    for (name, node) in found {
        let f = Found { name, node };
        match tensor_entry(&ar, f.node) {
            Ok((dtype, shape, offset, nbytes, strided, packed)) => {
                let k = (
                    offset,
                    nbytes,
                    dtype,
                    shape.clone(),
                    strided.clone(),
                    packed.clone(),
                );
                if let Some(kept) = seen.get(&k) {
                    aliases.push((f.name.clone(), kept.clone()));
                    continue;
                }
                seen.insert(k, f.name.clone());
                tensors.push(TensorEntry {
                    name: f.name,
                    dtype,
                    shape,
                    file: 0,
                    offset,
                    nbytes,
                    strided,
                    packed,
                });
            }
            Err(why) => notes.push(format!("tensor `{}` left out: {why}", f.name)),
        }
    }
    if !aliases.is_empty() {
        notes.push(format!(
            "{} tied tensor(s) share storage with another and are written once: {}",
            aliases.len(),
            aliases
                .iter()
                .map(|(a, k)| format!("`{a}` = `{k}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let globals: Vec<(String, String, Class)> = pk
        .globals()
        .into_iter()
        .map(|(m, n)| {
            let c = classify(&m, &n);
            (m, n, c)
        })
        .collect();
    let dangerous: Vec<String> = globals
        .iter()
        .filter(|g| g.2 == Class::Dangerous)
        .map(|g| format!("{}.{}", g.0, g.1))
        .collect();
    if !dangerous.is_empty() {
        notes.push(format!(
            "the pickle references dangerous globals ({}): weightcast never runs them; do not torch.load this file",
            dangerous.join(", ")
        ));
    }
    // safetensors metadata in the convert.py style: {"format": "pt", removed: kept}.
    let mut metadata = vec![("format".to_string(), "pt".to_string())];
    metadata.extend(aliases.iter().cloned());
    Ok(Catalogue {
        path: path.to_path_buf(),
        kind: if ar.torchscript {
            InputKind::TorchScript
        } else if ar.legacy {
            InputKind::TorchLegacy
        } else {
            InputKind::Torch
        },
        files: vec![SourceFile {
            path: path.to_path_buf(),
            name: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            len,
            metadata: Some(metadata),
            big_endian: ar.big_endian,
        }],
        tensors,
        index_metadata: None,
        folder: None,
        notes,
        globals: globals
            .into_iter()
            .map(|(m, n, c)| (format!("{m}.{n}"), c))
            .collect(),
    })
}

/// The top-level entries of a checkpoint other than `kept`: (name, tensors, tensor bytes).
pub fn dropped_entries(ar: &Archive, kept: &str) -> Vec<(String, usize, u64)> {
    let pk = &ar.pickle;
    let first = kept.split('.').next().unwrap_or(kept);
    let Some(items) = dict_items(pk, pk.root) else {
        return vec![];
    };
    items
        .iter()
        .filter_map(|&(k, v)| {
            let name = key_text(pk, k)?;
            if name == first {
                return None;
            }
            let mut found = Vec::new();
            let _ = walk(
                Path::new(""),
                pk,
                v,
                &mut Vec::new(),
                &mut found,
                0,
                &mut HashSet::new(),
            );
            let bytes = found
                .iter()
                .filter_map(|f| tensor_entry(ar, f.node).ok())
                .map(|(_, _, _, n, _, _)| n)
                .sum();
            Some((name, found.len(), bytes))
        })
        .collect()
}

/// "`optimizer` (8 tensors, 1234 bytes), `epoch`".
pub fn describe_dropped(d: &[(String, usize, u64)]) -> String {
    d.iter()
        .map(|(n, t, b)| {
            if *t > 0 {
                format!("`{n}` ({t} tensors, {b} bytes)")
            } else {
                format!("`{n}`")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The node whose tensors are the state dict, and the entry it came from.
pub fn select_root(
    path: &Path,
    pk: &Pickle,
    key: Option<&str>,
) -> Result<(NodeId, Option<String>)> {
    if key == Some("") {
        return Ok((pk.root, None));
    }
    if let Some(key) = key {
        let mut node = pk.root;
        for part in key.split('.') {
            node = dict_get(pk, node, part).ok_or_else(|| {
                Error::usage(format!(
                    "{}: --key {key}: no entry `{part}` (entries: {})",
                    path.display(),
                    dict_keys(pk, node).join(", ")
                ))
            })?;
        }
        return Ok((node, Some(key.to_string())));
    }
    // A training checkpoint: a dict with a state-dict entry and other, non-tensor entries.
    for k in STATE_DICT_KEYS {
        if let Some(n) = dict_get(pk, pk.root, k) {
            if dict_items(pk, n).is_some_and(|items| !items.is_empty()) {
                return Ok((n, Some(k.to_string())));
            }
        }
    }
    Ok((pk.root, None))
}

/// The (key, value) pairs of a dict or dict-like object (OrderedDict).
fn dict_items(pk: &Pickle, id: NodeId) -> Option<&[(NodeId, NodeId)]> {
    match pk.node(id) {
        Node::Dict(items) => Some(items),
        Node::Object(o) if !o.items.is_empty() || is_dict_class(pk, id) => Some(&o.items),
        _ => None,
    }
}

fn is_dict_class(pk: &Pickle, id: NodeId) -> bool {
    matches!(
        pk.callee(id),
        Some(("collections", "OrderedDict" | "defaultdict"))
    )
}

fn key_text(pk: &Pickle, k: NodeId) -> Option<String> {
    match pk.node(k) {
        Node::Str(s) => Some(s.clone()),
        Node::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

fn dict_get(pk: &Pickle, id: NodeId, key: &str) -> Option<NodeId> {
    dict_items(pk, id)?
        .iter()
        .find(|(k, _)| key_text(pk, *k).as_deref() == Some(key))
        .map(|(_, v)| *v)
}

fn dict_keys(pk: &Pickle, id: NodeId) -> Vec<String> {
    dict_items(pk, id)
        .map(|items| items.iter().filter_map(|(k, _)| key_text(pk, *k)).collect())
        .unwrap_or_default()
}

const TENSOR_REBUILDS: &[&str] = &[
    "_rebuild_tensor_v2",
    "_rebuild_tensor_v3",
    "_rebuild_parameter",
    "_rebuild_parameter_with_state",
    "_rebuild_qtensor",
    "_rebuild_sparse_tensor",
    "_rebuild_from_type_v2",
    "_rebuild_tensor",
];

fn is_tensor(pk: &Pickle, id: NodeId) -> bool {
    matches!(pk.callee(id), Some((m, n)) if (m == "torch._utils" || m == "torch._tensor") && TENSOR_REBUILDS.contains(&n))
}

/// Collects every tensor below `id` with its dotted name, the way `state_dict()` names them
/// (a module's `_parameters`, `_buffers` and `_modules` add no name part).
fn walk(
    path: &Path,
    pk: &Pickle,
    id: NodeId,
    name: &mut Vec<String>,
    out: &mut Vec<Found>,
    depth: usize,
    visiting: &mut HashSet<NodeId>,
) -> Result<()> {
    if depth > MAX_DEPTH {
        return Err(Error::invalid(
            path,
            format!(
                "data.pkl nests deeper than {MAX_DEPTH} levels at `{}`",
                name.join(".")
            ),
        ));
    }
    if is_tensor(pk, id) {
        out.push(Found {
            name: name.join("."),
            node: id,
        });
        return Ok(());
    }
    if !visiting.insert(id) {
        return Ok(()); // a cycle: already being walked above
    }
    let child = |k: Option<String>,
                 v: NodeId,
                 name: &mut Vec<String>,
                 out: &mut Vec<Found>,
                 visiting: &mut HashSet<NodeId>|
     -> Result<()> {
        let pushed = match k {
            Some(k) if !matches!(k.as_str(), "_parameters" | "_buffers" | "_modules") => {
                name.push(k);
                true
            }
            _ => false,
        };
        let r = walk(path, pk, v, name, out, depth + 1, visiting);
        if pushed {
            name.pop();
        }
        r
    };
    match pk.node(id) {
        Node::Dict(items) => {
            for &(k, v) in items {
                child(key_text(pk, k), v, name, out, visiting)?;
            }
        }
        Node::List(items) | Node::Tuple(items) => {
            for (i, &v) in items.iter().enumerate() {
                child(Some(i.to_string()), v, name, out, visiting)?;
            }
        }
        Node::Object(o) => {
            for &(k, v) in &o.items {
                child(key_text(pk, k), v, name, out, visiting)?;
            }
            for (i, &v) in o.appends.iter().enumerate() {
                child(Some(i.to_string()), v, name, out, visiting)?;
            }
            if let Some(state) = o.state {
                // __setstate__ state: a dict, or (dict, slots)
                match pk.node(state) {
                    Node::Tuple(parts) => {
                        for &p in parts {
                            child(None, p, name, out, visiting)?;
                        }
                    }
                    _ => child(None, state, name, out, visiting)?,
                }
            }
        }
        _ => {}
    }
    visiting.remove(&id);
    Ok(())
}

/// Storage class names (`torch.FloatStorage`, C++ `torch.Float8_e4m3fnStorage`) to dtypes.
pub(crate) fn storage_dtype(name: &str) -> Option<DType> {
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

/// The dtype, shape and byte range in the file of the tensor built by node `id`.
/// dtype, shape, byte offset of the first element, contiguous bytes, non-contiguous layout.
type View = (DType, Vec<u64>, u64, u64, Option<Strided>, Option<Packed>);

fn tensor_entry(ar: &Archive, id: NodeId) -> std::result::Result<View, String> {
    let pk = &ar.pickle;
    let Some((_, func)) = pk.callee(id) else {
        return Err("not a tensor".into());
    };
    let Node::Object(o) = pk.node(id) else {
        return Err("not a tensor".into());
    };
    let Call::Reduce { args, .. } = o.call else {
        return Err("not a tensor".into());
    };
    let args = pk.seq(args).ok_or("rebuild arguments are not a tuple")?;
    match func {
        "_rebuild_parameter" | "_rebuild_parameter_with_state" => {
            let inner = *args.first().ok_or("parameter without data")?;
            tensor_entry(ar, inner)
        }
        "_rebuild_from_type_v2" => {
            // (func, new_type, args, state): the inner call's arguments
            let (f, a) = (
                *args.first().ok_or("missing function")?,
                *args.get(2).ok_or("missing arguments")?,
            );
            match pk.global(f) {
                Some(("torch._utils", "_rebuild_tensor_v2")) => {
                    storage_view(ar, pk.seq(a).ok_or("arguments are not a tuple")?, None)
                }
                Some((_, other)) => Err(format!(
                    "tensor subclass rebuilt with `{other}` is not read"
                )),
                None => Err("tensor subclass without a rebuild function".into()),
            }
        }
        "_rebuild_tensor_v2" => storage_view(ar, args, None),
        "_rebuild_tensor_v3" => {
            let d = *args.get(6).ok_or("v3 rebuild without dtype")?;
            let (_, name) = pk.global(d).ok_or("v3 dtype is not a torch dtype")?;
            let dtype = DType::ALL
                .into_iter()
                .find(|x| x.torch_name() == name)
                .ok_or_else(|| format!("dtype torch.{name} has no safetensors equivalent"))?;
            storage_view(ar, args, Some(dtype))
        }
        "_rebuild_qtensor" => Err("quantized tensor (left as is, not cast)".into()),
        "_rebuild_sparse_tensor" => Err("sparse tensor (not cast)".into()),
        other => Err(format!("`{other}` tensors are not read")),
    }
}

/// (storage, storage_offset, size, stride, ...) of `_rebuild_tensor_v2/v3`.
fn storage_view(
    ar: &Archive,
    args: &[NodeId],
    dtype: Option<DType>,
) -> std::result::Result<View, String> {
    let pk = &ar.pickle;
    let get = |i: usize| {
        args.get(i)
            .copied()
            .ok_or_else(|| format!("rebuild call has no argument {i}"))
    };
    let Node::PersId(pid) = pk.node(get(0)?) else {
        return Err("storage is not a persistent id".into());
    };
    let pid = pk.seq(*pid).ok_or("storage id is not a tuple")?;
    if pid.len() < 5 || pk.str(pid[0]) != Some("storage") {
        return Err("storage id is not (\"storage\", type, key, location, numel)".into());
    }
    if pid.len() > 5 && pk.node(pid[5]) != &Node::None {
        return Err("legacy storage views (pre-1.0 files) are not read".into());
    }
    let (smod, sname) = pk.global(pid[1]).ok_or("storage type is not a global")?;
    let key = match pk.node(pid[2]) {
        Node::Str(s) => s.clone(),
        Node::Int(i) => i.to_string(),
        _ => return Err("storage key is not a string".into()),
    };
    let dtype = match (dtype, sname) {
        (Some(d), _) => d,
        (None, n) => {
            storage_dtype(n).ok_or_else(|| format!("storage type {smod}.{n} is not read"))?
        }
    };
    let offset = pk
        .int(get(1)?)
        .filter(|o| *o >= 0)
        .ok_or("storage offset is not a non-negative integer")? as u64;
    let ints = |id: NodeId| -> std::result::Result<Vec<u64>, String> {
        let seq = match pk.node(id) {
            Node::Object(o) if pk.callee(id) == Some(("torch", "Size")) => match o.call {
                Call::Reduce { args, .. } => pk
                    .seq(args)
                    .and_then(|a| a.first().copied())
                    .and_then(|l| pk.seq(l)),
                _ => None,
            },
            _ => pk.seq(id),
        }
        .ok_or("size/stride is not a tuple")?;
        seq.iter()
            .map(|&d| {
                pk.int(d)
                    .filter(|v| *v >= 0)
                    .map(|v| v as u64)
                    .ok_or_else(|| "size/stride entries must be non-negative integers".to_string())
            })
            .collect()
    };
    let shape = ints(get(2)?)?;
    let stride = ints(get(3)?)?;
    if shape.len() != stride.len() {
        return Err("size and stride have different lengths".into());
    }
    // C-contiguous views are byte ranges of their storage; others are gathered on read.
    let mut expect = 1u64;
    let mut contiguous = true;
    for (&d, &s) in shape.iter().zip(&stride).rev() {
        if d > 1 && s != expect {
            contiguous = false;
        }
        expect = expect.checked_mul(d).ok_or("shape overflows")?;
    }
    let numel = expect;
    let record = ar
        .records
        .get(&format!("data/{key}"))
        .ok_or_else(|| format!("storage record `data/{key}` is missing from the archive"))?;
    let esize = (dtype.bitsize() / 8).max(1) as u64;
    let start = offset
        .checked_mul(esize)
        .ok_or("storage offset overflows")?;
    let nbytes = dtype.bytes_for(numel).ok_or("tensor size overflows")?;
    let strided = if contiguous || numel == 0 {
        None
    } else {
        let last = shape
            .iter()
            .zip(&stride)
            .try_fold(0u64, |acc, (&d, &s)| {
                acc.checked_add((d - 1).checked_mul(s)?)
            })
            .ok_or("strides overflow")?;
        let span = last
            .checked_add(1)
            .and_then(|n| n.checked_mul(esize))
            .ok_or("strides overflow")?;
        if span > MAX_GATHER {
            return Err(format!(
                "non-contiguous view spans {span} bytes of its storage, over the {MAX_GATHER}-byte gather limit"
            ));
        }
        Some(Strided {
            strides: stride.clone(),
            span,
        })
    };
    let covered = strided.as_ref().map_or(nbytes, |s| s.span);
    let end = start.checked_add(covered).ok_or("tensor size overflows")?;
    if end > record.size {
        return Err(format!(
            "view ends at byte {end} of storage `data/{key}`, which holds {} bytes",
            record.size
        ));
    }
    if record.stored {
        Ok((
            dtype,
            shape,
            record.data_start + start,
            nbytes,
            strided,
            None,
        ))
    } else {
        // torch.save never compresses storages, but an archive re-zipped with deflate still
        // loads in torch: its records are inflated by the reader.
        let packed = Packed {
            entry: format!("{}data/{key}", ar.prefix),
            size: record.size,
        };
        Ok((dtype, shape, start, nbytes, strided, Some(packed)))
    }
}
