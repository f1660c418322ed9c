//! The tokenizer keys `convert_hf_to_gguf.py` writes for a SentencePiece (`tokenizer.model`)
//! vocabulary, and gguf-py's `SpecialVocab` (special token ids, `add_*_token`, the chat
//! template), as vendored by llama-cpp-python 0.3.36.
//!
//! `tokenizer.model` is a protobuf `ModelProto`; only its pieces (field 1: piece, score, type)
//! are read, by a bounded walk over the bytes.

use std::path::Path;

use serde_json::Value as Json;

use crate::catalogue::gguf::Value;
use crate::error::{Error, Result};

/// One SentencePiece piece: its text, score and type (`ModelProto.SentencePiece.Type`).
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    /// Its text.
    pub text: String,
    /// Its score.
    pub score: f32,
    /// NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4, UNUSED 5, BYTE 6.
    pub kind: u64,
}

struct Proto<'a> {
    b: &'a [u8],
    pos: usize,
}

impl Proto<'_> {
    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self.b.get(self.pos)?;
            self.pos += 1;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }

    /// The next field: (number, wire type, its bytes for length-delimited / fixed ones, its
    /// value for varints).
    fn field(&mut self) -> Option<(u64, u64, &[u8], u64)> {
        let key = self.varint()?;
        let (num, wire) = (key >> 3, key & 7);
        let take = |s: &mut Self, n: usize| -> Option<&[u8]> {
            let end = s.pos.checked_add(n).filter(|&e| e <= s.b.len())?;
            let out = &s.b[s.pos..end];
            s.pos = end;
            Some(out)
        };
        match wire {
            0 => {
                let v = self.varint()?;
                Some((num, wire, &[], v))
            }
            1 => take(self, 8).map(|s| (num, wire, s, 0)),
            2 => {
                let n = usize::try_from(self.varint()?).ok()?;
                take(self, n).map(|s| (num, wire, s, 0))
            }
            5 => take(self, 4).map(|s| (num, wire, s, 0)),
            _ => None,
        }
    }
}

/// The pieces of a SentencePiece `tokenizer.model`.
pub fn sentencepiece(path: &Path) -> Result<Vec<Piece>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_sentencepiece(path, &bytes)
}

/// The pieces of a SentencePiece model's bytes (`path` names it in errors).
pub fn parse_sentencepiece(path: &Path, bytes: &[u8]) -> Result<Vec<Piece>> {
    let bad = |pos: usize| {
        Error::invalid(
            path,
            format!("byte {pos}: not a SentencePiece model (protobuf ModelProto)"),
        )
    };
    let mut top = Proto { b: bytes, pos: 0 };
    let mut pieces = Vec::new();
    while top.pos < bytes.len() {
        let at = top.pos;
        let (num, wire, body, _) = top.field().ok_or_else(|| bad(at))?;
        if num != 1 || wire != 2 {
            continue;
        }
        let mut p = Piece {
            text: String::new(),
            score: 0.0,
            kind: 1,
        };
        let mut inner = Proto { b: body, pos: 0 };
        while inner.pos < body.len() {
            let (n, w, s, v) = inner.field().ok_or_else(|| bad(at))?;
            match (n, w) {
                (1, 2) => p.text = String::from_utf8(s.to_vec()).map_err(|_| bad(at))?,
                (2, 5) => p.score = f32::from_le_bytes(s.try_into().expect("4 bytes")),
                (3, 0) => p.kind = v,
                _ => {}
            }
        }
        pieces.push(p);
    }
    if pieces.is_empty() {
        return Err(bad(0));
    }
    Ok(pieces)
}

fn read_json(path: &Path) -> Result<Option<Json>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::invalid(path, format!("not JSON: {e}")))
}

/// `_create_vocab_sentencepiece` + `_set_vocab_sentencepiece`: the tokenizer keys, in order,
/// for a vocabulary of `vocab_size` (`config.json`'s, or the model's own).
pub fn sentencepiece_keys(dir: &Path, vocab_size: Option<u64>) -> Result<Vec<(String, Value)>> {
    let spm = dir.join("tokenizer.model");
    let pieces = sentencepiece(&spm)?;
    let n = vocab_size.unwrap_or(pieces.len() as u64) as usize;
    if n > 1 << 24 {
        return Err(Error::invalid(
            dir.join("config.json"),
            format!("vocab_size {n} is out of range"),
        ));
    }
    let mut tokens: Vec<String> = (0..n).map(|i| format!("[PAD{i}]")).collect();
    let mut scores = vec![-10000.0f32; n];
    let mut types = vec![5i64; n];
    for (i, p) in pieces.iter().enumerate().take(n) {
        tokens[i] = p.text.clone();
        scores[i] = p.score;
        // as the converter asks SentencePieceProcessor: unknown, control, unused, byte; any
        // other piece (user-defined too) is normal
        types[i] = match p.kind {
            2 | 3 | 5 | 6 => p.kind as i64,
            _ => 1,
        };
    }
    if dir.join("added_tokens.json").is_file() {
        return Err(Error::usage(format!(
            "{}: added_tokens.json is not supported for a GGUF output yet",
            dir.display()
        )));
    }
    if let Some(tc) = read_json(&dir.join("tokenizer_config.json"))? {
        if let Some(Json::Object(decoder)) = tc.get("added_tokens_decoder") {
            if !decoder.is_empty() {
                return Err(Error::usage(format!(
                    "{}: tokenizer_config.json's added_tokens_decoder is not supported for a GGUF output yet",
                    dir.display()
                )));
            }
        }
    }
    let mut kv = vec![
        (
            "tokenizer.ggml.model".to_string(),
            Value::Str("llama".into()),
        ),
        (
            "tokenizer.ggml.pre".to_string(),
            Value::Str("default".into()),
        ),
        (
            "tokenizer.ggml.tokens".to_string(),
            Value::Array("string", tokens.into_iter().map(Value::Str).collect()),
        ),
        (
            "tokenizer.ggml.scores".to_string(),
            Value::Array("float32", scores.into_iter().map(Value::F32).collect()),
        ),
        (
            "tokenizer.ggml.token_type".to_string(),
            Value::Array(
                "int32",
                types.into_iter().map(|t| Value::I(t, "int32")).collect(),
            ),
        ),
    ];
    kv.extend(special_vocab(dir, Some(n as u64))?);
    Ok(kv)
}

const SPECIAL: [&str; 7] = ["bos", "eos", "unk", "sep", "pad", "cls", "mask"];

/// The GGUF key of a special token id (`cls` has none: gguf-py skips it).
fn id_key(typ: &str) -> Option<&'static str> {
    Some(match typ {
        "bos" => "tokenizer.ggml.bos_token_id",
        "eos" => "tokenizer.ggml.eos_token_id",
        "unk" => "tokenizer.ggml.unknown_token_id",
        "sep" => "tokenizer.ggml.seperator_token_id",
        "pad" => "tokenizer.ggml.padding_token_id",
        "mask" => "tokenizer.ggml.mask_token_id",
        _ => return None,
    })
}

fn add_key(typ: &str) -> Option<&'static str> {
    Some(match typ {
        "bos" => "tokenizer.ggml.add_bos_token",
        "eos" => "tokenizer.ggml.add_eos_token",
        "sep" => "tokenizer.ggml.add_sep_token",
        _ => return None,
    })
}

/// Python's truthiness of a JSON value.
fn truthy(v: Option<&Json>) -> bool {
    match v {
        None | Some(Json::Null) | Some(Json::Bool(false)) => false,
        Some(Json::String(s)) => !s.is_empty(),
        Some(Json::Object(o)) => !o.is_empty(),
        Some(Json::Array(a)) => !a.is_empty(),
        Some(Json::Number(n)) => n.as_f64() != Some(0.0),
        Some(_) => true,
    }
}

/// `processor['single'|'pair'][k]['SpecialToken']['id']` and `['Sequence']['id']`.
fn tmpl_id<'a>(item: Option<&'a Json>, kind: &str) -> Option<&'a Json> {
    item?.get(kind)?.get("id").filter(|v| truthy(Some(v)))
}

/// What `SpecialVocab._try_load_from_tokenizer_json` reads from a tokenizer.json
/// post-processor: `add_*_token` (in order) and the special tokens it fills into the tokenizer
/// config.
fn post_processor(
    dir: &Path,
    pp: &Json,
    tc: &mut Option<serde_json::Map<String, Json>>,
    adds: &mut Vec<(&'static str, bool)>,
) -> Result<()> {
    let get = |tc: &Option<serde_json::Map<String, Json>>, k: &str| {
        tc.as_ref().and_then(|t| t.get(k)).cloned()
    };
    let mut st = Specials {
        bos: get(tc, "bos_token"),
        cls: get(tc, "cls_token"),
        eos: get(tc, "eos_token"),
        sep: get(tc, "sep_token"),
        has_tc: tc.as_ref().is_some_and(|t| !t.is_empty()),
    };
    if !truthy(st.bos.as_ref()) && truthy(st.cls.as_ref()) && st.has_tc {
        st.bos = st.cls.clone();
        tc.as_mut()
            .expect("tc")
            .insert("bos_token".into(), st.bos.clone().expect("cls"));
    }
    if !truthy(st.eos.as_ref()) && truthy(st.sep.as_ref()) && st.has_tc {
        st.eos = st.sep.clone();
        tc.as_mut()
            .expect("tc")
            .insert("eos_token".into(), st.eos.clone().expect("sep"));
    }
    let single = vec![pp.clone()];
    let procs = pp
        .get("processors")
        .and_then(Json::as_array)
        .unwrap_or(&single);
    for proc_ in procs {
        match proc_.get("type").and_then(Json::as_str) {
            Some("ByteLevel") => {
                for typ in ["bos", "eos"] {
                    if !adds.iter().any(|(t, _)| *t == typ) {
                        adds.push((typ, false));
                    }
                }
            }
            Some("TemplateProcessing") => template(dir, proc_, &mut st, tc, adds)?,
            Some("RobertaProcessing") => {
                return Err(Error::usage(format!(
                "{}: tokenizer.json's RobertaProcessing is not supported for a .gguf output yet",
                dir.display()
            )))
            }
            _ => {}
        }
    }
    Ok(())
}

/// The special tokens a tokenizer config names, as `_try_load_from_tokenizer_json` tracks them.
struct Specials {
    bos: Option<Json>,
    cls: Option<Json>,
    eos: Option<Json>,
    sep: Option<Json>,
    /// The tokenizer config exists and is not empty.
    has_tc: bool,
}

fn set_add(adds: &mut Vec<(&'static str, bool)>, typ: &'static str, v: bool) {
    match adds.iter_mut().find(|(t, _)| *t == typ) {
        Some(slot) => slot.1 = v,
        None => adds.push((typ, v)),
    }
}

/// A `TemplateProcessing` post-processor: `add_bos`/`add_eos` from its single template,
/// `add_sep` from its pair template (the converter's "crude parsing").
fn template(
    dir: &Path,
    proc_: &Json,
    st: &mut Specials,
    tc: &mut Option<serde_json::Map<String, Json>>,
    adds: &mut Vec<(&'static str, bool)>,
) -> Result<()> {
    let empty = vec![];
    let single = proc_
        .get("single")
        .and_then(Json::as_array)
        .unwrap_or(&empty);
    let pair = proc_.get("pair").and_then(Json::as_array).unwrap_or(&empty);
    let (mut first, mut last) = (None, None);
    if single.len() > 1 {
        if let Some(f) = tmpl_id(single.first(), "SpecialToken") {
            first = Some(f.clone());
            if !st.has_tc {
                st.bos = Some(f.clone());
            } else if st.bos.as_ref() != Some(f) && st.cls.as_ref() != Some(f) {
                if !truthy(st.bos.as_ref()) {
                    st.bos = Some(f.clone());
                    tc.as_mut()
                        .expect("tc")
                        .insert("bos_token".into(), f.clone());
                }
                if !truthy(st.cls.as_ref()) {
                    st.cls = Some(f.clone());
                    tc.as_mut()
                        .expect("tc")
                        .insert("cls_token".into(), f.clone());
                }
            }
            let on = st.bos.as_ref() == Some(f) || st.cls.as_ref() == Some(f);
            set_add(adds, "bos", on);
        }
        if let Some(l) = tmpl_id(single.last(), "SpecialToken") {
            last = Some(l.clone());
            if !st.has_tc {
                st.eos = Some(l.clone());
            } else if st.eos.as_ref() != Some(l) {
                return Err(Error::usage(format!(
                    "{}: a tokenizer.json template ending in another token than the \
                     EOS token is not supported for a .gguf output yet",
                    dir.display()
                )));
            }
            set_add(adds, "eos", st.eos.as_ref() == Some(l));
        }
    }
    if !pair.is_empty() {
        let start =
            usize::from(first.is_some() && tmpl_id(pair.first(), "SpecialToken") == first.as_ref());
        let stop =
            usize::from(last.is_some() && tmpl_id(pair.last(), "SpecialToken") == last.as_ref());
        let inner = pair
            .get(start..pair.len().saturating_sub(stop))
            .unwrap_or(&[]);
        let a = tmpl_id(inner.first(), "Sequence").and_then(Json::as_str);
        let b = tmpl_id(inner.last(), "Sequence").and_then(Json::as_str);
        if a == Some("A") && b == Some("B") && inner.len() > 2 {
            let mid = &inner[1..inner.len() - 1];
            let is_sep =
                |e: Option<&Json>| e.is_some() && (e == st.sep.as_ref() || e == st.eos.as_ref());
            let mut add_sep = false;
            let e0 = tmpl_id(mid.first(), "SpecialToken");
            if is_sep(e0) && last.is_none() {
                add_sep = true;
            }
            if mid.len() == 2 && is_sep(tmpl_id(mid.get(1), "SpecialToken")) {
                add_sep = true;
            }
            set_add(adds, "sep", add_sep);
            if add_sep && !truthy(st.sep.as_ref()) && st.has_tc {
                if let Some(e) = st.eos.clone() {
                    tc.as_mut().expect("tc").insert("sep_token".into(), e);
                }
            }
        }
    }
    Ok(())
}

/// `SpecialVocab._parse_normalizer`: (lowercase, strip_accents).
fn normalizer(n: &Json, out: &mut (Option<bool>, Option<bool>)) {
    match n.get("type").and_then(Json::as_str) {
        Some("Lowercase") => out.0 = Some(true),
        Some("StripAccents") => out.1 = Some(true),
        Some("BertNormalizer") => {
            if let Some(v) = n.get("lowercase") {
                out.0 = v.as_bool();
            }
            if let Some(v) = n.get("strip_accents") {
                out.1 = v.as_bool();
            }
        }
        Some("Sequence") => {
            for m in n
                .get("normalizers")
                .and_then(Json::as_array)
                .into_iter()
                .flatten()
            {
                normalizer(m, out);
            }
        }
        _ => {}
    }
}

/// The chat template: `tokenizer_config.json`'s, else `chat_template.jinja`'s or
/// `chat_template.json`'s.
fn chat_template(dir: &Path, tc: &serde_json::Map<String, Json>) -> Result<Option<String>> {
    let jinja = dir.join("chat_template.jinja");
    let alt = if jinja.is_file() {
        if dir.join("additional_chat_templates").is_dir() {
            return Err(Error::usage(format!(
                "{}: additional chat templates are not supported for a GGUF output yet",
                dir.display()
            )));
        }
        Some(Json::String(
            std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?,
        ))
    } else {
        read_json(&dir.join("chat_template.json"))?.and_then(|j| j.get("chat_template").cloned())
    };
    match tc.get("chat_template").cloned().or(alt) {
        Some(Json::String(s)) => Ok(Some(s)),
        Some(Json::Array(_)) => Err(Error::usage(format!(
            "{}: a list of chat templates is not supported for a GGUF output yet",
            dir.display()
        ))),
        _ => Ok(None),
    }
}

/// gguf-py's `SpecialVocab(dir, n_vocab=...)` then `add_to_gguf` (no merges): special ids from
/// `tokenizer_config.json` (through `tokenizer.json`'s added tokens) then `config.json`,
/// `add_*_token` from tokenizer.json's post-processor and the tokenizer config, the chat
/// template, the normalizer's lowercase and strip-accents flags.
pub fn special_vocab(dir: &Path, n_vocab: Option<u64>) -> Result<Vec<(String, Value)>> {
    let tok = read_json(&dir.join("tokenizer.json"))?;
    let mut tc: Option<serde_json::Map<String, Json>> =
        read_json(&dir.join("tokenizer_config.json"))?.and_then(|j| match j {
            Json::Object(o) => Some(o),
            _ => None,
        });
    let mut adds: Vec<(&str, bool)> = vec![];
    let mut norm = (None, None);
    let mut added: Vec<Json> = vec![];
    if let Some(t) = &tok {
        if let Some(n) = t.get("normalizer").filter(|n| truthy(Some(n))) {
            normalizer(n, &mut norm);
        }
        added = t
            .get("added_tokens")
            .and_then(Json::as_array)
            .cloned()
            .unwrap_or_default();
        if let Some(pp) = t.get("post_processor").filter(|p| truthy(Some(p))) {
            post_processor(dir, pp, &mut tc, &mut adds)?;
        }
    }
    let mut ids: Vec<(&str, u64)> = vec![];
    let set = |ids: &mut Vec<(&'static str, u64)>, typ: &'static str, v: Option<&Json>| {
        let Some(id) = v.and_then(Json::as_i64) else {
            return Ok(());
        };
        if id < 0 {
            return Err(Error::invalid(
                dir,
                format!("invalid value for special token type {typ}: {id}"),
            ));
        }
        if n_vocab.is_none_or(|n| (id as u64) < n) && !ids.iter().any(|(t, _)| *t == typ) {
            ids.push((typ, id as u64));
        }
        Ok(())
    };
    let mut chat: Option<String> = None;
    if let Some(tc) = tc.filter(|tc| !tc.is_empty()) {
        chat = chat_template(dir, &tc)?;
        for typ in SPECIAL {
            if let Some(Json::Bool(b)) = tc.get(&format!("add_{typ}_token")) {
                if !adds.iter().any(|(t, _)| *t == typ) {
                    adds.push((typ, *b));
                }
            }
            let content = match tc.get(&format!("{typ}_token")) {
                Some(Json::String(s)) => s.clone(),
                Some(Json::Object(o)) => match o.get("content") {
                    Some(Json::String(s)) => s.clone(),
                    _ => continue,
                },
                _ => continue,
            };
            let id = added
                .iter()
                .find(|a| a.get("content").and_then(Json::as_str) == Some(&content))
                .and_then(|a| a.get("id"));
            set(&mut ids, typ, id)?;
        }
    }
    if let Some(cfg) = read_json(&dir.join("config.json"))? {
        for typ in SPECIAL {
            let key = format!("{typ}_token_id");
            let v = cfg
                .get(&key)
                .filter(|v| !v.is_null())
                .or_else(|| cfg.get("text_config").and_then(|t| t.get(&key)));
            set(&mut ids, typ, v)?;
        }
    }
    let mut kv = vec![];
    for (typ, id) in ids {
        if let Some(k) = id_key(typ) {
            kv.push((k.to_string(), Value::U(id, "uint32")));
        }
    }
    for (typ, b) in adds {
        if let Some(k) = add_key(typ) {
            kv.push((k.to_string(), Value::Bool(b)));
        }
    }
    if let Some(c) = chat {
        kv.push(("tokenizer.chat_template".to_string(), Value::Str(c)));
    }
    if let Some(b) = norm.0 {
        kv.push(("tokenizer.ggml.normalizer.lowercase".into(), Value::Bool(b)));
    }
    if let Some(b) = norm.1 {
        kv.push((
            "tokenizer.ggml.normalizer.strip_accents".into(),
            Value::Bool(b),
        ));
    }
    Ok(kv)
}

fn varint(b: &mut Vec<u8>, mut v: u64) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            b.push(byte);
            return;
        }
        b.push(byte | 0x80);
    }
}

fn field_bytes(b: &mut Vec<u8>, num: u64, bytes: &[u8]) {
    varint(b, num << 3 | 2);
    varint(b, bytes.len() as u64);
    b.extend_from_slice(bytes);
}

fn field_varint(b: &mut Vec<u8>, num: u64, v: u64) {
    varint(b, num << 3);
    varint(b, v);
}

/// A SentencePiece `ModelProto` of `pieces`: BPE (the algorithm llama.cpp's SPM tokenizer
/// runs over the scores), the special ids, byte fallback when there are byte pieces, and the
/// normalizer llama.cpp applies (no normalization, a dummy prefix as `add_space_prefix` says,
/// spaces escaped, repeated whitespace kept).
pub fn sentencepiece_model(pieces: &[Piece], ids: [i64; 4], add_dummy_prefix: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for p in pieces {
        let mut m = Vec::new();
        field_bytes(&mut m, 1, p.text.as_bytes());
        varint(&mut m, 2 << 3 | 5);
        m.extend(p.score.to_le_bytes());
        field_varint(&mut m, 3, p.kind);
        field_bytes(&mut out, 1, &m);
    }
    let mut trainer = Vec::new();
    field_varint(&mut trainer, 3, 2);
    if pieces.iter().any(|p| p.kind == 6) {
        field_varint(&mut trainer, 35, 1);
    }
    for (num, id) in (40..44).zip(ids) {
        // int32: a negative id is its 64-bit two's complement
        field_varint(&mut trainer, num, id as u64);
    }
    field_bytes(&mut out, 2, &trainer);
    let mut norm = Vec::new();
    field_bytes(&mut norm, 1, b"identity");
    field_varint(&mut norm, 3, add_dummy_prefix as u64);
    field_varint(&mut norm, 4, 0);
    field_varint(&mut norm, 5, 1);
    field_bytes(&mut out, 3, &norm);
    out
}

/// A file to write: its name and bytes.
pub type NamedFile = (&'static str, Vec<u8>);

/// The tokenizer files of a GGUF file's SentencePiece vocabulary (`tokenizer.ggml.model` =
/// `llama`): `tokenizer.model` and `tokenizer_config.json`; `None` for other vocabularies.
pub fn tokenizer_files(
    doc: &crate::catalogue::gguf::GgufDoc,
    arch: &str,
) -> Result<Option<Vec<NamedFile>>> {
    match doc.get("tokenizer.ggml.model") {
        Some(Value::Str(m)) if m == "llama" => spm_files(doc),
        Some(Value::Str(m)) if m == "gpt2" && matches!(arch, "qwen2" | "qwen3") => {
            Ok(Some(bpe_files(doc)))
        }
        _ => Ok(None),
    }
}

/// A GGUF file's byte-level BPE vocabulary as the files `Qwen2Tokenizer` loads: `vocab.json`,
/// `merges.txt` and `tokenizer_config.json` with the control tokens as special added tokens
/// and the user-defined ones as plain added tokens (as transformers' GGUF tokenizer adds them).
fn bpe_files(doc: &crate::catalogue::gguf::GgufDoc) -> Vec<NamedFile> {
    let strs = |key: &str| -> Vec<String> {
        match doc.get(key) {
            Some(Value::Array(_, items)) => items
                .iter()
                .map(|v| match v {
                    Value::Str(s) => s.clone(),
                    _ => String::new(),
                })
                .collect(),
            _ => vec![],
        }
    };
    let tokens = strs("tokenizer.ggml.tokens");
    let types: Vec<i64> = match doc.get("tokenizer.ggml.token_type") {
        Some(Value::Array(_, t)) => t
            .iter()
            .map(|v| match v {
                Value::I(k, _) => *k,
                _ => 1,
            })
            .collect(),
        _ => vec![],
    };
    let mut vocab = serde_json::Map::new();
    for (i, t) in tokens.iter().enumerate() {
        vocab.entry(t.clone()).or_insert(Json::from(i));
    }
    let mut merges = String::from("#version: 0.2\n");
    for m in strs("tokenizer.ggml.merges") {
        merges.push_str(&m);
        merges.push('\n');
    }
    let mut added = serde_json::Map::new();
    for (i, (t, ty)) in tokens.iter().zip(&types).enumerate() {
        if *ty == 3 || *ty == 4 {
            added.insert(
                i.to_string(),
                serde_json::json!({"content": t, "lstrip": false, "normalized": false,
                                   "rstrip": false, "single_word": false, "special": *ty == 3}),
            );
        }
    }
    let mut tc = tokenizer_config(doc, &tokens, "Qwen2Tokenizer", false);
    tc.insert("add_prefix_space".into(), false.into());
    tc.insert("errors".into(), "replace".into());
    tc.insert("added_tokens_decoder".into(), Json::Object(added));
    vec![
        ("vocab.json", json_bytes(&Json::Object(vocab))),
        ("merges.txt", merges.into_bytes()),
        ("tokenizer_config.json", json_bytes(&Json::Object(tc))),
    ]
}

fn json_bytes(v: &Json) -> Vec<u8> {
    let mut s = serde_json::to_string_pretty(v).expect("JSON");
    s.push('\n');
    s.into_bytes()
}

/// `tokenizer_config.json`: its class, `add_bos_token`/`add_eos_token` (GGUF's, else
/// `add_bos`), the special tokens by their ids, the chat template.
fn tokenizer_config(
    doc: &crate::catalogue::gguf::GgufDoc,
    tokens: &[String],
    class: &str,
    add_bos: bool,
) -> serde_json::Map<String, Json> {
    let flag = |key: &str| match doc.get(key) {
        Some(Value::Bool(b)) => Some(*b),
        _ => None,
    };
    let id = |key: &str| match doc.get(key) {
        Some(Value::U(v, _)) => usize::try_from(*v).ok(),
        Some(Value::I(v, _)) => usize::try_from(*v).ok(),
        _ => None,
    };
    let mut tc = serde_json::Map::new();
    tc.insert("tokenizer_class".into(), class.into());
    tc.insert(
        "add_bos_token".into(),
        flag("tokenizer.ggml.add_bos_token")
            .unwrap_or(add_bos)
            .into(),
    );
    tc.insert(
        "add_eos_token".into(),
        flag("tokenizer.ggml.add_eos_token").unwrap_or(false).into(),
    );
    for (name, key) in [
        ("bos_token", "tokenizer.ggml.bos_token_id"),
        ("eos_token", "tokenizer.ggml.eos_token_id"),
        ("unk_token", "tokenizer.ggml.unknown_token_id"),
        ("pad_token", "tokenizer.ggml.padding_token_id"),
    ] {
        if let Some(t) = id(key).and_then(|i| tokens.get(i)) {
            tc.insert(name.into(), t.clone().into());
        }
    }
    if let Some(Value::Str(c)) = doc.get("tokenizer.chat_template") {
        tc.insert("chat_template".into(), c.clone().into());
    }
    tc
}

/// A GGUF file's SentencePiece vocabulary as `tokenizer.model` and `tokenizer_config.json`.
fn spm_files(doc: &crate::catalogue::gguf::GgufDoc) -> Result<Option<Vec<NamedFile>>> {
    let Some(Value::Array(_, tokens)) = doc.get("tokenizer.ggml.tokens") else {
        return Ok(None);
    };
    let scores = match doc.get("tokenizer.ggml.scores") {
        Some(Value::Array(_, s)) => s.clone(),
        _ => vec![],
    };
    let types = match doc.get("tokenizer.ggml.token_type") {
        Some(Value::Array(_, t)) => t.clone(),
        _ => vec![],
    };
    let pieces: Vec<Piece> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| Piece {
            text: match t {
                Value::Str(s) => s.clone(),
                _ => String::new(),
            },
            score: match scores.get(i) {
                Some(Value::F32(f)) => *f,
                _ => 0.0,
            },
            kind: match types.get(i) {
                Some(Value::I(k, _)) if (1..=6).contains(k) => *k as u64,
                _ => 1,
            },
        })
        .collect();
    let id = |key: &str| match doc.get(key) {
        Some(Value::U(v, _)) => Some(*v as i64),
        Some(Value::I(v, _)) => Some(*v),
        _ => None,
    };
    let (unk, bos, eos, pad) = (
        id("tokenizer.ggml.unknown_token_id"),
        id("tokenizer.ggml.bos_token_id"),
        id("tokenizer.ggml.eos_token_id"),
        id("tokenizer.ggml.padding_token_id"),
    );
    let unk_or_first = unk.or_else(|| pieces.iter().position(|p| p.kind == 2).map(|i| i as i64));
    let flag = |key: &str| match doc.get(key) {
        Some(Value::Bool(b)) => Some(*b),
        _ => None,
    };
    let model = sentencepiece_model(
        &pieces,
        [
            unk_or_first.unwrap_or(0),
            bos.unwrap_or(-1),
            eos.unwrap_or(-1),
            pad.unwrap_or(-1),
        ],
        flag("tokenizer.ggml.add_space_prefix").unwrap_or(true),
    );
    let texts: Vec<String> = pieces.iter().map(|p| p.text.clone()).collect();
    let tc = tokenizer_config(doc, &texts, "LlamaTokenizer", true);
    let config = String::from_utf8(json_bytes(&Json::Object(tc))).expect("UTF-8");
    Ok(Some(vec![
        ("tokenizer.model", model),
        ("tokenizer_config.json", config.into_bytes()),
    ]))
}

/// A WordPiece or BPE vocabulary as the converter's `get_vocab_base` lists it.
pub struct WordPiece {
    /// Tokens by id (`[PAD{i}]` for ids the vocabulary lacks).
    pub tokens: Vec<String>,
    /// Their types: NORMAL 1, CONTROL 3 (special added tokens), USER_DEFINED 4, UNUSED 5.
    pub types: Vec<i64>,
    /// The pre-tokenizer's name (`get_vocab_base_pre`).
    pub pre: String,
}

/// `does_token_look_special`.
fn looks_special(t: &str) -> bool {
    matches!(t, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (t.starts_with("<|") && t.ends_with("|>"))
        || (t.starts_with("<\u{ff5c}") && t.ends_with("\u{ff5c}>"))
        || (t.starts_with("<unused") && t.ends_with('>'))
}

/// The vocabulary of a folder's `tokenizer.json` (a `kind` model: `WordPiece`, `BPE`) for
/// `vocab_size` ids, as `get_vocab_base` lists it.
pub fn vocab_base(dir: &Path, vocab_size: Option<u64>, kind: &str) -> Result<WordPiece> {
    let path = dir.join("tokenizer.json");
    let tok = read_json(&path)?.ok_or_else(|| {
        Error::usage(format!(
            "{}: no tokenizer.json: a .gguf output of this folder needs it",
            dir.display()
        ))
    })?;
    let model = tok.get("model").cloned().unwrap_or(Json::Null);
    if model.get("type").and_then(Json::as_str) != Some(kind) {
        return Err(Error::usage(format!(
            "{}: a .gguf output of this folder needs a {kind} tokenizer",
            path.display()
        )));
    }
    let mut by_id: std::collections::BTreeMap<u64, String> = Default::default();
    for (t, id) in model
        .get("vocab")
        .and_then(Json::as_object)
        .into_iter()
        .flatten()
    {
        let id = id
            .as_u64()
            .ok_or_else(|| Error::invalid(&path, format!("token `{t}`: id is not a number")))?;
        by_id.insert(id, t.clone());
    }
    // added tokens: (id -> special)
    let mut added: std::collections::BTreeMap<u64, bool> = Default::default();
    for a in tok
        .get("added_tokens")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
    {
        let (Some(id), Some(content)) = (
            a.get("id").and_then(Json::as_u64),
            a.get("content").and_then(Json::as_str),
        ) else {
            continue;
        };
        let special = a.get("special").and_then(Json::as_bool).unwrap_or(false);
        let normalized = a
            .get("normalized")
            .and_then(Json::as_bool)
            .unwrap_or(!special);
        if !special && !normalized {
            return Err(Error::usage(format!(
                "{}: added token `{content}` (not special, not normalized) is not supported for \
                 a .gguf output yet",
                path.display()
            )));
        }
        by_id.insert(id, content.to_string());
        added.insert(id, special);
    }
    let n = vocab_size.unwrap_or(by_id.len() as u64);
    if by_id.keys().next_back().is_some_and(|&m| m >= n) || n > 1 << 24 {
        return Err(Error::invalid(
            &path,
            format!("token ids reach past the vocabulary size {n}"),
        ));
    }
    let mut tokens = Vec::with_capacity(n as usize);
    let mut types = Vec::with_capacity(n as usize);
    for i in 0..n {
        match by_id.get(&i) {
            None => {
                tokens.push(format!("[PAD{i}]"));
                types.push(5);
            }
            Some(t) => {
                let ty = match added.get(&i) {
                    Some(&special) if special || looks_special(t) => 3,
                    Some(_) => 4,
                    None => 1,
                };
                tokens.push(if ty == 4 {
                    t.replace('\u{2581}', " ")
                } else {
                    t.clone()
                });
                types.push(ty);
            }
        }
    }
    Ok(WordPiece {
        tokens,
        types,
        pre: pre_tokenizer(&path)?,
    })
}

/// The merges of a BPE `tokenizer.json`, as `SpecialVocab(load_merges=True)` lists them: a pair
/// joined by a space, a space inside a part written as U+0120.
pub fn merges(dir: &Path) -> Result<Vec<String>> {
    let path = dir.join("tokenizer.json");
    let tok = read_json(&path)?.unwrap_or(Json::Null);
    let list = tok
        .get("model")
        .and_then(|m| m.get("merges"))
        .and_then(Json::as_array)
        .cloned()
        .unwrap_or_default();
    let bad = || Error::invalid(&path, "unknown tokenizer merges format");
    list.iter()
        .map(|m| match m {
            Json::String(s) => Ok(s.clone()),
            Json::Array(pair) if pair.len() == 2 => {
                let part = |v: &Json| {
                    v.as_str()
                        .map(|p| p.replace(' ', "\u{120}"))
                        .ok_or_else(bad)
                };
                Ok(format!("{} {}", part(&pair[0])?, part(&pair[1])?))
            }
            _ => Err(bad()),
        })
        .collect()
}

/// `get_vocab_base_pre`: llama.cpp's name for the tokenizer, found by the sha256 of the ids it
/// gives a fixed text (with special tokens, untruncated).
#[cfg(feature = "tokenizer")]
fn pre_tokenizer(path: &Path) -> Result<String> {
    let mut t = tokenizers::Tokenizer::from_file(path)
        .map_err(|e| Error::invalid(path, format!("not a tokenizer: {e}")))?;
    t.with_truncation(None)
        .map_err(|e| Error::invalid(path, format!("{e}")))?;
    t.with_padding(None);
    let enc = t
        .encode(super::pre_hashes::CHKTXT, true)
        .map_err(|e| Error::invalid(path, format!("cannot tokenize: {e}")))?;
    let ids: Vec<String> = enc.get_ids().iter().map(|i| i.to_string()).collect();
    let text = format!("[{}]", ids.join(", "));
    let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    let hash: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    super::pre_hashes::PRE_HASHES
        .iter()
        .rev()
        .find(|(h, _)| *h == hash)
        .map(|(_, name)| name.to_string())
        .ok_or_else(|| {
            Error::usage(format!(
                "{}: llama.cpp does not know this pre-tokenizer (chkhsh {hash})",
                path.display()
            ))
        })
}

#[cfg(not(feature = "tokenizer"))]
fn pre_tokenizer(path: &Path) -> Result<String> {
    Err(Error::usage(format!(
        "{}: naming the tokenizer for llama.cpp runs it: this build has no tokenizer (the \
         weightcast command has)",
        path.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentencepiece_round_trip_and_bad_bytes() {
        let pieces = vec![
            Piece {
                text: "<unk>".into(),
                score: 0.0,
                kind: 2,
            },
            Piece {
                text: "<s>".into(),
                score: 0.0,
                kind: 3,
            },
            Piece {
                text: "\u{2581}t".into(),
                score: -1.5,
                kind: 1,
            },
            Piece {
                text: "<0x0A>".into(),
                score: 0.0,
                kind: 6,
            },
        ];
        let bytes = sentencepiece_model(&pieces, [0, 1, -1, -1], true);
        let p = Path::new("t.model");
        assert_eq!(parse_sentencepiece(p, &bytes).unwrap(), pieces);
        // every truncation and a sweep of corrupted bytes: an error or pieces, never a panic
        for n in 0..bytes.len() {
            let _ = parse_sentencepiece(p, &bytes[..n]);
        }
        let mut x = 0x9E37_79B9u32;
        for _ in 0..2000 {
            let mut b = bytes.clone();
            for _ in 0..4 {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let i = x as usize % b.len();
                b[i] = (x >> 8) as u8;
            }
            let _ = parse_sentencepiece(p, &b);
        }
        assert!(parse_sentencepiece(p, b"").is_err());
        assert!(parse_sentencepiece(p, &[0x0a, 0xff, 0xff, 0xff]).is_err());
    }
}
