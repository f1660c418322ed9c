//! A pickle engine of our own that never imports or calls anything.
//!
//! [`parse`] turns pickle bytes (protocols 0 to 5) into a [`Pickle`]: an arena of [`Node`]s in
//! which globals are names, REDUCE/NEWOBJ/BUILD results are [`Object`] nodes and persistent ids
//! stay [`Node::PersId`]. Memo references resolve to the same node id, so shared objects (tied
//! weights, repeated storages) stay shared and nothing is copied. The parser is iterative (no
//! recursion on nesting) and every length is checked against the bytes that remain, so a
//! hostile file gets an error naming the byte offset and opcode, never a hang, a stack overflow
//! or an allocation sized by an untrusted length.

mod equiv;
mod read;
mod write;

pub use equiv::{equivalent, reachable_globals, WRITER_GLOBALS};
pub use read::{
    is_opcode, parse, parse_prefix, parse_prefix_partial, parse_with, Limits, PickleError, Reading,
};
pub use write::{write, WriteError};

pub use crate::audit::Use;

/// Index of a node in [`Pickle::nodes`].
pub type NodeId = usize;

/// One value of a pickle.
#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    /// `None`.
    None,
    /// `True`/`False`.
    Bool(bool),
    /// An integer that fits i64.
    Int(i64),
    /// A larger integer: little-endian two's complement bytes (LONG1/LONG4).
    BigInt(Vec<u8>),
    /// A float.
    Float(f64),
    /// `bytes`/`bytearray` (and protocol-0/1 byte strings).
    Bytes(Vec<u8>),
    /// `str`.
    Str(String),
    /// `list`.
    List(Vec<NodeId>),
    /// `tuple`.
    Tuple(Vec<NodeId>),
    /// `dict`, in insertion order.
    Dict(Vec<(NodeId, NodeId)>),
    /// `set`.
    Set(Vec<NodeId>),
    /// `frozenset`.
    FrozenSet(Vec<NodeId>),
    /// A global reference (`module.name`), never resolved.
    Global {
        /// Module path.
        module: String,
        /// Attribute name.
        name: String,
    },
    /// The result of calling something: kept as a description, never executed.
    Object(Object),
    /// A persistent id (torch's storage references).
    PersId(NodeId),
}

impl Node {
    /// The nodes this one refers to directly.
    pub fn children(&self) -> Vec<NodeId> {
        match self {
            Node::List(v) | Node::Tuple(v) | Node::Set(v) | Node::FrozenSet(v) => v.clone(),
            Node::Dict(d) => d.iter().flat_map(|&(k, v)| [k, v]).collect(),
            Node::PersId(i) => vec![*i],
            Node::Object(o) => {
                let mut v = match &o.call {
                    Call::Reduce { func, args } => vec![*func, *args],
                    Call::NewObj { cls, args, kwargs } => {
                        let mut v = vec![*cls, *args];
                        v.extend(kwargs);
                        v
                    }
                    Call::Inst { cls, args } => {
                        let mut v = vec![*cls];
                        v.extend(args);
                        v
                    }
                };
                v.extend(o.items.iter().flat_map(|&(k, x)| [k, x]));
                v.extend(&o.appends);
                v.extend(o.state);
                v
            }
            _ => vec![],
        }
    }
}

/// How an object would have been made.
#[derive(Debug, Clone, PartialEq)]
pub enum Call {
    /// `REDUCE`: `func(*args)`.
    Reduce {
        /// The callable (usually a [`Node::Global`]).
        func: NodeId,
        /// The argument tuple.
        args: NodeId,
    },
    /// `NEWOBJ`/`NEWOBJ_EX`: `cls.__new__(cls, *args, **kwargs)`.
    NewObj {
        /// The class.
        cls: NodeId,
        /// The argument tuple.
        args: NodeId,
        /// Keyword arguments (NEWOBJ_EX).
        kwargs: Option<NodeId>,
    },
    /// Protocol 0/1 `INST`/`OBJ`: `cls(*args)`.
    Inst {
        /// The class (a [`Node::Global`]).
        cls: NodeId,
        /// The arguments.
        args: Vec<NodeId>,
    },
}

/// An object node: the call that makes it plus what later opcodes did to it.
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    /// How it is made.
    pub call: Call,
    /// The `BUILD` state (`__setstate__` argument), if any.
    pub state: Option<NodeId>,
    /// Items set with SETITEM(S) (an OrderedDict, a defaultdict).
    pub items: Vec<(NodeId, NodeId)>,
    /// Items added with APPEND(S).
    pub appends: Vec<NodeId>,
}

impl Object {
    /// The node of `func(*args)` with nothing applied to it yet.
    pub fn reduce(func: NodeId, args: NodeId) -> Node {
        Node::Object(Object {
            call: Call::Reduce { func, args },
            state: None,
            items: vec![],
            appends: vec![],
        })
    }
}

/// A parsed pickle.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Pickle {
    /// Every node.
    pub nodes: Vec<Node>,
    /// The value the pickle returns.
    pub root: NodeId,
    /// For each global the parser read: where, by which opcode, and the protocol in force
    /// then (which decides how an unpickler resolves its name).
    pub global_sites: std::collections::HashMap<NodeId, GlobalSite>,
    /// Bytes CPython's C unpickler skips reading this pickle from a file, where FRAME opcodes
    /// do not enclose whole opcodes (no pickler writes that): loaders read it differently.
    pub frame_skips: Vec<FrameSkip>,
    /// Globals whose attributes a BUILD sets (`(global node, BUILD offset)`): a module or a
    /// class rewritten while loading.
    pub built_globals: Vec<(NodeId, usize)>,
}

/// Bytes the C unpickler skips reading from a file: what is left of a FRAME's buffer when an
/// opcode needs more than that.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameSkip {
    /// The opcode whose read skips them.
    pub offset: usize,
    /// First byte skipped.
    pub from: usize,
    /// End of the bytes skipped.
    pub to: usize,
}

impl std::fmt::Display for FrameSkip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the opcode at byte {} does not fit in its FRAME: CPython's C unpickler reading a \
             file skips bytes {}..{}, a loader reading memory does not",
            self.offset, self.from, self.to
        )
    }
}

/// Where the parser read a global.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GlobalSite {
    /// The protocol in force: the last PROTO opcode's, 0 before any.
    pub protocol: u8,
    /// Byte offset of the opcode in the pickle.
    pub offset: usize,
    /// The opcode (`c` GLOBAL, `i` INST, 0x93 STACK_GLOBAL).
    pub opcode: u8,
}

impl GlobalSite {
    /// The opcode's name.
    pub fn opcode_name(&self) -> &'static str {
        match self.opcode {
            b'c' => "GLOBAL",
            b'i' => "INST",
            0x93 => "STACK_GLOBAL",
            _ => "?",
        }
    }
}

impl Pickle {
    /// The node `id`.
    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id]
    }

    /// The string in node `id`, if it is one.
    pub fn str(&self, id: NodeId) -> Option<&str> {
        match &self.nodes[id] {
            Node::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The integer in node `id`, if it is one (bools count as 0/1).
    pub fn int(&self, id: NodeId) -> Option<i64> {
        match &self.nodes[id] {
            Node::Int(i) => Some(*i),
            Node::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }

    /// The items of a tuple or list node.
    pub fn seq(&self, id: NodeId) -> Option<&[NodeId]> {
        match &self.nodes[id] {
            Node::Tuple(v) | Node::List(v) => Some(v),
            _ => None,
        }
    }

    /// `(module, name)` of a global node.
    pub fn global(&self, id: NodeId) -> Option<(&str, &str)> {
        match &self.nodes[id] {
            Node::Global { module, name } => Some((module, name)),
            _ => None,
        }
    }

    /// For an object made by calling a global, that global's `(module, name)`.
    pub fn callee(&self, id: NodeId) -> Option<(&str, &str)> {
        match &self.nodes[id] {
            Node::Object(o) => match o.call {
                Call::Reduce { func, .. } => self.global(func),
                Call::NewObj { cls, .. } => self.global(cls),
                Call::Inst { cls, .. } => self.global(cls),
            },
            _ => None,
        }
    }

    /// Every global the parser read, with the protocol in force when it was read, in
    /// first-seen order, without duplicates (a global added later counts as protocol 2, what
    /// our writer emits).
    pub fn globals_with_protocol(&self) -> Vec<(String, String, u8)> {
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        for (id, n) in self.nodes.iter().enumerate() {
            if let Node::Global { module, name } = n {
                let p = self.global_sites.get(&id).map_or(2, |s| s.protocol);
                if seen.insert((module.as_str(), name.as_str(), p)) {
                    out.push((module.clone(), name.clone(), p));
                }
            }
        }
        out
    }

    /// Every global the parser read, where it read it, in file order (every occurrence), and
    /// how the pickle uses it.
    pub fn global_occurrences(&self) -> Vec<(String, String, GlobalSite, Use)> {
        let uses = self.uses();
        let mut v: Vec<(String, String, GlobalSite, Use)> = self
            .global_sites
            .iter()
            .filter_map(|(&id, &site)| match &self.nodes[id] {
                Node::Global { module, name } => Some((
                    module.clone(),
                    name.clone(),
                    site,
                    uses.get(&id).copied().unwrap_or(Use::Named),
                )),
                _ => None,
            })
            .collect();
        v.sort_by_key(|g| g.2.offset);
        v
    }

    /// How the pickle uses each global node it calls or instantiates (the worst use when
    /// several): the callable of a REDUCE and the class of an INST or OBJ are called; the
    /// class of a NEWOBJ is instantiated, as is the class `copyreg._reconstructor` is given
    /// (whose base, unless `object`, is called: its `__init__` runs).
    pub fn uses(&self) -> std::collections::HashMap<NodeId, Use> {
        let mut out: std::collections::HashMap<NodeId, Use> = Default::default();
        let mut mark = |id: NodeId, u: Use| {
            if matches!(self.nodes.get(id), Some(Node::Global { .. })) {
                let e = out.entry(id).or_insert(u);
                *e = (*e).max(u);
            }
        };
        for n in &self.nodes {
            let Node::Object(o) = n else { continue };
            match o.call {
                Call::Reduce { func, args } => {
                    mark(func, Use::Called);
                    // callables that call what they are given: numpy's random-generator
                    // helpers call it; sklearn's `newObj` instantiates it
                    let passes = match self.global(func) {
                        Some(("numpy.random._pickle", _)) => Some(Use::Called),
                        Some((m, "newObj")) if m.starts_with("sklearn.") => Some(Use::Instantiated),
                        _ => None,
                    };
                    if let (Some(u), Some(items)) = (passes, self.seq(args)) {
                        for &a in items {
                            mark(a, u);
                        }
                    }
                    // builtins call their arguments' special methods (`len` its `__len__`,
                    // `int` its `__int__`, `min` iterates and compares the items): a global
                    // given to one, or held by a container given to one, is judged as called
                    let builtin = matches!(
                        self.global(func),
                        Some(("builtins" | "__builtin__" | "__builtins__", _))
                    );
                    if let (true, Some(items)) = (builtin, self.seq(args)) {
                        for &a in items {
                            mark(a, Use::Called);
                            if matches!(
                                self.nodes.get(a),
                                Some(
                                    Node::List(_)
                                        | Node::Tuple(_)
                                        | Node::Set(_)
                                        | Node::FrozenSet(_)
                                        | Node::Dict(_)
                                )
                            ) {
                                for b in self.nodes[a].children() {
                                    mark(b, Use::Called);
                                }
                            }
                        }
                    }
                    let reconstructor = matches!(
                        self.global(func),
                        Some(("copyreg" | "copy_reg", "_reconstructor"))
                    );
                    if let (true, Some([cls, base, ..])) = (reconstructor, self.seq(args)) {
                        mark(*cls, Use::Instantiated);
                        let object = matches!(
                            self.global(*base),
                            Some(("builtins" | "__builtin__", "object"))
                        );
                        if !object {
                            mark(*base, Use::Called);
                        }
                    }
                }
                Call::NewObj { cls, .. } => mark(cls, Use::Instantiated),
                Call::Inst { cls, .. } => mark(cls, Use::Called),
            }
        }
        out
    }

    /// Adds the globals `other` read (another reading of the same bytes) that this one has not
    /// read at the same offset, so that both readings are judged.
    pub fn merge_globals(&mut self, other: &Pickle) {
        let have: std::collections::HashSet<(usize, String, String)> = self
            .global_sites
            .iter()
            .filter_map(|(&id, s)| match &self.nodes[id] {
                Node::Global { module, name } => Some((s.offset, module.clone(), name.clone())),
                _ => None,
            })
            .collect();
        let uses = other.uses();
        let mut sites: Vec<_> = other.global_sites.iter().collect();
        sites.sort_by_key(|(_, s)| s.offset);
        for (&id, site) in sites {
            if let Node::Global { module, name } = &other.nodes[id] {
                if !have.contains(&(site.offset, module.clone(), name.clone())) {
                    self.nodes.push(Node::Global {
                        module: module.clone(),
                        name: name.clone(),
                    });
                    let g = self.nodes.len() - 1;
                    self.global_sites.insert(g, *site);
                    // how the other reading uses it: a node of its own that uses it so
                    let empty = self.nodes.len();
                    match uses.get(&id) {
                        Some(Use::Called) => {
                            self.nodes.push(Node::Tuple(vec![]));
                            self.nodes.push(Object::reduce(g, empty));
                        }
                        Some(Use::Instantiated) => {
                            self.nodes.push(Node::Tuple(vec![]));
                            self.nodes.push(Node::Object(Object {
                                call: Call::NewObj {
                                    cls: g,
                                    args: empty,
                                    kwargs: None,
                                },
                                state: None,
                                items: vec![],
                                appends: vec![],
                            }));
                        }
                        _ => {}
                    }
                    if let Some(&(_, at)) = other.built_globals.iter().find(|b| b.0 == id) {
                        self.built_globals.push((g, at));
                    }
                }
            }
        }
    }

    /// Every global the pickle references, in first-seen order, without duplicates.
    pub fn globals(&self) -> Vec<(String, String)> {
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        for n in &self.nodes {
            if let Node::Global { module, name } = n {
                if seen.insert((module.as_str(), name.as_str())) {
                    out.push((module.clone(), name.clone()));
                }
            }
        }
        out
    }
}
