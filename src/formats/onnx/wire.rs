//! The protobuf wire format, scanned by hand: varints, fixed32/fixed64 and length-delimited
//! fields, read through positional reads of the file (a small window is cached), so that a
//! multi-GB model is never loaded and the byte offset of every field is known.
//!
//! Nothing here panics or allocates by a length the file declares: every length is checked
//! against the end of the message that holds it (itself inside the file) before it is used,
//! nesting is bounded by [`MAX_DEPTH`], and every error names the byte offset.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{Error, Result};

/// Deepest nesting of messages (a graph in a node in a graph... counts every level).
pub const MAX_DEPTH: usize = 64;
/// Bytes read at a time (the cached window).
const WINDOW: usize = 64 << 10;
/// Longest string field read (names, keys, external locations).
const MAX_STRING: u64 = 1 << 20;

/// Bytes that can be read at any position: a file, or a buffer.
pub trait ReadAt {
    /// Length in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` with the bytes at `pos` (inside the length).
    fn read_at(&self, buf: &mut [u8], pos: u64) -> std::io::Result<()>;
}

impl ReadAt for &[u8] {
    fn size(&self) -> u64 {
        self.len() as u64
    }
    fn read_at(&self, buf: &mut [u8], pos: u64) -> std::io::Result<()> {
        let start = usize::try_from(pos).map_err(std::io::Error::other)?;
        let src = start
            .checked_add(buf.len())
            .and_then(|end| self.get(start..end))
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

impl ReadAt for Vec<u8> {
    fn size(&self) -> u64 {
        self.len() as u64
    }
    fn read_at(&self, buf: &mut [u8], pos: u64) -> std::io::Result<()> {
        self.as_slice().read_at(buf, pos)
    }
}

/// A file of known length, read by position.
pub struct FileAt {
    /// The open file.
    pub file: File,
    /// Its length when opened.
    pub len: u64,
}

impl ReadAt for FileAt {
    fn size(&self) -> u64 {
        self.len
    }
    fn read_at(&self, buf: &mut [u8], pos: u64) -> std::io::Result<()> {
        self.file.read_exact_at(buf, pos)
    }
}

/// A message's span: its fields lie in `pos..end`; `depth` is how deep it is nested.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Msg {
    /// Where the next field starts.
    pub pos: u64,
    /// Where the message ends.
    pub end: u64,
    /// Nesting depth (0 for the file's top message).
    pub depth: usize,
}

/// A field's value, as the wire type gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value {
    /// Wire type 0.
    Varint(u64),
    /// Wire type 1 (little-endian).
    Fixed64(u64),
    /// Wire type 5 (little-endian).
    Fixed32(u32),
    /// Wire type 2: `len` bytes at byte offset `at` of the file.
    Len {
        /// Where the bytes start.
        at: u64,
        /// How many.
        len: u64,
    },
}

/// One field of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    /// Its field number.
    pub number: u32,
    /// Byte offset of its tag.
    pub at: u64,
    /// Its value.
    pub value: Value,
}

/// The scanner over one file.
pub struct Wire<'a> {
    path: &'a Path,
    src: &'a dyn ReadAt,
    len: u64,
    win: Vec<u8>,
    win_at: u64,
}

impl<'a> Wire<'a> {
    /// A scanner over `src` (the file at `path`, named in errors).
    pub fn new(path: &'a Path, src: &'a dyn ReadAt) -> Wire<'a> {
        Wire {
            path,
            src,
            len: src.size(),
            win: Vec::new(),
            win_at: 0,
        }
    }

    /// The file's path.
    pub fn path(&self) -> &'a Path {
        self.path
    }

    /// The file's length.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the file is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The whole file as the top message.
    pub fn root(&self) -> Msg {
        Msg {
            pos: 0,
            end: self.len,
            depth: 0,
        }
    }

    /// An error about the byte at offset `at`.
    pub fn bad<T>(&self, what: impl std::fmt::Display, at: u64) -> Result<T> {
        Err(Error::invalid(
            self.path,
            format!("ONNX: {what} at byte offset {at}"),
        ))
    }

    /// Up to `n` (at most the window) bytes at `pos`, fewer where the file ends.
    fn peek(&mut self, pos: u64, n: usize) -> Result<&[u8]> {
        let want = (n.min(WINDOW) as u64).min(self.len.saturating_sub(pos));
        let inside = pos >= self.win_at
            && pos
                .checked_add(want)
                .is_some_and(|e| e <= self.win_at + self.win.len() as u64);
        if !inside {
            let take = (WINDOW as u64).min(self.len.saturating_sub(pos)) as usize;
            self.win.resize(take, 0);
            self.win_at = pos;
            if let Err(e) = self.src.read_at(&mut self.win, pos) {
                self.win.clear();
                return self.bad(format!("cannot read {take} bytes ({e})"), pos);
            }
        }
        let from = (pos - self.win_at) as usize;
        Ok(&self.win[from..from + want as usize])
    }

    /// The varint at `*pos` (before `end`); moves `*pos` past it.
    pub fn varint(&mut self, pos: &mut u64, end: u64) -> Result<u64> {
        let start = *pos;
        let avail = end.saturating_sub(start).min(10) as usize;
        let mut bytes = [0u8; 10];
        let got = self.peek(start, avail)?;
        let avail = got.len();
        bytes[..avail].copy_from_slice(got);
        let mut v = 0u64;
        for (i, &b) in bytes[..avail].iter().enumerate() {
            if i == 9 && b & 0x80 != 0 {
                return self.bad("varint longer than 10 bytes", start);
            }
            if i == 9 && b > 1 {
                return self.bad("varint overflows 64 bits", start);
            }
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                *pos = start + i as u64 + 1;
                return Ok(v);
            }
        }
        if avail == 10 {
            self.bad("varint longer than 10 bytes", start)
        } else {
            self.bad(
                "truncated varint (the message or file ends inside it)",
                start,
            )
        }
    }

    fn fixed<const N: usize>(&mut self, pos: &mut u64, end: u64) -> Result<[u8; N]> {
        let start = *pos;
        if end.saturating_sub(start) < N as u64 {
            return self.bad(format!("truncated {}-byte value", N), start);
        }
        let mut out = [0u8; N];
        let got = self.peek(start, N)?;
        if got.len() != N {
            return self.bad("the file ends early", start);
        }
        out.copy_from_slice(got);
        *pos = start + N as u64;
        Ok(out)
    }

    /// The next field of `m` (moving past it), or `None` at its end.
    pub fn next(&mut self, m: &mut Msg) -> Result<Option<Field>> {
        if m.pos >= m.end {
            return Ok(None);
        }
        let at = m.pos;
        let tag = self.varint(&mut m.pos, m.end)?;
        let number = match u32::try_from(tag >> 3) {
            Ok(n) if n != 0 && n < (1 << 29) => n,
            _ => return self.bad(format!("invalid field number {}", tag >> 3), at),
        };
        let value = match tag & 7 {
            0 => Value::Varint(self.varint(&mut m.pos, m.end)?),
            1 => Value::Fixed64(u64::from_le_bytes(self.fixed::<8>(&mut m.pos, m.end)?)),
            5 => Value::Fixed32(u32::from_le_bytes(self.fixed::<4>(&mut m.pos, m.end)?)),
            2 => {
                let len = self.varint(&mut m.pos, m.end)?;
                let start = m.pos;
                if len > m.end - start {
                    return self.bad(
                        format!(
                            "field {number} of {len} bytes runs past the end of its message \
                             ({} bytes left; truncated?)",
                            m.end - start
                        ),
                        at,
                    );
                }
                m.pos = start + len;
                Value::Len { at: start, len }
            }
            3 | 4 => {
                return self.bad(
                    format!("field {number} is a group (wire type {})", tag & 7),
                    at,
                )
            }
            t => return self.bad(format!("field {number} has unknown wire type {t}"), at),
        };
        Ok(Some(Field { number, at, value }))
    }

    /// The message a length-delimited field `f` of `parent` holds.
    pub fn enter(&self, f: &Field, parent: &Msg) -> Result<Msg> {
        let Value::Len { at, len } = f.value else {
            return self.bad(format!("field {} is not a message", f.number), f.at);
        };
        if parent.depth + 1 > MAX_DEPTH {
            return self.bad(
                format!("messages nested deeper than {MAX_DEPTH} levels"),
                f.at,
            );
        }
        Ok(Msg {
            pos: at,
            end: at + len,
            depth: parent.depth + 1,
        })
    }

    /// The bytes `at..at + len` (a span inside the file, at most [`MAX_STRING`]).
    pub fn bytes(&mut self, at: u64, len: u64) -> Result<Vec<u8>> {
        if len > MAX_STRING {
            return self.bad(
                format!("a string of {len} bytes (at most {MAX_STRING})"),
                at,
            );
        }
        if at.checked_add(len).is_none_or(|e| e > self.len) {
            return self.bad(format!("{len} bytes run past the end of the file"), at);
        }
        let mut out = Vec::with_capacity(len as usize);
        while (out.len() as u64) < len {
            let pos = at + out.len() as u64;
            let chunk = self.peek(pos, (len - out.len() as u64) as usize)?;
            if chunk.is_empty() {
                return self.bad("the file ends early", pos);
            }
            out.extend_from_slice(chunk);
        }
        Ok(out)
    }

    /// The string a length-delimited field holds (invalid UTF-8 replaced).
    pub fn string(&mut self, f: &Field) -> Result<String> {
        match f.value {
            Value::Len { at, len } => {
                Ok(String::from_utf8_lossy(&self.bytes(at, len)?).into_owned())
            }
            _ => self.bad(format!("field {} is not a string", f.number), f.at),
        }
    }

    /// Calls `each` with every varint of a repeated integer field's entry: packed (one
    /// length-delimited span) or one plain varint.
    pub fn varints(&mut self, f: &Field, mut each: impl FnMut(u64) -> Result<()>) -> Result<()> {
        match f.value {
            Value::Varint(v) => each(v),
            Value::Len { at, len } => {
                let (mut pos, end) = (at, at + len);
                while pos < end {
                    let v = self.varint(&mut pos, end)?;
                    each(v)?;
                }
                Ok(())
            }
            _ => self.bad(
                format!("field {} should hold integers (varints)", f.number),
                f.at,
            ),
        }
    }

    /// Appends the `len` bytes at `at` (inside the file) to `out`.
    pub fn copy_into(&mut self, at: u64, len: u64, out: &mut Vec<u8>) -> Result<()> {
        let mut done = 0u64;
        while done < len {
            let chunk = self.peek(at + done, (len - done).min(WINDOW as u64) as usize)?;
            if chunk.is_empty() {
                return self.bad("the file ends early", at + done);
            }
            out.extend_from_slice(chunk);
            done += chunk.len() as u64;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(bytes: &[u8]) -> Result<Vec<Field>> {
        let p = Path::new("t.onnx");
        let v = bytes.to_vec();
        let mut w = Wire::new(p, &v);
        let mut m = w.root();
        let mut out = vec![];
        while let Some(f) = w.next(&mut m)? {
            out.push(f);
        }
        Ok(out)
    }

    fn err(bytes: &[u8]) -> String {
        fields(bytes).unwrap_err().to_string()
    }

    #[test]
    fn reads_every_wire_type() {
        let mut b = vec![0x08, 0x96, 0x01]; // 1: varint 150
        b.extend([0x11, 1, 0, 0, 0, 0, 0, 0, 0]); // 2: fixed64 1
        b.extend([0x1a, 2, b'h', b'i']); // 3: "hi"
        b.extend([0x25, 0, 0, 0x80, 0x3f]); // 4: fixed32 1.0f
        let f = fields(&b).unwrap();
        assert_eq!(f[0].value, Value::Varint(150));
        assert_eq!(f[1].value, Value::Fixed64(1));
        assert_eq!(f[2].value, Value::Len { at: 14, len: 2 });
        assert_eq!(f[3].value, Value::Fixed32(0x3f80_0000));
        let mut w = Wire::new(Path::new("t"), &b);
        assert_eq!(w.string(&f[2]).unwrap(), "hi");
        // the largest varint: 10 bytes
        let mut max = vec![0x08];
        max.extend([0xff; 9]);
        max.push(0x01);
        assert_eq!(fields(&max).unwrap()[0].value, Value::Varint(u64::MAX));
    }

    #[test]
    fn malformed_input_is_an_error_with_its_offset() {
        // truncated varint
        let e = err(&[0x08, 0x96]);
        assert!(
            e.contains("truncated varint") && e.ends_with("at byte offset 1"),
            "{e}"
        );
        // a length past the end
        let e = err(&[0x0a, 0x05, 1, 2]);
        assert!(
            e.contains("runs past the end") && e.contains("byte offset 0"),
            "{e}"
        );
        // an 11-byte varint
        let mut b = vec![0x08];
        b.extend([0x80; 10]);
        b.push(0);
        let e = err(&b);
        assert!(e.contains("longer than 10 bytes at byte offset 1"), "{e}");
        // a 10th byte beyond 64 bits
        let mut b = vec![0x08];
        b.extend([0xff; 9]);
        b.push(0x02);
        assert!(err(&b).contains("overflows 64 bits"));
        // unknown wire types 6 and 7, groups, field number 0
        assert!(err(&[0x0e, 0]).contains("unknown wire type 6 at byte offset 0"));
        assert!(err(&[0x0f, 0]).contains("unknown wire type 7"));
        assert!(err(&[0x0b]).contains("group"));
        assert!(err(&[0x00, 0]).contains("invalid field number 0"));
        // a truncated fixed value
        assert!(err(&[0x0d, 1, 2]).contains("truncated 4-byte value at byte offset 1"));
        // a truncated packed varint run
        let b = vec![0x0a, 0x02, 0x96, 0x96];
        let f = fields(&b).unwrap();
        let mut w = Wire::new(Path::new("t"), &b);
        let e = w.varints(&f[0], |_| Ok(())).unwrap_err().to_string();
        assert!(
            e.contains("truncated varint") && e.ends_with("at byte offset 2"),
            "{e}"
        );
    }

    /// Walks every nested message as deep as it goes.
    fn walk(w: &mut Wire<'_>, mut m: Msg) -> Result<usize> {
        let mut deepest = m.depth;
        while let Some(f) = w.next(&mut m)? {
            if let Value::Len { .. } = f.value {
                let child = w.enter(&f, &m)?;
                deepest = deepest.max(walk(w, child)?);
            }
        }
        Ok(deepest)
    }

    #[test]
    fn nesting_is_bounded() {
        let nest = |levels: usize| {
            let mut b: Vec<u8> = vec![];
            for _ in 0..levels {
                let mut outer = vec![0x0a];
                let mut n = b.len() as u64;
                loop {
                    let byte = (n & 0x7f) as u8;
                    n >>= 7;
                    outer.push(if n == 0 { byte } else { byte | 0x80 });
                    if n == 0 {
                        break;
                    }
                }
                outer.extend(b);
                b = outer;
            }
            b
        };
        let ok = nest(MAX_DEPTH);
        let mut w = Wire::new(Path::new("t"), &ok);
        let root = w.root();
        assert_eq!(walk(&mut w, root).unwrap(), MAX_DEPTH);
        let deep = nest(10_000);
        let mut w = Wire::new(Path::new("t"), &deep);
        let root = w.root();
        let e = walk(&mut w, root).unwrap_err().to_string();
        assert!(e.contains("nested deeper than 64"), "{e}");
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..20_000 {
            let mut b = vec![];
            for _ in 0..(x % 64) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b.push((x & 0xFF) as u8);
            }
            let mut w = Wire::new(Path::new("t"), &b);
            let root = w.root();
            let _ = walk(&mut w, root);
        }
    }
}
