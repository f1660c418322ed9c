//! Structural equivalence of two pickles, for the writer's round-trip property: what our writer
//! emits parses back to the same tree, with the same globals, up to the spellings protocol 2
//! forces (`bytes` as `_codecs.encode(str, "latin1")`, sets as `builtins.set([...])`).

use std::collections::{BTreeSet, HashSet};

use super::{Call, Node, NodeId, Pickle};

/// Whether `b` (read back from our writer's bytes) is the same tree as `a` from their roots.
pub fn equivalent(a: &Pickle, b: &Pickle) -> bool {
    let mut todo = vec![(a.root, b.root)];
    let mut done = HashSet::new();
    while let Some((x, y)) = todo.pop() {
        if !done.insert((x, y)) {
            continue;
        }
        let Some(pairs) = pair_children(a, x, b, y) else {
            return false;
        };
        todo.extend(pairs);
    }
    true
}

/// The child pairs to compare next, or `None` when the nodes differ.
fn pair_children(a: &Pickle, x: NodeId, b: &Pickle, y: NodeId) -> Option<Vec<(NodeId, NodeId)>> {
    let zip = |u: &[NodeId], v: &[NodeId]| -> Option<Vec<(NodeId, NodeId)>> {
        (u.len() == v.len()).then(|| u.iter().copied().zip(v.iter().copied()).collect())
    };
    match (a.node(x), b.node(y)) {
        (Node::Float(p), Node::Float(q)) => (p.to_bits() == q.to_bits()).then(Vec::new),
        (Node::List(u), Node::List(v)) | (Node::Tuple(u), Node::Tuple(v)) => zip(u, v),
        (Node::Set(u), Node::Set(v)) | (Node::FrozenSet(u), Node::FrozenSet(v)) => zip(u, v),
        (Node::Dict(u), Node::Dict(v)) => zip(&flat(u), &flat(v)),
        (Node::PersId(i), Node::PersId(j)) => Some(vec![(*i, *j)]),
        (Node::Bytes(raw), Node::Object(_)) => {
            // protocol 2: _codecs.encode(latin-1 text, "latin1")
            let (func, args) = reduce_of(b, y)?;
            let s = b.seq(args)?;
            let text: String = raw.iter().map(|&c| c as char).collect();
            (b.global(func) == Some(("_codecs", "encode"))
                && s.len() == 2
                && b.str(s[0]) == Some(text.as_str())
                && b.str(s[1]) == Some("latin1"))
            .then(Vec::new)
        }
        (Node::Set(u) | Node::FrozenSet(u), Node::Object(_)) => {
            let want = if matches!(a.node(x), Node::Set(_)) {
                "set"
            } else {
                "frozenset"
            };
            let (func, args) = reduce_of(b, y)?;
            let s = b.seq(args)?;
            if b.global(func) != Some(("builtins", want)) || s.len() != 1 {
                return None;
            }
            zip(u, b.seq(s[0])?)
        }
        (Node::Object(o), Node::Object(r)) => {
            let mut pairs = match (&o.call, &r.call) {
                (Call::Reduce { func: f, args: g }, Call::Reduce { func: h, args: k }) => {
                    vec![(*f, *h), (*g, *k)]
                }
                (
                    Call::NewObj {
                        cls: c,
                        args: g,
                        kwargs: w,
                    },
                    Call::NewObj {
                        cls: d,
                        args: k,
                        kwargs: v,
                    },
                ) => {
                    let mut p = vec![(*c, *d), (*g, *k)];
                    match (w, v) {
                        (Some(w), Some(v)) => p.push((*w, *v)),
                        (None, None) => {}
                        _ => return None,
                    }
                    p
                }
                (Call::Inst { cls: c, args: g }, Call::Inst { cls: d, args: k }) => {
                    let mut p = vec![(*c, *d)];
                    p.extend(zip(g, k)?);
                    p
                }
                _ => return None,
            };
            pairs.extend(zip(&flat(&o.items), &flat(&r.items))?);
            pairs.extend(zip(&o.appends, &r.appends)?);
            match (o.state, r.state) {
                (Some(s), Some(t)) => pairs.push((s, t)),
                (None, None) => {}
                _ => return None,
            }
            Some(pairs)
        }
        (p, q) => (p == q).then(Vec::new),
    }
}

fn flat(items: &[(NodeId, NodeId)]) -> Vec<NodeId> {
    items.iter().flat_map(|&(k, v)| [k, v]).collect()
}

fn reduce_of(pk: &Pickle, id: NodeId) -> Option<(NodeId, NodeId)> {
    match pk.node(id) {
        Node::Object(o) => match o.call {
            Call::Reduce { func, args } => Some((func, args)),
            _ => None,
        },
        _ => None,
    }
}

/// The globals reachable from the root, as `(module, name)`.
pub fn reachable_globals(pk: &Pickle) -> BTreeSet<(String, String)> {
    let mut seen = vec![false; pk.nodes.len()];
    let mut stack = vec![pk.root];
    let mut out = BTreeSet::new();
    while let Some(id) = stack.pop() {
        if std::mem::replace(&mut seen[id], true) {
            continue;
        }
        if let Node::Global { module, name } = pk.node(id) {
            out.insert((module.clone(), name.clone()));
        }
        stack.extend(pk.node(id).children());
    }
    out
}

/// The globals our protocol-2 writer adds to spell bytes and sets.
pub const WRITER_GLOBALS: &[(&str, &str)] = &[
    ("_codecs", "encode"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
];

#[cfg(test)]
mod tests {
    use super::super::{parse, write};
    use super::*;
    use crate::audit::{classify, is_name_path, Class};

    /// A protocol-4 pickle calling `module.name()` through STACK_GLOBAL.
    fn stack_global(module: &str, name: &str) -> Vec<u8> {
        let mut p = vec![0x80, 4];
        for s in [module, name] {
            p.push(0x8C);
            p.push(s.len() as u8);
            p.extend(s.as_bytes());
        }
        p.extend(b"\x93)R.");
        p
    }

    #[test]
    fn what_the_writer_accepts_reads_back_the_same_and_hostile_names_are_refused() {
        let names = [
            "OrderedDict",
            "a.b",
            "Modèle",
            "_x1",
            "OrderedDict\ncposix\nsystem",
            "a\rb",
            "a b",
            "",
            ".a",
            "a.",
            "a..b",
            "1a",
            "é\u{202e}",
            "x\0",
        ];
        for m in ["collections", "torch._utils", "mod\nc", ""] {
            for n in names {
                let pk = parse(&stack_global(m, n)).expect("any two strings parse");
                let valid = is_name_path(m) && is_name_path(n);
                assert_eq!(classify(m, n) == Class::Dangerous, !valid || m == "mod\nc");
                match write(&pk) {
                    Ok(bytes) => {
                        assert!(valid, "{m:?}.{n:?} was written");
                        let back = parse(&bytes).unwrap();
                        assert!(equivalent(&pk, &back), "{m:?}.{n:?}");
                        assert_eq!(reachable_globals(&pk), reachable_globals(&back));
                    }
                    Err(e) => {
                        assert!(!valid, "{m:?}.{n:?}: {e}");
                        assert!(e.to_string().contains("not a Python name"));
                    }
                }
            }
        }
    }

    #[test]
    fn bytes_and_sets_are_equivalent_to_their_protocol_2_spelling() {
        // protocol 4: b"\x00\xff" as SHORT_BINBYTES, a frozenset, a set
        let p = b"\x80\x04(C\x02\x00\xff(\x91\x8f(\x8c\x01aK\x01\x90t.";
        let a = parse(p).unwrap();
        let b = parse(&write(&a).unwrap()).unwrap();
        assert!(equivalent(&a, &b));
        let extra: Vec<_> = reachable_globals(&b)
            .difference(&reachable_globals(&a))
            .cloned()
            .collect();
        assert!(extra
            .iter()
            .all(|(m, n)| WRITER_GLOBALS.contains(&(m.as_str(), n.as_str()))));
        let c = parse(b"\x80\x04(C\x02\x00\xfe(\x91\x8f(\x8c\x01aK\x01\x90t.").unwrap();
        assert!(!equivalent(&c, &b), "a changed byte is seen");
    }
}
