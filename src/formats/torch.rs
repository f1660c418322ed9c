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
use std::path::Path;

use crate::audit::Class;
use crate::catalogue::{
    Catalogue, InputKind, Packed, SourceFile, StorageEntry, Strided, TensorEntry,
};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::formats::pickle::{self, Call, Node, NodeId, Pickle};

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
    /// What two readers would read differently in this file (audit and `.pt` writing refuse
    /// it).
    pub ambiguities: Vec<String>,
    /// Globals of the other pickles torch unpickles (a legacy file's magic number, protocol,
    /// sys_info and storage keys) with the protocol in force: never written back, but they run
    /// on `torch.load`.
    pub other_globals: Vec<(String, String, u8)>,
    records: HashMap<String, Record>,
}

pub use crate::catalogue::torch::{OtherTensor, Rebuild, Site, TensorRef, TorchDoc};
pub use crate::formats::torch_scan::is_zip;
use crate::formats::torch_scan::{LEGACY_MAGIC, MAX_PICKLE};

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
    for id in 0..main.nodes.len() {
        if let Some(sid) = storage_id(&main, id) {
            if let Some((_, sname)) = sid.storage_type(&main) {
                let size = DType::from_storage_name(sname)
                    .map(|d| (d.bitsize() as u64 / 8).max(1))
                    .unwrap_or(1);
                elsize.insert(sid.key, size);
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
    let mut ambiguities = vec![];
    if has_zip_end(file, file_len) {
        ambiguities.push(
            "the file does not start with a zip header but holds a zip directory: torch reads it \
             as stacked pickles, zip readers read the archive"
                .to_string(),
        );
    }
    let other_globals = [&magic, &proto, &sys_info, &keys]
        .iter()
        .flat_map(|p| p.globals_with_protocol())
        .collect();
    Ok(Archive {
        pickle: main,
        prefix: String::new(),
        big_endian,
        torchscript: false,
        legacy: true,
        ambiguities,
        other_globals,
        records,
    })
}

use crate::formats::torch_scan::has_zip_end;

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

/// Opens the archive and parses its `data.pkl` (or a legacy file's stacked pickles). The
/// container is decided as torch decides it: a zip when the first four bytes are a zip local
/// header, stacked pickles otherwise.
pub fn read_archive(path: &Path) -> Result<Archive> {
    use crate::formats::torch_scan::{zip_ambiguities, Container};
    let (file, file_len, container) = crate::formats::torch_scan::open(path)?;
    match container {
        Container::Tar => {
            return Err(Error::invalid(
                path,
                "a tar-format checkpoint (torch < 0.4): `weightcast audit` reads its pickles, but \
                 its tensors are not converted (torch.load it with weights_only=False where you trust it, and \
                 torch.save it again)",
            ))
        }
        Container::Stack | Container::Npy => return read_legacy(path, &file, file_len),
        Container::Zip => {}
    }
    let handle = file.try_clone().map_err(|e| Error::io(path, e))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(handle))
        .map_err(|e| crate::formats::torch_scan::zip_error(path, e))?;
    let ambiguities = zip_ambiguities(&file, file_len, &mut zip);
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
        crate::formats::torch_scan::read_record(path, zip, &format!("{prefix}{rest}"), limit)
            .map(|(_, buf)| buf)
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
        ambiguities,
        other_globals: vec![],
        records,
    })
}

/// Every tensor below `root` with its `state_dict()`-style name and, in a pickled module, the
/// module's class.
pub fn tensors_in(path: &Path, pk: &Pickle, root: NodeId) -> Result<Vec<Found>> {
    let mut found = Vec::new();
    walk(
        path,
        pk,
        root,
        &mut Vec::new(),
        &mut found,
        0,
        &mut HashSet::new(),
        None,
    )?;
    Ok(found)
}

/// A tensor found in the pickle.
#[derive(Debug, Clone)]
pub struct Found {
    /// Its dotted name.
    pub name: String,
    /// Its node.
    pub node: NodeId,
    /// The class of the module holding it (`torch.nn.modules.linear.Linear`), if in one.
    pub class: Option<String>,
}

/// The class an object is an instance of, when it was pickled as an instance (a module: made
/// by its class or `copyreg._reconstructor(cls, ...)`, then given its `__dict__` by BUILD).
/// A state dict's `OrderedDict` (given its `_metadata` by BUILD) is a container, not a module:
/// none.
fn instance_class(pk: &Pickle, id: NodeId) -> Option<String> {
    let Node::Object(o) = pk.node(id) else {
        return None;
    };
    o.state?;
    let (m, n) = pk.callee(id)?;
    if matches!(
        (m, n),
        ("collections", "OrderedDict") | ("builtins", "dict")
    ) {
        return None;
    }
    if (m, n) == ("copyreg", "_reconstructor") {
        let Call::Reduce { args, .. } = o.call else {
            return None;
        };
        let (m, n) = pk.global(*pk.seq(args)?.first()?)?;
        return Some(format!("{m}.{n}"));
    }
    Some(format!("{m}.{n}"))
}

/// What a safetensors output does with tied tensors (the same view of one storage under two
/// names): it writes them once. A `.pt` output keeps them tied, so nothing to say there.
pub fn tied_note(doc: &TorchDoc) -> Option<String> {
    if doc.aliases.is_empty() {
        return None;
    }
    Some(format!(
        "{} tied tensor(s) are the same view of a storage as another (a .pt output keeps them \
         tied, safetensors writes them once): {}",
        doc.aliases.len(),
        doc.aliases
            .iter()
            .map(|(a, k)| format!("`{a}` = `{k}`"))
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

/// Opens a PyTorch checkpoint (torch.save zip, legacy, TorchScript) as a catalogue. `key`
/// selects the entry holding the state dict (dotted, e.g. `model_state_dict`); without it, a
/// training checkpoint's state dict is found by [`STATE_DICT_KEYS`].
pub fn open(path: &Path, key: Option<&str>) -> Result<Catalogue> {
    let ar = read_archive(path)?;
    let len = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();
    let pk = &ar.pickle;
    let (selected, entry) = select_root(path, pk, key)?;
    let mut notes = Vec::new();
    let mut dec = Decoder::new(&ar);
    let (tensors, others, aliases) = decode_all(path, pk, selected, &mut dec, &mut notes)?;
    if let Some(k) = key.filter(|k| !k.is_empty() && tensors.is_empty()) {
        return Err(Error::usage(format!(
            "{}: --key {k}: the entry holds no tensor (entries of the checkpoint: {})",
            path.display(),
            dict_keys(pk, pk.root).join(", ")
        )));
    }
    dec.pin_unread_storages(pk.root);
    let entries = top_entries(pk, entry.as_deref(), &others);
    let training: Vec<(String, &'static str)> = entries
        .iter()
        .filter_map(|(name, _, _)| {
            let value = dict_get(pk, pk.root, name)?;
            let why = crate::formats::checkpoint::training_state(pk, name, value, &others)?;
            Some((name.clone(), why))
        })
        .collect();
    // An entry named by --key is what the user asked for: nothing to tell.
    if let Some(p) = entry.as_ref().filter(|_| key.is_none()) {
        notes.push(format!(
            "the state dict is the entry `{p}` (found by its name; --key chooses another){}",
            if entries.is_empty() {
                String::new()
            } else {
                format!("; other entries: {}", describe_dropped(&entries))
            }
        ));
    }
    // Every global torch.load would look up: the saved object's through torch's unpickler,
    // the other pickles of a legacy stack through plain pickle.
    let mut all_globals: Vec<(String, String, u8, bool)> = pk
        .globals_with_protocol()
        .into_iter()
        .map(|(m, n, p)| (m, n, p, true))
        .collect();
    for (m, n, p) in &ar.other_globals {
        all_globals.push((m.clone(), n.clone(), *p, false));
    }
    let globals: Vec<(String, Class)> = all_globals
        .iter()
        .map(|(m, n, p, t)| crate::audit::judge(m, n, *p, *t))
        .collect();
    let dangerous: Vec<&str> = globals
        .iter()
        .filter(|g| g.1 == Class::Dangerous)
        .map(|g| g.0.as_str())
        .collect();
    if !dangerous.is_empty() {
        notes.push(format!(
            "the pickle references dangerous globals ({}): weightcast never runs them; do not torch.load this file",
            dangerous.join(", ")
        ));
    }
    for a in &ar.ambiguities {
        notes.push(format!(
            "ambiguous file: {a}; other readers may load something else (audit it)"
        ));
    }
    // safetensors metadata in the convert.py style: {"format": "pt", removed: kept}.
    let mut metadata = vec![("format".to_string(), "pt".to_string())];
    metadata.extend(aliases.iter().cloned());
    let Decoder {
        storages, rebuilds, ..
    } = dec;
    let doc = TorchDoc {
        pickle: ar.pickle.clone(),
        legacy: ar.legacy,
        torchscript: ar.torchscript,
        selected,
        entry,
        rebuilds,
        others,
        entries,
        training,
        ambiguities: ar.ambiguities.clone(),
        globals: globals.clone(),
        aliases: aliases.clone(),
    };
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
            remote: None,
        }],
        tensors,
        index_metadata: None,
        folder: None,
        notes,
        globals,
        storages,
        torch: Some(std::sync::Arc::new(doc)),
        quant: None,
    })
}

/// Decodes every tensor of the pickle: the state dict's (below `selected`, named as
/// `state_dict()` names them), then every other one (named by its path from the top, or by its
/// node when no name leads to it). Returns them with the tied names (alias, kept name).
#[allow(clippy::type_complexity)]
fn decode_all(
    path: &Path,
    pk: &Pickle,
    selected: NodeId,
    dec: &mut Decoder<'_>,
    notes: &mut Vec<String>,
) -> Result<(Vec<TensorEntry>, Vec<OtherTensor>, Vec<(String, String)>)> {
    let mut tensors: Vec<TensorEntry> = Vec::new();
    let mut others: Vec<OtherTensor> = Vec::new();
    let mut aliases: Vec<(String, String)> = Vec::new();
    // Tensors of the state dict first, named as `state_dict()` names them.
    for Found { name, node, class } in tensors_in(path, pk, selected)? {
        match dec.decode(node) {
            Ok(d) => {
                if let Some(kept) = dec.tied(&d) {
                    if let TensorRef::Selected(i) = kept {
                        aliases.push((name, tensors[i].name.clone()));
                    }
                    dec.record(node, &d, kept);
                    continue;
                }
                let r = TensorRef::Selected(tensors.len());
                let mut e = dec.entry(name, &d);
                e.module_class = class;
                tensors.push(e);
                dec.record(node, &d, r);
            }
            Err(why) => {
                dec.pin_below(node);
                notes.push(format!("tensor `{name}` left out: {why}"));
            }
        }
    }
    // Then every other tensor of the file, by its path from the top; then rebuild calls no
    // name leads to (inside a custom object's arguments), so that a .pt output never converts
    // a storage under a tensor it did not see.
    let mut rest = if selected == pk.root {
        vec![]
    } else {
        tensors_in(path, pk, pk.root)?
    };
    rest.extend(
        reachable(pk, pk.root)
            .into_iter()
            .filter(|&id| is_tensor(pk, id))
            .map(|id| Found {
                name: format!("<object {id}>"),
                node: id,
                class: None,
            }),
    );
    for Found { name, node, .. } in rest {
        if dec.seen(node) {
            continue;
        }
        let section = name.split('.').next().unwrap_or("").to_string();
        match dec.decode(node) {
            Ok(d) => {
                let r = match dec.tied(&d) {
                    Some(r) => r,
                    None => {
                        others.push(OtherTensor {
                            entry: dec.entry(name, &d),
                            section,
                        });
                        TensorRef::Other(others.len() - 1)
                    }
                };
                dec.record(node, &d, r);
            }
            Err(_) => dec.pin_below(node),
        }
    }
    Ok((tensors, others, aliases))
}

/// The top-level entries of a checkpoint other than the selected one: (name, tensors, bytes).
fn top_entries(
    pk: &Pickle,
    selected: Option<&str>,
    others: &[OtherTensor],
) -> Vec<(String, usize, u64)> {
    let Some(first) = selected.map(|k| k.split('.').next().unwrap_or(k)) else {
        return vec![];
    };
    let Some(items) = dict_items(pk, pk.root) else {
        return vec![];
    };
    items
        .iter()
        .filter_map(|&(k, _)| key_text(pk, k))
        .filter(|name| name != first)
        .map(|name| {
            let mine = others.iter().filter(|o| o.section == name);
            let (n, b) = mine.fold((0, 0), |(n, b), o| (n + 1, b + o.entry.nbytes));
            (name, n, b)
        })
        .collect()
}

/// Every node reachable from `root`, each once.
pub fn reachable(pk: &Pickle, root: NodeId) -> Vec<NodeId> {
    let mut seen = vec![false; pk.nodes.len()];
    let mut stack = vec![root];
    let mut out = Vec::new();
    while let Some(id) = stack.pop() {
        if id >= seen.len() || std::mem::replace(&mut seen[id], true) {
            continue;
        }
        out.push(id);
        stack.extend(pk.nodes[id].children());
    }
    out
}

/// A storage's persistent id as torch.save writes it: `("storage", type, key, location,
/// numel)` (a legacy file adds a view field). The one parser of persistent ids.
pub struct StorageId<'p> {
    /// The tuple's items.
    pub items: &'p [NodeId],
    /// The storage key (a legacy file's keys are integers, written as text).
    pub key: String,
}

impl StorageId<'_> {
    /// The storage type's global (`torch`, `FloatStorage`).
    pub fn storage_type<'a>(&self, pk: &'a Pickle) -> Option<(&'a str, &'a str)> {
        pk.global(self.items[1])
    }
}

/// The storage id node `persid` holds, if it is one.
pub fn storage_id(pk: &Pickle, persid: NodeId) -> Option<StorageId<'_>> {
    let Node::PersId(t) = pk.node(persid) else {
        return None;
    };
    let items = pk.seq(*t)?;
    if items.len() < 5 || pk.str(items[0]) != Some("storage") {
        return None;
    }
    let key = match pk.node(items[2]) {
        Node::Str(s) => s.clone(),
        Node::Int(i) => i.to_string(),
        _ => return None,
    };
    Some(StorageId { items, key })
}

/// The storage key of a persistent id `("storage", type, key, location, numel)`.
pub fn persid_key(pk: &Pickle, persid: NodeId) -> Option<String> {
    storage_id(pk, persid).map(|s| s.key)
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
/// (a module's `_parameters`, `_buffers` and `_modules` add no name part), and the class of
/// the innermost module holding it (`class`, as inherited from above).
#[allow(clippy::too_many_arguments)]
fn walk(
    path: &Path,
    pk: &Pickle,
    id: NodeId,
    name: &mut Vec<String>,
    out: &mut Vec<Found>,
    depth: usize,
    visiting: &mut HashSet<NodeId>,
    class: Option<&str>,
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
            class: class.map(str::to_string),
        });
        return Ok(());
    }
    if !visiting.insert(id) {
        return Ok(()); // a cycle: already being walked above
    }
    let own = instance_class(pk, id);
    let class = own.as_deref().or(class);
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
        let r = walk(path, pk, v, name, out, depth + 1, visiting, class);
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

/// A tensor's rebuild call, decoded: where it is and the view it makes.
#[derive(Debug, Clone)]
struct Decoded {
    site: Site,
    v3: bool,
    persid: NodeId,
    key: String,
    dtype: DType,
    shape: Vec<u64>,
    strides: Vec<u64>,
    /// First element, counted in elements of `dtype` from the storage's start.
    offset: u64,
}

/// The one decoder of rebuild calls: every consumer (catalogue, `.pt` writer) sees the tensors
/// it produces, with their storages.
struct Decoder<'a> {
    ar: &'a Archive,
    storages: Vec<StorageEntry>,
    by_key: HashMap<String, usize>,
    rebuilds: Vec<Rebuild>,
    /// Tensor nodes and inner rebuild nodes already decoded.
    consumed: HashSet<NodeId>,
    /// Views already in the catalogue, for tied weights.
    views: HashMap<ViewKey, TensorRef>,
}

/// A view of a storage: (storage, element offset, dtype, shape, strides).
type ViewKey = (usize, u64, DType, Vec<u64>, Vec<u64>);

impl<'a> Decoder<'a> {
    fn new(ar: &'a Archive) -> Self {
        Decoder {
            ar,
            storages: vec![],
            by_key: HashMap::new(),
            rebuilds: vec![],
            consumed: HashSet::new(),
            views: HashMap::new(),
        }
    }

    fn seen(&self, node: NodeId) -> bool {
        self.consumed.contains(&node)
    }

    /// The storage of `key` (made on first use from its record).
    fn storage(&mut self, key: &str, dtype: Option<DType>) -> std::result::Result<usize, String> {
        if let Some(&i) = self.by_key.get(key) {
            let s = &mut self.storages[i];
            match (s.dtype, dtype) {
                (None, d) => s.dtype = d,
                (Some(a), Some(b)) if a != b => s.pinned = true, // one storage read as two dtypes
                _ => {}
            }
            return Ok(i);
        }
        let record =
            self.ar.records.get(&format!("data/{key}")).ok_or_else(|| {
                format!("storage record `data/{key}` is missing from the archive")
            })?;
        let (offset, packed) = if record.stored {
            (record.data_start, None)
        } else {
            // torch.save never compresses storages, but an archive re-zipped with deflate still
            // loads in torch: its records are inflated by the reader.
            let packed = Packed {
                entry: format!("{}data/{key}", self.ar.prefix),
                size: record.size,
            };
            (0, Some(packed))
        };
        self.storages.push(StorageEntry {
            key: key.to_string(),
            dtype,
            file: 0,
            offset,
            nbytes: record.size,
            packed,
            pinned: false,
        });
        self.by_key.insert(key.to_string(), self.storages.len() - 1);
        Ok(self.storages.len() - 1)
    }

    /// Decodes the tensor built by node `id`.
    fn decode(&mut self, id: NodeId) -> std::result::Result<Decoded, String> {
        let d = decode_rebuild(&self.ar.pickle, id)?;
        // The storage must exist and hold the view.
        let s = self.storage(&d.key, Some(d.dtype))?;
        view_bytes(&d, self.storages[s].nbytes)?;
        Ok(d)
    }

    /// The catalogue tensor that an identical view of the same storage already is.
    fn tied(&self, d: &Decoded) -> Option<TensorRef> {
        let s = self.by_key[&d.key];
        self.views
            .get(&(s, d.offset, d.dtype, d.shape.clone(), d.strides.clone()))
            .copied()
    }

    /// Records that node `node` (decoded as `d`) is the tensor `r`.
    fn record(&mut self, node: NodeId, d: &Decoded, r: TensorRef) {
        let storage = self.by_key[&d.key];
        // The wrapper and the inner call (a Parameter's data) are this tensor.
        self.consumed.insert(node);
        let (Site::Call(c) | Site::FromType(c)) = d.site;
        self.consumed.insert(c);
        self.views
            .entry((
                storage,
                d.offset,
                d.dtype,
                d.shape.clone(),
                d.strides.clone(),
            ))
            .or_insert(r);
        self.rebuilds.push(Rebuild {
            node,
            site: d.site,
            v3: d.v3,
            persid: d.persid,
            storage,
            tensor: r,
        });
    }

    /// The catalogue entry of a decoded tensor.
    fn entry(&self, name: String, d: &Decoded) -> TensorEntry {
        let s = self.by_key[&d.key];
        let st = &self.storages[s];
        let (start, nbytes, strided) = view_bytes(d, st.nbytes).expect("checked when decoded");
        TensorEntry {
            name,
            dtype: d.dtype,
            shape: d.shape.clone(),
            file: 0,
            offset: st.offset + start,
            nbytes,
            strided,
            packed: st.packed.clone(),
            storage: Some(s),
            module_class: None,
        }
    }

    /// Pins every storage referenced below `node` (a tensor weightcast does not read): the
    /// tensors inside it (a sparse tensor's indices and values) are part of it, not tensors of
    /// their own.
    fn pin_below(&mut self, node: NodeId) {
        let pk = &self.ar.pickle;
        let below = reachable(pk, node);
        self.consumed.extend(below.iter().copied());
        let keys: Vec<String> = below
            .into_iter()
            .filter_map(|id| persid_key(pk, id))
            .collect();
        for k in keys {
            if let Ok(i) = self.storage(&k, None) {
                self.storages[i].pinned = true;
            }
        }
    }

    /// Storages referenced other than through a decoded tensor (a raw storage object) are
    /// pinned, so that a `.pt` output copies them as they are.
    fn pin_unread_storages(&mut self, root: NodeId) {
        let used: HashSet<NodeId> = self.rebuilds.iter().map(|r| r.persid).collect();
        let pk = &self.ar.pickle;
        let keys: Vec<String> = reachable(pk, root)
            .into_iter()
            .filter(|id| !used.contains(id))
            .filter_map(|id| persid_key(pk, id))
            .collect();
        for k in keys {
            if let Ok(i) = self.storage(&k, None) {
                self.storages[i].pinned = true;
            }
        }
    }
}

/// Decodes the rebuild call of tensor node `id`: `_rebuild_tensor_v2/v3`, through
/// `_rebuild_parameter(_with_state)` and `_rebuild_from_type_v2` wrappers.
fn decode_rebuild(pk: &Pickle, id: NodeId) -> std::result::Result<Decoded, String> {
    let Some((module, func)) = pk.callee(id) else {
        return Err("not a tensor".into());
    };
    let Node::Object(o) = pk.node(id) else {
        return Err("not a tensor".into());
    };
    let Call::Reduce { args, .. } = o.call else {
        return Err("not a tensor".into());
    };
    if module != "torch._utils" && module != "torch._tensor" {
        return Err(format!("`{module}.{func}` tensors are not read"));
    }
    let args = pk.seq(args).ok_or("rebuild arguments are not a tuple")?;
    match func {
        "_rebuild_parameter" | "_rebuild_parameter_with_state" => {
            let inner = *args.first().ok_or("parameter without data")?;
            if inner == id {
                return Err("parameter wraps itself".into());
            }
            decode_rebuild(pk, inner)
        }
        "_rebuild_from_type_v2" => {
            // (func, new_type, args, state): the inner call's function and arguments.
            let (f, a) = (
                *args.first().ok_or("missing function")?,
                *args.get(2).ok_or("missing arguments")?,
            );
            let v3 = match pk.global(f) {
                Some(("torch._utils", "_rebuild_tensor_v2")) => false,
                Some(("torch._utils", "_rebuild_tensor_v3")) => true,
                Some((_, other)) => {
                    return Err(format!(
                        "tensor subclass rebuilt with `{other}` is not read"
                    ))
                }
                None => return Err("tensor subclass without a rebuild function".into()),
            };
            let a = pk.seq(a).ok_or("arguments are not a tuple")?;
            tensor_call(pk, a, v3, Site::FromType(id))
        }
        "_rebuild_tensor_v2" => tensor_call(pk, args, false, Site::Call(id)),
        "_rebuild_tensor_v3" => tensor_call(pk, args, true, Site::Call(id)),
        "_rebuild_qtensor" => Err("quantized tensor (left as is, not cast)".into()),
        "_rebuild_sparse_tensor" => Err("sparse tensor (not cast)".into()),
        other => Err(format!("`{other}` tensors are not read")),
    }
}

/// (storage, storage_offset, size, stride, requires_grad, hooks[, dtype]) of
/// `_rebuild_tensor_v2/v3`.
fn tensor_call(
    pk: &Pickle,
    args: &[NodeId],
    v3: bool,
    site: Site,
) -> std::result::Result<Decoded, String> {
    let get = |i: usize| {
        args.get(i)
            .copied()
            .ok_or_else(|| format!("rebuild call has no argument {i}"))
    };
    let persid = get(0)?;
    if !matches!(pk.node(persid), Node::PersId(_)) {
        return Err("storage is not a persistent id".into());
    }
    let sid = storage_id(pk, persid).ok_or(
        "storage id is not (\"storage\", type, key, location, numel) with a string or integer key",
    )?;
    let pid = sid.items;
    if pid.len() > 5 && pk.node(pid[5]) != &Node::None {
        return Err("legacy storage views (pre-1.0 files) are not read".into());
    }
    let (smod, sname) = sid.storage_type(pk).ok_or("storage type is not a global")?;
    let key = sid.key.clone();
    let dtype = if v3 {
        let (_, name) = pk.global(get(6)?).ok_or("v3 dtype is not a torch dtype")?;
        DType::ALL
            .into_iter()
            .find(|x| x.torch_name() == name)
            .ok_or_else(|| format!("dtype torch.{name} has no safetensors equivalent"))?
    } else {
        DType::from_storage_name(sname)
            .ok_or_else(|| format!("storage type {smod}.{sname} is not read"))?
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
    let strides = ints(get(3)?)?;
    if shape.len() != strides.len() {
        return Err("size and stride have different lengths".into());
    }
    Ok(Decoded {
        site,
        v3,
        persid,
        key,
        dtype,
        shape,
        strides,
        offset,
    })
}

/// Where a view's bytes are in its storage of `record` bytes: (first byte, contiguous bytes,
/// non-contiguous layout). C-contiguous views are byte ranges; others are gathered on read.
fn view_bytes(
    d: &Decoded,
    record: u64,
) -> std::result::Result<(u64, u64, Option<Strided>), String> {
    let mut expect = 1u64;
    let mut contiguous = true;
    for (&n, &s) in d.shape.iter().zip(&d.strides).rev() {
        if n > 1 && s != expect {
            contiguous = false;
        }
        expect = expect.checked_mul(n).ok_or("shape overflows")?;
    }
    let numel = expect;
    let esize = (d.dtype.bitsize() / 8).max(1) as u64;
    let start = d
        .offset
        .checked_mul(esize)
        .ok_or("storage offset overflows")?;
    let nbytes = d.dtype.bytes_for(numel).ok_or("tensor size overflows")?;
    let strided = if contiguous || numel == 0 {
        None
    } else {
        let last = d
            .shape
            .iter()
            .zip(&d.strides)
            .try_fold(0u64, |acc, (&n, &s)| {
                acc.checked_add((n - 1).checked_mul(s)?)
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
            strides: d.strides.clone(),
            span,
        })
    };
    let covered = strided.as_ref().map_or(nbytes, |s| s.span);
    let end = start.checked_add(covered).ok_or("tensor size overflows")?;
    if end > record {
        return Err(format!(
            "view ends at byte {end} of storage `data/{}`, which holds {record} bytes",
            d.key
        ));
    }
    Ok((start, nbytes, strided))
}
