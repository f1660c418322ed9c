//! The entries of a training checkpoint (`{"model": ..., "optimizer": ..., "epoch": ...}`)
//! and which of them are training state: what resuming training needs and inference never
//! does. Recognised by structure first (an optimizer's `state_dict()` is `{"state",
//! "param_groups"}` whatever the entry is called), by name otherwise.

use crate::catalogue::torch::OtherTensor;
use crate::dtype::DType;
use crate::formats::pickle::{Node, NodeId, Pickle};

/// Entry names that are training state by name alone (lower case; a name matches when it
/// equals one or starts with one followed by `_`).
const TRAINING_NAMES: &[(&str, &str)] = &[
    ("optimizer", "optimizer state"),
    ("optimizers", "optimizer state"),
    ("optim", "optimizer state"),
    ("opt", "optimizer state"),
    ("scheduler", "learning-rate scheduler state"),
    ("schedulers", "learning-rate scheduler state"),
    ("lr_scheduler", "learning-rate scheduler state"),
    ("scaler", "AMP grad scaler state"),
    ("grad_scaler", "AMP grad scaler state"),
    ("amp", "AMP grad scaler state"),
    ("rng", "random number generator state"),
    ("rng_state", "random number generator state"),
    ("rng_states", "random number generator state"),
    ("cuda_rng_state", "random number generator state"),
    ("torch_rng_state", "random number generator state"),
    ("numpy_rng_state", "random number generator state"),
    ("np_rng_state", "random number generator state"),
    ("random_state", "random number generator state"),
    ("python_rng_state", "random number generator state"),
    ("grad", "gradient buffers"),
    ("grads", "gradient buffers"),
    ("gradients", "gradient buffers"),
];

/// Bytes of torch's CPU generator state (`torch.get_rng_state()`, a uint8 tensor).
const CPU_RNG_BYTES: u64 = 5056;

/// Why the entry `name` (value `value`) is training state, if it is. `others` are the tensors
/// outside the state dict (their `section` is their top-level entry).
pub fn training_state(
    pk: &Pickle,
    name: &str,
    value: NodeId,
    others: &[OtherTensor],
) -> Option<&'static str> {
    if let Some(why) = by_structure(pk, value, 0) {
        return Some(why);
    }
    let mine: Vec<&OtherTensor> = others.iter().filter(|o| o.section == name).collect();
    // torch.get_rng_state(): one uint8 tensor of the generator's state size.
    if mine.len() == 1 && mine[0].entry.dtype == DType::U8 && mine[0].entry.shape == [CPU_RNG_BYTES]
    {
        return Some("random number generator state");
    }
    let lower = name.to_ascii_lowercase();
    TRAINING_NAMES
        .iter()
        .find(|(n, _)| lower == *n || lower.strip_prefix(n).is_some_and(|r| r.starts_with('_')))
        .map(|(_, why)| *why)
}

/// What a value is by its shape: an optimizer's, an LR scheduler's or a grad scaler's
/// `state_dict()`, NumPy's or Python's RNG state, or a list or dict of those.
fn by_structure(pk: &Pickle, id: NodeId, depth: usize) -> Option<&'static str> {
    if depth > 2 {
        return None;
    }
    if let Some(keys) = dict_keys(pk, id) {
        let has = |k: &[&str]| k.iter().all(|k| keys.iter().any(|x| x == k));
        if has(&["state", "param_groups"]) {
            return Some("optimizer state");
        }
        if has(&["base_lrs", "last_epoch"]) {
            return Some("learning-rate scheduler state");
        }
        if has(&["scale", "growth_factor", "backoff_factor"]) {
            return Some("AMP grad scaler state");
        }
        // A dict of several optimizers' (or schedulers') states.
        return uniform(pk, dict_values(pk, id), depth);
    }
    match pk.node(id) {
        // np.random.get_state(): ('MT19937', keys, pos, has_gauss, cached_gaussian).
        Node::Tuple(items) if items.first().and_then(|&f| pk.str(f)) == Some("MT19937") => {
            Some("random number generator state")
        }
        // random.getstate(): (3, (625 ints), None).
        Node::Tuple(items)
            if items.len() == 3
                && pk.int(items[0]) == Some(3)
                && pk.seq(items[1]).is_some_and(|s| s.len() == 625) =>
        {
            Some("random number generator state")
        }
        Node::List(items) => uniform(pk, items.clone(), depth),
        _ => None,
    }
}

/// The kind every one of `items` is, when they all are the same kind of training state.
fn uniform(pk: &Pickle, items: Vec<NodeId>, depth: usize) -> Option<&'static str> {
    let first = by_structure(pk, *items.first()?, depth + 1)?;
    items
        .iter()
        .all(|&i| by_structure(pk, i, depth + 1) == Some(first))
        .then_some(first)
}

/// The (key, value) pairs of a dict or an OrderedDict.
fn items(pk: &Pickle, id: NodeId) -> Option<&[(NodeId, NodeId)]> {
    match pk.node(id) {
        Node::Dict(items) => Some(items),
        Node::Object(o)
            if matches!(
                pk.callee(id),
                Some(("collections", "OrderedDict" | "defaultdict"))
            ) =>
        {
            Some(&o.items)
        }
        _ => None,
    }
}

fn dict_keys(pk: &Pickle, id: NodeId) -> Option<Vec<String>> {
    Some(
        items(pk, id)?
            .iter()
            .filter_map(|&(k, _)| pk.str(k).map(str::to_string))
            .collect(),
    )
}

fn dict_values(pk: &Pickle, id: NodeId) -> Vec<NodeId> {
    items(pk, id)
        .map(|i| i.iter().map(|&(_, v)| v).collect())
        .unwrap_or_default()
}
