//! Which bytes `torch.load` reads, decided as torch 2.15 decides (`torch/serialization.py`):
//! a file whose first four bytes are a zip local header is a zip archive (its `data.pkl`; a
//! TorchScript archive's `constants.pkl` too); any other file is tried as the old tar format,
//! then read as a stack of pickles (magic number, protocol version, sys_info, the object, the
//! storage keys), each one unpickled in turn until a check fails. [`scan`] lists every pickle
//! torch would unpickle, in order, so that audit judges what would run and not what another
//! reader would see; [`zip_ambiguities`] lists what makes a zip read differently by different
//! readers (torch's miniz, Python's zipfile, the `zip` crate), which is itself a danger.

use std::collections::HashSet;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::audit::{Allow, Use};
use crate::error::{Error, Result};
use crate::formats::pickle::{self, Node, Pickle};

/// Largest pickle read into memory.
pub const MAX_PICKLE: u64 = 1 << 30;

/// The error for a zip the `zip` crate cannot open, said as a person would: a missing end
/// record is a truncated file.
pub fn zip_error(path: &Path, e: zip::result::ZipError) -> Error {
    let text = e.to_string();
    if text.contains("EOCD") || text.contains("end of central directory") {
        Error::invalid(
            path,
            "starts like a zip archive (torch.save) but its end record is missing: the file is \
             truncated (an interrupted download or copy?)",
        )
    } else {
        Error::invalid(path, format!("not a readable zip archive: {text}"))
    }
}

/// Whether the file starts like a zip archive: torch's `_is_zipfile` (the first four bytes only).
pub fn is_zip(head: &[u8]) -> bool {
    head.starts_with(b"PK\x03\x04")
}

/// Whether the first 512 bytes are a tar header (ustar magic or a valid header checksum), which
/// torch's legacy loader tries before the stacked pickles.
pub fn is_tar(head: &[u8]) -> bool {
    if head.len() < 512 {
        return false;
    }
    if &head[257..262] == b"ustar" {
        return true;
    }
    let field = &head[148..156];
    let digits: String = field
        .iter()
        .take_while(|&&b| b != 0 && b != b' ')
        .map(|&b| b as char)
        .collect();
    let Ok(want) = u32::from_str_radix(digits.trim(), 8) else {
        return false;
    };
    let sum: u32 = head[..512]
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                32
            } else {
                b as u32
            }
        })
        .sum();
    want == sum && head[..100].iter().any(|&b| b != 0)
}

/// One pickle torch would unpickle, and the globals it references.
#[derive(Debug, Clone)]
pub struct ScannedPickle {
    /// What it is (`data.pkl`, `pickle 1 of the legacy stack (magic number)`).
    pub label: String,
    /// Where it starts in the file (for a zip record, its data offset).
    pub offset: u64,
    /// `(module, name, protocol in force)` of every global it references, first-seen order.
    pub globals: Vec<(String, String, u8)>,
    /// Unpickled by torch's own unpickler (the saved object), whose `find_class` adds its
    /// renames; the other pickles of a legacy stack go through plain `pickle.load`.
    pub torch_unpickler: bool,
    /// A TorchScript archive's pickle, read by torch.jit's own unpickler: `__torch__.*` are
    /// classes compiled from the archive's code and `torch.jit._pickle.*` its list builders,
    /// not Python imports.
    pub jit: bool,
    /// Every global as read, with its opcode, offset (within this pickle) and protocol, and
    /// how the pickle uses it.
    pub occurrences: Vec<(String, String, pickle::GlobalSite, Use)>,
    /// Where the C unpickler reading a file skips bytes a reader of memory reads.
    pub frame_skips: Vec<pickle::FrameSkip>,
    /// Globals whose attributes a BUILD sets: `(module, name, BUILD offset)`.
    pub built: Vec<(String, String, usize)>,
}

/// One global a pickle references, judged, where it was read.
#[derive(Debug, Clone)]
pub struct Finding {
    /// The name as shown (`__builtin__.reduce -> functools.reduce`).
    pub name: String,
    /// Its class.
    pub class: crate::audit::Class,
    /// Byte offset of its opcode in the file (in a compressed zip record: in the record).
    pub offset: u64,
    /// The opcode that read it.
    pub opcode: &'static str,
    /// Whether the pickle calls it (REDUCE, NEWOBJ, OBJ, INST; BUILD calls its
    /// `__setstate__`): a global that is only named runs nothing by itself.
    pub called: bool,
    /// How: named, instantiated or called.
    pub how: Use,
}

impl ScannedPickle {
    fn of(label: String, offset: u64, pk: &Pickle, torch_unpickler: bool) -> Self {
        ScannedPickle {
            label,
            offset,
            globals: pk.globals_with_protocol(),
            torch_unpickler,
            jit: false,
            occurrences: pk.global_occurrences(),
            frame_skips: pk.frame_skips.clone(),
            built: pk
                .built_globals
                .iter()
                .filter_map(|&(id, at)| {
                    pk.global(id)
                        .map(|(m, n)| (m.to_string(), n.to_string(), at))
                })
                .collect(),
        }
    }

    /// A global a BUILD rewrites, as shown and judged: always dangerous.
    fn built_finding(&self, m: &str, n: &str, at: usize) -> Finding {
        Finding {
            name: format!(
                "{} (BUILD at byte {} sets its attributes: rewrites imported code)",
                crate::audit::display_name(m, n),
                self.offset + at as u64
            ),
            class: crate::audit::Class::Dangerous,
            offset: self.offset + at as u64,
            opcode: "BUILD",
            called: true,
            how: Use::Called,
        }
    }

    /// What makes loaders read this pickle differently.
    pub fn ambiguities(&self) -> Vec<String> {
        self.frame_skips
            .iter()
            .map(|s| format!("{} (byte {}): {s}", self.label, self.offset))
            .collect()
    }

    /// Every occurrence of a global, judged by name and use (calls outside the allowlists
    /// and `allow` are unknown calls), with its place in the file.
    pub fn findings(&self, allow: &Allow) -> Vec<Finding> {
        self.occurrences
            .iter()
            .map(|(m, n, site, how)| {
                let jit_own = self.jit
                    && (m == "__torch__"
                        || m.starts_with("__torch__.")
                        || m == "torch.jit._pickle")
                    && crate::audit::is_name_path(n);
                let (name, class) = if jit_own {
                    (crate::audit::display_name(m, n), crate::audit::Class::Other)
                } else {
                    crate::audit::judge_use(m, n, site.protocol, self.torch_unpickler, *how, allow)
                };
                Finding {
                    name,
                    class,
                    offset: self.offset + site.offset as u64,
                    opcode: site.opcode_name(),
                    called: *how != Use::Named,
                    how: *how,
                }
            })
            .chain(
                self.built
                    .iter()
                    .map(|(m, n, at)| self.built_finding(m, n, *at)),
            )
            .collect()
    }

    /// Every global as the unpickler resolves and uses it: (shown name, class), the worst
    /// class of each name once.
    pub fn judged(&self, allow: &Allow) -> Vec<(String, crate::audit::Class)> {
        let mut out: Vec<(String, crate::audit::Class)> = Vec::new();
        for f in self.findings(allow) {
            match out.iter_mut().find(|(n, _)| *n == f.name) {
                Some(e) => e.1 = e.1.min(f.class),
                None => out.push((f.name, f.class)),
            }
        }
        out
    }
}

/// What `torch.load` would read of a file.
#[derive(Debug, Clone)]
pub struct Scan {
    /// The container torch decides on.
    pub container: &'static str,
    /// Every pickle torch would unpickle, in order (up to where it would stop).
    pub pickles: Vec<ScannedPickle>,
    /// Where torch would stop with an error after unpickling the pickles above (their code has
    /// run by then), if it would.
    pub stops: Option<String>,
    /// What two readers would read differently.
    pub ambiguities: Vec<String>,
    /// Where parsing stopped before the end of what a loader would read, and why: such a file
    /// is never clean (what was seen up to there is in `pickles`).
    pub incomplete: Option<String>,
}

/// The container a file is, decided from its first bytes as torch.load decides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Container {
    /// Starts with a zip local header (torch's `_is_zipfile`).
    Zip,
    /// A tar archive (tried first by torch's legacy loader).
    Tar,
    /// A NumPy `.npy` file (numpy.load, not torch.load).
    Npy,
    /// Anything else: torch.load reads it as stacked pickles.
    Stack,
}

/// Opens `path` and decides its container: the file, its length and the container.
pub fn open(path: &Path) -> Result<(File, u64, Container)> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut head = vec![0u8; 512.min(len as usize)];
    file.read_exact_at(&mut head, 0)
        .map_err(|e| Error::io(path, e))?;
    let c = if is_zip(&head) {
        Container::Zip
    } else if is_tar(&head) {
        Container::Tar
    } else if head.starts_with(b"\x93NUMPY") {
        Container::Npy
    } else {
        Container::Stack
    };
    Ok((file, len, c))
}

/// A compressed stream joblib's loader decompresses before unpickling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// gzip (`1f 8b`).
    Gzip,
    /// zlib (`78 ..` with a valid header check).
    Zlib,
    /// bzip2 (`BZh`).
    Bz2,
    /// xz (`fd 37 7a 58 5a 00`).
    Xz,
    /// lz4 frame (`04 22 4d 18`).
    Lz4,
}

impl Compression {
    /// What a file of it is, in words.
    pub fn describe(self) -> &'static str {
        match self {
            Compression::Gzip => "a gzip stream (joblib.load decompresses and unpickles it)",
            Compression::Zlib => "a zlib stream (joblib.load decompresses and unpickles it)",
            Compression::Bz2 => "a bzip2 stream (joblib.load decompresses and unpickles it)",
            Compression::Xz => "an xz stream (joblib.load decompresses and unpickles it)",
            Compression::Lz4 => "an lz4 stream (joblib.load decompresses and unpickles it)",
        }
    }
}

/// The compression a file's first bytes announce.
pub fn compression(head: &[u8]) -> Option<Compression> {
    match head {
        [0x1f, 0x8b, ..] => Some(Compression::Gzip),
        [0x78, f, ..] if (0x7800u16 | *f as u16) % 31 == 0 => Some(Compression::Zlib),
        [b'B', b'Z', b'h', ..] => Some(Compression::Bz2),
        [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => Some(Compression::Xz),
        [0x04, 0x22, 0x4d, 0x18, ..] => Some(Compression::Lz4),
        _ => None,
    }
}

/// A compressed file as joblib reads it: gzip and zlib are decompressed (up to the pickle
/// limit) and judged as a stream of pickles; other compressions cannot be read here, so the
/// file is never clean.
pub fn scan_compressed(path: &Path, c: Compression) -> Result<Scan> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut out = empty_scan(c.describe());
    let reader: Box<dyn Read> = match c {
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(std::io::BufReader::new(
            file,
        ))),
        Compression::Zlib => Box::new(flate2::read::ZlibDecoder::new(std::io::BufReader::new(
            file,
        ))),
        _ => {
            out.incomplete = Some(
                "weightcast does not decompress this format: what joblib.load would unpickle \
                 from it is not judged"
                    .into(),
            );
            return Ok(out);
        }
    };
    let mut data = Vec::new();
    if let Err(e) = reader.take(MAX_PICKLE + 1).read_to_end(&mut data) {
        out.incomplete = Some(format!(
            "decompressing stopped after {} bytes: {e}",
            data.len()
        ));
    }
    if data.len() as u64 > MAX_PICKLE {
        data.truncate(MAX_PICKLE as usize);
        out.incomplete = Some(format!(
            "more than {MAX_PICKLE} bytes once decompressed: judged up to there"
        ));
    }
    let before = out.incomplete.take();
    stream(&mut out, "decompressed: ", 0, data.len() as u64, |pos| {
        parse_joblib_aware(&data[pos as usize..])
    });
    out.incomplete = out.incomplete.take().or(before);
    Ok(out)
}

/// Lists what `torch.load(path, weights_only=False)` would unpickle. An error means the file
/// could not be read far enough to know: never "clean".
pub fn scan(path: &Path) -> Result<Scan> {
    let (file, len, container) = open(path)?;
    if container == Container::Zip {
        return scan_zip(path, &file, len);
    }
    if container == Container::Tar {
        return scan_tar(path, &file, len);
    }
    if container == Container::Npy {
        let mut data = Vec::new();
        (&file)
            .take(MAX_PICKLE)
            .read_to_end(&mut data)
            .map_err(|e| Error::io(path, e))?;
        let mut out = empty_scan("NumPy array file (.npy)");
        npy(&data, "", 0, &mut out);
        return Ok(out);
    }
    scan_stack(&file, len)
}

impl Scan {
    /// What two readers would read differently: the container's ambiguities and every
    /// pickle's frames that the C unpickler reads differently.
    pub fn all_ambiguities(&self) -> Vec<String> {
        let mut v = self.ambiguities.clone();
        v.extend(self.pickles.iter().flat_map(ScannedPickle::ambiguities));
        v
    }
}

fn empty_scan(container: &'static str) -> Scan {
    Scan {
        container,
        pickles: vec![],
        stops: None,
        ambiguities: vec![],
        incomplete: None,
    }
}

/// Every pickle of a stream of pickles in a row (`pickle.load` called until the data ends, as
/// joblib, numpy and torch's legacy format do), parsed by `parse(pos)`, from `start` to `end`.
/// Parsing that stops before `end` is recorded in `out.incomplete`.
fn stream(out: &mut Scan, label: &str, start: u64, end: u64, parse: impl Fn(u64) -> Parsed) {
    let mut pos = start;
    let mut i = 0;
    while pos < end {
        match parse(pos) {
            (Ok((pk, n)), _) => {
                out.pickles.push(ScannedPickle::of(
                    format!("{label}pickle {} (byte {pos})", i + 1),
                    pos,
                    &pk,
                    false,
                ));
                pos += n.max(1) as u64;
                i += 1;
            }
            (Err(e), partial) => {
                out.parse_failed(
                    partial,
                    format!("{label}pickle {} (byte {pos})", i + 1),
                    pos,
                    &e,
                    format!("{label}parsing stopped at byte {pos}"),
                );
                return;
            }
        }
    }
}

/// A parse and, when it failed, what was built before the error.
type Parsed = (
    std::result::Result<(Pickle, usize), pickle::PickleError>,
    Option<Pickle>,
);

impl Scan {
    /// A pickle whose parse failed at `e` (`at` says where, for messages): when nothing was
    /// read before the error that an unpickler imports and CPython's unpickler stops there too,
    /// every loader stops before running anything (`stops`); otherwise what was seen is judged
    /// and the file is incomplete (never clean).
    fn parse_failed(
        &mut self,
        partial: Option<Pickle>,
        label: String,
        offset: u64,
        e: &pickle::PickleError,
        at: String,
    ) {
        if partial.is_none() && e.every_unpickler_stops {
            self.stops = Some(format!(
                "{at}: {e}; every unpickler stops there, before it imports anything"
            ));
            return;
        }
        self.push_partial(partial, label, offset);
        self.incomplete = Some(format!("{at}: {e}"));
    }

    /// Judges the globals a pickle named before its parse failed: an unpickler would already
    /// have imported them.
    fn push_partial(&mut self, partial: Option<Pickle>, label: String, offset: u64) {
        if let Some(pk) = partial {
            self.pickles.push(ScannedPickle::of(
                format!("{label}, up to where parsing stopped"),
                offset,
                &pk,
                false,
            ));
        }
    }
}

/// A `.npy` array (`data`, found at `offset`): an object array's pickle follows its header.
fn npy(data: &[u8], label: &str, offset: u64, out: &mut Scan) {
    let header = || -> Option<(usize, String)> {
        let major = *data.get(6)?;
        let (len, at): (usize, usize) = match major {
            1 => (
                u16::from_le_bytes([*data.get(8)?, *data.get(9)?]) as usize,
                10,
            ),
            2 | 3 => (
                u32::from_le_bytes(data.get(8..12)?.try_into().ok()?) as usize,
                12,
            ),
            _ => return None,
        };
        let text = String::from_utf8_lossy(data.get(at..at.checked_add(len)?)?).into_owned();
        Some((at + len, text))
    };
    let Some((end, text)) = header() else {
        out.incomplete = Some(format!("{label}the .npy header is not readable"));
        return;
    };
    // descr 'O' (or a structured dtype holding one): numpy pickles the array.
    if !(text.contains("'O'") || text.contains("|O") || text.contains("\"O\"")) {
        return;
    }
    match pickle::parse_prefix_partial(&data[end..], pickle::Limits::default()) {
        (Ok((pk, _)), _) => out.pickles.push(ScannedPickle::of(
            format!(
                "{label}object array (pickle at byte {})",
                offset + end as u64
            ),
            offset + end as u64,
            &pk,
            false,
        )),
        (Err(e), partial) => {
            let at = offset + end as u64;
            out.push_partial(
                partial,
                format!("{label}object array (pickle at byte {at})"),
                at,
            );
            out.incomplete = Some(format!(
                "{label}the object array's pickle (byte {}): {e}",
                offset + end as u64
            ))
        }
    }
}

/// A member of a zip that is not a torch.save archive (`.npz`, a zip of pickles, nested zips):
/// what a loader opening it would unpickle.
fn member(data: &[u8], label: &str, out: &mut Scan, depth: usize) {
    if data.starts_with(b"\x93NUMPY") {
        npy(data, label, 0, out);
    } else if data.starts_with(b"PK\x03\x04") {
        if depth >= 3 {
            out.incomplete = Some(format!("{label}zips nested deeper than 3 are not opened"));
            return;
        }
        let Ok(mut z) = zip::ZipArchive::new(std::io::Cursor::new(data)) else {
            out.incomplete = Some(format!("{label}a nested zip that does not open"));
            return;
        };
        members(&mut z, label, out, depth + 1);
    } else if data.first().is_some_and(|&b| pickle::is_opcode(b)) {
        stream(out, label, 0, data.len() as u64, |pos| {
            parse_joblib_aware(&data[pos as usize..])
        });
    }
}

/// A member that does not open: one whose encryption flag is set. Python's `zipfile` and
/// torch's miniz refuse it without a password, but a reader that ignores the flag (an older or
/// hand-written one) reads its bytes: when they read as plaintext (a pickle, a zip, an
/// `.npy`), they are judged as a member's, and the flag is named as an ambiguity; otherwise
/// the member is named as one no loader reads without its password (never clean).
fn encrypted_member<R: std::io::Read + std::io::Seek>(
    z: &mut zip::ZipArchive<R>,
    i: usize,
    label: &str,
    out: &mut Scan,
    depth: usize,
) {
    let raw = z.by_index_raw(i).ok().and_then(|f| {
        let name = crate::audit::escape(f.name());
        let (encrypted, method) = (f.encrypted(), f.compression());
        let mut bytes = Vec::new();
        let mut r = f.take(MAX_PICKLE);
        r.read_to_end(&mut bytes).ok()?;
        let data = match method {
            zip::CompressionMethod::Stored => bytes,
            zip::CompressionMethod::Deflated => {
                let mut d = Vec::new();
                flate2::read::DeflateDecoder::new(&bytes[..])
                    .take(MAX_PICKLE)
                    .read_to_end(&mut d)
                    .ok()?;
                d
            }
            _ => return None,
        };
        Some((name, encrypted, data))
    });
    let Some((name, encrypted, data)) = raw else {
        out.incomplete = Some(format!("{label}zip member {i} does not open"));
        return;
    };
    let plaintext = data.starts_with(b"\x93NUMPY")
        || data.starts_with(b"PK\x03\x04")
        || pickle::parse_prefix(&data, pickle::Limits::default()).is_ok();
    if encrypted && plaintext {
        out.ambiguities.push(format!(
            "{label}zip member `{name}` has the encryption flag set over plaintext: Python's \
             zipfile and torch refuse it, a reader that ignores the flag reads it"
        ));
        member(
            &data,
            &format!("{label}{name} (encryption flag ignored): "),
            out,
            depth,
        );
    } else if encrypted {
        out.incomplete = Some(format!(
            "{label}zip member `{name}` is encrypted: no loader reads it without its password"
        ));
    } else {
        out.incomplete = Some(format!("{label}zip member `{name}` does not open"));
    }
}

/// Every member of a zip, as [`member`] reads it.
fn members<R: std::io::Read + std::io::Seek>(
    z: &mut zip::ZipArchive<R>,
    label: &str,
    out: &mut Scan,
    depth: usize,
) {
    const MAX_MEMBERS: usize = 100_000;
    for i in 0..z.len().min(MAX_MEMBERS) {
        let Ok(mut f) = z.by_index(i) else {
            encrypted_member(z, i, label, out, depth);
            continue;
        };
        let name = format!("{label}{}: ", crate::audit::escape(f.name()));
        if f.size() > MAX_PICKLE {
            out.incomplete = Some(format!("{name}larger than the {MAX_PICKLE}-byte limit"));
            continue;
        }
        let mut data = Vec::new();
        if let Err(e) = (&mut f).take(MAX_PICKLE).read_to_end(&mut data) {
            out.incomplete = Some(format!("{name}{e}"));
            continue;
        }
        member(&data, &name, out, depth);
    }
}

/// One member of a tar archive: (name, data offset, size).
type TarMember = (String, u64, u64);

/// Largest pax extended header or GNU long name read (they hold names and numbers).
const MAX_TAR_EXTENSION: u64 = 1 << 20;

/// Extension headers (pax, GNU long name) chained before one member, at most.
const MAX_TAR_CHAIN: usize = 8;

/// A member's header once its extensions are applied.
struct TarEntry {
    /// The type flag (`0`, NUL and `7` are regular files, `5` a folder).
    kind: u8,
    /// The name: ustar prefix and name, or a GNU long name, or a pax `path`.
    name: String,
    /// The size read as its data.
    size: u64,
    /// Where its data starts.
    data: u64,
    /// Where the next header is.
    next: u64,
}

impl TarEntry {
    fn regular(&self) -> bool {
        matches!(self.kind, b'0' | 0 | b'7')
    }
}

/// `b` up to its first NUL, as text (tarfile's `nts`).
fn nts(b: &[u8]) -> String {
    String::from_utf8_lossy(&b[..b.iter().position(|&c| c == 0).unwrap_or(b.len())]).into_owned()
}

/// `n` rounded up to whole 512-byte blocks.
fn blocks(n: u64) -> Option<u64> {
    n.checked_add(511).map(|n| n / 512 * 512)
}

/// Reads a tar archive as Python's `tarfile` (torch's legacy loader) lists it.
struct TarReader<'a> {
    path: &'a Path,
    file: &'a File,
    len: u64,
    /// The records of the pax global headers read so far (`g`), later ones replacing earlier.
    global: Vec<(String, String)>,
}

impl TarReader<'_> {
    fn err(&self, pos: u64, what: impl std::fmt::Display) -> Error {
        Error::invalid(self.path, format!("tar header at byte {pos}: {what}"))
    }

    /// The entry whose first header is at `pos`, extensions applied, or `None` at the end of
    /// the archive (a zero block, or less than a block left: tarfile's end).
    fn entry(&mut self, pos: u64, chain: usize) -> Result<Option<TarEntry>> {
        if pos.checked_add(512).is_none_or(|e| e > self.len) {
            return Ok(None);
        }
        let mut h = [0u8; 512];
        self.file
            .read_exact_at(&mut h, pos)
            .map_err(|e| Error::io(self.path, e))?;
        if h.iter().all(|&b| b == 0) {
            return Ok(None);
        }
        if !is_tar(&h) {
            return Err(Error::invalid(
                self.path,
                format!("tar header at byte {pos} is not valid"),
            ));
        }
        let mut kind = h[156];
        let mut name = nts(&h[..100]);
        // tarfile's frombuf: an old-style folder, slashes, the ustar prefix
        if kind == 0 && name.ends_with('/') {
            kind = b'5';
        }
        if kind == b'5' {
            name = name.trim_end_matches('/').to_string();
        }
        let prefix = nts(&h[345..500]);
        if !prefix.is_empty() && !matches!(kind, b'L' | b'K' | b'S') {
            name = format!("{prefix}/{name}");
        }
        let size = match nts(&h[124..136]).trim() {
            "" => 0,
            digits => {
                u64::from_str_radix(digits, 8).map_err(|_| self.err(pos, "bad size field"))?
            }
        };
        let data = pos + 512;
        let shown = crate::audit::escape(&name);
        match kind {
            b'L' | b'K' | b'x' | b'X' | b'g' => self.extended(pos, kind, size, data, chain),
            b'0' | 0 | b'7' | b'5' => {
                let regular = kind != b'5';
                let skip = if regular {
                    blocks(size).ok_or_else(|| self.err(pos, "bad size field"))?
                } else {
                    0
                };
                let mut e = TarEntry {
                    kind,
                    name,
                    size,
                    data,
                    next: data
                        .checked_add(skip)
                        .ok_or_else(|| self.err(pos, "bad size field"))?,
                };
                // global records apply to every member; a global size changes the size read,
                // not where the next header is (tarfile's _proc_builtin)
                let global = self.global.clone();
                self.apply(pos, &mut e, &global)?;
                Ok(Some(e))
            }
            other => Err(self.err(
                pos,
                format!(
                    "`{shown}`: type `{}` (links, devices, GNU sparse files) is not read",
                    crate::audit::escape(&(other as char).to_string())
                ),
            )),
        }
    }

    /// An extension header (`L`/`K` GNU long names, `x`/`X` local and `g` global pax records)
    /// at `pos`: the member after it, the extension applied as tarfile applies it.
    fn extended(
        &mut self,
        pos: u64,
        kind: u8,
        size: u64,
        data: u64,
        chain: usize,
    ) -> Result<Option<TarEntry>> {
        if chain >= MAX_TAR_CHAIN {
            return Err(self.err(
                pos,
                format!("more than {MAX_TAR_CHAIN} extension headers in a row"),
            ));
        }
        let buf = self.extension(pos, data, size)?;
        let next_pos = blocks(size)
            .and_then(|b| data.checked_add(b))
            .ok_or_else(|| self.err(pos, "bad size field"))?;
        let records = match kind {
            b'L' | b'K' => vec![],
            _ => self.pax_records(pos, &buf)?,
        };
        let headers = if kind == b'g' {
            set_records(&mut self.global, records);
            self.global.clone()
        } else {
            let mut all = self.global.clone();
            set_records(&mut all, records);
            all
        };
        let Some(mut next) = self.entry(next_pos, chain + 1)? else {
            return Err(self.err(
                pos,
                format!(
                    "an extension header (type `{}`) with no member after it",
                    kind as char
                ),
            ));
        };
        match kind {
            b'L' => {
                next.name = nts(&buf);
                if next.kind == b'5' {
                    next.name = next.name.trim_end_matches('/').to_string();
                }
            }
            b'x' | b'X' => {
                self.apply(pos, &mut next, &headers)?;
                if headers.iter().any(|(k, _)| k == "size") {
                    // the size replaced: the next header moves with it
                    let skip = if next.regular() {
                        blocks(next.size).ok_or_else(|| self.err(pos, "bad size"))?
                    } else {
                        0
                    };
                    next.next = next
                        .data
                        .checked_add(skip)
                        .ok_or_else(|| self.err(pos, "bad size"))?;
                }
            }
            _ => {}
        }
        Ok(Some(next))
    }

    /// The data of an extension header (pax records or a GNU long name): its blocks, as
    /// tarfile reads them, up to the end of the file.
    fn extension(&self, pos: u64, data: u64, size: u64) -> Result<Vec<u8>> {
        if size > MAX_TAR_EXTENSION {
            return Err(self.err(
                pos,
                format!("an extension header of {size} bytes (over {MAX_TAR_EXTENSION})"),
            ));
        }
        if data + size > self.len {
            return Err(self.err(pos, "an extension header runs past the end of the file"));
        }
        let n = blocks(size).unwrap_or(size).min(self.len - data);
        let mut buf = vec![0u8; n as usize];
        self.file
            .read_exact_at(&mut buf, data)
            .map_err(|e| Error::io(self.path, e))?;
        Ok(buf)
    }

    /// The records of a pax header, `LENGTH KEYWORD=VALUE\n` each, up to the first NUL; a
    /// record that does not frame so is an error (readers could disagree on it).
    fn pax_records(&self, pos: u64, buf: &[u8]) -> Result<Vec<(String, String)>> {
        let mut out = Vec::new();
        let mut p = 0usize;
        while p < buf.len() && buf[p] != 0 {
            let bad = || {
                self.err(
                    pos,
                    format!("pax record at byte {} is malformed", pos + 512 + p as u64),
                )
            };
            let digits = buf[p..].iter().take_while(|c| c.is_ascii_digit()).count();
            if digits == 0 || digits > 20 || buf.get(p + digits) != Some(&b' ') {
                return Err(bad());
            }
            let length: usize = std::str::from_utf8(&buf[p..p + digits])
                .ok()
                .and_then(|d| d.parse().ok())
                .ok_or_else(bad)?;
            if length < 5 || length > buf.len() - p || buf[p + length - 1] != b'\n' {
                return Err(bad());
            }
            let record = buf.get(p + digits + 1..p + length - 1).ok_or_else(bad)?;
            let eq = record.iter().position(|&c| c == b'=').ok_or_else(bad)?;
            if eq == 0 {
                return Err(bad());
            }
            out.push((
                String::from_utf8_lossy(&record[..eq]).into_owned(),
                String::from_utf8_lossy(&record[eq + 1..]).into_owned(),
            ));
            p += length;
        }
        Ok(out)
    }

    /// Applies pax records to a member as tarfile does: `path` renames it, `size` resizes it;
    /// GNU sparse records are refused; others (times, owners, links) change nothing read.
    fn apply(&self, pos: u64, e: &mut TarEntry, records: &[(String, String)]) -> Result<()> {
        for (k, v) in records {
            match k.as_str() {
                "path" => e.name = v.trim_end_matches('/').to_string(),
                "size" => {
                    e.size = v
                        .bytes()
                        .all(|c| c.is_ascii_digit())
                        .then(|| v.parse::<u64>().ok())
                        .flatten()
                        .ok_or_else(|| {
                            self.err(
                                pos,
                                format!("pax size `{}` is not a number", crate::audit::escape(v)),
                            )
                        })?
                }
                k if k.starts_with("GNU.sparse.") => {
                    return Err(self.err(pos, "a GNU sparse member is not read"))
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// `records` set into `into`, a later value of a keyword replacing the earlier one.
fn set_records(into: &mut Vec<(String, String)>, records: Vec<(String, String)>) {
    for (k, v) in records {
        match into.iter_mut().find(|(x, _)| *x == k) {
            Some(e) => e.1 = v,
            None => into.push((k, v)),
        }
    }
}

/// The members of a tar archive as Python's `tarfile` lists them (torch's legacy loader opens
/// the file with it): ustar names with their prefix; pax extended headers (`x`: their `path`
/// and `size` records apply to the next member; `g`: to every member after it, a `size`
/// changing the size read but not where the next header is, as tarfile does); GNU long names
/// (`L`). Regular files and folders (size 0) are listed; links, devices and sparse files are
/// refused.
fn tar_members(path: &Path, file: &File, len: u64) -> Result<Vec<TarMember>> {
    let mut r = TarReader {
        path,
        file,
        len,
        global: Vec::new(),
    };
    let mut out = Vec::new();
    let mut pos = 0u64;
    while let Some(e) = r.entry(pos, 0)? {
        if e.regular() {
            if e.data.checked_add(e.size).is_none_or(|end| end > len) {
                return Err(Error::invalid(
                    path,
                    format!(
                        "tar member `{}` (byte {}) runs past the end of the file (truncated?)",
                        crate::audit::escape(&e.name),
                        e.data
                    ),
                ));
            }
            out.push((e.name, e.data, e.size));
        } else {
            out.push((e.name, e.data, 0));
        }
        pos = e.next;
    }
    Ok(out)
}

/// A member of a tar checkpoint made of a count pickle, then per item an arguments pickle
/// followed by raw bytes (`raw(args, pos, i)` gives where the next item starts): every pickle
/// goes into `out`. Returns the position after the last item and the member's end.
fn counted(
    path: &Path,
    file: &File,
    member: &TarMember,
    item: &str,
    out: &mut Scan,
    raw: impl Fn(&Pickle, u64, i64) -> std::result::Result<u64, String>,
) -> Result<(u64, u64)> {
    let (name, start, size) = member;
    let end = start + size;
    let mut pos = *start;
    let count = next_pickle(
        path,
        file,
        &mut pos,
        end,
        &format!("`{name}`: {item} count"),
    )?;
    out.pickles.push(ScannedPickle::of(
        format!("tar member `{name}`: {item} count"),
        *start,
        &count,
        false,
    ));
    for i in 0..count.int(count.root).filter(|n| *n >= 0).unwrap_or(0) {
        let at = pos;
        let args = next_pickle(
            path,
            file,
            &mut pos,
            end,
            &format!("`{name}`: {item} arguments"),
        )?;
        out.pickles.push(ScannedPickle::of(
            format!("tar member `{name}`: {item} {i} arguments"),
            at,
            &args,
            false,
        ));
        pos = raw(&args, pos, i)
            .and_then(|e| {
                (e <= end)
                    .then_some(e)
                    .ok_or_else(|| format!("{item} {i} runs past its member"))
            })
            .map_err(|e| Error::invalid(path, format!("tar member `{name}`: {e}")))?;
    }
    Ok((pos, end))
}

/// The pickle at `pos` (before `end`), moving `pos` past it.
fn next_pickle(path: &Path, file: &File, pos: &mut u64, end: u64, label: &str) -> Result<Pickle> {
    let (pk, n) = parse_at(file, *pos, end)
        .map_err(|e| Error::invalid(path, format!("tar member {label} (byte {pos}): {e}")))?;
    *pos += n as u64;
    Ok(pk)
}

/// The tar format of torch < 0.4: torch.load unpickles, in order, the `storages` member (a
/// count, then per storage its arguments followed by its raw data, then the views), the
/// `tensors` member (a count, then per tensor its arguments followed by its raw geometry) and
/// the `pickle` member (the saved object, through torch's unpickler).
fn scan_tar(path: &Path, file: &File, len: u64) -> Result<Scan> {
    let members = tar_members(path, file, len)?;
    let mut out = Scan {
        container: "tar-format torch.save (torch < 0.4)",
        pickles: vec![],
        stops: None,
        ambiguities: vec![],
        incomplete: None,
    };
    let mut names = HashSet::new();
    for (n, _, _) in &members {
        if !names.insert(n.as_str()) {
            out.ambiguities.push(format!(
                "two tar members named `{}` (tarfile reads the last)",
                crate::audit::escape(n)
            ));
        }
    }
    // tarfile.extract(name) takes the last member of that name.
    let member = |want: &str| members.iter().rev().find(|(n, _, _)| n == want).cloned();
    let bad = |what: String| Error::invalid(path, what);
    let Some(storages) = member("storages") else {
        return Err(bad(
            "tar-format checkpoint without a `storages` member".into()
        ));
    };
    // storages: per storage (key, location, storage_type), then an 8-byte element count and
    // the elements.
    let (mut pos, end) = counted(
        path,
        file,
        &storages,
        "storage",
        &mut out,
        |args, pos, i| {
            let es = args
                .seq(args.root)
                .and_then(|t| t.get(2))
                .and_then(|&g| args.global(g))
                .and_then(|(_, n)| crate::dtype::DType::from_storage_name(n))
                .map(|d| (d.bitsize() / 8).max(1) as u64)
                .ok_or_else(|| format!("storage {i} has no storage type"))?;
            let mut c = [0u8; 8];
            file.read_exact_at(&mut c, pos)
                .map_err(|_| format!("storage {i} is truncated"))?;
            u64::from_le_bytes(c)
                .checked_mul(es)
                .and_then(|b| b.checked_add(8 + pos))
                .ok_or_else(|| format!("storage {i} runs past its member"))
        },
    )?;
    let at = pos;
    let views = next_pickle(path, file, &mut pos, end, "`storages`: views")?;
    out.pickles.push(ScannedPickle::of(
        "tar member `storages`: views".into(),
        at,
        &views,
        false,
    ));
    if let Some(tensors) = member("tensors") {
        // tensors: per tensor (key, storage_id, type), then ndim (4 bytes), 4 skipped, sizes
        // and strides (8 * ndim each) and the offset (8).
        counted(path, file, &tensors, "tensor", &mut out, |_, pos, i| {
            let mut d = [0u8; 4];
            file.read_exact_at(&mut d, pos)
                .map_err(|_| format!("tensor {i} is truncated"))?;
            let ndim = i32::from_le_bytes(d).max(0) as u64;
            ndim.checked_mul(16)
                .and_then(|b| b.checked_add(pos + 16))
                .ok_or_else(|| format!("tensor {i} runs past its member"))
        })?;
    }
    let Some((_, start, size)) = member("pickle") else {
        return Err(bad("tar-format checkpoint without a `pickle` member".into()));
    };
    let (pk, _) = parse_at(file, start, start + size)
        .map_err(|e| bad(format!("tar member `pickle` (byte {start}): {e}")))?;
    out.pickles.push(ScannedPickle::of(
        "tar member `pickle` (the saved object)".into(),
        start,
        &pk,
        true,
    ));
    Ok(out)
}

/// A non-zip file: torch unpickles the first pickle whatever it is, checks that it is the
/// magic number, and goes on through the stack.
fn scan_stack(file: &File, len: u64) -> Result<Scan> {
    let mut out = Scan {
        container: "legacy torch.save (stacked pickles)",
        pickles: vec![],
        stops: None,
        ambiguities: vec![],
        incomplete: None,
    };
    if has_zip_end(file, len) {
        out.ambiguities.push(
            "the file does not start with a zip header but holds a zip directory: torch reads \
             it as stacked pickles, zip readers read the archive"
                .into(),
        );
    }
    let mut pos = 0u64;
    for (i, what) in [
        "magic number",
        "protocol version",
        "sys_info",
        "the saved object",
        "storage keys",
    ]
    .into_iter()
    .enumerate()
    {
        let (pk, n) = match parse_at_partial(file, pos, len) {
            (Ok(r), _) => r,
            (Err(e), partial) if i == 0 => {
                out.container = "not a torch.save file";
                let at = "parsing stopped at byte 0".to_string();
                out.parse_failed(partial, "pickle 1 (byte 0)".into(), 0, &e, at);
                return Ok(out);
            }
            (Err(e), partial) => {
                // What was seen so far stays judged: parsing stopped, the file is not clean.
                out.parse_failed(
                    partial,
                    format!("pickle {} of the legacy stack ({what})", i + 1),
                    pos,
                    &e,
                    format!(
                        "pickle {} of the legacy stack ({what}) at byte {pos}",
                        i + 1
                    ),
                );
                return Ok(out);
            }
        };
        let stop = match i {
            0 if !is_magic(&pk) => Some("its first pickle is not torch's magic number"),
            1 if pk.int(pk.root) != Some(1001) => Some("its protocol version is not 1001"),
            _ => None,
        };
        if let Some(s) = stop {
            // torch.load stops after this pickle; pickle.load loops, joblib and numpy read on:
            // every pickle in a row is judged.
            out.stops = Some(format!("torch.load stops after pickle {}: {s}", i + 1));
            out.container = "a pickle stream (not a torch.save file)";
            out.pickles.clear();
            stream(&mut out, "", 0, len, |p| parse_at_partial(file, p, len));
            return Ok(out);
        }
        out.pickles.push(ScannedPickle::of(
            format!("pickle {} of the legacy stack ({what})", i + 1),
            pos,
            &pk,
            i == 3,
        ));
        pos += n as u64;
    }
    Ok(out)
}

/// The magic number legacy torch.save files start with, as LONG1 bytes (little-endian).
pub const LEGACY_MAGIC: [u8; 10] = [0x6C, 0xFC, 0x9C, 0x46, 0xF9, 0x20, 0x6A, 0xA8, 0x50, 0x19];

/// Whether a pickle is torch's magic number (the first of a legacy stack).
pub fn is_magic(pk: &Pickle) -> bool {
    matches!(pk.node(pk.root), Node::BigInt(b) if b.as_slice() == &LEGACY_MAGIC[..])
}

/// Parses the pickle starting at `pos`, reading a window that grows until it parses.
pub fn parse_at(
    file: &File,
    pos: u64,
    len: u64,
) -> std::result::Result<(Pickle, usize), pickle::PickleError> {
    parse_at_partial(file, pos, len).0
}

/// Like [`parse_at`]; when the pickle does not parse, also what was built before the error.
fn parse_at_partial(file: &File, pos: u64, len: u64) -> Parsed {
    let avail = len.saturating_sub(pos).min(MAX_PICKLE);
    let mut window = (1u64 << 20).min(avail);
    loop {
        let mut buf = vec![0u8; window as usize];
        let read = file.read_exact_at(&mut buf, pos);
        if read.is_err() {
            buf.clear();
        }
        match parse_joblib_aware(&buf) {
            (Ok(r), _) => return (Ok(r), None),
            (Err(_), _) if window < avail => window = (window * 4).min(avail),
            failed => return failed,
        }
    }
}

/// Parses the pickle at the start of `buf`; one that names joblib's `NumpyArrayWrapper` is
/// parsed a second time as joblib reads it (the array bytes after each wrapper skipped, an
/// object array's nested pickle judged), and its globals are those of both readings: what
/// `pickle.load` would import and what `joblib.load` would.
pub(crate) fn parse_joblib_aware(buf: &[u8]) -> Parsed {
    let plain = pickle::parse_prefix_partial(buf, pickle::Limits::default());
    let names_wrapper = |pk: &Pickle| {
        pk.globals()
            .iter()
            .any(|(m, n)| n == "NumpyArrayWrapper" && m.ends_with("numpy_pickle"))
    };
    let wrapper = match &plain {
        (Ok((pk, _)), _) | (Err(_), Some(pk)) => names_wrapper(pk),
        _ => false,
    };
    if !wrapper {
        return plain;
    }
    let limits = pickle::Limits {
        joblib_arrays: true,
        ..pickle::Limits::default()
    };
    match pickle::parse_prefix_partial(buf, limits) {
        (Ok((mut pk, n)), _) => {
            let other = match plain {
                (Ok((p, _)), _) | (Err(_), Some(p)) => p,
                _ => Pickle::default(),
            };
            pk.merge_globals(&other);
            (Ok((pk, n)), None)
        }
        _ => plain,
    }
}

/// Whether an end-of-central-directory record sits in the file's last 64 KiB.
pub(crate) fn has_zip_end(file: &File, len: u64) -> bool {
    let tail = len.min(65_557);
    let mut buf = vec![0u8; tail as usize];
    file.read_exact_at(&mut buf, len - tail).is_ok() && buf.windows(4).any(|w| w == b"PK\x05\x06")
}

/// A zip: torch reads `data.pkl` (and dispatches a TorchScript archive, with `constants.pkl`,
/// to torch.jit.load).
fn scan_zip(path: &Path, file: &File, len: u64) -> Result<Scan> {
    let handle = file.try_clone().map_err(|e| Error::io(path, e))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(handle))
        .map_err(|e| crate::formats::torch::scan::zip_error(path, e))?;
    let ambiguities = zip_ambiguities(file, len, &mut zip);
    let names: Vec<String> = zip.file_names().map(str::to_string).collect();
    let find = |want: &str| -> Option<String> {
        // miniz looks names up case-insensitively: the first match is what torch reads.
        names
            .iter()
            .find(|n| {
                n.rsplit_once('/')
                    .is_some_and(|(_, f)| f.eq_ignore_ascii_case(want))
                    && n.matches('/').count() == 1
            })
            .cloned()
    };
    let mut out = Scan {
        container: "torch.save zip",
        pickles: vec![],
        stops: None,
        ambiguities,
        incomplete: None,
    };
    let constants = find("constants.pkl");
    if constants.is_some() {
        out.container = "TorchScript archive (torch.load hands it to torch.jit.load, which runs \
                         the archive's compiled TorchScript code: its pickles are judged, not that code)";
    }
    let jit = constants.is_some();
    for name in [find("data.pkl"), constants].into_iter().flatten() {
        let before = out.pickles.len();
        let (offset, buf) = read_record(path, &mut zip, &name, MAX_PICKLE)?;
        match pickle::parse_prefix_partial(&buf, pickle::Limits::default()) {
            (Ok((pk, _)), _) => {
                out.pickles
                    .push(ScannedPickle::of(name.clone(), offset, &pk, true))
            }
            (Err(e), partial) => {
                // torch.load has imported what its unpickler met before the error
                if let Some(pk) = partial {
                    out.pickles.push(ScannedPickle::of(
                        format!("{name}, up to where parsing stopped"),
                        offset,
                        &pk,
                        true,
                    ));
                }
                out.incomplete = Some(format!("record `{name}`: {e}"));
            }
        }
        for pk in &mut out.pickles[before..] {
            pk.jit = jit;
        }
        if out.incomplete.is_some() {
            break;
        }
    }
    if out.pickles.is_empty() && out.incomplete.is_none() {
        // Not a torch.save archive (.npz, a zip of pickles): every member a loader would open.
        out.container = "zip archive (not torch.save): every member read";
        members(&mut zip, "", &mut out, 0);
    }
    Ok(out)
}

/// The bytes of zip record `name` (at most `limit`, checked against the directory first) and
/// its data offset; the zip reader checks the CRC.
pub(crate) fn read_record<R: std::io::Read + std::io::Seek>(
    path: &Path,
    zip: &mut zip::ZipArchive<R>,
    name: &str,
    limit: u64,
) -> Result<(u64, Vec<u8>)> {
    let f = zip
        .by_name(name)
        .map_err(|e| Error::invalid(path, format!("record `{name}`: {e}")))?;
    if f.size() > limit {
        return Err(Error::invalid(
            path,
            format!(
                "record `{name}` is {} bytes, over the {limit}-byte limit",
                f.size()
            ),
        ));
    }
    let offset = f.data_start().unwrap_or(0);
    let mut buf = Vec::new();
    f.take(limit)
        .read_to_end(&mut buf)
        .map_err(|e| Error::invalid(path, format!("record `{name}`: {e}")))?;
    Ok((offset, buf))
}

/// What makes this zip read differently by different readers: bytes before the first entry or
/// after the end record, more than one end record, duplicate names (also ignoring case, as
/// torch's miniz looks them up), entries outside one top folder, local headers that disagree
/// with the central directory.
pub fn zip_ambiguities<R: std::io::Read + std::io::Seek>(
    file: &File,
    len: u64,
    zip: &mut zip::ZipArchive<R>,
) -> Vec<String> {
    let mut out = Vec::new();
    if zip.offset() > 0 {
        out.push(format!(
            "{} bytes before the zip's first entry",
            zip.offset()
        ));
    }
    // End records in the tail: torch's miniz takes the last, others the first valid one.
    let tail = len.min(65_557);
    let mut buf = vec![0u8; tail as usize];
    if file.read_exact_at(&mut buf, len - tail).is_ok() {
        let ends: Vec<usize> = buf
            .windows(4)
            .enumerate()
            .filter(|(_, w)| *w == b"PK\x05\x06")
            .map(|(i, _)| i)
            .collect();
        if ends.len() > 1 {
            out.push(format!("{} end-of-central-directory records", ends.len()));
        }
        if let Some(&last) = ends.last() {
            if let Some(why) = zip64_disagrees(file, len, &buf, last) {
                out.push(why);
            }
            if last + 22 <= buf.len() {
                let comment = u16::from_le_bytes([buf[last + 20], buf[last + 21]]) as usize;
                let end = last + 22 + comment;
                if end != buf.len() {
                    out.push(format!(
                        "{} bytes after the zip's end record",
                        buf.len() as i64 - end as i64
                    ));
                }
            }
        }
    }
    let mut seen = HashSet::new();
    let mut folders = HashSet::new();
    for i in 0..zip.len() {
        let Ok(f) = zip.by_index_raw(i) else {
            out.push(format!("zip entry {i} cannot be read"));
            continue;
        };
        let name = f.name().to_string();
        if !seen.insert(name.to_ascii_lowercase()) {
            out.push(format!(
                "two entries named `{}` (ignoring case, as torch looks names up)",
                crate::audit::escape(&name)
            ));
        }
        folders.insert(name.split_once('/').map(|(p, _)| p.to_string()));
        let (start, method, csize, usize_, crc) = (
            f.header_start(),
            f.compression(),
            f.compressed_size(),
            f.size(),
            f.crc32(),
        );
        drop(f);
        if let Some(why) = local_header_mismatch(file, start, &name, method, csize, usize_, crc) {
            out.push(format!(
                "entry `{}`: its local header {why} than the central directory says",
                crate::audit::escape(&name)
            ));
        }
    }
    // torch.save's layout (a `data.pkl` in one folder): entries elsewhere are read by one
    // reader and not another. Other zips (.npz) have no such rule.
    let torch_layout = seen
        .iter()
        .any(|n| n.rsplit('/').next() == Some("data.pkl"));
    if torch_layout && (folders.len() > 1 || folders.contains(&None)) {
        out.push("entries outside one top folder (torch.save writes them all in one)".into());
    }
    out
}

/// torch's reader (miniz) uses the zip64 end record whenever its locator precedes the end
/// record; other readers use the 32-bit fields unless they are saturated. Where both are
/// present and give another entry count or directory place, the archive reads two ways.
fn zip64_disagrees(file: &File, len: u64, tail: &[u8], end: usize) -> Option<String> {
    let le16 = |b: &[u8], i: usize| u16::from_le_bytes([b[i], b[i + 1]]) as u64;
    let le32 = |b: &[u8], i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4")) as u64;
    let le64 = |b: &[u8], i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8"));
    if end < 20 || end + 22 > tail.len() || &tail[end - 20..end - 16] != b"PK\x06\x07" {
        return None;
    }
    let at = le64(tail, end - 20 + 8);
    let mut rec = [0u8; 56];
    if at.checked_add(56).is_none_or(|e| e > len) || file.read_exact_at(&mut rec, at).is_err() {
        return Some("a zip64 locator points outside the file".into());
    }
    if &rec[..4] != b"PK\x06\x06" {
        return Some("a zip64 locator points at no zip64 end record".into());
    }
    let e = &tail[end..end + 22];
    let (n32, size32, off32) = (le16(e, 10), le32(e, 12), le32(e, 16));
    let (n64, size64, off64) = (le64(&rec, 32), le64(&rec, 40), le64(&rec, 48));
    let differs = |a: u64, b: u64, saturated: u64| a != saturated && a != b;
    if differs(n32, n64, 0xFFFF)
        || differs(size32, size64, 0xFFFF_FFFF)
        || differs(off32, off64, 0xFFFF_FFFF)
    {
        return Some(format!(
            "the zip64 end record ({n64} entries, directory at byte {off64}) and the 32-bit one \
             ({n32} entries, directory at byte {off32}) disagree"
        ));
    }
    None
}

/// How the local header at `start` disagrees with the central directory, if it does.
fn local_header_mismatch(
    file: &File,
    start: u64,
    name: &str,
    method: zip::CompressionMethod,
    csize: u64,
    usize_: u64,
    crc: u32,
) -> Option<&'static str> {
    let mut h = [0u8; 30];
    if file.read_exact_at(&mut h, start).is_err() || &h[..4] != b"PK\x03\x04" {
        return Some("is missing or has another signature");
    }
    let le16 = |i: usize| u16::from_le_bytes([h[i], h[i + 1]]);
    let le32 = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
    let flags = le16(6);
    #[allow(deprecated)]
    let method_code = match method {
        zip::CompressionMethod::Stored => 0,
        zip::CompressionMethod::Deflated => 8,
        _ => le16(8),
    };
    if le16(8) != method_code {
        return Some("names another compression method");
    }
    let name_len = le16(26) as usize;
    let mut n = vec![0u8; name_len];
    if file.read_exact_at(&mut n, start + 30).is_err() || n != name.as_bytes() {
        return Some("names another file");
    }
    // With a data descriptor (flag bit 3, as torch writes) the sizes and CRC follow the data
    // and are 0 here; zip64 puts the sizes in an extra field (0xFFFFFFFF here). Anything else
    // must agree with the central directory.
    let deferred = |v: u32| flags & 8 != 0 && v == 0;
    let (c, u) = (le32(18), le32(22));
    let size_ok = |v: u32, want: u64| v == 0xFFFF_FFFF || v as u64 == want || deferred(v);
    if !size_ok(c, csize) || !size_ok(u, usize_) {
        return Some("gives other sizes");
    }
    if le32(14) != crc && !deferred(le32(14)) {
        return Some("gives another CRC");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ustar header (checksum filled in).
    fn header(name: &str, kind: u8, size: u64, prefix: &str) -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..107].copy_from_slice(b"0000644");
        h[108..115].copy_from_slice(b"0000000");
        h[116..123].copy_from_slice(b"0000000");
        h[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
        h[136..147].copy_from_slice(b"00000000000");
        h[156] = kind;
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[345..345 + prefix.len()].copy_from_slice(prefix.as_bytes());
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| b as u32).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        h
    }

    /// A header (`size` in its size field) and `data`, padded to whole blocks.
    fn member(tar: &mut Vec<u8>, name: &str, kind: u8, size: u64, data: &[u8]) {
        tar.extend(header(name, kind, size, ""));
        tar.extend_from_slice(data);
        tar.resize(tar.len().div_ceil(512) * 512, 0);
    }

    /// A pax header of `records`, as tarfile writes them (`LENGTH KEY=VALUE\n`).
    fn pax(tar: &mut Vec<u8>, kind: u8, records: &[(&str, &str)]) {
        let mut data = String::new();
        for (k, v) in records {
            let rest = k.len() + v.len() + 3;
            let mut n = rest + 1;
            while n != rest + n.to_string().len() {
                n = rest + n.to_string().len();
            }
            data.push_str(&format!("{n} {k}={v}\n"));
        }
        member(
            tar,
            "././@PaxHeader",
            kind,
            data.len() as u64,
            data.as_bytes(),
        );
    }

    /// The members of torch < 0.4's tar checkpoint: one float storage, no tensors, the object
    /// (`evil`: a pickle that calls posix.system).
    fn members(evil: bool) -> Vec<(&'static str, Vec<u8>)> {
        let mut storages = b"\x80\x02K\x01.".to_vec();
        storages.extend_from_slice(
            b"\x80\x02X\x01\x00\x00\x000q\x00X\x03\x00\x00\x00cpuq\x01ctorch\nFloatStorage\nq\x02\x87q\x03.",
        );
        storages.extend_from_slice(&2u64.to_le_bytes());
        storages.extend_from_slice(&[0u8; 8]);
        storages.extend_from_slice(b"\x80\x02]q\x00.");
        let object: &[u8] = if evil {
            b"\x80\x02cposix\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03."
        } else {
            b"\x80\x02\x7dq\x00X\x05\x00\x00\x00epochq\x01K\x01s."
        };
        vec![
            (
                "sys_info",
                b"\x80\x02\x7dq\x00X\r\x00\x00\x00little_endianq\x01\x88s.".to_vec(),
            ),
            ("storages", storages),
            ("tensors", b"\x80\x02K\x00.".to_vec()),
            ("pickle", object.to_vec()),
        ]
    }

    /// Each pickle's label and globals.
    type Pickles = Vec<(String, Vec<(String, String, u8)>)>;

    /// `tar` (two zero blocks added) scanned and audited: the scan's pickles (label, offset
    /// left out: extension headers move the data) and globals, and the file's verdict.
    fn judge(tar: &[u8]) -> (Pickles, &'static str) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ckpt.pt");
        let mut bytes = tar.to_vec();
        bytes.extend([0u8; 1024]);
        std::fs::write(&p, &bytes).unwrap();
        let s = scan(&p).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.container, "tar-format torch.save (torch < 0.4)");
        let pickles = s
            .pickles
            .iter()
            .map(|k| (k.label.clone(), k.globals.clone()))
            .collect();
        let r = crate::commands::audit::AuditRequest {
            paths: vec![p],
            ..Default::default()
        }
        .run();
        (pickles, r.files[0].verdict().as_str())
    }

    fn plain(evil: bool) -> Vec<u8> {
        let mut tar = Vec::new();
        for (n, data) in members(evil) {
            member(&mut tar, n, b'0', data.len() as u64, &data);
        }
        tar
    }

    #[test]
    fn pax_and_gnu_tar_checkpoints_read_as_tarfile_reads_them() {
        for evil in [false, true] {
            let want = judge(&plain(evil));
            assert_eq!(want.1, if evil { "dangerous" } else { "clean" });
            assert_eq!(want.0.len(), 5, "{want:?}");
            // pax as tarfile's PAX_FORMAT writes it: a global header first, then per member a
            // local header whose path and size replace the ustar fields (here: a size field of
            // 0, as for a member over 8 GiB, and a name the ustar field cannot hold)
            let mut tar = Vec::new();
            pax(&mut tar, b'g', &[("comment", "made by a test")]);
            for (n, data) in members(evil) {
                let size = data.len().to_string();
                pax(
                    &mut tar,
                    b'x',
                    &[("path", n), ("size", &size), ("mtime", "1.5")],
                );
                member(&mut tar, "PaxHeaders/truncated-name", b'0', 0, &data);
            }
            assert_eq!(judge(&tar), want, "pax");
            // GNU long names: an `L` header whose data is the next member's name
            for (n, _) in members(evil) {
                let mut long = n.as_bytes().to_vec();
                long.push(0);
                let mut tar = Vec::new();
                for (m, d) in members(evil) {
                    if m == n {
                        member(&mut tar, "././@LongLink", b'L', long.len() as u64, &long);
                        member(&mut tar, "ignored", b'0', d.len() as u64, &d);
                    } else {
                        member(&mut tar, m, b'0', d.len() as u64, &d);
                    }
                }
                assert_eq!(judge(&tar), want, "GNU long name for {n}");
            }
            // the ustar prefix is part of the name: `x/pickle` is not `pickle`
            let mut tar = plain(evil);
            let decoy = b"\x80\x02cposix\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03.";
            tar.extend(header("pickle", b'0', decoy.len() as u64, "x"));
            tar.extend_from_slice(decoy);
            tar.resize(tar.len().div_ceil(512) * 512, 0);
            assert_eq!(judge(&tar).1, want.1, "prefix");
        }
    }

    #[test]
    fn tar_names_are_the_ones_torch_extracts() {
        // a pax path renames a member: the `pickle` torch extracts is the one named so by its
        // pax header, not the one whose ustar field says `pickle`
        let mut tar = Vec::new();
        let (evil, clean) = (
            members(true).pop().unwrap().1,
            members(false).pop().unwrap().1,
        );
        for (n, data) in members(false).into_iter().take(3) {
            member(&mut tar, n, b'0', data.len() as u64, &data);
        }
        pax(&mut tar, b'x', &[("path", "pickle")]);
        member(&mut tar, "notes", b'0', evil.len() as u64, &evil);
        pax(&mut tar, b'x', &[("path", "notes")]);
        member(&mut tar, "pickle", b'0', clean.len() as u64, &clean);
        let (pickles, verdict) = judge(&tar);
        assert_eq!(verdict, "dangerous");
        assert!(pickles.last().unwrap().1.iter().any(|g| g.0 == "posix"));
        // a folder has no data, whatever its size field says: the headers after it are
        // members (tarfile reads the last `pickle` there; a reader skipping 1024 bytes
        // would see the clean one only)
        let mut tar = plain(false);
        tar.extend(header("folder/", b'5', 1024, ""));
        member(&mut tar, "pickle", b'0', evil.len() as u64, &evil);
        let (pickles, verdict) = judge(&tar);
        assert_eq!(verdict, "dangerous");
        assert!(pickles.last().unwrap().1.iter().any(|g| g.0 == "posix"));
        // a global size changes the size read, not where the next header is
        let mut tar = Vec::new();
        for (n, data) in members(false).into_iter().take(3) {
            member(&mut tar, n, b'0', data.len() as u64, &data);
        }
        let size = evil.len().to_string();
        pax(&mut tar, b'g', &[("size", &size)]);
        member(&mut tar, "pickle", b'0', 1, &evil);
        assert_eq!(judge(&tar).1, "dangerous");
    }

    #[test]
    fn bad_extension_headers_are_one_line_errors() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("bad.pt");
        let with = |ext: &dyn Fn(&mut Vec<u8>)| {
            let mut tar = Vec::new();
            ext(&mut tar);
            tar.extend(plain(false));
            tar.extend([0u8; 1024]);
            std::fs::write(&p, &tar).unwrap();
            scan(&p).map(|_| ()).map_err(|e| e.to_string())
        };
        let bad_record = |tar: &mut Vec<u8>| {
            member(tar, "././@PaxHeader", b'x', 12, b"11 path\nxyz\n");
        };
        let wrong_length = |tar: &mut Vec<u8>| {
            member(tar, "././@PaxHeader", b'x', 16, b"99 path=pickle\n\n");
        };
        let bad_size = |tar: &mut Vec<u8>| pax(tar, b'x', &[("size", "-5")]);
        let sparse = |tar: &mut Vec<u8>| pax(tar, b'x', &[("GNU.sparse.size", "5")]);
        let chain = |tar: &mut Vec<u8>| {
            for _ in 0..9 {
                pax(tar, b'x', &[("comment", "again")]);
            }
        };
        let huge = |tar: &mut Vec<u8>| tar.extend(header("././@PaxHeader", b'x', 1 << 32, ""));
        let link = |tar: &mut Vec<u8>| tar.extend(header("pickle", b'2', 0, ""));
        for (what, ext, want) in [
            (
                "record",
                &bad_record as &dyn Fn(&mut Vec<u8>),
                "pax record at byte 512",
            ),
            ("length", &wrong_length, "pax record at byte 512"),
            ("size", &bad_size, "pax size `-5` is not a number"),
            ("sparse", &sparse, "GNU sparse"),
            ("chain", &chain, "extension headers in a row"),
            ("huge", &huge, "an extension header of 4294967296 bytes"),
            ("link", &link, "type `2`"),
        ] {
            let e = with(ext).expect_err(what);
            assert!(e.contains(want) && e.contains("bad.pt"), "{what}: {e}");
            assert!(e.contains("tar header at byte"), "{what}: {e}");
            assert_eq!(e.lines().count(), 1, "{what}: {e}");
        }
        // an extension header with nothing after it
        let mut tar = Vec::new();
        pax(&mut tar, b'x', &[("path", "pickle")]);
        tar.extend([0u8; 1024]);
        std::fs::write(&p, &tar).unwrap();
        let e = scan(&p).map(|_| ()).unwrap_err().to_string();
        assert!(e.contains("with no member after it"), "{e}");
    }
}
