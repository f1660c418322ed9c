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

mod archive;
pub mod checkpoint;
mod decode;
mod names;
pub mod scan;
pub mod write;

pub use archive::{read_archive, Archive};
use decode::*;
pub use decode::{tensors_in, Found};
use names::*;
pub use names::{describe_dropped, select_root, tied_note, STATE_DICT_KEYS};

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

pub use crate::catalogue::torch::{OtherTensor, Rebuild, Site, TensorRef, TorchDoc};

pub use crate::formats::torch::scan::is_zip;

use crate::formats::torch::scan::{LEGACY_MAGIC, MAX_PICKLE};

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
            let why = crate::formats::torch::checkpoint::training_state(pk, name, value, &others)?;
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
    let globals = judge_globals(pk, &ar, &mut notes);
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
            metadata: Some(metadata),
            big_endian: ar.big_endian,
            ..SourceFile::local(path, len)
        }],
        tensors,
        index_metadata: None,
        folder: None,
        notes,
        globals,
        storages,
        torch: Some(std::sync::Arc::new(doc)),
        quant: None,
        gguf: None,
        onnx: None,
    })
}

/// Every global torch.load would look up, judged, with notes for the user on the dangerous
/// ones, the calls no allowlist names and the ambiguities.
fn judge_globals(pk: &Pickle, ar: &Archive, notes: &mut Vec<String>) -> Vec<(String, Class)> {
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
    // Default-deny: what the saved object's pickle calls that no allowlist names.
    let mut unknown: Vec<String> = Vec::new();
    for (m, n, site, how) in pk.global_occurrences() {
        let allow = crate::audit::Allow::default();
        let (name, class) = crate::audit::judge_use(&m, &n, site.protocol, true, how, &allow);
        if class == Class::UnknownCall && !unknown.contains(&name) {
            unknown.push(name);
        }
    }
    if !unknown.is_empty() {
        notes.push(format!(
            "the pickle calls globals that no allowlist names ({}): weightcast never runs them; \
             torch.load(weights_only=False) would (audit lists them; a .pt output needs --allow)",
            unknown.join(", ")
        ));
    }
    for a in &ar.ambiguities {
        notes.push(format!(
            "ambiguous file: {a}; other readers may load something else (audit it)"
        ));
    }
    globals
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
