//! Writing a [`Pickle`] back as protocol 2, as `torch.save` does. Nodes referenced more than
//! once are memoised on first emission and fetched with BINGET afterwards, so shared objects
//! (storages, tied tensors, memo-shared strings) stay shared.

use super::{Call, Node, NodeId, Pickle};

/// Deepest nesting written (the parser's input came from a file; this bounds recursion).
const MAX_DEPTH: usize = 1000;

/// Why a pickle could not be written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot write pickle: {0}")]
pub struct WriteError(String);

/// Serialises `pk` (from its root) as a protocol-2 pickle.
pub fn write(pk: &Pickle) -> Result<Vec<u8>, WriteError> {
    let mut refs = vec![0u32; pk.nodes.len()];
    count_refs(pk, &mut refs);
    let mut w = Writer {
        pk,
        refs,
        memo: vec![None; pk.nodes.len()],
        next_memo: 0,
        out: vec![0x80, 2],
        active: vec![false; pk.nodes.len()],
    };
    w.emit(pk.root, 0)?;
    w.out.push(b'.');
    Ok(w.out)
}

/// Counts incoming references of every node reachable from the root (iteratively).
fn count_refs(pk: &Pickle, refs: &mut [u32]) {
    let mut stack = vec![pk.root];
    refs[pk.root] = 1;
    while let Some(id) = stack.pop() {
        for c in pk.nodes[id].children() {
            refs[c] = refs[c].saturating_add(1);
            if refs[c] == 1 {
                stack.push(c);
            }
        }
    }
}

struct Writer<'a> {
    pk: &'a Pickle,
    refs: Vec<u32>,
    memo: Vec<Option<u32>>,
    next_memo: u32,
    out: Vec<u8>,
    active: Vec<bool>,
}

impl Writer<'_> {
    fn put(&mut self, id: NodeId) {
        if self.refs[id] > 1 && self.memo[id].is_none() {
            let k = self.next_memo;
            self.next_memo += 1;
            self.memo[id] = Some(k);
            if k < 256 {
                self.out.extend([b'q', k as u8]);
            } else {
                self.out.push(b'r');
                self.out.extend(k.to_le_bytes());
            }
        }
    }

    fn get(&mut self, k: u32) {
        if k < 256 {
            self.out.extend([b'h', k as u8]);
        } else {
            self.out.push(b'j');
            self.out.extend(k.to_le_bytes());
        }
    }

    fn str(&mut self, s: &str) {
        self.out.push(b'X');
        self.out.extend((s.len() as u32).to_le_bytes());
        self.out.extend(s.as_bytes());
    }

    /// GLOBAL, the one text-line opcode the writer emits: refused unless module and name are
    /// dotted Python identifiers, so no newline (or anything else) in a name read from an input
    /// can turn into opcodes of its own.
    fn global(&mut self, module: &str, name: &str) -> Result<(), WriteError> {
        if !crate::audit::is_name_path(module) || !crate::audit::is_name_path(name) {
            return Err(WriteError(format!(
                "global `{}` is not a Python name; refusing to write it",
                crate::audit::escape(&format!("{module}.{name}"))
            )));
        }
        self.out.push(b'c');
        self.out.extend(module.as_bytes());
        self.out.push(b'\n');
        self.out.extend(name.as_bytes());
        self.out.push(b'\n');
        Ok(())
    }

    fn items(&mut self, ids: &[NodeId], depth: usize) -> Result<(), WriteError> {
        for &i in ids {
            self.emit(i, depth + 1)?;
        }
        Ok(())
    }

    fn emit(&mut self, id: NodeId, depth: usize) -> Result<(), WriteError> {
        if depth > MAX_DEPTH {
            return Err(WriteError(format!("nesting deeper than {MAX_DEPTH}")));
        }
        if let Some(k) = self.memo[id] {
            self.get(k);
            return Ok(());
        }
        if self.active[id] {
            return Err(WriteError("a value contains itself through a tuple".into()));
        }
        self.active[id] = true;
        let pk = self.pk;
        match &pk.nodes[id] {
            Node::None => self.out.push(b'N'),
            Node::Bool(b) => self.out.push(if *b { 0x88 } else { 0x89 }),
            Node::Int(i) => {
                let i = *i;
                if (0..256).contains(&i) {
                    self.out.extend([b'K', i as u8]);
                } else if (0..65536).contains(&i) {
                    self.out.push(b'M');
                    self.out.extend((i as u16).to_le_bytes());
                } else if i32::try_from(i).is_ok() {
                    self.out.push(b'J');
                    self.out.extend((i as i32).to_le_bytes());
                } else {
                    let b = i.to_le_bytes();
                    // shortest two's complement
                    let mut n = 8;
                    while n > 1
                        && ((b[n - 1] == 0 && b[n - 2] & 0x80 == 0)
                            || (b[n - 1] == 0xFF && b[n - 2] & 0x80 != 0))
                    {
                        n -= 1;
                    }
                    self.out.extend([0x8A, n as u8]);
                    self.out.extend(&b[..n]);
                }
            }
            Node::BigInt(b) => {
                if b.len() < 256 {
                    self.out.extend([0x8A, b.len() as u8]);
                } else {
                    self.out.push(0x8B);
                    self.out.extend((b.len() as u32).to_le_bytes());
                }
                self.out.extend(b);
            }
            Node::Float(f) => {
                self.out.push(b'G');
                self.out.extend(f.to_be_bytes());
            }
            Node::Str(s) => self.str(s),
            Node::Bytes(b) => {
                // Protocol 2 has no bytes opcode: Python 3 writes _codecs.encode(latin-1 str).
                self.global("_codecs", "encode")?;
                let latin1: String = b.iter().map(|&c| c as char).collect();
                self.str(&latin1);
                self.str("latin1");
                self.out.extend([0x86, b'R']);
            }
            Node::Tuple(v) => {
                if v.is_empty() {
                    self.out.push(b')');
                } else if v.len() <= 3 {
                    self.items(v, depth)?;
                    self.out.push(0x84 + v.len() as u8);
                } else {
                    self.out.push(b'(');
                    self.items(v, depth)?;
                    self.out.push(b't');
                }
            }
            Node::List(v) => {
                self.out.push(b']');
                self.put(id);
                if !v.is_empty() {
                    self.out.push(b'(');
                    self.items(v, depth)?;
                    self.out.push(b'e');
                }
            }
            Node::Dict(d) => {
                self.out.push(b'}');
                self.put(id);
                self.setitems(d, depth)?;
            }
            Node::Set(v) | Node::FrozenSet(v) => {
                let name = if matches!(pk.nodes[id], Node::Set(_)) {
                    "set"
                } else {
                    "frozenset"
                };
                self.global("builtins", name)?;
                self.out.push(b']');
                if !v.is_empty() {
                    self.out.push(b'(');
                    self.items(v, depth)?;
                    self.out.push(b'e');
                }
                self.out.extend([0x85, b'R']);
            }
            Node::Global { module, name } => self.global(module, name)?,
            Node::PersId(p) => {
                self.emit(*p, depth + 1)?;
                self.out.push(b'Q');
            }
            Node::Object(o) => {
                match &o.call {
                    Call::Reduce { func, args } => {
                        self.emit(*func, depth + 1)?;
                        self.emit(*args, depth + 1)?;
                        self.out.push(b'R');
                    }
                    Call::NewObj { cls, args, kwargs } => {
                        self.emit(*cls, depth + 1)?;
                        self.emit(*args, depth + 1)?;
                        match kwargs {
                            Some(k) => {
                                self.emit(*k, depth + 1)?;
                                self.out.push(0x92);
                            }
                            None => self.out.push(0x81),
                        }
                    }
                    Call::Inst { cls, args } => {
                        self.out.push(b'(');
                        self.emit(*cls, depth + 1)?;
                        self.items(args, depth)?;
                        self.out.push(b'o');
                    }
                }
                self.put(id);
                self.setitems(&o.items, depth)?;
                if !o.appends.is_empty() {
                    self.out.push(b'(');
                    self.items(&o.appends, depth)?;
                    self.out.push(b'e');
                }
                if let Some(s) = o.state {
                    self.emit(s, depth + 1)?;
                    self.out.push(b'b');
                }
            }
        }
        self.put(id);
        self.active[id] = false;
        Ok(())
    }

    fn setitems(&mut self, d: &[(NodeId, NodeId)], depth: usize) -> Result<(), WriteError> {
        if d.is_empty() {
            return Ok(());
        }
        // SETITEMS in batches of 1000, as CPython does.
        for chunk in d.chunks(1000) {
            self.out.push(b'(');
            for &(k, v) in chunk {
                self.emit(k, depth + 1)?;
                self.emit(v, depth + 1)?;
            }
            self.out.push(b'u');
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::parse;
    use super::*;

    /// Structural equality of two pickles from their roots (ids may differ).
    fn same(a: &Pickle, x: NodeId, b: &Pickle, y: NodeId, depth: usize) -> bool {
        if depth > 50 {
            return true;
        }
        let (p, q) = (&a.nodes[x], &b.nodes[y]);
        let all = |u: &[NodeId], v: &[NodeId]| {
            u.len() == v.len() && u.iter().zip(v).all(|(&i, &j)| same(a, i, b, j, depth + 1))
        };
        match (p, q) {
            (Node::List(u), Node::List(v)) | (Node::Tuple(u), Node::Tuple(v)) => all(u, v),
            (Node::Dict(u), Node::Dict(v)) => {
                u.len() == v.len()
                    && u.iter().zip(v).all(|(&(k1, v1), &(k2, v2))| {
                        same(a, k1, b, k2, depth + 1) && same(a, v1, b, v2, depth + 1)
                    })
            }
            (Node::PersId(i), Node::PersId(j)) => same(a, *i, b, *j, depth + 1),
            (Node::Object(o), Node::Object(r)) => {
                a.callee(x) == b.callee(y)
                    && o.items.len() == r.items.len()
                    && o.state.is_some() == r.state.is_some()
                    && o.state
                        .zip(r.state)
                        .is_none_or(|(s, t)| same(a, s, b, t, depth + 1))
            }
            _ => p == q,
        }
    }

    #[test]
    fn round_trip_keeps_structure_and_sharing() {
        let mut p = vec![0x80, 2];
        p.extend_from_slice(b"ccollections\nOrderedDict\nq\x00)Rq\x01(X\x01\x00\x00\x00a");
        p.extend_from_slice(b"(X\x07\x00\x00\x00storageq\x02ctorch\nFloatStorage\nq\x03X\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04tQ");
        p.extend_from_slice(
            b"X\x01\x00\x00\x00b(h\x02h\x03X\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04tQ",
        );
        p.extend_from_slice(b"X\x01\x00\x00\x00c\x8a\x05\x00\x00\x00\x00\x01u}X\x01\x00\x00\x00vG?\xf8\x00\x00\x00\x00\x00\x00sb.");
        let a = parse(&p).unwrap();
        let bytes = write(&a).unwrap();
        let b = parse(&bytes).unwrap();
        assert!(same(&a, a.root, &b, b.root, 0));
        assert_eq!(write(&b).unwrap(), bytes, "writing is stable");
        let Node::Object(o) = b.node(b.root) else {
            panic!()
        };
        assert_eq!(b.int(o.items[2].1), Some(1 << 32));
    }

    #[test]
    fn ints_bytes_sets() {
        for v in [
            0i64,
            255,
            256,
            65535,
            65536,
            -1,
            i32::MIN as i64,
            i64::MAX,
            i64::MIN,
            -(1 << 40),
        ] {
            let pk = Pickle {
                nodes: vec![Node::Int(v)],
                root: 0,
                ..Pickle::default()
            };
            let back = parse(&write(&pk).unwrap()).unwrap();
            assert_eq!(back.int(back.root), Some(v), "{v}");
        }
        let pk = Pickle {
            nodes: vec![Node::Bytes(vec![0, 200, 255])],
            root: 0,
            ..Pickle::default()
        };
        let back = parse(&write(&pk).unwrap()).unwrap();
        assert_eq!(back.callee(back.root), Some(("_codecs", "encode")));
    }

    #[test]
    fn self_reference_through_a_list() {
        // l = []; l.append(l)
        let pk = Pickle {
            nodes: vec![Node::List(vec![0])],
            root: 0,
            ..Pickle::default()
        };
        let back = parse(&write(&pk).unwrap()).unwrap();
        assert_eq!(back.seq(back.root), Some(&[back.root][..]));
    }
}
