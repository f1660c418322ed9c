//! Reading a torch.save file's bytes: the zip archive (its `data.pkl` and storage records),
//! or a legacy file's stack of pickles and its storages.

use super::*;

/// One stored record of the archive.
#[derive(Debug, Clone)]
pub(super) struct Record {
    pub(super) data_start: u64,
    pub(super) size: u64,
    pub(super) stored: bool,
}

/// A torch.save archive: its records and its parsed pickle.
#[derive(Debug)]
pub struct Archive {
    /// The parsed `data.pkl`.
    pub pickle: Pickle,
    /// Record prefix (`model/`).
    pub prefix: String,
    /// Whether storages are big-endian (`byteorder` record).
    pub big_endian: bool,
    /// A TorchScript archive (`constants.pkl` present).
    pub torchscript: bool,
    /// A legacy (non-zip) file.
    pub legacy: bool,
    /// What two readers would read differently in this file (audit and `.pt` writing refuse
    /// it).
    pub ambiguities: Vec<String>,
    /// Globals of the other pickles torch unpickles (a legacy file's magic number, protocol,
    /// sys_info and storage keys) with the protocol in force: never written back, but they run
    /// on `torch.load`.
    pub other_globals: Vec<(String, String, u8)>,
    pub(super) records: HashMap<String, Record>,
}

/// Reads a legacy torch.save file: magic, protocol version, sys_info, the main pickle, the list
/// of storage keys, then each storage as an 8-byte element count and its bytes.
pub(super) fn read_legacy(path: &Path, file: &File, file_len: u64) -> Result<Archive> {
    use std::os::unix::fs::FileExt;
    // The pickles come first; read a window that grows until they parse.
    let mut window = (64u64 << 20).min(file_len);
    let (pickles, mut pos) = loop {
        let mut buf = vec![0u8; window as usize];
        file.read_exact_at(&mut buf, 0)
            .map_err(|e| Error::io(path, e))?;
        match parse_stack(&buf) {
            Ok(r) => break r,
            Err(e) if window < file_len.min(MAX_PICKLE) => {
                let _ = e;
                window = (window * 2).min(file_len).min(MAX_PICKLE);
            }
            Err(e) => return Err(Error::invalid(path, e)),
        }
    };
    let [magic, proto, sys_info, main, keys] = pickles;
    match magic.node(magic.root) {
        Node::BigInt(b) if b.as_slice() == &LEGACY_MAGIC[..] => {}
        _ => {
            return Err(Error::invalid(
                path,
                "invalid magic number: not a torch.save file",
            ))
        }
    }
    if proto.int(proto.root) != Some(1001) {
        return Err(Error::invalid(
            path,
            "unsupported legacy protocol version (expected 1001)",
        ));
    }
    let big_endian = dict_get(&sys_info, sys_info.root, "little_endian")
        .is_some_and(|v| sys_info.node(v) == &Node::Bool(false));
    // Element size of each storage, from the persistent ids of the main pickle.
    let mut elsize: HashMap<String, u64> = HashMap::new();
    for id in 0..main.nodes.len() {
        if let Some(sid) = storage_id(&main, id) {
            if let Some((_, sname)) = sid.storage_type(&main) {
                let size = DType::from_storage_name(sname)
                    .map(|d| (d.bitsize() as u64 / 8).max(1))
                    .unwrap_or(1);
                elsize.insert(sid.key, size);
            }
        }
    }
    let key_list: Vec<String> = keys
        .seq(keys.root)
        .ok_or_else(|| Error::invalid(path, "the storage key list is not a list"))?
        .iter()
        .map(|&k| {
            keys.str(k)
                .map(str::to_string)
                .ok_or_else(|| Error::invalid(path, "a storage key is not a string"))
        })
        .collect::<Result<_>>()?;
    let mut records = HashMap::new();
    for key in key_list {
        let mut count = [0u8; 8];
        file.read_exact_at(&mut count, pos as u64).map_err(|_| {
            Error::invalid(path, format!("storage `{key}`: the file ends at byte {file_len} before its size (truncated?)"))
        })?;
        let count = u64::from_le_bytes(count);
        let size = count
            .checked_mul(*elsize.get(&key).unwrap_or(&1))
            .filter(|s| (pos as u64 + 8).checked_add(*s).is_some_and(|e| e <= file_len))
            .ok_or_else(|| {
                Error::invalid(path, format!("storage `{key}` at byte {pos}: {count} elements run past the end of the file (truncated?)"))
            })?;
        records.insert(
            format!("data/{key}"),
            Record {
                data_start: pos as u64 + 8,
                size,
                stored: true,
            },
        );
        pos += 8 + size as usize;
    }
    let mut ambiguities = vec![];
    if has_zip_end(file, file_len) {
        ambiguities.push(
            "the file does not start with a zip header but holds a zip directory: torch reads it \
             as stacked pickles, zip readers read the archive"
                .to_string(),
        );
    }
    for (what, pk) in [
        ("magic number", &magic),
        ("protocol version", &proto),
        ("sys_info", &sys_info),
        ("main pickle", &main),
        ("storage keys", &keys),
    ] {
        ambiguities.extend(read_differently(what, pk));
    }
    let other_globals = [&magic, &proto, &sys_info, &keys]
        .iter()
        .flat_map(|p| p.globals_with_protocol())
        .collect();
    Ok(Archive {
        pickle: main,
        prefix: String::new(),
        big_endian,
        torchscript: false,
        legacy: true,
        ambiguities,
        other_globals,
        records,
    })
}

use crate::formats::torch::scan::has_zip_end;

/// The five stacked pickles of a legacy file and where the raw storages begin.
pub(super) fn parse_stack(buf: &[u8]) -> std::result::Result<([Pickle; 5], usize), String> {
    let mut pos = 0;
    let mut out = Vec::with_capacity(5);
    for what in [
        "magic number",
        "protocol version",
        "sys_info",
        "main pickle",
        "storage keys",
    ] {
        let (p, n) = pickle::parse_prefix(&buf[pos..], pickle::Limits::default())
            .map_err(|e| format!("{what} (from byte {pos}): {e}"))?;
        out.push(p);
        pos += n;
    }
    Ok((out.try_into().expect("five pickles"), pos))
}

/// What makes loaders read pickle `what` differently (frames the C unpickler reads otherwise),
/// or rewrites imported code (a BUILD into a module or class).
fn read_differently(what: &str, pk: &Pickle) -> Vec<String> {
    let mut v: Vec<String> = pk
        .frame_skips
        .iter()
        .map(|s| format!("{what}: {s}"))
        .collect();
    for &(id, at) in &pk.built_globals {
        if let Some((m, n)) = pk.global(id) {
            v.push(format!(
                "{what}: the BUILD at byte {at} sets the attributes of `{}`, rewriting imported code",
                crate::audit::display_name(m, n)
            ));
        }
    }
    v
}

/// Opens the archive and parses its `data.pkl` (or a legacy file's stacked pickles). The
/// container is decided as torch decides it: a zip when the first four bytes are a zip local
/// header, stacked pickles otherwise.
pub fn read_archive(path: &Path) -> Result<Archive> {
    use crate::formats::torch::scan::{zip_ambiguities, Container};
    let (file, file_len, container) = crate::formats::torch::scan::open(path)?;
    match container {
        Container::Tar => {
            return Err(Error::invalid(
                path,
                "a tar-format checkpoint (torch < 0.4): `weightcast audit` reads its pickles, but \
                 its tensors are not converted (torch.load it with weights_only=False where you trust it, and \
                 torch.save it again)",
            ))
        }
        Container::Stack | Container::Npy => return read_legacy(path, &file, file_len),
        Container::Zip => {}
    }
    let handle = file.try_clone().map_err(|e| Error::io(path, e))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(handle))
        .map_err(|e| crate::formats::torch::scan::zip_error(path, e))?;
    let mut ambiguities = zip_ambiguities(&file, file_len, &mut zip);
    let mut records = HashMap::new();
    let mut prefix: Option<String> = None;
    for i in 0..zip.len() {
        let f = zip
            .by_index_raw(i)
            .map_err(|e| Error::invalid(path, format!("zip entry {i}: {e}")))?;
        let name = f.name().to_string();
        let Some((p, rest)) = name.split_once('/') else {
            return Err(Error::invalid(
                path,
                format!("zip entry `{name}` is not in a folder, as torch.save writes"),
            ));
        };
        let p = format!("{p}/");
        match &prefix {
            None => prefix = Some(p.clone()),
            Some(q) if *q != p => {
                return Err(Error::invalid(
                    path,
                    format!("zip entries under both `{q}` and `{p}`"),
                ))
            }
            _ => {}
        }
        let Some(data_start) = f.data_start() else {
            return Err(Error::invalid(
                path,
                format!("zip entry `{name}`: no data offset"),
            ));
        };
        if data_start
            .checked_add(f.compressed_size())
            .is_none_or(|end| end > file_len)
        {
            return Err(Error::invalid(
                path,
                format!(
                    "zip entry `{name}` runs past the end of the file (byte {data_start} + {} > {file_len}): truncated?",
                    f.compressed_size()
                ),
            ));
        }
        records.insert(
            rest.to_string(),
            Record {
                data_start,
                size: f.size(),
                stored: f.compression() == zip::CompressionMethod::Stored,
            },
        );
    }
    let prefix = prefix.unwrap_or_default();
    let torchscript = records.contains_key("constants.pkl");
    let read_record = |zip: &mut zip::ZipArchive<_>, rest: &str, limit: u64| -> Result<Vec<u8>> {
        crate::formats::torch::scan::read_record(path, zip, &format!("{prefix}{rest}"), limit)
            .map(|(_, buf)| buf)
    };
    if !records.contains_key("data.pkl") {
        return Err(Error::invalid(
            path,
            format!("zip archive has no `{prefix}data.pkl`: not a torch.save checkpoint"),
        ));
    }
    let data = read_record(&mut zip, "data.pkl", MAX_PICKLE)?;
    let pickle =
        pickle::parse(&data).map_err(|e| Error::invalid(path, format!("{prefix}data.pkl: {e}")))?;
    ambiguities.extend(read_differently(&format!("{prefix}data.pkl"), &pickle));
    let big_endian = match records.get("byteorder") {
        Some(_) => read_record(&mut zip, "byteorder", 16)? == b"big",
        None => false,
    };
    Ok(Archive {
        pickle,
        prefix,
        big_endian,
        torchscript,
        legacy: false,
        ambiguities,
        other_globals: vec![],
        records,
    })
}
