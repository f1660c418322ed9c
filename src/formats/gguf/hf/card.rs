//! The authorship keys `convert_hf_to_gguf.py` writes (`general.name`, `license`, `tags`,
//! `datasets`...): gguf-py's `Metadata.load` (llama-cpp-python 0.3.36) without an override
//! file: a `README.md` model card's YAML front matter first, then `config.json`'s
//! `_name_or_path`, then the folder's name; and `set_gguf_meta_model`, which writes them.
//!
//! The front matter is read by PyYAML there (YAML 1.1) and by `yaml-rust2` here (YAML 1.2): a
//! value this port uses that the two would type differently (`yes`, `on`, a date, `1e3`, a
//! number where a string goes) is refused by name rather than written differently.

use std::path::Path;

use regex::Regex;
use std::sync::LazyLock;
use yaml_rust2::{Yaml, YamlLoader};

use super::naming::{id_to_title, model_id_components, rounded_count};
use crate::catalogue::gguf::Value;
use crate::error::{Error, Result};

/// The keys of a base model or dataset entry `set_gguf_meta_model` writes, in its order.
const ENTRY_KEYS: [&str; 9] = [
    "name",
    "author",
    "version",
    "organization",
    "description",
    "url",
    "doi",
    "uuid",
    "repo_url",
];

/// A base model or dataset entry: its keys (`name`, `organization`, `repo_url`...) in the order
/// they were set.
type Entry = Vec<(String, String)>;

/// What `Metadata` holds after its heuristics.
#[derive(Debug, Default)]
pub struct Authorship {
    name: Option<String>,
    author: Option<String>,
    version: Option<String>,
    organization: Option<String>,
    finetune: Option<String>,
    basename: Option<String>,
    description: Option<String>,
    size_label: Option<String>,
    license: Option<String>,
    license_name: Option<String>,
    license_link: Option<String>,
    source_url: Option<String>,
    source_doi: Option<String>,
    source_uuid: Option<String>,
    source_repo_url: Option<String>,
    base_models: Option<Vec<Entry>>,
    datasets: Option<Vec<Entry>>,
    tags: Option<Vec<String>>,
    languages: Option<Vec<String>>,
}

/// PyYAML's implicit resolvers for what is not a string (bool, int, float, null, timestamp).
static YAML11: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(concat!(
        r"^(?:yes|Yes|YES|no|No|NO|true|True|TRUE|false|False|FALSE|on|On|ON|off|Off|OFF",
        r"|[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?",
        r"|[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)",
        r"|[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+",
        r"|[-+]?[1-9][0-9_]*(?::[0-5]?[0-9])+|~|null|Null|NULL|",
        r"|[0-9]{4}-[0-9]{2}-[0-9]{2}",
        r"|[0-9]{4}-[0-9]{1,2}-[0-9]{1,2}(?:[Tt]|[ \t]+)[0-9]{1,2}:[0-9]{2}:[0-9]{2}",
        r"(?:\.[0-9]*)?(?:[ \t]*(?:Z|[-+][0-9]{1,2}(?::[0-9]{2})?))?)$"
    ))
    .expect("regex")
});

/// Python's `str.splitlines()` for the line breaks a model card has.
fn splitlines(s: &str) -> Vec<&str> {
    let mut out = vec![];
    let mut rest = s;
    while !rest.is_empty() {
        match rest.find(['\n', '\r']) {
            Some(i) => {
                out.push(&rest[..i]);
                let skip = if rest[i..].starts_with("\r\n") { 2 } else { 1 };
                rest = &rest[i + skip..];
            }
            None => {
                out.push(rest);
                break;
            }
        }
    }
    out
}

/// `Metadata.load_model_card`: the front matter of `README.md` as YAML (with the converter's
/// two text fixes), or `None` without one.
fn load(dir: &Path) -> Result<Option<(Yaml, String)>> {
    let path = dir.join("README.md");
    if !path.is_file() {
        return Ok(None);
    }
    let content = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let lines = splitlines(&content);
    if lines.first() != Some(&"---") {
        return Ok(None);
    }
    let body: Vec<&str> = lines[1..]
        .iter()
        .take_while(|l| **l != "---")
        .copied()
        .collect();
    let text = format!("{}\n", body.join("\n"))
        .replace("- no\n", "- \"no\"\n")
        .replace('\t', "  ");
    // aliases are expanded by copying: nested ones grow without bound (a "billion laughs"
    // card), so a card with any is refused before it is loaded
    struct Aliases(usize);
    impl yaml_rust2::parser::EventReceiver for Aliases {
        fn on_event(&mut self, ev: yaml_rust2::Event) {
            if matches!(ev, yaml_rust2::Event::Alias(_)) {
                self.0 += 1;
            }
        }
    }
    let bad =
        |e: yaml_rust2::ScanError| Error::invalid(&path, format!("model card front matter: {e}"));
    let mut aliases = Aliases(0);
    yaml_rust2::parser::Parser::new_from_str(&text)
        .load(&mut aliases, true)
        .map_err(bad)?;
    if aliases.0 > 0 {
        return Err(Error::usage(format!(
            "{}: model card front matter with YAML aliases is not carried into a .gguf output",
            path.display()
        )));
    }
    let docs = YamlLoader::load_from_str(&text).map_err(bad)?;
    Ok(docs.into_iter().next().map(|d| (d, text)))
}

/// A model card value this port uses, as a string: refused when YAML 1.1 would type it
/// otherwise (`no` in a list is the converter's own fix, quoted).
fn text(path: &Path, key: &str, v: &Yaml, in_list: bool, src: &str) -> Result<String> {
    let refuse = |what: String| {
        Err(Error::usage(format!(
            "{}: model card `{key}`: {what}: not carried into a .gguf output (llama.cpp's \
             converter reads it as YAML 1.1)",
            path.display()
        )))
    };
    match v {
        Yaml::String(s) if in_list && s == "no" && src.contains("- \"no\"\n") => Ok(s.clone()),
        Yaml::String(s) if YAML11.is_match(s) => refuse(format!("`{s}` is no string there")),
        Yaml::String(s) => Ok(s.clone()),
        other => refuse(format!("{other:?} is not a string")),
    }
}

fn get<'a>(card: &'a Yaml, key: &str) -> Option<&'a Yaml> {
    card.as_hash()?.get(&Yaml::String(key.to_string()))
}

/// The base models or datasets of a model card (`base_model` or `datasets` and their
/// aliases): each a Hugging Face id or URL, split into name, organization, version and
/// repository as `Metadata.apply_metadata_heuristic` does, or a mapping taken as it is.
fn entries(
    path: &Path,
    card: &Yaml,
    keys: &[&str],
    total: i64,
    src: &str,
) -> Result<Option<Vec<Entry>>> {
    if !keys.iter().any(|k| get(card, k).is_some()) {
        return Ok(None);
    }
    let value = keys.iter().find_map(|k| get(card, k));
    let items: Vec<&Yaml> = match value {
        Some(Yaml::Array(a)) => a.iter().collect(),
        Some(v @ Yaml::String(_)) => vec![v],
        _ => vec![],
    };
    static HF: LazyLock<Regex> =
        LazyLock::new(|| Regex::new(r"^https?://huggingface.co/([^/]+/[^/]+)$").expect("regex"));
    let mut out = vec![];
    for item in items {
        let mut e: Entry = vec![];
        match item {
            Yaml::String(_) => {
                let id = text(path, keys[0], item, true, src)?;
                let from_url = ["http://", "https://", "ssh://"]
                    .iter()
                    .any(|p| id.starts_with(p));
                let hf_id = if from_url {
                    e.push(("repo_url".into(), id.clone()));
                    id.contains("huggingface.co")
                        .then(|| HF.captures(&id).map(|c| c[1].to_string()))
                        .flatten()
                } else {
                    Some(id.clone())
                };
                if let Some(hf_id) = hf_id {
                    let p = model_id_components(&hf_id, total);
                    if let Some(n) = &p.name {
                        e.push(("name".into(), id_to_title(n)));
                    }
                    if let Some(o) = &p.organization {
                        e.push(("organization".into(), id_to_title(o)));
                    }
                    if let Some(v) = &p.version {
                        e.push(("version".into(), v.clone()));
                    }
                    if !from_url {
                        if let (Some(o), Some(n)) = (&p.organization, &p.name) {
                            e.push(("repo_url".into(), format!("https://huggingface.co/{o}/{n}")));
                        }
                    }
                }
            }
            Yaml::Hash(h) => {
                // taken as it is; set_gguf_meta_model writes the keys it knows
                for (k, v) in h {
                    let Some(k) = k.as_str().filter(|k| ENTRY_KEYS.contains(k)) else {
                        continue;
                    };
                    e.push((k.to_string(), text(path, k, v, false, src)?));
                }
            }
            other => {
                return Err(Error::usage(format!(
                    "{}: model card `{}` entry {other:?} is not in a known format",
                    path.display(),
                    keys[0]
                )))
            }
        }
        out.push(e);
    }
    Ok(Some(out))
}

/// `use_array_model_card_metadata`: a string appended, a list extended.
fn extend(
    path: &Path,
    card: &Yaml,
    key: &str,
    into: &mut Option<Vec<String>>,
    src: &str,
) -> Result<()> {
    match get(card, key) {
        None | Some(Yaml::Null) => {}
        Some(v @ Yaml::String(_)) => into
            .get_or_insert_with(Vec::new)
            .push(text(path, key, v, false, src)?),
        Some(Yaml::Array(a)) => {
            let list = into.get_or_insert_with(Vec::new);
            for v in a {
                list.push(text(path, key, v, true, src)?);
            }
        }
        Some(_) => {
            into.get_or_insert_with(Vec::new);
        }
    }
    Ok(())
}

impl Authorship {
    /// `Metadata.load(None, dir, None, total)`: the model card, `_name_or_path` (from
    /// `config.json`) and the folder's name.
    pub fn load(dir: &Path, name_or_path: Option<&str>, total: u64) -> Result<Authorship> {
        let mut m = Authorship::default();
        let path = dir.join("README.md");
        let total_i = total as i64;
        if let Some((card, src)) = load(dir)? {
            let one = |key: &str| -> Result<Option<String>> {
                match get(&card, key) {
                    None | Some(Yaml::Null) => Ok(None),
                    Some(v) => text(&path, key, v, false, &src).map(Some),
                }
            };
            // the converter's order: its own names, then `model_*`, then the Hub's
            for (field, keys) in [
                ("name", &["name", "model_name", "model_name"][..]),
                ("author", &["author", "model_author", "model_creator"]),
                ("version", &["version", "model_version"]),
                ("organization", &["organization", "model_organization"]),
                ("description", &["description", "model_description"]),
                ("finetune", &["finetune", "model_finetune"]),
                ("basename", &["basename", "model_basename", "model_type"]),
                ("size_label", &["size_label", "model_size_label"]),
                ("source_url", &["url", "model_url"]),
                ("source_doi", &["doi", "model_doi"]),
                ("source_uuid", &["uuid", "model_uuid"]),
                ("source_repo_url", &["repo_url", "model_repo_url"]),
            ] {
                for k in keys {
                    let slot = m.field(field);
                    if slot.is_none() && get(&card, k).is_some() {
                        *m.field(field) = one(k)?;
                    }
                }
            }
            m.base_models = entries(
                &path,
                &card,
                &["base_model", "base_models", "base_model_sources"],
                total_i,
                &src,
            )?;
            m.datasets = entries(
                &path,
                &card,
                &["datasets", "dataset", "dataset_sources"],
                total_i,
                &src,
            )?;
            m.license = match get(&card, "license") {
                None | Some(Yaml::Null) => None,
                Some(Yaml::Array(a)) => Some(
                    a.iter()
                        .map(|v| text(&path, "license", v, true, &src))
                        .collect::<Result<Vec<_>>>()?
                        .join(","),
                ),
                Some(v) => Some(text(&path, "license", v, false, &src)?),
            };
            m.license_name = one("license_name")?;
            m.license_link = one("license_link")?;
            extend(&path, &card, "tags", &mut m.tags, &src)?;
            extend(&path, &card, "pipeline_tag", &mut m.tags, &src)?;
            extend(&path, &card, "languages", &mut m.languages, &src)?;
            extend(&path, &card, "language", &mut m.languages, &src)?;
        }
        let mut merge = |id: &str| {
            let p = model_id_components(id, total_i);
            if m.name.is_none() {
                m.name = p.name.map(|n| id_to_title(&n));
            }
            if m.organization.is_none() {
                m.organization = p.organization.map(|n| id_to_title(&n));
            }
            m.basename = m.basename.take().or(p.basename);
            m.finetune = m.finetune.take().or(p.finetune);
            m.version = m.version.take().or(p.version);
            m.size_label = m.size_label.take().or(p.size_label);
        };
        if let Some(id) = name_or_path.filter(|id| id.matches('/').count() <= 1) {
            merge(id);
        }
        let dir_name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        merge(&dir_name);
        if m.name.is_none() {
            m.name = Some(dir_name);
        }
        if m.size_label.is_none() && total > 0 {
            m.size_label = Some(rounded_count(total, 2));
        }
        Ok(m)
    }

    fn field(&mut self, name: &str) -> &mut Option<String> {
        match name {
            "name" => &mut self.name,
            "author" => &mut self.author,
            "version" => &mut self.version,
            "organization" => &mut self.organization,
            "description" => &mut self.description,
            "finetune" => &mut self.finetune,
            "basename" => &mut self.basename,
            "size_label" => &mut self.size_label,
            "source_url" => &mut self.source_url,
            "source_doi" => &mut self.source_doi,
            "source_uuid" => &mut self.source_uuid,
            _ => &mut self.source_repo_url,
        }
    }

    /// `set_gguf_meta_model` (after the sampling keys): the keys in its order.
    pub fn keys(&self) -> Vec<(String, Value)> {
        let mut out: Vec<(String, Value)> = vec![];
        let mut s = |k: &str, v: &Option<String>| {
            if let Some(v) = v {
                out.push((format!("general.{k}"), Value::Str(v.clone())));
            }
        };
        s("name", &self.name);
        s("author", &self.author);
        s("version", &self.version);
        s("organization", &self.organization);
        s("finetune", &self.finetune);
        s("basename", &self.basename);
        s("description", &self.description);
        s("size_label", &self.size_label);
        s("license", &self.license);
        s("license.name", &self.license_name);
        s("license.link", &self.license_link);
        s("source.url", &self.source_url);
        s("source.doi", &self.source_doi);
        s("source.uuid", &self.source_uuid);
        s("source.repo_url", &self.source_repo_url);
        for (what, list) in [
            ("base_model", &self.base_models),
            ("dataset", &self.datasets),
        ] {
            let Some(list) = list else { continue };
            out.push((
                format!("general.{what}.count"),
                Value::U(list.len() as u64, "uint32"),
            ));
            for (i, e) in list.iter().enumerate() {
                for key in ENTRY_KEYS {
                    if let Some((_, v)) = e.iter().find(|(k, _)| k == key) {
                        out.push((format!("general.{what}.{i}.{key}"), Value::Str(v.clone())));
                    }
                }
            }
        }
        for (k, list) in [("tags", &self.tags), ("languages", &self.languages)] {
            if let Some(l) = list {
                out.push((
                    format!("general.{k}"),
                    Value::Array("string", l.iter().map(|t| Value::Str(t.clone())).collect()),
                ));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn card(text: &str) -> Result<Authorship> {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("README.md"), text).expect("write");
        Authorship::load(dir.path(), None, 1000)
    }

    #[test]
    fn cards_refused_not_misread() {
        // YAML 1.1 readings, aliases (a billion-laughs card), bad YAML: one-line errors
        assert!(card("---\nlicense: yes\n---\n").is_err());
        assert!(card("---\nversion: 2\n---\n").is_err());
        assert!(card("---\nname: 2024-01-01\n---\n").is_err());
        let laughs = "---\na: &a [x, x]\nb: &b [*a, *a]\nc: &c [*b, *b]\ntags: *c\n---\n";
        assert!(card(laughs).is_err());
        assert!(card("---\ntags: [a\n---\n").is_err());
        // no front matter, or an empty one: nothing from the card
        assert!(card("# title\n").expect("ok").license.is_none());
        let m = card("---\nlicense: mit\nlanguage:\n- no\n---\n").expect("ok");
        assert_eq!(m.license.as_deref(), Some("mit"));
        assert_eq!(m.languages, Some(vec!["no".to_string()]));
    }
}
