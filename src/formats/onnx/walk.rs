//! Walking a `ModelProto` for its weights: the main graph's initializers, `Constant` nodes'
//! values, other nodes' tensor attributes, and the same in every subgraph (`If`/`Loop`/`Scan`
//! attributes), training graph and function body. Each weight gets a unique, stable name and
//! its op context; nothing but the small fields is read (values stay in the file, except those
//! of typed varint fields, decoded within a budget).

use std::collections::{BTreeSet, HashMap, HashSet};

use super::tensor::{self, Data, Resolved};
use super::wire::{Msg, ReadAt, Value, Wire};
use crate::catalogue::{OnnxOrigin, OnnxStored, OnnxWeight};
use crate::dtype::DType;
use crate::error::{Error, Result};

/// Most bytes of values decoded into memory (typed varint fields) for one model.
pub const MAX_DECODED: u64 = 256 << 20;

/// One weight found.
#[derive(Debug, Clone)]
pub struct Found {
    /// Its unique name.
    pub name: String,
    /// Its dtype.
    pub dtype: DType,
    /// Its shape.
    pub shape: Vec<u64>,
    /// Where its values are.
    pub place: Place,
    /// What the ONNX document says of it.
    pub weight: OnnxWeight,
    /// The value name whose consumers give its op context.
    lookup: Option<String>,
}

/// Where a weight's values are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// `nbytes` at `offset` in the model file.
    Model {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        nbytes: u64,
    },
    /// `nbytes` at `offset` in the external file `location`.
    External {
        /// The location, as the model gives it.
        location: String,
        /// Byte offset.
        offset: u64,
        /// Byte length.
        nbytes: u64,
    },
    /// `nbytes` at `offset` in [`Scanned::decoded`].
    Memory {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        nbytes: u64,
    },
}

/// What a model holds.
#[derive(Debug, Clone, Default)]
pub struct Scanned {
    /// `ir_version`.
    pub ir_version: u64,
    /// Producer name and version.
    pub producer: String,
    /// Operator sets.
    pub opsets: Vec<(String, u64)>,
    /// Every weight read.
    pub found: Vec<Found>,
    /// Decoded values (typed varint fields), one weight after another.
    pub decoded: Vec<u8>,
    /// Tensors not read, with why.
    pub skipped: Vec<String>,
    /// Sparse tensors (not read).
    pub sparse: usize,
}

struct Walker<'w, 'a> {
    wire: &'w mut Wire<'a>,
    out: Scanned,
    names: HashSet<String>,
    suffix: HashMap<String, u64>,
    uses: HashMap<String, BTreeSet<String>>,
}

/// Where a weight's op context comes from.
enum Ctx {
    /// The ops consuming this value name.
    Consumers(String),
    /// The op of the node holding it.
    Holder(String),
}

/// A node's small fields.
#[derive(Default)]
struct Node {
    outputs: Vec<String>,
    op: String,
    domain: String,
    holder: String,
}

/// Scans the model in `src` (the file at `path`, named in errors): every weight, checked.
pub fn scan(path: &std::path::Path, src: &dyn ReadAt) -> Result<Scanned> {
    let mut wire = Wire::new(path, src);
    let mut w = Walker {
        wire: &mut wire,
        out: Scanned::default(),
        names: HashSet::new(),
        suffix: HashMap::new(),
        uses: HashMap::new(),
    };
    w.model()?;
    let Walker { out, uses, .. } = w;
    let mut out = out;
    for f in &mut out.found {
        if let Some(n) = &f.lookup {
            f.weight.ops = uses
                .get(n)
                .map(|s| s.iter().cloned().collect())
                .unwrap_or_default();
        }
    }
    Ok(out)
}

impl Walker<'_, '_> {
    fn model(&mut self) -> Result<()> {
        let mut root = self.wire.root();
        let (mut graph, mut training, mut functions) = (None, vec![], vec![]);
        let (mut name, mut version) = (String::new(), String::new());
        while let Some(f) = self.wire.next(&mut root)? {
            match (f.number, f.value) {
                (1, Value::Varint(v)) => self.out.ir_version = v,
                (2, Value::Len { .. }) => name = self.wire.string(&f)?,
                (3, Value::Len { .. }) => version = self.wire.string(&f)?,
                (7, Value::Len { .. }) => graph = Some(self.wire.enter(&f, &root)?),
                (8, Value::Len { .. }) => {
                    let m = self.wire.enter(&f, &root)?;
                    let opset = self.opset(m)?;
                    self.out.opsets.push(opset);
                }
                (20, Value::Len { .. }) => training.push(self.wire.enter(&f, &root)?),
                (25, Value::Len { .. }) => functions.push(self.wire.enter(&f, &root)?),
                _ => {}
            }
        }
        self.out.producer = format!("{name} {version}").trim().to_string();
        let Some(graph) = graph else {
            return Err(Error::invalid(
                self.wire.path(),
                format!(
                    "not an ONNX model: no graph (ModelProto field 7) in its {} bytes",
                    self.wire.len()
                ),
            ));
        };
        self.graph(graph, "")?;
        for (i, t) in training.into_iter().enumerate() {
            let mut it = t;
            while let Some(f) = self.wire.next(&mut it)? {
                if let (1 | 2, Value::Len { .. }) = (f.number, f.value) {
                    let g = self.wire.enter(&f, &it)?;
                    let which = if f.number == 1 {
                        "initialization"
                    } else {
                        "algorithm"
                    };
                    self.graph(g, &format!("training_info.{i}.{which}"))?;
                }
            }
        }
        for f in functions {
            self.function(f)?;
        }
        Ok(())
    }

    fn opset(&mut self, m: Msg) -> Result<(String, u64)> {
        let (mut domain, mut version) = (String::new(), 0);
        let mut it = m;
        while let Some(f) = self.wire.next(&mut it)? {
            match (f.number, f.value) {
                (1, Value::Len { .. }) => domain = self.wire.string(&f)?,
                (2, Value::Varint(v)) => version = v,
                _ => {}
            }
        }
        Ok((domain, version))
    }

    /// A function body: its nodes, in the scope `function:DOMAIN:NAME`.
    fn function(&mut self, m: Msg) -> Result<()> {
        let (mut name, mut domain, mut nodes) = (String::new(), String::new(), vec![]);
        let mut it = m;
        while let Some(f) = self.wire.next(&mut it)? {
            match (f.number, f.value) {
                (1, Value::Len { .. }) => name = self.wire.string(&f)?,
                (10, Value::Len { .. }) => domain = self.wire.string(&f)?,
                (7, Value::Len { .. }) => nodes.push(self.wire.enter(&f, &it)?),
                _ => {}
            }
        }
        let scope = format!("function:{domain}:{name}");
        for (i, n) in nodes.into_iter().enumerate() {
            self.node(n, &scope, i)?;
        }
        Ok(())
    }

    /// A graph: its initializers first (so that their names stay as they are), then its nodes.
    fn graph(&mut self, m: Msg, scope: &str) -> Result<()> {
        let mut it = m;
        let mut k = 0usize;
        while let Some(f) = self.wire.next(&mut it)? {
            match (f.number, f.value) {
                (5, Value::Len { .. }) => {
                    let t = self.wire.enter(&f, &it)?;
                    let p = tensor::parse(self.wire, t)?;
                    let base = if p.name.is_empty() {
                        format!("initializer.{k}")
                    } else {
                        p.name.clone()
                    };
                    let ctx = Ctx::Consumers(p.name.clone());
                    self.tensor(t, p, scope, base, OnnxOrigin::Initializer, ctx)?;
                    k += 1;
                }
                (15, Value::Len { .. }) => self.out.sparse += 1,
                _ => {}
            }
        }
        let mut it = m;
        let mut i = 0usize;
        while let Some(f) = self.wire.next(&mut it)? {
            if let (1, Value::Len { .. }) = (f.number, f.value) {
                let n = self.wire.enter(&f, &it)?;
                self.node(n, scope, i)?;
                i += 1;
            }
        }
        Ok(())
    }

    fn node(&mut self, m: Msg, scope: &str, index: usize) -> Result<()> {
        let mut node = Node::default();
        let (mut inputs, mut name, mut attrs) = (vec![], String::new(), vec![]);
        let mut it = m;
        while let Some(f) = self.wire.next(&mut it)? {
            match (f.number, f.value) {
                (1, Value::Len { .. }) => inputs.push(self.wire.string(&f)?),
                (2, Value::Len { .. }) => node.outputs.push(self.wire.string(&f)?),
                (3, Value::Len { .. }) => name = self.wire.string(&f)?,
                (4, Value::Len { .. }) => node.op = self.wire.string(&f)?,
                (7, Value::Len { .. }) => node.domain = self.wire.string(&f)?,
                (5, Value::Len { .. }) => attrs.push(self.wire.enter(&f, &it)?),
                _ => {}
            }
        }
        for i in inputs.into_iter().filter(|i| !i.is_empty()) {
            self.uses.entry(i).or_default().insert(node.op.clone());
        }
        node.holder = if !name.is_empty() {
            name
        } else {
            match node.outputs.first().filter(|o| !o.is_empty()) {
                Some(o) => o.clone(),
                None => format!("node.{index}"),
            }
        };
        for a in attrs {
            self.attribute(a, scope, &node)?;
        }
        Ok(())
    }

    /// A node's attribute: its tensors (`t`, `tensors`) and graphs (`g`, `graphs`).
    fn attribute(&mut self, m: Msg, scope: &str, node: &Node) -> Result<()> {
        let (mut name, mut tensors, mut graphs) = (String::new(), vec![], vec![]);
        let mut it = m;
        while let Some(f) = self.wire.next(&mut it)? {
            match (f.number, f.value) {
                (1, Value::Len { .. }) => name = self.wire.string(&f)?,
                (5 | 10, Value::Len { .. }) => tensors.push((f.number, self.wire.enter(&f, &it)?)),
                (6 | 11, Value::Len { .. }) => graphs.push((f.number, self.wire.enter(&f, &it)?)),
                (22 | 23, Value::Len { .. }) => self.out.sparse += 1,
                _ => {}
            }
        }
        let constant = node.op == "Constant"
            && (node.domain.is_empty() || node.domain == "ai.onnx")
            && name == "value";
        let mut k = 0usize;
        for (number, t) in tensors {
            let p = tensor::parse(self.wire, t)?;
            let output = node.outputs.first().filter(|o| !o.is_empty());
            let (base, origin, ctx) = match output {
                Some(o) if constant && number == 5 => {
                    (o.clone(), OnnxOrigin::Constant, Ctx::Consumers(o.clone()))
                }
                _ => {
                    let base = if number == 10 {
                        k += 1;
                        format!("{}.{name}.{}", node.holder, k - 1)
                    } else {
                        format!("{}.{name}", node.holder)
                    };
                    let ctx = Ctx::Holder(node.op.clone());
                    (base, OnnxOrigin::Attribute(name.clone()), ctx)
                }
            };
            self.tensor(t, p, scope, base, origin, ctx)?;
        }
        let mut k = 0usize;
        for (number, g) in graphs {
            let mut sub = format!("{}.{name}", node.holder);
            if number == 11 {
                sub = format!("{sub}.{k}");
                k += 1;
            }
            if !scope.is_empty() {
                sub = format!("{scope}/{sub}");
            }
            self.graph(g, &sub)?;
        }
        Ok(())
    }

    /// One weight: checked, named, its varint values decoded.
    fn tensor(
        &mut self,
        m: Msg,
        p: tensor::Proto,
        scope: &str,
        base: String,
        origin: OnnxOrigin,
        ctx: Ctx,
    ) -> Result<()> {
        let (dtype, shape, data) = match tensor::resolve(self.wire, &p, &base)? {
            Resolved::Skip(why) => {
                let shown = if scope.is_empty() {
                    base
                } else {
                    format!("{scope}/{base}")
                };
                self.out.skipped.push(format!("`{shown}` ({why})"));
                return Ok(());
            }
            Resolved::Read(d, s, data) => (d, s, data),
        };
        let (place, stored) = match data {
            Data::Decode {
                field,
                size,
                nbytes,
            } => {
                let used = self.out.decoded.len() as u64;
                if nbytes > MAX_DECODED - used {
                    return Err(Error::invalid(
                        self.wire.path(),
                        format!(
                            "ONNX tensor `{base}` at byte offset {}: its {nbytes} bytes of values \
                             are stored as varints (not raw_data): more than the {} MiB \
                             weightcast decodes into memory ({used} bytes decoded before it)",
                            m.pos,
                            MAX_DECODED >> 20
                        ),
                    ));
                }
                let spec = (field, size, nbytes);
                tensor::decode(self.wire, m, &base, spec, &mut self.out.decoded)?;
                let place = Place::Memory {
                    offset: used,
                    nbytes,
                };
                (place, OnnxStored::Decoded)
            }
            Data::External {
                location,
                offset,
                nbytes,
            } => {
                let stored = OnnxStored::External(location.clone());
                let place = Place::External {
                    location,
                    offset,
                    nbytes,
                };
                (place, stored)
            }
            Data::InFile {
                offset,
                nbytes,
                packed,
            } => {
                let stored = if packed {
                    OnnxStored::Packed
                } else {
                    OnnxStored::Raw
                };
                (Place::Model { offset, nbytes }, stored)
            }
        };
        let name = self.unique(&base, scope);
        let (ops, lookup) = match ctx {
            Ctx::Holder(op) => (vec![op], None),
            Ctx::Consumers(n) => (vec![], Some(n)),
        };
        self.out.found.push(Found {
            name,
            dtype,
            shape,
            place,
            weight: OnnxWeight {
                onnx_name: p.name,
                graph: scope.to_string(),
                origin,
                ops,
                data_type: p.data_type,
                proto: p.msg,
                stored,
            },
            lookup,
        });
        Ok(())
    }

    /// `base` if no weight has that name yet; else `scope/base`, then `#2`, `#3`... appended.
    fn unique(&mut self, base: &str, scope: &str) -> String {
        let mut cand = base.to_string();
        if self.names.contains(&cand) && !scope.is_empty() {
            cand = format!("{scope}/{base}");
        }
        if self.names.contains(&cand) {
            let stem = cand;
            let n = self.suffix.entry(stem.clone()).or_insert(1);
            loop {
                *n += 1;
                let c = format!("{stem}#{n}");
                if !self.names.contains(&c) {
                    cand = c;
                    break;
                }
            }
        }
        self.names.insert(cand.clone());
        cand
    }
}
