//! The pickle parser: a stack machine over the opcodes of protocols 0 to 5 that builds nodes and
//! never executes anything.

use std::collections::HashMap;

use super::{Call, Node, NodeId, Object, Pickle};

/// Hard limits for untrusted input.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most nodes a pickle may create.
    pub max_nodes: usize,
    /// Most values on the stack at once (including those under marks).
    pub max_stack: usize,
    /// Most nested marks.
    pub max_marks: usize,
    /// Most memo entries.
    pub max_memo: usize,
    /// Read as joblib does: after the BUILD of a `numpy_pickle.NumpyArrayWrapper`, the
    /// array's raw bytes (or, for an object array, a nested pickle) follow in the stream.
    pub joblib_arrays: bool,
    /// How the bytes reach the unpickler, which decides what a FRAME does.
    pub reading: Reading,
}

/// How an unpickler gets the pickle's bytes. The two differ only for pickles whose FRAME
/// opcodes do not enclose whole opcodes (which no pickler writes): [`parse_prefix_partial`]
/// reads as [`Reading::File`] and, where that reading skips bytes, also as
/// [`Reading::Buffer`], and judges what both readings import.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Reading {
    /// CPython's C unpickler (`_pickle.c`) over a file object without `peek`: `torch.load` of
    /// a zip checkpoint unpickles `io.BytesIO(record)`. A FRAME whose bytes are not already
    /// buffered is read into a buffer of its own (`load_frame`); a read or a text line that
    /// does not fit in what is left of that buffer discards the rest of it and reads from the
    /// file after it (`_Unpickler_ReadImpl`, `_Unpickler_Readline`).
    #[default]
    File,
    /// The bytes in order: `pickle.loads`, and the C unpickler over a file with `peek` whose
    /// frames it prefetches (`open(path, "rb")`). A FRAME longer than what remains is read
    /// on, as the pure-Python unpickler (joblib's) reads it: the reading that sees most.
    Buffer,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_nodes: 50_000_000,
            max_stack: 10_000_000,
            max_marks: 100_000,
            max_memo: 50_000_000,
            joblib_arrays: false,
            reading: Reading::File,
        }
    }
}

/// Why a pickle could not be parsed: the byte offset, the opcode and what went wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("pickle byte {offset}: {opcode}: {what}")]
pub struct PickleError {
    /// Offset of the opcode in the pickle.
    pub offset: usize,
    /// The opcode's name (or its hex value when unknown).
    pub opcode: String,
    /// What is wrong.
    pub what: String,
    /// Whether CPython's unpickler stops here too (a malformed pickle), rather than only this
    /// parser (its limits, or what it does not model): a pickle that stops every unpickler
    /// before naming any global runs nothing.
    pub every_unpickler_stops: bool,
}

/// Parses with the default [`Limits`].
pub fn parse(data: &[u8]) -> Result<Pickle, PickleError> {
    parse_with(data, Limits::default())
}

/// Whether `op` is a pickle opcode (protocols 0 to 5): a stream whose first byte is not one
/// fails at that byte in any unpickler, before anything runs.
pub fn is_opcode(op: u8) -> bool {
    !name(op).starts_with("unknown")
}

fn name(op: u8) -> String {
    let n = match op {
        b'I' => "INT",
        b'J' => "BININT",
        b'K' => "BININT1",
        b'M' => "BININT2",
        b'L' => "LONG",
        0x8A => "LONG1",
        0x8B => "LONG4",
        b'S' => "STRING",
        b'T' => "BINSTRING",
        b'U' => "SHORT_BINSTRING",
        b'B' => "BINBYTES",
        b'C' => "SHORT_BINBYTES",
        0x8E => "BINBYTES8",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        b'N' => "NONE",
        0x88 => "NEWTRUE",
        0x89 => "NEWFALSE",
        b'V' => "UNICODE",
        0x8C => "SHORT_BINUNICODE",
        b'X' => "BINUNICODE",
        0x8D => "BINUNICODE8",
        b'F' => "FLOAT",
        b'G' => "BINFLOAT",
        b']' => "EMPTY_LIST",
        b'a' => "APPEND",
        b'e' => "APPENDS",
        b'l' => "LIST",
        b')' => "EMPTY_TUPLE",
        b't' => "TUPLE",
        0x85 => "TUPLE1",
        0x86 => "TUPLE2",
        0x87 => "TUPLE3",
        b'}' => "EMPTY_DICT",
        b'd' => "DICT",
        b's' => "SETITEM",
        b'u' => "SETITEMS",
        0x8F => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        b'0' => "POP",
        b'2' => "DUP",
        b'(' => "MARK",
        b'1' => "POP_MARK",
        b'g' => "GET",
        b'h' => "BINGET",
        b'j' => "LONG_BINGET",
        b'p' => "PUT",
        b'q' => "BINPUT",
        b'r' => "LONG_BINPUT",
        0x94 => "MEMOIZE",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        b'c' => "GLOBAL",
        0x93 => "STACK_GLOBAL",
        b'R' => "REDUCE",
        b'b' => "BUILD",
        b'i' => "INST",
        b'o' => "OBJ",
        0x81 => "NEWOBJ",
        0x92 => "NEWOBJ_EX",
        0x80 => "PROTO",
        b'.' => "STOP",
        0x95 => "FRAME",
        b'P' => "PERSID",
        b'Q' => "BINPERSID",
        _ => return format!("unknown opcode {op:#04x}"),
    };
    n.to_string()
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    op_at: usize,
    op: u8,
    limits: Limits,
    nodes: Vec<Node>,
    stack: Vec<NodeId>,
    marks: Vec<usize>,
    memo: HashMap<i64, NodeId>,
    /// The protocol in force: the last PROTO opcode's (0 before any), as CPython tracks it.
    proto: u8,
    /// The protocol in force when each global was read.
    global_sites: HashMap<NodeId, super::GlobalSite>,
    /// [`Reading::File`]: the end of the buffer a FRAME read, while bytes of it are left.
    window: Option<usize>,
    /// Bytes the C unpickler skips, and why.
    frame_skips: Vec<super::FrameSkip>,
    /// Globals a BUILD hands state to: `(global node, BUILD offset)`.
    built_globals: Vec<(NodeId, usize)>,
}

type R<T> = Result<T, PickleError>;

impl<'a> Machine<'a> {
    /// An error at which CPython's unpickler may go on reading (or that only the
    /// joblib reading has): what was read so far is judged, and the file is never clean.
    fn err<T>(&self, what: impl Into<String>) -> R<T> {
        Err(PickleError {
            offset: self.op_at,
            opcode: name(self.op),
            what: what.into(),
            every_unpickler_stops: false,
        })
    }

    /// An error of this parser alone (a limit, a reading CPython does not share).
    fn ours<T>(&self, what: impl Into<String>) -> R<T> {
        self.err(what)
    }

    /// An error at which CPython's unpickler surely stops too: data that runs out, a byte that
    /// is no opcode, a text argument that is not UTF-8, an unknown protocol.
    fn fatal<T>(&self, what: impl Into<String>) -> R<T> {
        let mut e = self.err::<T>(what);
        if let Err(e) = &mut e {
            e.every_unpickler_stops = true;
        }
        e
    }

    /// `_pickle.c` reading a file: a read that does not fit in what is left of a FRAME's
    /// buffer discards that rest and reads from the file after the buffer.
    fn leave_window(&mut self, fits: impl Fn(usize, usize) -> bool) {
        if let Some(end) = self.window {
            if fits(self.pos, end) {
                return;
            }
            if self.pos < end {
                self.frame_skips.push(super::FrameSkip {
                    offset: self.op_at,
                    from: self.pos,
                    to: end,
                });
                self.pos = end;
            }
            self.window = None;
        }
    }

    fn take(&mut self, n: usize) -> R<&'a [u8]> {
        self.leave_window(|pos, end| pos.checked_add(n).is_some_and(|e| e <= end));
        match self.pos.checked_add(n).filter(|&e| e <= self.data.len()) {
            Some(end) => {
                let s = &self.data[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => self.fatal(format!(
                "needs {n} bytes but only {} remain (truncated?)",
                self.data.len() - self.pos
            )),
        }
    }

    fn take_len(&mut self, n: u64) -> R<&'a [u8]> {
        match usize::try_from(n) {
            Ok(n) => self.take(n),
            Err(_) => self.fatal(format!("length {n} is larger than the input")),
        }
    }

    fn u8(&mut self) -> R<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> R<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> R<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn i32(&mut self) -> R<i32> {
        Ok(i32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> R<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }

    /// A newline-terminated text argument (protocol 0).
    fn line_bytes(&mut self) -> R<&'a [u8]> {
        let data = self.data;
        self.leave_window(|pos, end| data[pos..end].contains(&b'\n'));
        let rest = &self.data[self.pos..];
        let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
            return self.fatal("argument has no terminating newline (truncated?)");
        };
        self.pos += nl + 1;
        Ok(&rest[..nl])
    }

    fn line(&mut self) -> R<&'a str> {
        let s = self.line_bytes()?;
        match std::str::from_utf8(s) {
            Ok(s) => Ok(s),
            Err(_) => self.fatal("argument is not UTF-8"),
        }
    }

    /// UTF-8 as `load_binunicode` decodes it, with `surrogatepass`: encoded surrogates
    /// (`ED A0..BF xx`) are accepted (kept here as U+FFFD).
    fn utf8(&self, b: &[u8]) -> R<String> {
        let mut out = String::new();
        let mut rest = b;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    return Ok(out);
                }
                Err(e) => {
                    let at = e.valid_up_to();
                    out.push_str(std::str::from_utf8(&rest[..at]).expect("valid prefix"));
                    match rest.get(at..at + 3) {
                        Some([0xED, 0xA0..=0xBF, 0x80..=0xBF]) => {
                            out.push('\u{fffd}');
                            rest = &rest[at + 3..];
                        }
                        _ => {
                            return self.err(format!(
                                "string is not UTF-8 (at its byte {})",
                                b.len() - rest.len() + at
                            ))
                        }
                    }
                }
            }
        }
    }

    fn push_node(&mut self, n: Node) -> R<NodeId> {
        if self.nodes.len() >= self.limits.max_nodes {
            return self.ours(format!("more than {} values", self.limits.max_nodes));
        }
        self.nodes.push(n);
        let id = self.nodes.len() - 1;
        self.push(id)?;
        Ok(id)
    }

    fn push(&mut self, id: NodeId) -> R<()> {
        if self.stack.len() >= self.limits.max_stack {
            return self.ours(format!("stack deeper than {}", self.limits.max_stack));
        }
        self.stack.push(id);
        Ok(())
    }

    fn pop(&mut self) -> R<NodeId> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return self.err("stack underflow");
        }
        Ok(self.stack.pop().expect("checked"))
    }

    fn top(&self) -> R<NodeId> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return self.err("stack underflow");
        }
        Ok(*self.stack.last().expect("checked"))
    }

    fn pop_mark(&mut self) -> R<Vec<NodeId>> {
        let Some(m) = self.marks.pop() else {
            return self.err("no MARK before it");
        };
        Ok(self.stack.split_off(m))
    }

    /// Whether object `id` is made from joblib's `NumpyArrayWrapper`.
    fn is_joblib_wrapper(&self, id: NodeId) -> bool {
        let Node::Object(o) = &self.nodes[id] else {
            return false;
        };
        let cls = match o.call {
            Call::NewObj { cls, .. } | Call::Inst { cls, .. } => cls,
            Call::Reduce { func, .. } => func,
        };
        matches!(&self.nodes[cls], Node::Global { module, name }
            if name == "NumpyArrayWrapper" && module.ends_with("numpy_pickle"))
    }

    /// Steps over the array joblib writes after a `NumpyArrayWrapper` (`state` its BUILD
    /// dict): an alignment byte and its padding when the state asks for alignment, then
    /// `prod(shape) * itemsize` raw bytes; an object array is a nested pickle, whose globals
    /// are judged as this pickle's.
    fn joblib_array(&mut self, state: NodeId) -> R<()> {
        let Node::Dict(items) = &self.nodes[state] else {
            return self.ours("NumpyArrayWrapper state is not a dict");
        };
        let get = |k: &str| {
            items
                .iter()
                .find(|(key, _)| matches!(&self.nodes[*key], Node::Str(s) if s == k))
                .map(|(_, v)| *v)
        };
        let (shape, dtype, align) = (
            get("shape"),
            get("dtype"),
            get("numpy_array_alignment_bytes"),
        );
        let count = match shape.map(|s| &self.nodes[s]) {
            Some(Node::Tuple(dims)) => dims.iter().try_fold(1u64, |acc, &d| match &self.nodes[d] {
                Node::Int(n) if *n >= 0 => acc.checked_mul(*n as u64),
                _ => None,
            }),
            _ => None,
        };
        let descr = dtype.and_then(|d| match &self.nodes[d] {
            Node::Object(o) => match o.call {
                Call::Reduce { args, .. } => match &self.nodes[args] {
                    Node::Tuple(a) => a.first().and_then(|&x| match &self.nodes[x] {
                        Node::Str(s) => Some(s.clone()),
                        _ => None,
                    }),
                    _ => None,
                },
                _ => None,
            },
            _ => None,
        });
        let aligned = align.is_some_and(|a| !matches!(self.nodes[a], Node::None));
        let (Some(count), Some(descr)) = (count, descr) else {
            return self.ours("NumpyArrayWrapper without a readable shape and dtype");
        };
        let descr = descr.trim_start_matches(['<', '>', '|', '=']);
        if descr.starts_with('O') {
            let (res, partial) = machine(&self.data[self.pos..], self.limits).run_partial();
            let (nested, n) = match res {
                Ok((pk, n)) => (Some(pk), Some(n)),
                Err(_) => (partial, None),
            };
            if let Some(pk) = nested {
                let base = self.pos;
                let mut sites: Vec<_> = pk.global_sites.iter().collect();
                sites.sort_by_key(|(_, s)| s.offset);
                for (&id, site) in sites {
                    if let Node::Global { module, name } = &pk.nodes[id] {
                        if self.nodes.len() >= self.limits.max_nodes {
                            return self.ours("too many values");
                        }
                        self.nodes.push(Node::Global {
                            module: module.clone(),
                            name: name.clone(),
                        });
                        let mut site = *site;
                        site.offset += base;
                        self.global_sites.insert(self.nodes.len() - 1, site);
                    }
                }
            }
            return match n {
                Some(n) => {
                    self.pos += n;
                    Ok(())
                }
                None => self.ours("the object array's nested pickle does not parse"),
            };
        }
        let (kind, digits) = descr.split_at(descr.len().min(1));
        let n: u64 = digits.parse().unwrap_or(0);
        let itemsize = match kind {
            "U" => n.checked_mul(4),
            "b" | "i" | "u" | "f" | "c" | "S" | "a" | "V" | "M" | "m" | "e" | "d" | "g" => Some(n),
            _ => None,
        }
        .filter(|&s| s > 0);
        let Some(itemsize) = itemsize else {
            return self.ours(format!(
                "NumpyArrayWrapper dtype `{descr}` is not one joblib writes raw"
            ));
        };
        if aligned {
            let pad = self.u8()? as usize;
            self.take(pad)?;
        }
        let bytes = count
            .checked_mul(itemsize)
            .filter(|&b| b <= (self.data.len() - self.pos) as u64);
        match bytes {
            Some(b) => {
                self.pos += b as usize;
                Ok(())
            }
            None => self.ours("the array joblib wrote after NumpyArrayWrapper runs past the data"),
        }
    }

    /// FRAME as `load_frame` runs it: its 8-byte length, then the frame's bytes must be there;
    /// reading a file, a frame not already buffered becomes the buffer.
    fn frame(&mut self) -> R<()> {
        let len = self.u64()?;
        let fits = |pos: usize, end: usize| {
            usize::try_from(len)
                .ok()
                .and_then(|l| pos.checked_add(l))
                .is_some_and(|e| e <= end)
        };
        if self.limits.reading == Reading::File {
            self.leave_window(fits);
            if self.window.is_some() {
                return Ok(());
            }
        }
        if self.limits.reading == Reading::File && !fits(self.pos, self.data.len()) {
            return self.ours(format!(
                "frame of {len} bytes but only {} remain (truncated?)",
                self.data.len() - self.pos
            ));
        }
        if self.limits.reading == Reading::File && len > 0 {
            self.window = Some(self.pos + len as usize);
        }
        Ok(())
    }

    /// Records where global `id` was read: the opcode, its offset, the protocol in force.
    fn site(&mut self, id: NodeId) {
        self.global_sites.insert(
            id,
            super::GlobalSite {
                protocol: self.proto,
                offset: self.op_at,
                opcode: self.op,
            },
        );
    }

    fn memo_put(&mut self, key: i64) -> R<()> {
        let id = self.top()?;
        if self.memo.len() >= self.limits.max_memo && !self.memo.contains_key(&key) {
            return self.ours(format!("more than {} memo entries", self.limits.max_memo));
        }
        self.memo.insert(key, id);
        Ok(())
    }

    fn memo_get(&mut self, key: i64) -> R<()> {
        match self.memo.get(&key) {
            Some(&id) => self.push(id),
            None => self.err(format!("memo key {key} was never stored")),
        }
    }

    fn pairs(&self, items: Vec<NodeId>) -> R<Vec<(NodeId, NodeId)>> {
        if items.len() % 2 != 0 {
            return self.err("odd number of items for key/value pairs");
        }
        Ok(items.chunks(2).map(|c| (c[0], c[1])).collect())
    }

    /// Adds items to the dict-like node `target` (SETITEM/SETITEMS).
    /// SETITEM(S) on a list, a bytearray, a persistent object or a global (a mapping such as
    /// `os.environ`) can succeed in CPython (`obj[key] = value`): the items are dropped from
    /// the tree and reading goes on, their globals already recorded. On an immutable value
    /// every unpickler stops.
    fn set_items(&mut self, target: NodeId, items: Vec<(NodeId, NodeId)>) -> R<()> {
        match &mut self.nodes[target] {
            Node::Dict(d) => d.extend(items),
            Node::Object(o) => o.items.extend(items),
            Node::List(_) | Node::Bytes(_) | Node::PersId(_) | Node::Global { .. } => {}
            _ => return self.err("target is not a dict"),
        }
        Ok(())
    }

    /// APPEND(S): a list, or anything with `append`/`extend` (an object, a bytearray, a
    /// persistent object, a global such as a module's list).
    fn append_items(&mut self, target: NodeId, items: Vec<NodeId>) -> R<()> {
        match &mut self.nodes[target] {
            Node::List(l) => l.extend(items),
            Node::Object(o) => o.appends.extend(items),
            Node::Bytes(_) | Node::PersId(_) | Node::Global { .. } => {}
            _ => return self.err("target is not a list"),
        }
        Ok(())
    }

    fn object(&mut self, call: Call) -> R<()> {
        self.push_node(Node::Object(Object {
            call,
            state: None,
            items: vec![],
            appends: vec![],
        }))?;
        Ok(())
    }

    /// INT (`I`) and LONG (`L`) text as `load_int`/`load_long` read it: INT is C's
    /// `strtol(s, 0)` (so `0x1f` and `017` too; `00`/`01` are bools), falling back, as LONG
    /// does, to Python's `int(s, 0)` / `int(s, 10)` (underscores, surrounding whitespace, any
    /// size up to CPython's 4300-digit limit for decimal text).
    fn int_text(&self, s: &str) -> R<Node> {
        let long = self.op == b'L';
        let t = if long {
            s.strip_suffix('L').unwrap_or(s)
        } else {
            s
        };
        if !long {
            if let Some(v) = c_strtol(t) {
                return Ok(match (t.len(), v) {
                    (2, 0) => Node::Bool(false),
                    (2, 1) => Node::Bool(true),
                    _ => Node::Int(v),
                });
            }
        }
        match py_int_any(t, if long { 10 } else { 0 }) {
            Some(Ok(n)) => Ok(n),
            Some(Err((what, true))) => self.fatal(what),
            Some(Err((what, false))) => self.ours(what),
            None => self.err(format!("`{}` is not an integer", crate::audit::escape(s))),
        }
    }

    /// Runs to STOP; on an error, also returns what was built before it (its nodes and every
    /// global seen), root `0`.
    fn run_partial(mut self) -> (R<(Pickle, usize)>, Option<Pickle>) {
        match self.step_all() {
            Ok(r) => (Ok(r), None),
            Err(e) => {
                let partial = (!self.global_sites.is_empty() || !self.frame_skips.is_empty())
                    .then(|| self.take_pickle(0));
                (Err(e), partial)
            }
        }
    }

    fn take_pickle(&mut self, root: NodeId) -> Pickle {
        Pickle {
            nodes: std::mem::take(&mut self.nodes),
            root,
            global_sites: std::mem::take(&mut self.global_sites),
            frame_skips: std::mem::take(&mut self.frame_skips),
            built_globals: std::mem::take(&mut self.built_globals),
        }
    }

    fn step_all(&mut self) -> R<(Pickle, usize)> {
        loop {
            self.leave_window(|pos, end| pos < end);
            self.op_at = self.pos;
            if self.pos >= self.data.len() {
                self.op = 0;
                return Err(PickleError {
                    offset: self.pos,
                    opcode: "end of data".into(),
                    what: "no STOP opcode (truncated?)".into(),
                    every_unpickler_stops: true,
                });
            }
            self.op = self.data[self.pos];
            self.pos += 1;
            match self.op {
                0x80 => {
                    let p = self.u8()?;
                    if p > 5 {
                        return self.fatal(format!("unsupported protocol {p}"));
                    }
                    self.proto = p;
                }
                0x95 => self.frame()?,
                b'.' => {
                    let root = self.pop()?;
                    // Reading a file, the rest of a frame's buffer after STOP is consumed too:
                    // the next `pickle.load` of the same file starts after it.
                    self.leave_window(|_, _| false);
                    let end = self.pos;
                    return Ok((self.take_pickle(root), end));
                }
                b'N' => {
                    self.push_node(Node::None)?;
                }
                0x88 => {
                    self.push_node(Node::Bool(true))?;
                }
                0x89 => {
                    self.push_node(Node::Bool(false))?;
                }
                b'J' => {
                    let v = self.i32()? as i64;
                    self.push_node(Node::Int(v))?;
                }
                b'K' => {
                    let v = self.u8()? as i64;
                    self.push_node(Node::Int(v))?;
                }
                b'M' => {
                    let v = self.u16()? as i64;
                    self.push_node(Node::Int(v))?;
                }
                b'I' | b'L' => {
                    let s = self.line()?;
                    let n = self.int_text(s)?;
                    self.push_node(n)?;
                }
                0x8A | 0x8B => {
                    let n = if self.op == 0x8A {
                        self.u8()? as u64
                    } else {
                        let n = self.i32()?;
                        if n < 0 {
                            return self.err("negative length");
                        }
                        n as u64
                    };
                    let b = self.take_len(n)?;
                    let node = if b.is_empty() {
                        Node::Int(0)
                    } else if b.len() <= 8 {
                        let neg = b[b.len() - 1] & 0x80 != 0;
                        let mut buf = [if neg { 0xFF } else { 0 }; 8];
                        buf[..b.len()].copy_from_slice(b);
                        Node::Int(i64::from_le_bytes(buf))
                    } else {
                        Node::BigInt(b.to_vec())
                    };
                    self.push_node(node)?;
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into().expect("8"));
                    self.push_node(Node::Float(v))?;
                }
                b'F' => {
                    let s = self.line()?;
                    match s.trim().parse::<f64>() {
                        Ok(v) => {
                            self.push_node(Node::Float(v))?;
                        }
                        Err(_) => return self.err(format!("`{s}` is not a float")),
                    }
                }
                b'X' | 0x8C | 0x8D => {
                    let n = match self.op {
                        b'X' => self.u32()? as u64,
                        0x8C => self.u8()? as u64,
                        _ => self.u64()?,
                    };
                    let b = self.take_len(n)?;
                    let s = self.utf8(b)?;
                    self.push_node(Node::Str(s))?;
                }
                b'V' => {
                    // raw-unicode-escape: every byte is a Latin-1 character, but `\\uXXXX`.
                    let s: String = self.line_bytes()?.iter().map(|&b| b as char).collect();
                    let s = unescape_raw_unicode(&s);
                    self.push_node(Node::Str(s))?;
                }
                b'B' | b'C' | 0x8E | 0x96 => {
                    let n = match self.op {
                        b'B' => self.u32()? as u64,
                        b'C' => self.u8()? as u64,
                        _ => self.u64()?,
                    };
                    let b = self.take_len(n)?.to_vec();
                    self.push_node(Node::Bytes(b))?;
                }
                b'T' | b'U' => {
                    let n = if self.op == b'T' {
                        let n = self.i32()?;
                        if n < 0 {
                            return self.err("negative length");
                        }
                        n as u64
                    } else {
                        self.u8()? as u64
                    };
                    let b = self.take_len(n)?.to_vec();
                    self.push_node(Node::Bytes(b))?;
                }
                b'S' => {
                    let s = self.line()?;
                    let Some(body) = s
                        .strip_prefix('\'')
                        .and_then(|s| s.strip_suffix('\''))
                        .or_else(|| s.strip_prefix('"').and_then(|s| s.strip_suffix('"')))
                    else {
                        return self.err("STRING argument is not quoted");
                    };
                    let b = unescape_bytes(body);
                    self.push_node(Node::Bytes(b))?;
                }
                0x97 | 0x98 => return self.err("out-of-band buffers are not supported"),
                b']' => {
                    self.push_node(Node::List(vec![]))?;
                }
                b')' => {
                    self.push_node(Node::Tuple(vec![]))?;
                }
                b'}' => {
                    self.push_node(Node::Dict(vec![]))?;
                }
                0x8F => {
                    self.push_node(Node::Set(vec![]))?;
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push_node(Node::List(items))?;
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.push_node(Node::Tuple(items))?;
                }
                0x85..=0x87 => {
                    let n = (self.op - 0x84) as usize;
                    let mut items = vec![0; n];
                    for i in (0..n).rev() {
                        items[i] = self.pop()?;
                    }
                    self.push_node(Node::Tuple(items))?;
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let pairs = self.pairs(items)?;
                    self.push_node(Node::Dict(pairs))?;
                }
                0x91 => {
                    let items = self.pop_mark()?;
                    self.push_node(Node::FrozenSet(items))?;
                }
                b'a' => {
                    let v = self.pop()?;
                    let target = self.top()?;
                    self.append_items(target, vec![v])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    let target = self.top()?;
                    self.append_items(target, items)?;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let target = self.top()?;
                    self.set_items(target, vec![(k, v)])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let pairs = self.pairs(items)?;
                    let target = self.top()?;
                    self.set_items(target, pairs)?;
                }
                0x90 => {
                    let items = self.pop_mark()?;
                    let target = self.top()?;
                    match &mut self.nodes[target] {
                        Node::Set(s) => s.extend(items),
                        // anything with `add`
                        Node::Object(_) | Node::PersId(_) | Node::Global { .. } => {}
                        _ => return self.err("target is not a set"),
                    }
                }
                b'0' => {
                    // `load_pop`: a MARK on top of the stack is what POP removes
                    if self.marks.last() == Some(&self.stack.len()) {
                        self.marks.pop();
                    } else {
                        self.pop()?;
                    }
                }
                b'2' => {
                    let t = self.top()?;
                    self.push(t)?;
                }
                b'(' => {
                    if self.marks.len() >= self.limits.max_marks {
                        return self
                            .ours(format!("more than {} nested marks", self.limits.max_marks));
                    }
                    self.marks.push(self.stack.len());
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'g' | b'p' => {
                    // CPython: int(line), so signs, spaces and `_` between digits are keys too.
                    let s = self.line()?;
                    let Some(k) = py_int(s) else {
                        return self.err(format!("`{s}` is not a memo key"));
                    };
                    if self.op == b'g' {
                        self.memo_get(k)?;
                    } else {
                        self.memo_put(k)?;
                    }
                }
                b'h' => {
                    let k = self.u8()? as i64;
                    self.memo_get(k)?;
                }
                b'j' => {
                    let k = self.u32()? as i64;
                    self.memo_get(k)?;
                }
                b'q' => {
                    let k = self.u8()? as i64;
                    self.memo_put(k)?;
                }
                b'r' => {
                    let k = self.u32()? as i64;
                    self.memo_put(k)?;
                }
                0x94 => {
                    let k = self.memo.len() as i64;
                    self.memo_put(k)?;
                }
                0x82..=0x84 => return self.err("extension registry codes are not supported"),
                b'c' => {
                    let module = self.line()?.to_string();
                    let name = self.line()?.to_string();
                    self.push_node(Node::Global { module, name })?;
                    self.site(self.nodes.len() - 1);
                }
                0x93 => {
                    let n = self.pop()?;
                    let m = self.pop()?;
                    // Byte strings (STRING, BINSTRING, SHORT_BINSTRING) reach find_class as
                    // text: torch.load decodes them as UTF-8.
                    let text = |n: &Node| match n {
                        Node::Str(s) => Some(s.clone()),
                        Node::Bytes(b) => String::from_utf8(b.clone()).ok(),
                        _ => None,
                    };
                    let (Some(module), Some(name)) = (text(&self.nodes[m]), text(&self.nodes[n]))
                    else {
                        return self.err("module and name must be strings");
                    };
                    self.push_node(Node::Global { module, name })?;
                    self.site(self.nodes.len() - 1);
                }
                b'R' => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    self.object(Call::Reduce { func, args })?;
                }
                0x81 => {
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    self.object(Call::NewObj {
                        cls,
                        args,
                        kwargs: None,
                    })?;
                }
                0x92 => {
                    let kwargs = self.pop()?;
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    self.object(Call::NewObj {
                        cls,
                        args,
                        kwargs: Some(kwargs),
                    })?;
                }
                b'i' => {
                    let module = self.line()?.to_string();
                    let name = self.line()?.to_string();
                    if self.nodes.len() >= self.limits.max_nodes {
                        return self.ours("too many values");
                    }
                    // Recorded before the MARK is looked for: Python's pure unpickler imports
                    // the class first (the C one checks the MARK first; the file names it
                    // either way).
                    self.nodes.push(Node::Global { module, name });
                    let cls = self.nodes.len() - 1;
                    self.site(cls);
                    let args = self.pop_mark()?;
                    self.object(Call::Inst { cls, args })?;
                }
                b'o' => {
                    let mut items = self.pop_mark()?;
                    if items.is_empty() {
                        return self.err("OBJ needs a class");
                    }
                    let cls = items.remove(0);
                    self.object(Call::Inst { cls, args: items })?;
                }
                b'b' => {
                    let state = self.pop()?;
                    let target = self.top()?;
                    match &mut self.nodes[target] {
                        Node::Object(o) if o.state.is_none() => o.state = Some(state),
                        // `__setstate__` again: CPython calls it; the first state is kept
                        Node::Object(_) | Node::PersId(_) => {}
                        // `load_build` sets the attributes of whatever is on the stack: a
                        // module's or a class's, rewriting imported code.
                        Node::Global { .. } => self.built_globals.push((target, self.op_at)),
                        _ => return self.err("BUILD on a value that is not an object"),
                    }
                    if self.limits.joblib_arrays && self.is_joblib_wrapper(target) {
                        self.joblib_array(state)?;
                    }
                }
                b'P' => {
                    let s = self.line()?.to_string();
                    if self.nodes.len() >= self.limits.max_nodes {
                        return self.ours("too many values");
                    }
                    self.nodes.push(Node::Str(s));
                    let id = self.nodes.len() - 1;
                    self.push_node(Node::PersId(id))?;
                }
                b'Q' => {
                    let id = self.pop()?;
                    self.push_node(Node::PersId(id))?;
                }
                _ => return self.fatal("not a pickle opcode"),
            }
        }
    }
}

/// Parses with explicit limits.
pub fn parse_with(data: &[u8], limits: Limits) -> Result<Pickle, PickleError> {
    parse_prefix(data, limits).map(|(p, _)| p)
}

/// Parses the pickle at the start of `data` and returns it with the number of bytes it took
/// (legacy torch files stack several pickles and raw data in one file).
pub fn parse_prefix(data: &[u8], limits: Limits) -> Result<(Pickle, usize), PickleError> {
    parse_prefix_partial(data, limits).0
}

/// Like [`parse_prefix`]; when the pickle does not parse, also what was built before the error
/// (for judging the globals a loader would already have imported), if it saw any global.
///
/// Read as [`Reading::File`] (`limits.reading`), a pickle whose frames make the C unpickler
/// skip bytes is read again as [`Reading::Buffer`], and the globals of that reading are added
/// (a loader reading it from memory would import them); the skips stay in
/// [`Pickle::frame_skips`].
pub fn parse_prefix_partial(
    data: &[u8],
    limits: Limits,
) -> (Result<(Pickle, usize), PickleError>, Option<Pickle>) {
    let mut first = machine(data, limits).run_partial();
    let skipped = match &first {
        (Ok((pk, _)), _) | (Err(_), Some(pk)) => !pk.frame_skips.is_empty(),
        _ => false,
    } || matches!(&first.0, Err(e) if e.opcode == "FRAME");
    if first.0.is_err() && first.1.is_none() && skipped {
        // a frame longer than the data: the C unpickler stops there, the pure-Python one
        // reads what there is and goes on (judged below as the other reading)
        first.1 = Some(Pickle::default());
    }
    if limits.reading == Reading::File && skipped {
        let buffer = Limits {
            reading: Reading::Buffer,
            ..limits
        };
        let other = match machine(data, buffer).run_partial() {
            (Ok((pk, _)), _) | (Err(_), Some(pk)) => pk,
            _ => Pickle::default(),
        };
        if let (Ok((pk, _)), _) | (Err(_), Some(pk)) = &mut first {
            pk.merge_globals(&other);
        }
    }
    first
}

fn machine(data: &[u8], limits: Limits) -> Machine<'_> {
    Machine {
        data,
        pos: 0,
        op_at: 0,
        op: 0,
        limits,
        nodes: Vec::new(),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        proto: 0,
        global_sites: HashMap::new(),
        window: None,
        frame_skips: Vec::new(),
        built_globals: Vec::new(),
    }
}

/// C's `strtol(s, &end, 0)` accepting only when it ends the text, as `load_int` does: leading
/// whitespace, a sign, `0x` hex, `0` octal, else decimal; `None` on overflow or trailing text.
fn c_strtol(s: &str) -> Option<i64> {
    let t = s.trim_start_matches(|c: char| c.is_ascii_whitespace() || c == '\x0b' || c == '\x0c');
    let (neg, t) = match t.as_bytes().first()? {
        b'-' => (true, &t[1..]),
        b'+' => (false, &t[1..]),
        _ => (false, t),
    };
    let (radix, digits) = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        (16, h)
    } else if t.len() > 1 && t.starts_with('0') {
        (8, &t[1..])
    } else {
        (10, t)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    let v = i128::from_str_radix(digits, radix).ok()?;
    i64::try_from(if neg { -v } else { v }).ok()
}

/// Python's `int(s, base)` for base 0 or 10: surrounding whitespace, a sign, (base 0) a `0x`,
/// `0o` or `0b` prefix, digits with single underscores between them; base 0 refuses leading
/// zeros. `Some(Err((why, CPython stops too)))` past CPython's 4300-digit limit for decimal
/// text, or past this parser's own limit for other bases.
fn py_int_any(s: &str, base: u32) -> Option<Result<Node, (String, bool)>> {
    let t = s.trim_matches(|c: char| c.is_ascii_whitespace() || c == '\x0b' || c == '\x0c');
    let (neg, t) = match t.as_bytes().first()? {
        b'-' => (true, &t[1..]),
        b'+' => (false, &t[1..]),
        _ => (false, t),
    };
    let lower = t.to_ascii_lowercase();
    let (radix, digits) = match (base, lower.get(..2)) {
        (0, Some("0x")) => (16, &t[2..]),
        (0, Some("0o")) => (8, &t[2..]),
        (0, Some("0b")) => (2, &t[2..]),
        _ => (10, t),
    };
    let digits = if radix != 10 {
        digits.strip_prefix('_').unwrap_or(digits)
    } else {
        digits
    };
    if digits.is_empty()
        || digits.starts_with('_')
        || digits.ends_with('_')
        || digits.contains("__")
        || !digits.chars().all(|c| c == '_' || c.is_digit(radix))
    {
        return None;
    }
    let clean: String = digits.chars().filter(|&c| c != '_').collect();
    if base == 0 && radix == 10 && clean.len() > 1 && clean.starts_with('0') {
        if clean.bytes().all(|b| b == b'0') {
            return Some(Ok(Node::Int(0)));
        }
        return None;
    }
    if radix == 10 && clean.len() > 4300 {
        return Some(Err((
            format!(
                "an integer of {} digits: CPython refuses more than 4300",
                clean.len()
            ),
            true,
        )));
    }
    if let Ok(v) = i64::from_str_radix(&clean, radix) {
        return Some(Ok(Node::Int(if neg { -v } else { v })));
    }
    if clean.len() > 100_000 {
        return Some(Err((
            format!("an integer of {} digits", clean.len()),
            false,
        )));
    }
    // little-endian magnitude, then two's complement with a sign byte
    let mut mag: Vec<u8> = vec![0];
    for c in clean.chars() {
        let mut carry = c.to_digit(radix).expect("checked digit");
        for b in mag.iter_mut() {
            let v = *b as u32 * radix + carry;
            *b = v as u8;
            carry = v >> 8;
        }
        while carry > 0 {
            mag.push(carry as u8);
            carry >>= 8;
        }
    }
    mag.push(0);
    if neg {
        let mut carry = 1u16;
        for b in mag.iter_mut() {
            let v = (!*b) as u16 + carry;
            *b = v as u8;
            carry = v >> 8;
        }
    }
    // the shortest two's complement, as pickle's LONG1 writes it
    while mag.len() > 1 {
        let (top, next) = (mag[mag.len() - 1], mag[mag.len() - 2]);
        if (top == 0 && next & 0x80 == 0) || (top == 0xFF && next & 0x80 != 0) {
            mag.pop();
        } else {
            break;
        }
    }
    Some(Ok(Node::BigInt(mag)))
}

/// Python's `int()` of a text line (base 10): surrounding whitespace, an optional sign, digits
/// with single `_` between them.
pub(crate) fn py_int(s: &str) -> Option<i64> {
    let t = s.trim_matches(|c: char| c.is_ascii_whitespace() || c == '\x0b' || c == '\x0c');
    let (neg, digits) = match t.as_bytes().first()? {
        b'-' => (true, &t[1..]),
        b'+' => (false, &t[1..]),
        _ => (false, t),
    };
    if digits.is_empty()
        || digits.starts_with('_')
        || digits.ends_with('_')
        || digits.contains("__")
        || !digits.chars().all(|c| c.is_ascii_digit() || c == '_')
    {
        return None;
    }
    let v: i64 = digits.replace('_', "").parse().ok()?;
    Some(if neg { -v } else { v })
}

/// Protocol 0 `UNICODE` arguments use raw-unicode-escape: `\uXXXX` and `\UXXXXXXXX`.
fn unescape_raw_unicode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' && matches!(chars.peek(), Some('u') | Some('U')) {
            let n = if chars.next() == Some('u') { 4 } else { 8 };
            let hex: String = chars.by_ref().take(n).collect();
            match u32::from_str_radix(&hex, 16).ok().and_then(char::from_u32) {
                Some(ch) => out.push(ch),
                None => {
                    out.push('\\');
                    out.push_str(&hex);
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Python `repr` escapes of protocol 0 `STRING` arguments.
fn unescape_bytes(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 1 < b.len() {
            i += 1;
            match b[i] {
                b'n' => out.push(b'\n'),
                b't' => out.push(b'\t'),
                b'r' => out.push(b'\r'),
                b'\\' => out.push(b'\\'),
                b'\'' => out.push(b'\''),
                b'"' => out.push(b'"'),
                b'x' if i + 2 < b.len() + 1 => {
                    let hex = std::str::from_utf8(&b[i + 1..(i + 3).min(b.len())]).unwrap_or("");
                    match u8::from_str_radix(hex, 16) {
                        Ok(v) => {
                            out.push(v);
                            i += 2;
                        }
                        Err(_) => out.extend_from_slice(b"\\x"),
                    }
                }
                other => {
                    out.push(b'\\');
                    out.push(other);
                }
            }
        } else {
            out.push(b[i]);
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol2_state_dict_shape() {
        // collections.OrderedDict() REDUCE, memo, SETITEMS, BUILD
        let mut p = vec![0x80, 2];
        p.extend_from_slice(b"ccollections\nOrderedDict\nq\x00)R");
        p.extend_from_slice(b"q\x01(X\x01\x00\x00\x00aK\x05X\x01\x00\x00\x00bh\x01u}b.");
        let pk = parse(&p).unwrap();
        let Node::Object(o) = pk.node(pk.root) else {
            panic!()
        };
        assert_eq!(pk.callee(pk.root), Some(("collections", "OrderedDict")));
        assert_eq!(o.items.len(), 2);
        assert_eq!(pk.str(o.items[0].0), Some("a"));
        assert_eq!(pk.int(o.items[0].1), Some(5));
        assert_eq!(
            o.items[1].1, pk.root,
            "memo reference is the same node, not a copy"
        );
        assert!(o.state.is_some());
    }

    #[test]
    fn protocol0_text_opcodes() {
        let p = b"(lp0\nI42\naF1.5\naS'a\\nb'\np1\naVcaf\\u00e9\np2\nag1\naI01\na.";
        let pk = parse(p).unwrap();
        let items = pk.seq(pk.root).unwrap();
        assert_eq!(pk.int(items[0]), Some(42));
        assert_eq!(pk.node(items[1]), &Node::Float(1.5));
        assert_eq!(pk.node(items[2]), &Node::Bytes(b"a\nb".to_vec()));
        assert_eq!(pk.str(items[3]), Some("café"));
        assert_eq!(items[4], items[2]);
        assert_eq!(pk.node(items[5]), &Node::Bool(true));
    }

    #[test]
    fn errors_name_offset_and_opcode() {
        let cases: &[(&[u8], &str)] = &[
            (
                b"\x80\x02X\xff\xff\xff\x7fabc",
                "pickle byte 2: BINUNICODE: needs 2147483647 bytes",
            ),
            (
                b"\x80\x02h\x05.",
                "pickle byte 2: BINGET: memo key 5 was never stored",
            ),
            (b"\x80\x02t.", "pickle byte 2: TUPLE: no MARK"),
            (b"\x80\x02R.", "pickle byte 2: REDUCE: stack underflow"),
            (b"\x80\x02N", "no STOP"),
            (b"\x80\x09N.", "unsupported protocol 9"),
            (b"\x80\x02\xffN.", "pickle byte 2: unknown opcode 0xff"),
            (b"\x80\x02Nb.", "BUILD"),
            (b"\x80\x02\x8b\x00\x00\x00\x80.", "negative length"),
        ];
        for (p, want) in cases {
            let e = parse(p).unwrap_err().to_string();
            assert!(e.contains(want), "{e} !~ {want}");
        }
    }

    #[test]
    fn limits_stop_hostile_input() {
        let mut p = vec![0x80, 2];
        p.extend(std::iter::repeat_n(b'(', 1000));
        let e = parse_with(
            &p,
            Limits {
                max_marks: 100,
                ..Limits::default()
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("nested marks"), "{e}");
        // a million DUPs of one value: the stack limit, not memory, stops it
        let mut p = vec![0x80, 2, b'N'];
        p.extend(std::iter::repeat_n(b'2', 1_000_000));
        let e = parse_with(
            &p,
            Limits {
                max_stack: 1000,
                ..Limits::default()
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("stack deeper"), "{e}");
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..20_000 {
            let len = (x % 64) as usize;
            let mut v = vec![0x80, 2];
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                v.push((x & 0xFF) as u8);
            }
            let _ = parse(&v);
        }
    }

    #[test]
    fn read_as_cpythons_c_unpickler_reads() {
        // POP removes a MARK on top of the stack
        assert!(parse(b"\x80\x02N(0.").is_ok());
        // INT as strtol(s, 0): hex, octal, bools; LONG as int(s, 10), any size
        let pk = parse(b"(I0x10\nI010\nI01\nL123456789012345678901234567890L\nI-0x1\nt.").unwrap();
        let t = pk.seq(pk.root).unwrap();
        assert_eq!(pk.int(t[0]), Some(16));
        assert_eq!(pk.int(t[1]), Some(8));
        assert_eq!(pk.node(t[2]), &Node::Bool(true));
        let want = 123456789012345678901234567890u128.to_le_bytes();
        assert_eq!(pk.node(t[3]), &Node::BigInt(want[..13].to_vec()));
        assert_eq!(pk.int(t[4]), Some(-1));
        // BINUNICODE decoded with surrogatepass
        assert!(parse(b"\x80\x02X\x03\x00\x00\x00\xed\xa0\x80.").is_ok());
        // a frame whose last opcode runs past it: the C unpickler reading a file skips the
        // rest of the frame and reads on after it; the other reading is judged too
        let p = b"\x80\x04\x95\x04\x00\x00\x00\x00\x00\x00\x00cmacos\nsystem\n)R.";
        let pk = parse(p).unwrap();
        assert_eq!(pk.frame_skips.len(), 1);
        assert_eq!((pk.frame_skips[0].from, pk.frame_skips[0].to), (12, 15));
        let g = pk.globals();
        assert!(g.contains(&("os".into(), "system".into())), "{g:?}");
        assert!(g.contains(&("macos".into(), "system".into())), "{g:?}");
        // frames that enclose whole opcodes skip nothing
        let p = b"\x80\x04\x95\x03\x00\x00\x00\x00\x00\x00\x00K\x01\x85\x95\x01\x00\x00\x00\x00\x00\x00\x00.";
        assert!(parse(p).unwrap().frame_skips.is_empty());
        // BUILD into a global is recorded, not an error
        let pk = parse(b"\x80\x02ctorch\n_utils\n}b.").unwrap();
        assert_eq!(pk.built_globals.len(), 1);
    }

    #[test]
    fn long1_and_big_ints() {
        let p = b"\x80\x02\x8a\x02\xff\x7f\x8a\x01\xff\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x00\x01\x87.";
        let pk = parse(p).unwrap();
        let t = pk.seq(pk.root).unwrap();
        assert_eq!(pk.int(t[0]), Some(0x7fff));
        assert_eq!(pk.int(t[1]), Some(-1));
        assert!(matches!(pk.node(t[2]), Node::BigInt(b) if b.len() == 9));
    }
}
