//! Writing a converted `torch.save` checkpoint: the input's pickle with every converted storage's
//! type (and, between legacy and new dtypes, its rebuild call) rewritten, storages relabelled
//! `cpu`, and each storage record streamed through the cast kernels into a zip laid out as torch
//! writes it (stored records, 64-byte aligned), so `torch.load(weights_only=True)` and
//! `torch.load(mmap=True)` read it.
//!
//! Conversion is per storage: every tensor on a storage (views, tied weights) keeps its storage
//! offset and strides, which count elements and so stay valid in the new dtype: views stay
//! views. A storage whose tensors the rules would cast to different dtypes is left as it is.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::audit::Class;
use crate::cast::{self, Range};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::formats::pickle::{self, Call, Node, NodeId, Pickle};
use crate::formats::torch::{read_archive, tensors_in, Archive};
use crate::rules::{Action, RuleSet};

/// What writing a .pt did.
#[derive(Debug, Clone, Default)]
pub struct PtSummary {
    /// Storages whose dtype changed.
    pub storages_cast: usize,
    /// Storages copied as they were.
    pub storages_kept: usize,
    /// Tensors (names) on cast storages.
    pub tensors_cast: usize,
    /// Storage bytes read.
    pub bytes_in: u64,
    /// Storage bytes written.
    pub bytes_out: u64,
    /// Values that left the target's range, per storage key (first tensor name).
    pub overflow: Vec<(String, u64)>,
    /// Notes (storages kept because their views disagree, ...).
    pub notes: Vec<String>,
}

/// One tensor's rebuild call, unwrapped from Parameter / subclass wrappers.
struct Core {
    name: String,
    /// The object node whose call is `_rebuild_tensor_v2/v3(args)`.
    obj: NodeId,
    v3: bool,
    persid: NodeId,
    key: String,
    dtype: DType,
    shape: Vec<u64>,
}

/// Finds the core rebuild call of tensor node `id`.
fn core(pk: &Pickle, id: NodeId, name: &str) -> Option<Core> {
    let (m, f) = pk.callee(id)?;
    let Node::Object(o) = pk.node(id) else {
        return None;
    };
    let Call::Reduce { args, .. } = o.call else {
        return None;
    };
    let a = pk.seq(args)?;
    match (m, f) {
        ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
            core(pk, *a.first()?, name)
        }
        ("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor_v3") => {
            let v3 = f == "_rebuild_tensor_v3";
            let persid = *a.first()?;
            let Node::PersId(t) = pk.node(persid) else {
                return None;
            };
            let t = pk.seq(*t)?;
            let key = match pk.node(*t.get(2)?) {
                Node::Str(s) => s.clone(),
                Node::Int(i) => i.to_string(),
                _ => return None,
            };
            let dtype = if v3 {
                let (_, n) = pk.global(*a.get(6)?)?;
                DType::ALL.into_iter().find(|d| d.torch_name() == n)?
            } else {
                let (_, s) = pk.global(*t.get(1)?)?;
                crate::formats::torch::storage_dtype(s)?
            };
            let shape = pk
                .seq(*a.get(2)?)
                .map(|s| {
                    s.iter()
                        .filter_map(|&d| pk.int(d))
                        .map(|d| d.max(0) as u64)
                        .collect()
                })
                .unwrap_or_default();
            Some(Core {
                name: name.to_string(),
                obj: id,
                v3,
                persid,
                key,
                dtype,
                shape,
            })
        }
        _ => None,
    }
}

/// Storage keys of every persistent id reachable from the root.
fn referenced_keys(pk: &Pickle) -> std::collections::HashSet<String> {
    let mut seen = vec![false; pk.nodes.len()];
    let mut stack = vec![pk.root];
    let mut keys = std::collections::HashSet::new();
    while let Some(id) = stack.pop() {
        if std::mem::replace(&mut seen[id], true) {
            continue;
        }
        let n = &pk.nodes[id];
        if let Node::PersId(t) = n {
            if let Some(t) = pk.seq(*t) {
                if let Some(k) = t.get(2).and_then(|&k| match pk.node(k) {
                    Node::Str(s) => Some(s.clone()),
                    Node::Int(i) => Some(i.to_string()),
                    _ => None,
                }) {
                    keys.insert(k);
                }
            }
        }
        stack.extend(n.children());
    }
    keys
}

/// Sets `requires_grad` to False in every tensor and Parameter rebuild call.
fn clear_requires_grad(pk: &mut Pickle, found: &[(String, NodeId)]) {
    let f = add(pk, Node::Bool(false));
    let mut todo: Vec<NodeId> = found.iter().map(|x| x.1).collect();
    let mut done = std::collections::HashSet::new();
    while let Some(id) = todo.pop() {
        if !done.insert(id) {
            continue;
        }
        let Some((_, func)) = pk.callee(id).map(|(m, n)| (m.to_string(), n.to_string())) else {
            continue;
        };
        let Node::Object(o) = pk.node(id).clone() else {
            continue;
        };
        let Call::Reduce { func: fid, args } = o.call else {
            continue;
        };
        let Some(mut a) = pk.seq(args).map(|s| s.to_vec()) else {
            continue;
        };
        let at = match func.as_str() {
            "_rebuild_parameter" | "_rebuild_parameter_with_state" => {
                if let Some(&inner) = a.first() {
                    todo.push(inner);
                }
                1
            }
            "_rebuild_tensor_v2" | "_rebuild_tensor_v3" => 4,
            _ => continue,
        };
        if a.len() > at {
            a[at] = f;
            let new_args = add(pk, Node::Tuple(a));
            if let Node::Object(o) = &mut pk.nodes[id] {
                o.call = Call::Reduce {
                    func: fid,
                    args: new_args,
                };
            }
        }
    }
}

/// Removes `prefix` from the keys of the root state dict.
fn strip_prefix(path: &Path, pk: &mut Pickle, prefix: &str) -> Result<()> {
    let root = pk.root;
    let items: Vec<(NodeId, NodeId)> = match pk.node(root) {
        Node::Dict(d) => d.clone(),
        Node::Object(o) => o.items.clone(),
        _ => {
            return Err(Error::usage(format!(
                "{}: --strip-prefix needs a state dict at the top",
                path.display()
            )))
        }
    };
    let mut seen = std::collections::HashSet::new();
    let mut renamed = Vec::with_capacity(items.len());
    for (k, v) in items {
        let name = pk.str(k).map(str::to_string);
        let k = match name.as_deref().and_then(|n| n.strip_prefix(prefix)) {
            Some(stripped) => {
                let s = stripped.to_string();
                add(pk, Node::Str(s))
            }
            None => k,
        };
        if let Some(n) = pk.str(k) {
            if !seen.insert(n.to_string()) {
                return Err(Error::usage(format!(
                    "{}: --strip-prefix {prefix}: two entries would be named `{n}`",
                    path.display()
                )));
            }
        }
        renamed.push((k, v));
    }
    match &mut pk.nodes[root] {
        Node::Dict(d) => *d = renamed,
        Node::Object(o) => o.items = renamed,
        _ => {}
    }
    Ok(())
}

fn add(pk: &mut Pickle, n: Node) -> NodeId {
    pk.nodes.push(n);
    pk.nodes.len() - 1
}

/// Inference export options for a .pt output.
#[derive(Debug, Clone, Default)]
pub struct PtExport {
    /// Keep only the model's weights (the state dict entry of a training checkpoint), with
    /// `requires_grad` cleared.
    pub inference: bool,
    /// The entry holding the state dict (`--key`), found automatically otherwise.
    pub key: Option<String>,
    /// Remove this prefix from state-dict keys (`module.` from DataParallel).
    pub strip_prefix: Option<String>,
}

/// Writes the converted checkpoint of `path` into `dst`; `archive_name` is the record prefix
/// torch uses (the output file's stem). A tensor named in `planned` gets that dtype (the
/// per-tensor plan, after `--auto` or the range checks changed it); any other floating tensor
/// is decided by `rules` with `target` as the default.
#[allow(clippy::too_many_arguments)]
pub fn write_pt(
    path: &Path,
    rules: &RuleSet,
    target: DType,
    planned: &HashMap<String, DType>,
    range: Range,
    export: &PtExport,
    dst: &File,
    archive_name: &str,
    cancel: Option<&AtomicBool>,
    advance: &dyn Fn(u64),
) -> Result<PtSummary> {
    let ar: Archive = read_archive(path)?;
    if ar.torchscript {
        return Err(Error::usage(format!(
            "{}: writing a converted TorchScript archive is refused: its code may assume the old dtypes; \
             extract its tensors to .safetensors instead",
            path.display()
        )));
    }
    let dangerous: Vec<String> = ar
        .pickle
        .globals()
        .into_iter()
        .filter(|(m, n)| crate::audit::classify(m, n) == Class::Dangerous)
        .map(|(m, n)| format!("{m}.{n}"))
        .collect();
    if !dangerous.is_empty() {
        return Err(Error::Refused(format!(
            "{}: the pickle references dangerous globals ({}); refusing to write it to a .pt. \
             Extract its tensors to .safetensors instead (that is how to clean such a file)",
            path.display(),
            dangerous.join(", ")
        )));
    }
    let mut pk = ar.pickle.clone();
    let mut summary = PtSummary::default();
    if export.inference {
        let (root, entry) = crate::formats::torch::select_root(path, &pk, export.key.as_deref())?;
        if let Some(e) = entry {
            let dropped = crate::formats::torch::dropped_entries(&ar, &e);
            summary.notes.push(format!(
                "--inference kept the entry `{e}`; dropped {} ({} tensor bytes saved)",
                crate::formats::torch::describe_dropped(&dropped),
                dropped.iter().map(|d| d.2).sum::<u64>()
            ));
            pk.root = root;
        }
    }
    if let Some(prefix) = &export.strip_prefix {
        strip_prefix(path, &mut pk, prefix)?;
    }
    let found = tensors_in(path, &pk, pk.root)?;
    let cores: Vec<Core> = found
        .iter()
        .filter_map(|(name, id)| core(&pk, *id, name))
        .collect();
    if export.inference {
        clear_requires_grad(&mut pk, &found);
    }

    // Decide per storage.
    let mut want: BTreeMap<String, Vec<(DType, DType, String)>> = BTreeMap::new(); // key -> (from, to, name)
    for c in &cores {
        let to = if !c.dtype.is_castable() {
            c.dtype
        } else if let Some(&d) = planned.get(&c.name) {
            d
        } else {
            match rules.decide(&c.name, &c.shape).0 {
                Action::Keep => c.dtype,
                Action::Default => target,
                Action::To(d) => d,
            }
        };
        want.entry(c.key.clone())
            .or_default()
            .push((c.dtype, to, c.name.clone()));
    }
    let mut decision: HashMap<String, (DType, DType)> = HashMap::new();
    for (key, v) in &want {
        let from = v[0].0;
        let mut tos: Vec<DType> = v.iter().map(|x| x.1).collect();
        tos.dedup();
        let to = if tos.len() == 1 && v.iter().all(|x| x.0 == from) {
            tos[0]
        } else {
            summary.notes.push(format!(
                "storage `{key}` kept as {from}: its tensors ({}) would get different dtypes",
                v.iter()
                    .map(|x| format!("`{}`", x.2))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            from
        };
        decision.insert(key.clone(), (from, to));
    }

    // Rewrite the pickle: storage types, rebuild calls, locations.
    let cpu = add(&mut pk, Node::Str("cpu".into()));
    let mut new_globals: HashMap<(String, String), NodeId> = HashMap::new();
    let mut global = |pk: &mut Pickle, m: &str, n: &str| -> NodeId {
        *new_globals
            .entry((m.to_string(), n.to_string()))
            .or_insert_with(|| {
                add(
                    pk,
                    Node::Global {
                        module: m.into(),
                        name: n.into(),
                    },
                )
            })
    };
    // A tensor object referenced under several names (tied weights) is rewritten once.
    let mut done = std::collections::HashSet::new();
    for c in cores.iter().filter(|c| done.insert(c.obj)) {
        let (from, to) = decision[&c.key];
        let rec = ar.records_size(&format!("data/{}", c.key)).unwrap_or(0);
        let elems = rec / (from.bitsize() as u64 / 8).max(1);
        let Node::PersId(t) = pk.node(c.persid).clone() else {
            continue;
        };
        let mut items = pk.seq(t).map(|s| s.to_vec()).unwrap_or_default();
        if items.len() < 5 {
            continue;
        }
        items[3] = cpu;
        // A legacy file's 6-tuple (with view metadata) becomes the zip format's 5-tuple.
        items.truncate(5);
        let Node::Object(obj) = pk.node(c.obj).clone() else {
            continue;
        };
        let Call::Reduce { args, .. } = obj.call else {
            continue;
        };
        let mut a = pk.seq(args).map(|s| s.to_vec()).unwrap_or_default();
        let mut v3 = c.v3;
        if from != to {
            match legacy_storage(to) {
                Some(sname) => {
                    items[1] = global(&mut pk, "torch", sname);
                    items[4] = add(&mut pk, Node::Int(elems as i64));
                    if v3 {
                        a.remove(6);
                        v3 = false;
                    }
                }
                None => {
                    items[1] = global(&mut pk, "torch.storage", "UntypedStorage");
                    items[4] = add(
                        &mut pk,
                        Node::Int((elems * (to.bitsize() as u64 / 8)) as i64),
                    );
                    let d = global(&mut pk, "torch", to.torch_name());
                    if v3 {
                        a[6] = d;
                    } else {
                        a.insert(6.min(a.len()), d);
                        v3 = true;
                    }
                }
            }
        }
        let new_t = add(&mut pk, Node::Tuple(items));
        pk.nodes[c.persid] = Node::PersId(new_t);
        let func = global(
            &mut pk,
            "torch._utils",
            if v3 {
                "_rebuild_tensor_v3"
            } else {
                "_rebuild_tensor_v2"
            },
        );
        let new_args = add(&mut pk, Node::Tuple(a));
        if let Node::Object(o) = &mut pk.nodes[c.obj] {
            o.call = Call::Reduce {
                func,
                args: new_args,
            };
        }
    }
    let data_pkl = pickle::write(&pk).map_err(|e| Error::invalid(path, e.to_string()))?;

    // The zip, records in torch's order.
    let src = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut zip = PtZip::new(dst, archive_name, &data_pkl)?;
    // Only the storages the (possibly reduced) pickle still references.
    let referenced = referenced_keys(&pk);
    let mut keys: Vec<String> = ar
        .data_keys()
        .into_iter()
        .filter(|k| referenced.contains(k))
        .collect();
    keys.sort_by(|a, b| (a.len(), a).cmp(&(b.len(), b)));
    let first_name: HashMap<&str, &str> = cores
        .iter()
        .map(|c| (c.key.as_str(), c.name.as_str()))
        .rev()
        .collect();
    const CHUNK: u64 = 8 << 20;
    // Compressed storage records (archives re-zipped with deflate; torch never compresses them)
    // are decompressed while streaming; stored ones are read in place.
    let mut zin = if ar.legacy {
        None
    } else {
        Some(
            zip::ZipArchive::new(std::io::BufReader::new(
                File::open(path).map_err(|e| Error::io(path, e))?,
            ))
            .map_err(|e| Error::invalid(path, format!("not a readable zip archive: {e}")))?,
        )
    };
    for key in &keys {
        let record_name = format!("data/{key}");
        let stored = ar.record(&record_name);
        let size = stored
            .map(|r| r.1)
            .or_else(|| ar.records_size(&record_name))
            .unwrap_or(0);
        let data_start = stored.map_or(0, |r| r.0);
        let mut inflater = match (stored, zin.as_mut()) {
            (None, Some(z)) => Some(
                z.by_name(&format!("{}{record_name}", ar.prefix))
                    .map_err(|e| Error::invalid(path, format!("record `{record_name}`: {e}")))?,
            ),
            (None, None) => {
                return Err(Error::invalid(
                    path,
                    format!("record `{record_name}` cannot be read"),
                ))
            }
            _ => None,
        };
        let (from, to) = decision
            .get(key.as_str())
            .copied()
            .unwrap_or((DType::U8, DType::U8));
        let (isz, osz) = (
            (from.bitsize() / 8).max(1) as u64,
            (to.bitsize() / 8).max(1) as u64,
        );
        let out_size = size / isz * osz;
        zip.start(&format!("data/{key}"), out_size)?;
        let mut pos = 0u64;
        let step = CHUNK / isz.max(osz) * isz;
        let mut buf = vec![0u8; step.min(size) as usize];
        let mut out = Vec::new();
        let mut over = 0u64;
        while pos < size {
            if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
                return Err(Error::Interrupted);
            }
            let n = step.min(size - pos) as usize;
            let read = match inflater.as_mut() {
                Some(r) => std::io::Read::read_exact(r, &mut buf[..n]),
                None => src.read_exact_at(&mut buf[..n], data_start + pos),
            };
            read.map_err(|e| {
                Error::invalid(
                    path,
                    format!(
                        "storage `data/{key}`: cannot read at byte {}: {e}",
                        data_start + pos
                    ),
                )
            })?;
            if ar.big_endian {
                if !decision.contains_key(key.as_str()) {
                    return Err(Error::invalid(
                        path,
                        format!("storage `data/{key}` is big-endian and of a type weightcast cannot swap"),
                    ));
                }
                crate::source::swap_bytes(&mut buf[..n], isz as usize);
            }
            if from != to {
                out.resize(n / isz as usize * osz as usize, 0);
                over += cast::cast_par_checked(from, to, &buf[..n], &mut out, range)
                    .map_err(|e| Error::invalid(path, format!("storage `data/{key}`: {e}")))?;
                zip.write(&out)?;
            } else {
                zip.write(&buf[..n])?;
            }
            advance(n as u64);
            pos += n as u64;
        }
        if over > 0 {
            summary.overflow.push((
                first_name
                    .get(key.as_str())
                    .unwrap_or(&key.as_str())
                    .to_string(),
                over,
            ));
        }
        if from != to {
            summary.storages_cast += 1;
            summary.tensors_cast += cores.iter().filter(|c| &c.key == key).count();
        } else {
            summary.storages_kept += 1;
        }
        summary.bytes_in += size;
        summary.bytes_out += out_size;
    }
    zip.finish()?;
    Ok(summary)
}

/// Legacy storage class names torch.load maps to dtypes (others use `UntypedStorage` + v3).
fn legacy_storage(d: DType) -> Option<&'static str> {
    Some(match d {
        DType::F64 => "DoubleStorage",
        DType::F32 => "FloatStorage",
        DType::F16 => "HalfStorage",
        DType::BF16 => "BFloat16Storage",
        DType::I64 => "LongStorage",
        DType::I32 => "IntStorage",
        DType::I16 => "ShortStorage",
        DType::I8 => "CharStorage",
        DType::U8 => "ByteStorage",
        DType::Bool => "BoolStorage",
        DType::C64 => "ComplexFloatStorage",
        _ => return None,
    })
}

/// Writes the tensors of a non-PyTorch catalogue (safetensors) as a `torch.save` state dict
/// (an OrderedDict of tensors, one storage each), casting as `plan` says.
#[allow(clippy::too_many_arguments)]
pub fn write_pt_from_plan(
    cat: &crate::catalogue::Catalogue,
    plan: &crate::plan::Plan,
    range: Range,
    dst: &File,
    archive_name: &str,
    cancel: Option<&AtomicBool>,
    advance: &dyn Fn(u64),
) -> Result<PtSummary> {
    let mut pk = Pickle {
        nodes: vec![],
        root: 0,
    };
    let od = add(
        &mut pk,
        Node::Global {
            module: "collections".into(),
            name: "OrderedDict".into(),
        },
    );
    let empty = add(&mut pk, Node::Tuple(vec![]));
    let storage = add(&mut pk, Node::Str("storage".into()));
    let cpu = add(&mut pk, Node::Str("cpu".into()));
    let no = add(&mut pk, Node::Bool(false));
    let v2 = add(
        &mut pk,
        Node::Global {
            module: "torch._utils".into(),
            name: "_rebuild_tensor_v2".into(),
        },
    );
    let v3 = add(
        &mut pk,
        Node::Global {
            module: "torch._utils".into(),
            name: "_rebuild_tensor_v3".into(),
        },
    );
    let untyped = add(
        &mut pk,
        Node::Global {
            module: "torch.storage".into(),
            name: "UntypedStorage".into(),
        },
    );
    let zero = add(&mut pk, Node::Int(0));
    let mut items = Vec::new();
    for (i, p) in plan.tensors.iter().enumerate() {
        let t = &cat.tensors[p.tensor];
        let to = p.to;
        let torch_ok = !matches!(to, DType::F6E2M3 | DType::F6E3M2);
        if !torch_ok {
            return Err(Error::usage(format!(
                "tensor `{}`: torch has no {to} dtype",
                t.name
            )));
        }
        let key = add(&mut pk, Node::Str(i.to_string()));
        let numel = t.numel();
        let (stype, n) = match legacy_storage(to) {
            Some(s) => (
                add(
                    &mut pk,
                    Node::Global {
                        module: "torch".into(),
                        name: s.into(),
                    },
                ),
                numel,
            ),
            None => (untyped, p.bytes_out),
        };
        let n = add(&mut pk, Node::Int(n as i64));
        let pid_t = add(&mut pk, Node::Tuple(vec![storage, stype, key, cpu, n]));
        let pid = add(&mut pk, Node::PersId(pid_t));
        let dims: Vec<NodeId> = t
            .shape
            .iter()
            .map(|&d| add(&mut pk, Node::Int(d as i64)))
            .collect();
        let mut strides = vec![1u64; t.shape.len()];
        for k in (0..t.shape.len().saturating_sub(1)).rev() {
            strides[k] = strides[k + 1] * t.shape[k + 1].max(1);
        }
        let strides: Vec<NodeId> = strides
            .iter()
            .map(|&s| add(&mut pk, Node::Int(s as i64)))
            .collect();
        let size = add(&mut pk, Node::Tuple(dims));
        let stride = add(&mut pk, Node::Tuple(strides));
        let hooks = add(&mut pk, pickle::Object::reduce(od, empty));
        let mut args = vec![pid, zero, size, stride, no, hooks];
        let func = if legacy_storage(to).is_some() {
            v2
        } else {
            args.push(add(
                &mut pk,
                Node::Global {
                    module: "torch".into(),
                    name: to.torch_name().into(),
                },
            ));
            v3
        };
        let args = add(&mut pk, Node::Tuple(args));
        let tensor = add(&mut pk, pickle::Object::reduce(func, args));
        let name = add(&mut pk, Node::Str(t.name.clone()));
        items.push((name, tensor));
    }
    pk.root = add(
        &mut pk,
        Node::Object(pickle::Object {
            call: Call::Reduce {
                func: od,
                args: empty,
            },
            state: None,
            items,
            appends: vec![],
        }),
    );
    let data_pkl = pickle::write(&pk).map_err(|e| Error::invalid(&cat.path, e.to_string()))?;
    let sources = crate::source::Sources::open(cat)?;
    let mut zip = PtZip::new(dst, archive_name, &data_pkl)?;
    let mut summary = PtSummary::default();
    let mut out = Vec::new();
    for (i, p) in plan.tensors.iter().enumerate() {
        let t = &cat.tensors[p.tensor];
        zip.start(&format!("data/{i}"), p.bytes_out)?;
        let align = (p.from.bitsize() / 8)
            .max(1)
            .max((p.to.bitsize() / 8).max(1));
        let mut over = 0u64;
        sources.for_each_chunk(t, 8 << 20, align * (p.from.bitsize() / 8).max(1), |chunk| {
            if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
                return Err(Error::Interrupted);
            }
            if p.is_cast() {
                let (isz, osz) = (p.from.bitsize() / 8, p.to.bitsize() / 8);
                out.resize(chunk.len() / isz * osz, 0);
                over += cast::cast_par_checked(p.from, p.to, chunk, &mut out, range)
                    .map_err(|e| Error::invalid(&cat.path, format!("tensor `{}`: {e}", t.name)))?;
                zip.write(&out)?;
            } else {
                zip.write(chunk)?;
            }
            advance(chunk.len() as u64);
            Ok(())
        })?;
        if over > 0 {
            summary.overflow.push((t.name.clone(), over));
        }
        if p.is_cast() {
            summary.storages_cast += 1;
            summary.tensors_cast += 1;
        } else {
            summary.storages_kept += 1;
        }
        summary.bytes_in += p.bytes_in;
        summary.bytes_out += p.bytes_out;
    }
    zip.finish()?;
    Ok(summary)
}

/// A `torch.save` zip being written: stored records, 64-byte aligned data, the records torch
/// writes around the storages, in its order.
struct PtZip<'a> {
    zip: zip::ZipWriter<std::io::BufWriter<&'a File>>,
    archive: String,
}

impl<'a> PtZip<'a> {
    /// Starts the archive with `data.pkl`, `.format_version`, `.storage_alignment`, `byteorder`.
    fn new(dst: &'a File, archive: &str, data_pkl: &[u8]) -> Result<Self> {
        let mut z = PtZip {
            zip: zip::ZipWriter::new(std::io::BufWriter::with_capacity(1 << 20, dst)),
            archive: archive.to_string(),
        };
        for (name, body) in [
            ("data.pkl", data_pkl),
            (".format_version", b"1"),
            (".storage_alignment", b"64"),
            ("byteorder", b"little"),
        ] {
            z.start(name, body.len() as u64)?;
            z.write(body)?;
        }
        Ok(z)
    }

    /// Starts record `name` of `size` bytes.
    fn start(&mut self, name: &str, size: u64) -> Result<()> {
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .with_alignment(64)
            .large_file(size >= 0xFFFF_FFFF);
        self.zip
            .start_file(format!("{}/{name}", self.archive), opts)
            .map_err(|e| Error::invalid("output", format!("writing the zip: {e}")))
    }

    /// Appends to the current record.
    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.zip
            .write_all(bytes)
            .map_err(|e| Error::invalid("output", format!("writing the zip: {e}")))
    }

    /// Writes the `version` record and the central directory.
    fn finish(mut self) -> Result<()> {
        self.start("version", 2)?;
        self.write(b"3\n")?;
        let w = self
            .zip
            .finish()
            .map_err(|e| Error::invalid("output", format!("writing the zip: {e}")))?;
        let mut f = w
            .into_inner()
            .map_err(|e| Error::invalid("output", format!("writing the zip: {}", e.error())))?;
        f.flush()
            .map_err(|e| Error::invalid("output", format!("writing the zip: {e}")))
    }
}
