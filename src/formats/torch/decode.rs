//! The one decoder of tensor rebuild calls (`_rebuild_tensor_v2/v3`, Parameters,
//! `_rebuild_from_type_v2`): every tensor reachable from a node, its storage, dtype, shape,
//! strides and byte range, and the storages as the catalogue holds them.

use super::*;

/// Largest storage span read at once to gather a non-contiguous view.
pub(super) const MAX_GATHER: u64 = 1 << 30;

/// Deepest nesting followed when looking for tensors.
pub(super) const MAX_DEPTH: usize = 256;

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
pub(super) fn instance_class(pk: &Pickle, id: NodeId) -> Option<String> {
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

/// Decodes every tensor of the pickle: the state dict's (below `selected`, named as
/// `state_dict()` names them), then every other one (named by its path from the top, or by its
/// node when no name leads to it). Returns them with the tied names (alias, kept name).
#[allow(clippy::type_complexity)]
pub(super) fn decode_all(
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

pub(super) const TENSOR_REBUILDS: &[&str] = &[
    "_rebuild_tensor_v2",
    "_rebuild_tensor_v3",
    "_rebuild_parameter",
    "_rebuild_parameter_with_state",
    "_rebuild_qtensor",
    "_rebuild_sparse_tensor",
    "_rebuild_from_type_v2",
    "_rebuild_tensor",
];

pub(super) fn is_tensor(pk: &Pickle, id: NodeId) -> bool {
    matches!(pk.callee(id), Some((m, n)) if (m == "torch._utils" || m == "torch._tensor") && TENSOR_REBUILDS.contains(&n))
}

/// Collects every tensor below `id` with its dotted name, the way `state_dict()` names them
/// (a module's `_parameters`, `_buffers` and `_modules` add no name part), and the class of
/// the innermost module holding it (`class`, as inherited from above).
#[allow(clippy::too_many_arguments)]
pub(super) fn walk(
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
pub(super) struct Decoded {
    pub(super) site: Site,
    v3: bool,
    pub(super) persid: NodeId,
    pub(super) key: String,
    pub(super) dtype: DType,
    pub(super) shape: Vec<u64>,
    pub(super) strides: Vec<u64>,
    /// First element, counted in elements of `dtype` from the storage's start.
    pub(super) offset: u64,
}

/// The one decoder of rebuild calls: every consumer (catalogue, `.pt` writer) sees the tensors
/// it produces, with their storages.
pub(super) struct Decoder<'a> {
    pub(super) ar: &'a Archive,
    pub(super) storages: Vec<StorageEntry>,
    pub(super) by_key: HashMap<String, usize>,
    pub(super) rebuilds: Vec<Rebuild>,
    /// Tensor nodes and inner rebuild nodes already decoded.
    pub(super) consumed: HashSet<NodeId>,
    /// Views already in the catalogue, for tied weights.
    pub(super) views: HashMap<ViewKey, TensorRef>,
}

/// A view of a storage: (storage, element offset, dtype, shape, strides).
pub(super) type ViewKey = (usize, u64, DType, Vec<u64>, Vec<u64>);

impl<'a> Decoder<'a> {
    pub(super) fn new(ar: &'a Archive) -> Self {
        Decoder {
            ar,
            storages: vec![],
            by_key: HashMap::new(),
            rebuilds: vec![],
            consumed: HashSet::new(),
            views: HashMap::new(),
        }
    }

    pub(super) fn seen(&self, node: NodeId) -> bool {
        self.consumed.contains(&node)
    }

    /// The storage of `key` (made on first use from its record).
    pub(super) fn storage(
        &mut self,
        key: &str,
        dtype: Option<DType>,
    ) -> std::result::Result<usize, String> {
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
    pub(super) fn decode(&mut self, id: NodeId) -> std::result::Result<Decoded, String> {
        let d = decode_rebuild(&self.ar.pickle, id)?;
        // The storage must exist and hold the view.
        let s = self.storage(&d.key, Some(d.dtype))?;
        view_bytes(&d, self.storages[s].nbytes)?;
        Ok(d)
    }

    /// The catalogue tensor that an identical view of the same storage already is.
    pub(super) fn tied(&self, d: &Decoded) -> Option<TensorRef> {
        let s = self.by_key[&d.key];
        self.views
            .get(&(s, d.offset, d.dtype, d.shape.clone(), d.strides.clone()))
            .copied()
    }

    /// Records that node `node` (decoded as `d`) is the tensor `r`.
    pub(super) fn record(&mut self, node: NodeId, d: &Decoded, r: TensorRef) {
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
    pub(super) fn entry(&self, name: String, d: &Decoded) -> TensorEntry {
        let s = self.by_key[&d.key];
        let st = &self.storages[s];
        let (start, nbytes, strided) = view_bytes(d, st.nbytes).expect("checked when decoded");
        TensorEntry::new(name, d.dtype, d.shape.clone(), 0, st.offset + start, nbytes)
            .with_strided(strided)
            .with_packed(st.packed.clone())
            .with_storage(s)
    }

    /// Pins every storage referenced below `node` (a tensor weightcast does not read): the
    /// tensors inside it (a sparse tensor's indices and values) are part of it, not tensors of
    /// their own.
    pub(super) fn pin_below(&mut self, node: NodeId) {
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
    pub(super) fn pin_unread_storages(&mut self, root: NodeId) {
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
pub(super) fn decode_rebuild(pk: &Pickle, id: NodeId) -> std::result::Result<Decoded, String> {
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
pub(super) fn tensor_call(
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
pub(super) fn view_bytes(
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
