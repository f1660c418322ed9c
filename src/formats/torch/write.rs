//! Writing a converted `torch.save` checkpoint: what the plan decided, as a rewritten pickle and
//! the storage records to stream. [`from_torch`] takes the input's pickle and rewrites, for every
//! storage the plan converts, the storage type (and, between legacy and new dtypes, the rebuild
//! call) of each tensor on it, relabels storages `cpu`, and lists the records in torch's order;
//! [`from_tensors`] builds a state dict for a non-PyTorch input. The executor
//! ([`crate::convert`]) streams the records through the cast kernels into a [`PtZip`], laid out
//! as torch writes it (stored records, 64-byte aligned), so `torch.load(weights_only=True)` and
//! `torch.load(mmap=True)` read it.
//!
//! Conversion is per storage: every tensor on a storage (views, tied weights) keeps its storage
//! offset and strides, which count elements and so stay valid in the new dtype: views stay
//! views. The plan has already settled every storage to one dtype ([`Plan::settle`]).

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::path::Path;

use crate::audit::Class;
use crate::catalogue::{Catalogue, TensorEntry};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::formats::pickle::{self, Call, Node, NodeId, Pickle};
use crate::formats::torch::{reachable, Site, TensorRef, TorchDoc};
use crate::plan::{Plan, Scope};

/// Options of a `.pt` output beyond the plan.
#[derive(Debug, Clone, Default)]
pub struct PtExport {
    /// Clear `requires_grad` on every tensor and Parameter (`--inference`; the plan's
    /// [`Scope::StateDict`] keeps the state dict alone).
    pub inference: bool,
    /// Remove this prefix from the state dict's keys (`module.` from DataParallel); the
    /// catalogue's names were stripped the same way.
    pub strip_prefix: Option<String>,
    /// Refuse globals outside torch's weights-only allowlist (`--strict`).
    pub strict: bool,
    /// Globals accepted as calls (`--allow`): an output may carry a call to one of them.
    pub allow: crate::audit::Allow,
}

/// What the written `data.pkl` asks of `torch.load`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PickleReport {
    /// Whether every global it names is on torch's weights-only allowlist: then
    /// `torch.load(weights_only=True)` (torch's default) loads it.
    pub loads_with_weights_only: bool,
    /// The globals outside that list (model classes, accepted calls), as audit names them.
    pub outside_weights_only: Vec<String>,
}

/// One storage record of the output.
#[derive(Debug, Clone)]
pub struct PtRecord {
    /// Record name below the archive folder (`data/3`).
    pub name: String,
    /// Where its bytes come from (the whole input storage, or one tensor).
    pub source: TensorEntry,
    /// Stored dtype.
    pub from: DType,
    /// Written dtype.
    pub to: DType,
    /// Bytes written.
    pub bytes_out: u64,
    /// The first tensor on it, for messages.
    pub label: String,
    /// For a dequantized payload: its catalogue index and how it is dequantized.
    pub dequant: Option<(usize, crate::plan::Dequant)>,
    /// Its values multiplied by this factor (every tensor on the storage has it: a stored
    /// tensor is scaled once).
    pub factor: Option<crate::rules::Factor>,
}

/// What the output does to one storage: stored dtype, written dtype, factor.
type Decision = (DType, DType, Option<crate::rules::Factor>);

/// Whether two decisions for one storage agree (factors compared by their values).
fn agree(a: &Decision, b: &Decision) -> bool {
    a.0 == b.0
        && a.1 == b.1
        && match (a.2, b.2) {
            (None, None) => true,
            (Some(x), Some(y)) => x.same(y),
            _ => false,
        }
}

/// A `.pt` output, decided: its `data.pkl` and the records to stream after it.
#[derive(Debug, Clone)]
pub struct PtOutput {
    /// The pickle, written by our writer.
    pub data_pkl: Vec<u8>,
    /// What it asks of `torch.load`.
    pub report: PickleReport,
    /// Storage records in torch's order.
    pub records: Vec<PtRecord>,
}

/// The `.pt` output of a PyTorch input, as `plan` decides (made with [`Scope::WholeFile`] for
/// the whole file, [`Scope::StateDict`] for the state dict alone).
pub fn from_torch(cat: &Catalogue, plan: &Plan, export: &PtExport) -> Result<PtOutput> {
    let path = &cat.path;
    let doc: &TorchDoc = cat.torch.as_deref().ok_or_else(|| {
        Error::usage(format!(
            "{}: a .pt output needs a single PyTorch file as input",
            path.display()
        ))
    })?;
    if doc.torchscript {
        return Err(Error::usage(format!(
            "{}: writing a converted TorchScript archive is refused: its code may assume the old dtypes; \
 extract its tensors to .safetensors instead",
            path.display()
        )));
    }
    refuse_globals(path, &doc.globals, export.strict)?;
    if plan.quant == crate::plan::QuantPlan::Dequantize {
        return Err(Error::usage(format!(
            "{}: dequantizing a scaled FP8 PyTorch file into a .pt is not supported; write .safetensors, or pass --on-quantized keep",
            path.display()
        )));
    }
    if !doc.ambiguities.is_empty() {
        return Err(Error::Refused(format!(
            "{}: the file reads differently in different readers ({}); refusing to write it to a \
 .pt. Extract its tensors to .safetensors instead",
            path.display(),
            doc.ambiguities.join("; ")
        )));
    }
    let mut pk = doc.pickle.clone();
    match plan.scope {
        Scope::StateDict => pk.root = doc.selected,
        Scope::Inference => drop_entries(&mut pk, &plan.dropped),
        Scope::WholeFile { .. } => {}
    }
    if let Some(prefix) = &export.strip_prefix {
        strip_prefix(path, &mut pk, doc.selected, prefix)?;
    }
    let live: HashSet<NodeId> = reachable(&pk, pk.root).into_iter().collect();
    let rebuilds: Vec<_> = doc
        .rebuilds
        .iter()
        .filter(|r| live.contains(&r.node))
        .collect();
    let decision = storage_decisions(cat, plan, &rebuilds)?;
    if export.inference {
        clear_requires_grad(&mut pk, &rebuilds);
    }
    let mut rw = Rewriter::new(&mut pk);
    let mut done = HashSet::new();
    for r in rebuilds.iter().filter(|r| done.insert(r.site)) {
        let (from, to, _) = decision[&r.storage];
        if from != to {
            rw.convert(
                r.site,
                r.persid,
                r.v3,
                cat.storages[r.storage].nbytes,
                from,
                to,
            );
        }
    }
    rw.normalize_storage_ids(path)?;
    let report = output_globals(path, &pk, export)?;
    let data_pkl = pickle::write(&pk).map_err(|e| Error::invalid(path, e.to_string()))?;

    let records = records(cat, doc, &pk, &decision, &rebuilds)?;
    Ok(PtOutput {
        data_pkl,
        report,
        records,
    })
}

/// Per storage: (from, to, factor) as the plan says for every tensor on it that the output
/// holds; a storage the plan's tensors disagree on is an error (the plan settles storages
/// first, and refuses factors that differ on one: [`Plan::check_factors`]).
fn storage_decisions(
    cat: &Catalogue,
    plan: &Plan,
    rebuilds: &[&crate::formats::torch::Rebuild],
) -> Result<HashMap<usize, Decision>> {
    let path = &cat.path;
    let mut decision: HashMap<usize, Decision> = HashMap::new();
    let mut split = HashSet::new();
    for r in rebuilds {
        let entry = match r.tensor {
            TensorRef::Selected(i) => plan.tensors().get(i).map(|p| (p.from, p.to, p.factor)),
            TensorRef::Other(i) => plan
                .others()
                .iter()
                .find(|p| p.tensor.0 == i)
                .map(|p| (p.from, p.to, p.factor)),
        };
        let d = match entry {
            Some(d) => d,
            None => {
                let dt = cat.storages[r.storage].dtype.unwrap_or(DType::U8);
                (dt, dt, None)
            }
        };
        if !agree(decision.entry(r.storage).or_insert(d), &d) {
            split.insert(r.storage);
        }
    }
    if let Some(&s) = split.iter().next() {
        return Err(Error::invalid(
            path,
            format!(
                "storage data/{} would get two dtypes or factors: the plan was not settled \
                 (Plan::settle, Plan::check_factors)",
                cat.storages[s].key
            ),
        ));
    }
    Ok(decision)
}

/// The storage records the output's pickle `pk` references, in torch's order, each with the
/// conversion the plan decided.
fn records(
    cat: &Catalogue,
    doc: &TorchDoc,
    pk: &Pickle,
    decision: &HashMap<usize, Decision>,
    rebuilds: &[&crate::formats::torch::Rebuild],
) -> Result<Vec<PtRecord>> {
    let path = &cat.path;
    // The records the output's pickle references, in torch's order.
    let by_key: HashMap<&str, usize> = cat
        .storages
        .iter()
        .enumerate()
        .map(|(i, s)| (s.key.as_str(), i))
        .collect();
    let mut used: Vec<usize> = reachable(pk, pk.root)
        .into_iter()
        .filter_map(|id| crate::formats::torch::persid_key(pk, id))
        .filter_map(|k| by_key.get(k.as_str()).copied())
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    used.sort_by(|&a, &b| {
        let (a, b) = (&cat.storages[a].key, &cat.storages[b].key);
        (a.len(), a).cmp(&(b.len(), b))
    });
    // The first tensor on each storage names its record in messages.
    let mut first: HashMap<usize, TensorRef> = HashMap::new();
    for r in rebuilds {
        first.entry(r.storage).or_insert(r.tensor);
    }
    let label_of = |s: usize| -> String {
        match first.get(&s) {
            Some(TensorRef::Selected(i)) => cat.tensors[*i].name.clone(),
            Some(TensorRef::Other(i)) => doc.others[*i].entry.name.clone(),
            None => format!("storage data/{}", cat.storages[s].key),
        }
    };
    let big_endian = cat.files[0].big_endian;
    let mut records = Vec::with_capacity(used.len());
    for s in used {
        let st = &cat.storages[s];
        let (from, to, factor) = decision.get(&s).copied().unwrap_or_else(|| {
            let dt = st.dtype.unwrap_or(DType::U8);
            (dt, dt, None)
        });
        // bytes as they are: neither cast nor scaled
        let copied = from == to && factor.is_none();
        let es = (from.bitsize() / 8).max(1) as u64;
        if (!copied || big_endian) && st.nbytes % es != 0 {
            return Err(Error::invalid(
                path,
                format!(
                    "storage data/{} holds {} bytes, not a whole number of {from} elements",
                    st.key, st.nbytes
                ),
            ));
        }
        if big_endian && st.dtype.is_none() && st.nbytes > 0 {
            return Err(Error::invalid(
                path,
                format!(
                    "storage data/{} is big-endian and of a type weightcast cannot swap",
                    st.key
                ),
            ));
        }
        let mut source = st.as_tensor();
        if copied && !big_endian {
            // Copied byte for byte, trailing bytes included.
            source.dtype = DType::U8;
            source.shape = vec![st.nbytes];
            source.nbytes = st.nbytes;
        }
        let osz = (to.bitsize() / 8).max(1) as u64;
        records.push(PtRecord {
            name: format!("data/{}", st.key),
            bytes_out: if copied {
                source.nbytes
            } else {
                st.nbytes / es * osz
            },
            source,
            from,
            to,
            label: label_of(s),
            dequant: None,
            factor,
        });
    }
    Ok(records)
}

/// Refuses a pickle we must not write back: dangerous globals, names that are not Python
/// identifiers, and with `strict` anything outside torch's weights-only allowlist.
fn refuse_globals(path: &Path, globals: &[(String, Class)], strict: bool) -> Result<()> {
    let bad: Vec<&str> = globals
        .iter()
        .filter(|(_, c)| match c {
            Class::Dangerous | Class::UnknownCall => true,
            Class::Other => strict,
            Class::Allowed => false,
        })
        .map(|(n, _)| n.as_str())
        .collect();
    if bad.is_empty() {
        return Ok(());
    }
    Err(Error::Refused(if strict {
        format!(
            "{}: the pickle references globals outside torch's weights-only allowlist ({}); \
 refusing to write it to a .pt (--strict). Extract its tensors to .safetensors instead",
            path.display(),
            bad.join(", ")
        )
    } else {
        format!(
            "{}: the pickle references dangerous globals ({}); refusing to write it to a .pt. \
 Extract its tensors to .safetensors instead (that is how to clean such a file)",
            path.display(),
            bad.join(", ")
        )
    }))
}

/// Judges the globals the output pickle `pk` carries as audit judges them (by name and use,
/// loaded by torch at protocol 2): a call that audit does not allow is refused, naming the
/// globals, unless `--allow` accepts it; nothing is written then.
fn output_globals(path: &Path, pk: &Pickle, export: &PtExport) -> Result<PickleReport> {
    let uses = pk.uses();
    let mut live = reachable(pk, pk.root);
    live.sort_unstable();
    live.dedup();
    let mut judged: Vec<(String, Class)> = Vec::new();
    let mut outside: Vec<String> = Vec::new();
    for id in live {
        if let Some((m, n)) = pk.global(id) {
            let how = uses.get(&id).copied().unwrap_or(pickle::Use::Named);
            let j = crate::audit::judge_use(m, n, 2, true, how, &export.allow);
            if !crate::audit::weights_only_loads(m, n, 2) && !outside.contains(&j.0) {
                outside.push(j.0.clone());
            }
            if !judged.contains(&j) {
                judged.push(j);
            }
        }
    }
    let calls: Vec<&str> = judged
        .iter()
        .filter(|(_, c)| *c <= Class::UnknownCall)
        .map(|(n, _)| n.as_str())
        .collect();
    if !calls.is_empty() {
        return Err(Error::Refused(format!(
            "{}: the output would call globals that audit does not allow ({}); refusing to \
 write it to a .pt. Accept each with --allow NAME if you trust it, or extract the tensors to \
 .safetensors",
            path.display(),
            calls.join(", ")
        )));
    }
    Ok(PickleReport {
        loads_with_weights_only: outside.is_empty(),
        outside_weights_only: outside,
    })
}

/// The function and argument tuple of the `_rebuild_tensor_v2/v3` call at `site`.
fn site_call(pk: &Pickle, site: Site) -> Option<(NodeId, NodeId)> {
    match site {
        Site::Call(id) => match pk.node(id) {
            Node::Object(o) => match o.call {
                Call::Reduce { func, args } => Some((func, args)),
                _ => None,
            },
            _ => None,
        },
        Site::FromType(id) => {
            let Node::Object(o) = pk.node(id) else {
                return None;
            };
            let Call::Reduce { args, .. } = o.call else {
                return None;
            };
            let a = pk.seq(args)?;
            Some((*a.first()?, *a.get(2)?))
        }
    }
}

/// Replaces the call at `site` with `func(*args)`.
fn set_site_call(pk: &mut Pickle, site: Site, func: NodeId, args: NodeId) {
    match site {
        Site::Call(id) => {
            if let Node::Object(o) = &mut pk.nodes[id] {
                o.call = Call::Reduce { func, args };
            }
        }
        Site::FromType(id) => {
            let Node::Object(o) = pk.node(id).clone() else {
                return;
            };
            let Call::Reduce {
                func: outer,
                args: oargs,
            } = o.call
            else {
                return;
            };
            let Some(mut a) = pk.seq(oargs).map(<[NodeId]>::to_vec) else {
                return;
            };
            if a.len() < 3 {
                return;
            }
            a[0] = func;
            a[2] = args;
            let t = add(pk, Node::Tuple(a));
            if let Node::Object(o) = &mut pk.nodes[id] {
                o.call = Call::Reduce {
                    func: outer,
                    args: t,
                };
            }
        }
    }
}

/// Rewrites rebuild calls and storage ids, adding each new global once.
struct Rewriter<'a> {
    pk: &'a mut Pickle,
    globals: HashMap<(&'static str, &'static str), NodeId>,
    cpu: NodeId,
}

impl<'a> Rewriter<'a> {
    fn new(pk: &'a mut Pickle) -> Self {
        let cpu = add(pk, Node::Str("cpu".into()));
        Rewriter {
            pk,
            globals: HashMap::new(),
            cpu,
        }
    }

    fn global(&mut self, module: &'static str, name: &'static str) -> NodeId {
        if let Some(&id) = self.globals.get(&(module, name)) {
            return id;
        }
        let id = add(
            self.pk,
            Node::Global {
                module: module.into(),
                name: name.into(),
            },
        );
        self.globals.insert((module, name), id);
        id
    }

    /// The tensor at `site` (storage id `persid`, of `nbytes` bytes) now lives on a storage of
    /// `to`: a legacy typed storage and `_rebuild_tensor_v2`, or an `UntypedStorage` and
    /// `_rebuild_tensor_v3` with the dtype.
    fn convert(
        &mut self,
        site: Site,
        persid: NodeId,
        v3: bool,
        nbytes: u64,
        from: DType,
        to: DType,
    ) {
        let elems = nbytes / (from.bitsize() as u64 / 8).max(1);
        let Some((_, args)) = site_call(self.pk, site) else {
            return;
        };
        let Node::PersId(t) = self.pk.node(persid).clone() else {
            return;
        };
        let mut items = self.pk.seq(t).map(<[NodeId]>::to_vec).unwrap_or_default();
        let mut a = self
            .pk
            .seq(args)
            .map(<[NodeId]>::to_vec)
            .unwrap_or_default();
        if items.len() < 5 || a.len() < 6 {
            return;
        }
        items.truncate(5);
        let mut v3 = v3;
        match legacy_storage(to) {
            Some(sname) => {
                items[1] = self.global("torch", sname);
                items[4] = add(self.pk, Node::Int(elems as i64));
                if v3 {
                    a.truncate(6);
                    v3 = false;
                }
            }
            None => {
                items[1] = self.global("torch.storage", "UntypedStorage");
                items[4] = add(
                    self.pk,
                    Node::Int((elems * (to.bitsize() as u64 / 8)) as i64),
                );
                let d = self.global("torch", to.torch_name());
                a.truncate(6);
                a.push(d);
                v3 = true;
            }
        }
        let new_t = add(self.pk, Node::Tuple(items));
        self.pk.nodes[persid] = Node::PersId(new_t);
        let func = if v3 {
            self.global("torch._utils", "_rebuild_tensor_v3")
        } else {
            self.global("torch._utils", "_rebuild_tensor_v2")
        };
        let new_args = add(self.pk, Node::Tuple(a));
        set_site_call(self.pk, site, func, new_args);
    }

    /// Every storage id reachable from the root becomes the zip format's
    /// `("storage", type, key, "cpu", numel)`: storages saved on `cuda:N` load on any machine,
    /// and a legacy file's 6-tuple loses its (empty) view field.
    fn normalize_storage_ids(&mut self, path: &Path) -> Result<()> {
        for id in reachable(self.pk, self.pk.root) {
            let Some(mut items) =
                crate::formats::torch::storage_id(self.pk, id).map(|s| s.items.to_vec())
            else {
                continue;
            };
            if items.len() > 5 && self.pk.node(items[5]) != &Node::None {
                return Err(Error::usage(format!(
                    "{}: a pre-1.0 storage view cannot be written to the zip format",
                    path.display()
                )));
            }
            if items.len() == 5 && self.pk.str(items[3]) == Some("cpu") {
                continue;
            }
            items.truncate(5);
            items[3] = self.cpu;
            let new_t = add(self.pk, Node::Tuple(items));
            self.pk.nodes[id] = Node::PersId(new_t);
        }
        Ok(())
    }
}

/// Removes the top-level entries `dropped` names from the checkpoint's dict (a new root node:
/// the rest of the pickle is shared, and what only they reached is no longer written).
fn drop_entries(pk: &mut Pickle, dropped: &[(String, usize, u64)]) {
    let gone = |pk: &Pickle, k: NodeId| pk.str(k).is_some_and(|k| dropped.iter().any(|d| d.0 == k));
    let node = match pk.node(pk.root).clone() {
        Node::Dict(items) => Node::Dict(items.into_iter().filter(|&(k, _)| !gone(pk, k)).collect()),
        Node::Object(mut o) => {
            o.items.retain(|&(k, _)| !gone(pk, k));
            Node::Object(o)
        }
        _ => return,
    };
    pk.root = add(pk, node);
}

/// Sets `requires_grad` to False in every tensor rebuild and Parameter wrapper.
fn clear_requires_grad(pk: &mut Pickle, rebuilds: &[&crate::formats::torch::Rebuild]) {
    let no = add(pk, Node::Bool(false));
    let (mut wrappers, mut sites) = (HashSet::new(), HashSet::new());
    for r in rebuilds {
        // A Parameter wrapper: `_rebuild_parameter(data, requires_grad, hooks[, state])`.
        if !matches!(r.site, Site::Call(c) if c == r.node) && wrappers.insert(r.node) {
            if let Node::Object(o) = pk.node(r.node).clone() {
                if let Call::Reduce { func, args } = o.call {
                    if let Some(mut a) = pk.seq(args).map(<[NodeId]>::to_vec) {
                        if a.len() > 1
                            && matches!(pk.callee(r.node), Some((_, n)) if n.starts_with("_rebuild_parameter"))
                        {
                            a[1] = no;
                            let t = add(pk, Node::Tuple(a));
                            if let Node::Object(o) = &mut pk.nodes[r.node] {
                                o.call = Call::Reduce { func, args: t };
                            }
                        }
                    }
                }
            }
        }
        if !sites.insert(r.site) {
            continue;
        }
        let Some((func, args)) = site_call(pk, r.site) else {
            continue;
        };
        let Some(mut a) = pk.seq(args).map(<[NodeId]>::to_vec) else {
            continue;
        };
        if a.len() > 4 {
            a[4] = no;
            let t = add(pk, Node::Tuple(a));
            set_site_call(pk, r.site, func, t);
        }
    }
}

/// Removes `prefix` from the keys of the state dict at `node`.
fn strip_prefix(path: &Path, pk: &mut Pickle, node: NodeId, prefix: &str) -> Result<()> {
    let items: Vec<(NodeId, NodeId)> = match pk.node(node) {
        Node::Dict(d) => d.clone(),
        Node::Object(o) => o.items.clone(),
        _ => {
            return Err(Error::usage(format!(
                "{}: --strip-prefix needs a state dict",
                path.display()
            )))
        }
    };
    let mut seen = HashSet::new();
    let mut renamed = Vec::with_capacity(items.len());
    for (k, v) in items {
        let name = pk.str(k).map(str::to_string);
        let k = match name.as_deref().and_then(|n| n.strip_prefix(prefix)) {
            Some(stripped) => add(pk, Node::Str(stripped.to_string())),
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
    match &mut pk.nodes[node] {
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

/// The `.pt` output of a non-PyTorch input (safetensors): a `torch.save` state dict (an
/// OrderedDict of tensors, one storage each), cast as `plan` says.
pub fn from_tensors(cat: &Catalogue, plan: &Plan) -> Result<PtOutput> {
    let mut b = StateDict::new();
    let mut items = Vec::with_capacity(plan.tensors().len());
    for (i, p) in plan.tensors().iter().enumerate() {
        let t = &cat.tensors[p.tensor];
        if matches!(p.to, DType::F6E2M3 | DType::F6E3M2) {
            return Err(Error::usage(format!(
                "tensor `{}`: torch has no {} dtype",
                t.name, p.to
            )));
        }
        items.push(b.tensor(&i.to_string(), &t.name, &t.shape, p.to, p.bytes_out));
    }
    let pk = b.finish(items);
    let report = output_globals(&cat.path, &pk, &PtExport::default())?;
    let data_pkl = pickle::write(&pk).map_err(|e| Error::invalid(&cat.path, e.to_string()))?;
    let records = plan
        .tensors()
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let t = &cat.tensors[p.tensor];
            PtRecord {
                name: format!("data/{i}"),
                source: t.clone(),
                from: p.from,
                to: p.to,
                bytes_out: p.bytes_out,
                label: t.name.clone(),
                dequant: p.dequant.map(|d| (p.tensor.0, d)),
                factor: p.factor,
            }
        })
        .collect();
    Ok(PtOutput {
        data_pkl,
        report,
        records,
    })
}

/// Builds the pickle `torch.save(state_dict)` writes: an OrderedDict of `_rebuild_tensor_v2`
/// calls (`_v3` with an `UntypedStorage` for dtypes without a legacy storage class), each on a
/// storage of its own.
struct StateDict {
    pk: Pickle,
    /// Globals made so far: shared nodes, memoised once by the writer (as Python's pickler
    /// memoises them).
    globals: HashMap<(&'static str, String), NodeId>,
    od: NodeId,
    empty: NodeId,
    storage: NodeId,
    cpu: NodeId,
    no: NodeId,
    zero: NodeId,
}

impl StateDict {
    fn new() -> Self {
        let mut pk = Pickle {
            nodes: vec![],
            root: 0,
            ..Pickle::default()
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
        let zero = add(&mut pk, Node::Int(0));
        StateDict {
            pk,
            globals: HashMap::new(),
            od,
            empty,
            storage,
            cpu,
            no,
            zero,
        }
    }

    /// The `(name, tensor)` item of a contiguous tensor on storage `key`.
    fn tensor(
        &mut self,
        key: &str,
        name: &str,
        shape: &[u64],
        to: DType,
        nbytes: u64,
    ) -> (NodeId, NodeId) {
        let numel: u64 = shape.iter().product();
        let legacy = legacy_storage(to);
        let (stype, n) = match legacy {
            Some(s) => (self.global("torch", s), numel),
            None => (self.global("torch.storage", "UntypedStorage"), nbytes),
        };
        let func = match legacy {
            Some(_) => self.global("torch._utils", "_rebuild_tensor_v2"),
            None => self.global("torch._utils", "_rebuild_tensor_v3"),
        };
        let dtype = self.global("torch", to.torch_name());
        let pk = &mut self.pk;
        let key = add(pk, Node::Str(key.to_string()));
        let n = add(pk, Node::Int(n as i64));
        let pid_t = add(pk, Node::Tuple(vec![self.storage, stype, key, self.cpu, n]));
        let pid = add(pk, Node::PersId(pid_t));
        let mut strides = vec![1u64; shape.len()];
        for k in (0..shape.len().saturating_sub(1)).rev() {
            strides[k] = strides[k + 1] * shape[k + 1].max(1);
        }
        let ints = |pk: &mut Pickle, v: &[u64]| {
            let ids = v.iter().map(|&d| add(pk, Node::Int(d as i64))).collect();
            add(pk, Node::Tuple(ids))
        };
        let size = ints(pk, shape);
        let stride = ints(pk, &strides);
        let hooks = add(pk, pickle::Object::reduce(self.od, self.empty));
        let mut args = vec![pid, self.zero, size, stride, self.no, hooks];
        if legacy.is_none() {
            args.push(dtype);
        }
        let args = add(pk, Node::Tuple(args));
        let tensor = add(pk, pickle::Object::reduce(func, args));
        let name = add(pk, Node::Str(name.to_string()));
        (name, tensor)
    }

    /// The node of global `module.name`, made once.
    fn global(&mut self, module: &'static str, name: &str) -> NodeId {
        if let Some(&id) = self.globals.get(&(module, name.to_string())) {
            return id;
        }
        let id = add(
            &mut self.pk,
            Node::Global {
                module: module.into(),
                name: name.into(),
            },
        );
        self.globals.insert((module, name.to_string()), id);
        id
    }

    /// The pickle with `items` as its OrderedDict.
    fn finish(mut self, items: Vec<(NodeId, NodeId)>) -> Pickle {
        self.pk.root = add(
            &mut self.pk,
            Node::Object(pickle::Object {
                call: Call::Reduce {
                    func: self.od,
                    args: self.empty,
                },
                state: None,
                items,
                appends: vec![],
            }),
        );
        self.pk
    }
}

/// A `torch.save` zip being written: stored records, 64-byte aligned data, the records torch
/// writes around the storages, in its order.
pub struct PtZip<'a> {
    zip: zip::ZipWriter<std::io::BufWriter<&'a File>>,
    archive: String,
}

impl<'a> PtZip<'a> {
    /// Starts the archive with `data.pkl`, `.format_version`, `.storage_alignment`, `byteorder`.
    pub fn new(dst: &'a File, archive: &str, data_pkl: &[u8]) -> Result<Self> {
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
    pub fn start(&mut self, name: &str, size: u64) -> Result<()> {
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .with_alignment(64)
            .large_file(size >= 0xFFFF_FFFF);
        self.zip
            .start_file(format!("{}/{name}", self.archive), opts)
            .map_err(|e| Error::invalid("output", format!("writing the zip: {e}")))
    }

    /// Appends to the current record.
    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.zip
            .write_all(bytes)
            .map_err(|e| Error::invalid("output", format!("writing the zip: {e}")))
    }

    /// Writes the `version` record and the central directory.
    pub fn finish(mut self) -> Result<()> {
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
