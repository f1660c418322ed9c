//! Naming inside a checkpoint: which entry is the state dict (`model`, `state_dict`, ... or
//! `--key`), the other top-level entries, dict access into a pickle, and the notes on tied
//! tensors.

use super::*;

/// Entries of a training checkpoint that hold the model's state dict, in order of preference.
pub const STATE_DICT_KEYS: &[&str] = &[
    "state_dict",
    "model_state_dict",
    "model",
    "module",
    "net",
    "network",
];

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

/// The top-level entries of a checkpoint other than the selected one: (name, tensors, bytes).
pub(super) fn top_entries(
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
pub(super) fn dict_items(pk: &Pickle, id: NodeId) -> Option<&[(NodeId, NodeId)]> {
    match pk.node(id) {
        Node::Dict(items) => Some(items),
        Node::Object(o) if !o.items.is_empty() || is_dict_class(pk, id) => Some(&o.items),
        _ => None,
    }
}

pub(super) fn is_dict_class(pk: &Pickle, id: NodeId) -> bool {
    matches!(
        pk.callee(id),
        Some(("collections", "OrderedDict" | "defaultdict"))
    )
}

pub(super) fn key_text(pk: &Pickle, k: NodeId) -> Option<String> {
    match pk.node(k) {
        Node::Str(s) => Some(s.clone()),
        Node::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

pub(super) fn dict_get(pk: &Pickle, id: NodeId, key: &str) -> Option<NodeId> {
    dict_items(pk, id)?
        .iter()
        .find(|(k, _)| key_text(pk, *k).as_deref() == Some(key))
        .map(|(_, v)| *v)
}

pub(super) fn dict_keys(pk: &Pickle, id: NodeId) -> Vec<String> {
    dict_items(pk, id)
        .map(|items| items.iter().filter_map(|(k, _)| key_text(pk, *k)).collect())
        .unwrap_or_default()
}
