//! `audit`: what each pickle in a set of files would run if a loader unpickled it. Files are
//! triaged by content (formats without a pickle have nothing to run), each pickle is read as
//! the loader that would open it reads it, and each file gets a [`Verdict`]; the exit code
//! follows from the verdicts.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::audit::{Allow, Class};
use crate::formats::sniff::{self, Kind};
use crate::formats::torch::scan::{self as tc, Scan};

/// What a file is, decided from its content.
pub type FileKind = Kind;

/// Everything `audit` can be asked.
#[derive(Debug, Clone, Default)]
pub struct AuditRequest {
    /// Files and folders (searched recursively).
    pub paths: Vec<PathBuf>,
    /// Anything outside torch's weights-only allowlist fails too.
    pub strict: bool,
    /// Globals the user accepts as calls (their own classes).
    pub allow: Allow,
}

/// A file's verdict, worst first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// A global that runs code, or a container that reads differently in different loaders.
    Dangerous,
    /// A call to a global on no allowlist: what it runs is unknown (default-deny).
    #[serde(rename = "unknown call")]
    UnknownCall,
    /// The file could not be read.
    Unreadable,
    /// The file could not be read to its end: never clean.
    Incomplete,
    /// A global outside torch's weights-only allowlist.
    Other,
    /// Only allowlisted globals.
    Clean,
}

impl Verdict {
    /// The word in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Dangerous => "dangerous",
            Verdict::UnknownCall => "unknown call",
            Verdict::Unreadable => "unreadable",
            Verdict::Incomplete => "incomplete",
            Verdict::Other => "other",
            Verdict::Clean => "clean",
        }
    }
}

/// A global found in a file.
#[derive(Debug, Clone)]
pub struct Global {
    /// The name as shown.
    pub name: String,
    /// Its class.
    pub class: Class,
    /// The pickle it is in.
    pub pickle: String,
}

/// What audit found in one file with a pickle.
#[derive(Debug, Clone)]
pub struct Audited {
    /// The file.
    pub path: PathBuf,
    /// The scan, or why the file could not be read.
    pub scan: Result<Scan, String>,
    /// Every global, once, worst first.
    pub globals: Vec<Global>,
}

impl Audited {
    /// The file's verdict.
    pub fn verdict(&self) -> Verdict {
        let dangerous = self.globals.iter().any(|g| g.class == Class::Dangerous);
        match &self.scan {
            _ if dangerous => Verdict::Dangerous,
            Ok(s) if !s.all_ambiguities().is_empty() => Verdict::Dangerous,
            _ if self.globals.iter().any(|g| g.class == Class::UnknownCall) => Verdict::UnknownCall,
            Err(_) => Verdict::Unreadable,
            Ok(s) if s.incomplete.is_some() => Verdict::Incomplete,
            _ if self.globals.iter().any(|g| g.class == Class::Other) => Verdict::Other,
            _ => Verdict::Clean,
        }
    }

    /// The names of its globals of class `c`.
    pub fn names(&self, c: Class) -> Vec<String> {
        self.globals
            .iter()
            .filter(|g| g.class == c)
            .map(|g| g.name.clone())
            .collect()
    }
}

/// What `audit` found.
pub struct AuditReport {
    /// The files with a pickle (or that could not be read), in order.
    pub files: Vec<Audited>,
    /// The files without a pickle, and what they are.
    pub no_pickle: Vec<(PathBuf, FileKind)>,
    /// Whether the request was strict.
    pub strict: bool,
    /// What the request accepted.
    pub allow: Allow,
}

impl AuditRequest {
    /// Reads every file.
    pub fn run(&self) -> AuditReport {
        let mut files = Vec::new();
        let mut no_pickle = Vec::new();
        for p in files_below(&self.paths) {
            match triage(&p) {
                Ok((_, Some(scan))) => {
                    files.push(audited(p, scan.map_err(|e| e.to_string()), &self.allow))
                }
                Ok((kind, None)) => no_pickle.push((p, kind)),
                Err(e) => files.push(audited(p, Err(e.to_string()), &self.allow)),
            }
        }
        AuditReport {
            files,
            no_pickle,
            strict: self.strict,
            allow: self.allow.clone(),
        }
    }
}

/// How a file is read: `None` for a format without a pickle (nothing to run), else the scan
/// of what the loader that would open it reads. A safetensors file whose first bytes also
/// start a pickle, a zip or a tar is read as torch.load would read it too: if that reading
/// finds a global, the file is a polyglot and is judged by it.
fn triage(p: &Path) -> crate::Result<(FileKind, Option<crate::Result<Scan>>)> {
    let kind = sniff::sniff_path(p)?;
    let scan = match kind {
        Kind::Safetensors => {
            let head = std::fs::File::open(p).ok().map(|f| {
                let mut b = Vec::with_capacity(sniff::HEAD);
                let limit = sniff::HEAD as u64;
                let _ = std::io::Read::read_to_end(&mut std::io::Read::take(f, limit), &mut b);
                b
            });
            let torch_reads = head
                .as_deref()
                .is_some_and(|h| sniff::by_magic(h, 1).is_torch());
            match torch_reads.then(|| tc::scan(p)) {
                Some(Ok(s)) if s.pickles.iter().any(|pk| !pk.globals.is_empty()) => Some(Ok(s)),
                _ => None,
            }
        }
        k if k.runs_nothing() => None,
        Kind::Compressed(c) => Some(tc::scan_compressed(p, c)),
        _ => Some(tc::scan(p)),
    };
    Ok((kind, scan))
}

/// A file's report from its scan: every global once, worst first.
fn audited(path: PathBuf, scan: Result<Scan, String>, allow: &Allow) -> Audited {
    let mut globals: Vec<Global> = Vec::new();
    for pk in scan.iter().flat_map(|s| &s.pickles) {
        for (name, class) in pk.judged(allow) {
            if let Some(g) = globals.iter_mut().find(|g| g.name == name) {
                g.class = g.class.min(class);
            } else {
                globals.push(Global {
                    name,
                    class,
                    pickle: pk.label.clone(),
                });
            }
        }
    }
    globals.sort_by(|a, b| a.class.cmp(&b.class).then(a.name.cmp(&b.name)));
    Audited {
        path,
        scan,
        globals,
    }
}

impl AuditReport {
    /// 1: something dangerous or an unknown call (strict: anything not allowlisted); 2: a file could not be read
    /// to its end; 0: nothing to fear in what was read.
    pub fn exit_code(&self) -> u8 {
        let verdicts: Vec<Verdict> = self.files.iter().map(Audited::verdict).collect();
        if verdicts
            .iter()
            .any(|v| v <= &Verdict::UnknownCall || (self.strict && *v == Verdict::Other))
        {
            1
        } else if verdicts
            .iter()
            .any(|v| matches!(v, Verdict::Unreadable | Verdict::Incomplete))
        {
            2
        } else {
            0
        }
    }

    /// `audit --json`'s document.
    pub fn doc(&self) -> AuditDoc {
        let code = self.exit_code();
        AuditDoc {
            files: self
                .files
                .iter()
                .map(|f| file_doc(f, &self.allow))
                .collect(),
            no_pickle: self
                .no_pickle
                .iter()
                .map(|(p, k)| NoPickle {
                    path: p.clone(),
                    format: k.describe(),
                    verdict: "no pickle",
                })
                .collect(),
            dangerous: self.files.iter().any(|r| r.verdict() == Verdict::Dangerous),
            strict: self.strict,
            failed: code == 1,
            exit_code: code,
        }
    }
}

fn file_doc(r: &Audited, allow: &Allow) -> FileDoc {
    use serde_json::json;
    let mut d = FileDoc {
        path: r.path.clone(),
        verdict: r.verdict(),
        dangerous: r.names(Class::Dangerous),
        unknown_calls: r.names(Class::UnknownCall),
        other: r.names(Class::Other),
        allowed: r.names(Class::Allowed),
        scan: None,
        error: None,
    };
    match &r.scan {
        Ok(scan) => {
            d.scan = Some(ScanDoc {
                findings: scan
                    .pickles
                    .iter()
                    .flat_map(|k| {
                        k.findings(allow).into_iter().map(move |f| {
                            json!({
                                "name": f.name, "class": f.class.as_str(), "offset": f.offset,
                                "opcode": f.opcode, "called": f.called, "use": f.how.as_str(),
                                "pickle": k.label,
                            })
                        })
                    })
                    .collect(),
                container: scan.container,
                pickles: scan
                    .pickles
                    .iter()
                    .map(|k| {
                        json!({
                            "label": k.label, "offset": k.offset,
                            "globals": k.judged(allow).into_iter()
                                .map(|(n, c)| json!({"name": n, "class": c.as_str()}))
                                .collect::<Vec<_>>(),
                        })
                    })
                    .collect(),
                stops: scan.stops.clone(),
                ambiguities: scan.all_ambiguities(),
                incomplete: scan.incomplete.clone(),
            })
        }
        Err(e) => d.error = Some(e.clone()),
    }
    d
}

/// `audit --json`.
#[derive(Debug, Clone, Serialize)]
pub struct AuditDoc {
    /// The files with a pickle.
    pub files: Vec<FileDoc>,
    /// The files without one.
    pub no_pickle: Vec<NoPickle>,
    /// Whether any file is dangerous.
    pub dangerous: bool,
    /// Whether the request was strict.
    pub strict: bool,
    /// Whether the audit fails (exit code 1).
    pub failed: bool,
    /// The exit code.
    pub exit_code: u8,
}

/// A file without a pickle.
#[derive(Debug, Clone, Serialize)]
pub struct NoPickle {
    /// The file.
    pub path: PathBuf,
    /// What it is.
    pub format: &'static str,
    /// `no pickle`.
    pub verdict: &'static str,
}

/// A file with a pickle.
#[derive(Debug, Clone, Serialize)]
pub struct FileDoc {
    /// The file.
    pub path: PathBuf,
    /// Its verdict.
    pub verdict: Verdict,
    /// Dangerous globals.
    pub dangerous: Vec<String>,
    /// Globals called that no allowlist names.
    pub unknown_calls: Vec<String>,
    /// Globals outside the allowlist.
    pub other: Vec<String>,
    /// Allowlisted globals.
    pub allowed: Vec<String>,
    /// What the scan found.
    #[serde(flatten)]
    pub scan: Option<ScanDoc>,
    /// Why it could not be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What the scan of one file found.
#[derive(Debug, Clone, Serialize)]
pub struct ScanDoc {
    /// Every global occurrence: name, class, byte offset, opcode, whether it is called.
    pub findings: Vec<serde_json::Value>,
    /// The container torch decides on.
    pub container: &'static str,
    /// Every pickle a loader would unpickle.
    pub pickles: Vec<serde_json::Value>,
    /// Where torch would stop with an error.
    pub stops: Option<String>,
    /// What two readers would read differently.
    pub ambiguities: Vec<String>,
    /// Where reading stopped before the end.
    pub incomplete: Option<String>,
}

/// The files to audit: each path given, and every file below a folder (recursively, links not
/// followed, `.git` skipped), in name order. A path that cannot be read is kept, to be
/// reported unreadable.
fn files_below(paths: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo: Vec<PathBuf> = paths.iter().rev().cloned().collect();
    let mut given = true;
    while let Some(p) = todo.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            out.push(p);
            continue;
        };
        let is_dir = if meta.file_type().is_symlink() {
            // Hugging Face cache snapshots are links to blobs: follow links to files.
            std::fs::metadata(&p).map(|m| m.is_dir()).unwrap_or(false) && given
        } else {
            meta.is_dir()
        };
        if is_dir {
            let Ok(dir) = std::fs::read_dir(&p) else {
                out.push(p);
                continue;
            };
            let mut entries: Vec<_> = dir
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|e| e.file_name().is_some_and(|n| n != ".git"))
                .collect();
            entries.sort();
            todo.extend(entries.into_iter().rev());
        } else {
            out.push(p);
        }
        given = todo.len() >= paths.len();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `bytes` written as a raw pickle file and audited alone.
    fn audit_pickle(bytes: &[u8]) -> (Audited, u8) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.pkl");
        std::fs::write(&p, bytes).unwrap();
        let mut r = AuditRequest {
            paths: vec![p],
            ..Default::default()
        }
        .run();
        assert_eq!(r.files.len(), 1);
        let code = r.exit_code();
        (r.files.remove(0), code)
    }

    #[test]
    fn pure_builtins_are_reviewed_calls() {
        // builtins.len([1, 2]) as Python pickles it at protocols 2 (`__builtin__`) and 3, and
        // int("3"): calls on the calls allowlist, so outside torch's list (other) but no
        // unknown call, exit 0
        for pk in [
            &b"\x80\x02c__builtin__\nlen\nq\x00]q\x01(K\x01K\x02e\x85q\x02Rq\x03."[..],
            b"\x80\x03cbuiltins\nlen\nq\x00]q\x01(K\x01K\x02e\x85q\x02Rq\x03.",
            b"\x80\x02c__builtin__\nint\nX\x01\x00\x00\x003\x85R.",
        ] {
            let (a, code) = audit_pickle(pk);
            assert_eq!(a.verdict(), Verdict::Other, "{:?}", a.globals);
            assert!(a.names(Class::UnknownCall).is_empty(), "{:?}", a.globals);
            assert_eq!(code, 0);
        }
        // getattr stays dangerous
        let (a, code) = audit_pickle(
            b"\x80\x02c__builtin__\ngetattr\nccollections\nOrderedDict\nX\x03\x00\x00\x00pop\x86R.",
        );
        assert_eq!(a.verdict(), Verdict::Dangerous);
        assert_eq!(
            a.names(Class::Dangerous),
            ["__builtin__.getattr -> builtins.getattr"]
        );
        assert_eq!(code, 1);
        // len(posix.system("id")): the dangerous call inside is still reported
        let (a, code) = audit_pickle(
            b"\x80\x02c__builtin__\nlen\nq\x00cposix\nsystem\nq\x01X\x02\x00\x00\x00idq\x02\x85q\x03Rq\x04\x85q\x05Rq\x06.",
        );
        assert_eq!(a.verdict(), Verdict::Dangerous);
        assert_eq!(a.names(Class::Dangerous), ["posix.system"]);
        assert_eq!(code, 1);
        // a global given to a builtin, directly or in a list, is judged as called: its
        // metaclass's __len__ (or iteration, comparison) runs
        for pk in [
            &b"\x80\x02c__builtin__\nlen\ncmylib\nThing\n\x85R."[..],
            b"\x80\x02c__builtin__\nmax\n](cmylib\nThing\nK\x01e\x85R.",
        ] {
            let (a, code) = audit_pickle(pk);
            assert_eq!(a.verdict(), Verdict::UnknownCall, "{:?}", a.globals);
            assert_eq!(a.names(Class::UnknownCall), ["mylib.Thing"]);
            assert_eq!(code, 1);
        }
        // named only (a dict value), it stays other
        let (a, code) = audit_pickle(b"\x80\x02}X\x01\x00\x00\x00kcmylib\nThing\ns.");
        assert_eq!((a.verdict(), code), (Verdict::Other, 0), "{:?}", a.globals);
    }
}
