//! Sorting the globals a pickle references: what torch's `weights_only=True` loader allows,
//! other classes (which need `weights_only=False`), and dangerous ones (code execution, files,
//! processes, network), as picklescan and fickling list them.

mod compat_pickle;

/// torch 2.15's weights-only allowlist (`torch.serialization.get_safe_globals` defaults), one
/// `module.name` per line; the first line is the count.
const ALLOWLIST: &str = include_str!("weights-only-allowlist.txt");

/// Callables that only rebuild data, beyond torch's list: `module.name  # why`, reviewed.
const CALLS_ALLOWLIST: &str = include_str!("calls-allowlist.txt");

/// Packages that define models: their classes, instantiated as `torch.save(model)` pickles
/// modules (NEWOBJ, or `copyreg._reconstructor` with `object` as base, then BUILD), are
/// judged as instantiation (class `Other`), not as calls.
pub const MODEL_PACKAGES: &[&str] = &[
    "torch.nn",
    "torch.ao.nn",
    "torch.optim",
    "torchvision",
    "torchaudio",
    "transformers",
    "diffusers",
    "timm",
    "sentence_transformers",
    "sklearn",
];

/// How risky a global is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Class {
    /// Loading it can run code or touch files, processes or the network.
    Dangerous,
    /// Called (REDUCE, INST, OBJ, or a class instantiated outside the model packages) and on
    /// no allowlist: what it runs is unknown, so the scan fails (default-deny).
    UnknownCall,
    /// Not allowed by torch's weights-only loader, but not known to be dangerous
    /// (user classes, `torch.nn` modules, numpy objects).
    Other,
    /// Allowed by torch's weights-only loader.
    Allowed,
}

impl Class {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Dangerous => "dangerous",
            Class::UnknownCall => "unknown call",
            Class::Other => "other",
            Class::Allowed => "allowed",
        }
    }
}

/// Whole modules whose every global is dangerous (any dotted component matching).
const DANGEROUS_MODULES: &[&str] = &[
    "os",
    "posix",
    "nt",
    "subprocess",
    "sys",
    "pty",
    "commands",
    "multiprocessing",
    "_posixsubprocess",
    "code",
    "codeop",
    "runpy",
    "marshal",
    "doctest",
    "_interpreters",
    "importlib",
    "_frozen_importlib",
    "_frozen_importlib_external",
    "_imp",
    "imp",
    "pkgutil",
    "zipimport",
    "site",
    "cProfile",
    "profile",
    "pdb",
    "bdb",
    "timeit",
    "trace",
    "socket",
    "ssl",
    "httplib",
    "http",
    "urllib",
    "urllib2",
    "requests",
    "aiohttp",
    "asyncio",
    "webbrowser",
    "smtplib",
    "imaplib",
    "ftplib",
    "poplib",
    "telnetlib",
    "nntplib",
    "socketserver",
    "xmlrpc",
    "ctypes",
    "_ctypes",
    "pickle",
    "_pickle",
    "dill",
    "cloudpickle",
    "joblib",
    "shutil",
    "tempfile",
    "distutils",
    "fileinput",
    "linecache",
    "compileall",
    "py_compile",
    "tarfile",
    "zipfile",
    "shelve",
    "sqlite3",
    "_sqlite3",
    "mmap",
    "pydoc",
    "pexpect",
    "pipes",
    "venv",
    "ensurepip",
    "pip",
    "idlelib",
    "lib2to3",
    "signal",
    "_signal",
    "threading",
    "_thread",
    "atexit",
    "platform",
    "select",
    "selectors",
    "syslog",
    "uuid",
    "_osx_support",
    "_aix_support",
    "_pyrepl",
    "setuptools",
    "jinja2",
    "mako",
    "cpp_extension",
    "types",
    "npyio",
    "ctypeslib",
];

/// Single dangerous globals (`module.name`).
const DANGEROUS_GLOBALS: &[&str] = &[
    "builtins.eval",
    "builtins.exec",
    "builtins.compile",
    "builtins.open",
    "builtins.getattr",
    "builtins.__import__",
    "builtins.apply",
    "builtins.breakpoint",
    "builtins.input",
    "builtins.setattr",
    "builtins.delattr",
    "builtins.globals",
    "builtins.locals",
    "builtins.vars",
    "functools.partial",
    "functools.reduce",
    "operator.attrgetter",
    "operator.itemgetter",
    "operator.methodcaller",
    "_operator.attrgetter",
    "_operator.itemgetter",
    "_operator.methodcaller",
    "torch.load",
    "torch.serialization.load",
    "torch.compile",
    "torch.storage._load_from_bytes",
    "torch.jit.unsupported_tensor_ops.execWrapper",
    "torch.utils.collect_env.run",
    "_io.FileIO",
    "io.FileIO",
    "io.open",
    "_io.open",
    "logging.FileHandler",
    "types.CodeType",
    "types.FunctionType",
    "numpy.testing._private.utils.runstring",
    "builtins.file",
    "builtins.help",
    "builtins.exit",
    "builtins.quit",
    "builtins.execfile",
    "builtins.reload",
    "numpy.load",
    "numpy.fromfile",
    "numpy.loadtxt",
    "numpy.genfromtxt",
    "pandas.read_pickle",
    "pandas.read_csv",
    "keras.models.load_model",
    "tensorflow.keras.models.load_model",
    "tf_keras.models.load_model",
    "torch.utils._config_module.ConfigModule.load_config",
    "torch.utils.data.datapipes.utils.decoder.basichandlers",
    "torch.fx.experimental.symbolic_shapes.ShapeEnv.evaluate_guards_expression",
    "torch._dynamo.guards.GuardBuilder.get",
];

/// What numpy needs to rebuild an array from a pickle (np.save of object arrays, np.savez,
/// pickled arrays): allowed besides torch's list, as picklescan and numpy's own safe loading do.
const NUMPY_REBUILD: &[&str] = &[
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.ndarray",
    "numpy.dtype",
];

/// numpy's random-generator pickling helpers (module `numpy.random._pickle`).
pub const NUMPY_RNG: &[&str] = &[
    "numpy.random._pickle.__randomstate_ctor",
    "numpy.random._pickle.__generator_ctor",
    "numpy.random._pickle.__bit_generator_ctor",
];

/// Module prefixes whose globals are dangerous.
const DANGEROUS_PREFIXES: &[&str] = &[
    "torch.hub",
    "torch._dynamo",
    "torch._inductor",
    "torch.jit",
    "numpy.f2py",
    "numpy.distutils",
    "numpy.testing._private.utils",
    "numpy.lib.npyio",
    "torch.utils.cpp_extension",
    "torch.utils.collect_env",
    "torch.utils.bottleneck",
    "torch.utils._config_module",
    "torch.utils.data.datapipes.utils.decoder",
    "torch.fx.experimental.symbolic_shapes",
    "keras.models",
    "keras.saving",
];

/// Whether `s` is a dotted path of Python identifiers (`torch._utils`, `Module.method`): what a
/// module or a global's name must be. A name holding a newline, a space, an empty component or
/// a control character is not a name: a text pickle opcode carrying it would be read as more
/// opcodes.
pub fn is_name_path(s: &str) -> bool {
    !s.is_empty()
        && s.split('.').all(|part| {
            let mut c = part.chars();
            c.next().is_some_and(|f| f == '_' || f.is_alphabetic())
                && c.all(|x| x == '_' || x.is_alphanumeric())
        })
}

/// `module.name` for display: control characters and other unprintable ones escaped, so that a
/// crafted name stays on one line; a name that is not a Python name says so.
pub fn display_name(module: &str, name: &str) -> String {
    let text = escape(&format!("{module}.{name}"));
    if is_name_path(module) && is_name_path(name) {
        text
    } else {
        format!("{text} (not a Python name)")
    }
}

/// Escapes control and other unprintable characters (`\n`, `\x1c`, `\u{202e}`).
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\x7f' => out.push_str(&format!("\\x{:02x}", c as u32)),
            c if c.is_control()
                || matches!(c as u32, 0x200b..=0x200f | 0x202a..=0x202e | 0x2066..=0x2069) =>
            {
                out.push_str(&format!("\\u{{{:x}}}", c as u32))
            }
            c => out.push(c),
        }
    }
    out
}

/// The global an unpickler really looks up for `module.name` read under `protocol` (the last
/// PROTO opcode before it, 0 before any), as CPython's `Unpickler.find_class` resolves it: for
/// protocols below 3, Python 2 names are renamed through `_compat_pickle`
/// (`__builtin__.reduce` is `functools.reduce`, `cPickle` is `pickle`). With `torch` (the
/// unpickler torch.load uses for the saved object), torch's wrapper comes first: a name
/// containing `Storage` that is a storage type imports nothing, and `torch.tensor` is
/// `torch._tensor`.
pub fn resolve(module: &str, name: &str, protocol: u8, torch: bool) -> (String, String) {
    let (mut m, mut n) = (module.to_string(), name.to_string());
    if torch {
        if name.contains("Storage") && is_storage_type(name) {
            return ("torch".into(), name.into());
        }
        if m == "torch.tensor" {
            m = "torch._tensor".into();
        }
    }
    if protocol < 3 {
        if let Some((_, (m2, n2))) = compat_pickle::NAME_MAPPING
            .iter()
            .find(|((a, b), _)| *a == m && *b == n)
        {
            (m, n) = (m2.to_string(), n2.to_string());
        } else if let Some((_, m2)) = compat_pickle::IMPORT_MAPPING.iter().find(|(a, _)| *a == m) {
            m = m2.to_string();
        }
    }
    (m, n)
}

/// Storage type names torch's unpickler turns into a `StorageType` without importing anything.
fn is_storage_type(name: &str) -> bool {
    crate::dtype::DType::from_storage_name(name).is_some()
        || matches!(
            name,
            "QInt8Storage"
                | "QUInt8Storage"
                | "QInt32Storage"
                | "QUInt4x2Storage"
                | "QUInt2x4Storage"
                | "ComplexDoubleStorage"
                | "UntypedStorage"
        )
}

/// A global as an unpickler sees it: its class (the worse of the name as written and the name
/// it resolves to) and how to show it (`__builtin__.reduce -> functools.reduce`).
pub fn judge(module: &str, name: &str, protocol: u8, torch: bool) -> (String, Class) {
    let (m, n) = resolve(module, name, protocol, torch);
    let raw = classify(module, name);
    let resolved = classify(&m, &n);
    let shown = display_name(module, name);
    if (m.as_str(), n.as_str()) == (module, name) {
        (shown, raw)
    } else {
        (
            format!("{shown} -> {}", display_name(&m, &n)),
            raw.min(resolved),
        )
    }
}

/// joblib's array wrapper (current format), under its two module paths.
const JOBLIB_ARRAY_WRAPPERS: &[&str] = &[
    "joblib.numpy_pickle.NumpyArrayWrapper",
    "sklearn.externals.joblib.numpy_pickle.NumpyArrayWrapper",
];

/// Classifies `module.name`. A module or name that is not a dotted path of Python identifiers
/// is dangerous: no real global has it, and written back as text it would be more opcodes.
pub fn classify(module: &str, name: &str) -> Class {
    if !is_name_path(module) || !is_name_path(name) {
        return Class::Dangerous;
    }
    // Protocol 4 and up: a dotted name is an attribute path from the module, and any module
    // imports others (`torch.nn.modules.module` + `torch.load` is `torch.load`): every split of
    // the path is judged as a global of its own.
    let parts: Vec<&str> = name.split('.').collect();
    if (1..parts.len())
        .any(|k| classify(&parts[..k].join("."), &parts[k..].join(".")) == Class::Dangerous)
    {
        return Class::Dangerous;
    }
    let full = format!("{module}.{name}");
    let module = match module {
        "__builtin__" | "__builtins__" => "builtins",
        m => m,
    };
    let canonical = format!("{module}.{name}");
    if NUMPY_RNG.contains(&canonical.as_str()) {
        // In a module named `_pickle`, but rebuild random generators; the callables they are
        // given are judged as called (`Pickle::uses`).
        return Class::Other;
    }
    if JOBLIB_ARRAY_WRAPPERS.contains(&canonical.as_str()) {
        // A data holder in an otherwise dangerous module: built with NEWOBJ and a state dict;
        // joblib then reads its array's bytes, or the nested pickle of an object array, which
        // the scan judges as the file's own.
        return Class::Other;
    }
    if DANGEROUS_GLOBALS.contains(&canonical.as_str())
        || DANGEROUS_GLOBALS
            .iter()
            .any(|g| canonical.starts_with(&format!("{g}.")))
        || module
            .split('.')
            .chain(name.split('.'))
            .any(|c| DANGEROUS_MODULES.contains(&c))
        || DANGEROUS_PREFIXES.iter().any(|p| {
            module == *p
                || module.starts_with(&format!("{p}."))
                || canonical.starts_with(&format!("{p}."))
        })
        || name == "eval"
        || name == "exec"
    {
        return Class::Dangerous;
    }
    if ALLOWLIST
        .lines()
        .skip(1)
        .any(|l| l.trim() == full || l.trim() == canonical)
        || NUMPY_REBUILD.contains(&canonical.as_str())
    {
        return Class::Allowed;
    }
    Class::Other
}

/// How a pickle uses a global.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Use {
    /// Only named (an argument, a dict value): runs nothing by itself.
    Named,
    /// A class instantiated as pickle protocol 2 saves objects (NEWOBJ, or
    /// `copyreg._reconstructor` with `object` as base): `cls.__new__`, then its
    /// `__setstate__` on BUILD.
    Instantiated,
    /// Called: the callable of a REDUCE, the class of an INST or OBJ (its `__init__` runs),
    /// or the base of a `copyreg._reconstructor` that is not `object`.
    Called,
}

impl Use {
    /// The word in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Use::Named => "named",
            Use::Instantiated => "instantiated",
            Use::Called => "called",
        }
    }
}

/// Globals the user accepts (`--allow NAME`, `--allow-file FILE`, `allow=`): a call to one
/// of them is judged `Other`, not `UnknownCall`. A dangerous global stays dangerous.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allow {
    names: Vec<String>,
}

impl Allow {
    /// From names (`module.name`); a name ending in `.*` accepts a whole module and those
    /// below it.
    pub fn new(names: impl IntoIterator<Item = String>) -> Self {
        Allow {
            names: names.into_iter().map(|n| n.trim().to_string()).collect(),
        }
    }

    /// The names of an allow file: one per line, `#` starts a comment, blank lines skipped.
    pub fn parse_file(text: &str) -> Vec<String> {
        text.lines()
            .map(|l| l.split('#').next().unwrap_or("").trim())
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    }

    /// From names and allow files (see [`Allow::parse_file`]); a file that cannot be read is an
    /// error naming it.
    pub fn with_files(
        names: impl IntoIterator<Item = String>,
        files: &[std::path::PathBuf],
    ) -> crate::Result<Self> {
        let mut all: Vec<String> = names.into_iter().collect();
        for f in files {
            let text = std::fs::read_to_string(f)
                .map_err(|e| crate::Error::usage(format!("allow file {}: {e}", f.display())))?;
            all.extend(Self::parse_file(&text));
        }
        Ok(Self::new(all))
    }

    /// Whether `module.name` is accepted.
    pub fn accepts(&self, module: &str, name: &str) -> bool {
        let full = format!("{module}.{name}");
        self.names.iter().any(|a| match a.strip_suffix(".*") {
            Some(m) => module == m || module.starts_with(&format!("{m}.")),
            None => *a == full,
        })
    }

    /// Whether nothing is accepted.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// Whether `torch.load(weights_only=True)` (torch's default) resolves `module.name` read at
/// `protocol`: on torch's weights-only allowlist, storage types included (numpy's rebuild
/// globals, judged clean, are not on it: torch asks for them to be allowlisted first).
pub fn weights_only_loads(module: &str, name: &str, protocol: u8) -> bool {
    let (m, n) = resolve(module, name, protocol, true);
    let m = match m.as_str() {
        "__builtin__" | "__builtins__" => "builtins".to_string(),
        _ => m,
    };
    let full = format!("{m}.{n}");
    (m == "torch" && is_storage_type(&n)) || ALLOWLIST.lines().skip(1).any(|l| l.trim() == full)
}

fn calls_allowlist() -> impl Iterator<Item = &'static str> {
    CALLS_ALLOWLIST
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
}

/// Whether `module` is, or is below, a package of [`MODEL_PACKAGES`].
fn in_model_package(module: &str) -> bool {
    MODEL_PACKAGES
        .iter()
        .any(|p| module == *p || module.starts_with(&format!("{p}.")))
}

/// A global as an unpickler uses it (see [`judge`]), with default-deny for calls: a global
/// that is not dangerous and not on torch's weights-only list is `UnknownCall` when it is
/// called, unless the calls allowlist names it or `allow` accepts it; a class instantiated
/// (not called) is `Other` when it comes from a model-definition package.
pub fn judge_use(
    module: &str,
    name: &str,
    protocol: u8,
    torch: bool,
    how: Use,
    allow: &Allow,
) -> (String, Class) {
    let (shown, class) = judge(module, name, protocol, torch);
    if class != Class::Other || how == Use::Named {
        return (shown, class);
    }
    let (m, n) = resolve(module, name, protocol, torch);
    let m = match m.as_str() {
        "__builtin__" | "__builtins__" => "builtins".to_string(),
        _ => m,
    };
    let full = format!("{m}.{n}");
    let known = calls_allowlist().any(|c| match c.strip_suffix(".*") {
        Some(module) => m == module,
        None => c == full,
    }) || (how == Use::Instantiated && in_model_package(&m))
        || allow.accepts(&m, &n)
        || allow.accepts(module, name);
    (
        shown,
        if known {
            Class::Other
        } else {
            Class::UnknownCall
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        assert_eq!(
            classify("torch._utils", "_rebuild_tensor_v2"),
            Class::Allowed
        );
        assert_eq!(classify("collections", "OrderedDict"), Class::Allowed);
        assert_eq!(classify("torch", "BFloat16Storage"), Class::Allowed);
        assert_eq!(classify("posix", "system"), Class::Dangerous);
        assert_eq!(classify("os", "system"), Class::Dangerous);
        assert_eq!(classify("__builtin__", "eval"), Class::Dangerous);
        assert_eq!(classify("builtins", "getattr"), Class::Dangerous);
        assert_eq!(classify("subprocess", "Popen"), Class::Dangerous);
        assert_eq!(classify("functools", "partial"), Class::Dangerous);
        assert_eq!(classify("torch.serialization", "load"), Class::Dangerous);
        assert_eq!(classify("torch.nn.modules.linear", "Linear"), Class::Other);
        assert_eq!(classify("__main__", "MyModel"), Class::Other);
        assert_eq!(classify("builtins", "set"), Class::Allowed);
        // Names that load or run code that the older lists missed.
        for (m, n) in [
            ("torch.utils.cpp_extension", "load_inline"),
            ("numpy", "load"),
            ("numpy.lib.npyio", "load"),
            ("pandas", "read_pickle"),
            ("keras.models", "load_model"),
            ("setuptools", "setup"),
            ("jinja2", "Template"),
            ("__builtin__", "file"),
            // protocol 4: a dotted name is an attribute path
            ("torch.nn.modules.module", "torch.load"),
            ("numpy", "lib.npyio.load"),
        ] {
            assert_eq!(classify(m, n), Class::Dangerous, "{m}.{n}");
        }
    }

    #[test]
    fn names_resolve_as_cpython_and_torch_resolve_them() {
        // protocol 2 (torch.save's default): Python 2 names are renamed
        assert_eq!(
            judge("__builtin__", "reduce", 2, true),
            (
                "__builtin__.reduce -> functools.reduce".into(),
                Class::Dangerous
            )
        );
        assert_eq!(judge("cPickle", "loads", 2, false).1, Class::Dangerous);
        assert_eq!(
            resolve("SimpleHTTPServer", "SimpleHTTPRequestHandler", 0, false).0,
            "http.server"
        );
        assert_eq!(resolve("thread", "start_new_thread", 1, false).0, "_thread");
        // protocol 3 and up: no renaming (a later PROTO 2 turns it on again: the parser
        // records the protocol in force per global)
        assert_eq!(
            resolve("__builtin__", "reduce", 4, false),
            ("__builtin__".into(), "reduce".into())
        );
        // torch's wrapper: storage types import nothing; torch.tensor is torch._tensor
        assert_eq!(
            resolve("os", "FloatStorage", 2, true),
            ("torch".into(), "FloatStorage".into())
        );
        assert_eq!(resolve("os", "FooStorage", 2, true).0, "os");
        assert_eq!(
            resolve("torch.tensor", "Tensor", 4, true).0,
            "torch._tensor"
        );
        assert_eq!(judge("__builtin__", "set", 2, true).1, Class::Allowed);
    }

    #[test]
    fn the_allowlist_is_allowed() {
        // No dangerous rule (whole modules match any dotted component) catches an entry of
        // torch's weights-only allowlist.
        for l in ALLOWLIST
            .lines()
            .skip(1)
            .map(str::trim)
            .filter(|l| !l.is_empty())
        {
            let (m, n) = l.rsplit_once('.').unwrap();
            assert_eq!(classify(m, n), Class::Allowed, "{l}");
        }
    }

    #[test]
    fn the_calls_allowlist_is_reviewed() {
        // every entry has its reason, is a Python name, and no dangerous rule names it
        for l in CALLS_ALLOWLIST.lines().filter(|l| !l.starts_with('#')) {
            let (name, why) = l.split_once('#').expect("a reason after #");
            assert!(why.trim().len() > 10, "{l}");
            let (m, n) = name.trim().rsplit_once('.').unwrap();
            let n = if n == "*" { "x" } else { n };
            assert!(is_name_path(m) && is_name_path(n), "{l}");
            assert_ne!(classify(m, n), Class::Dangerous, "{l}");
        }
    }

    #[test]
    fn calls_are_denied_by_default() {
        let none = Allow::default();
        let j = |m: &str, n: &str, how| judge_use(m, n, 2, true, how, &none).1;
        // called, on no list
        assert_eq!(
            j(
                "test.support.script_helper",
                "assert_python_ok",
                Use::Called
            ),
            Class::UnknownCall
        );
        assert_eq!(j("yaml", "unsafe_load", Use::Called), Class::UnknownCall);
        assert_eq!(j("yaml", "unsafe_load", Use::Named), Class::Other);
        // a model class instantiated is not a call; called, its __init__ runs
        assert_eq!(
            j("torch.nn.modules.linear", "Linear", Use::Instantiated),
            Class::Other
        );
        assert_eq!(
            j("torch.nn.modules.linear", "Linear", Use::Called),
            Class::UnknownCall
        );
        assert_eq!(j("__main__", "Net", Use::Instantiated), Class::UnknownCall);
        // the calls allowlist, torch's list, and what the user allows
        assert_eq!(j("argparse", "Namespace", Use::Instantiated), Class::Other);
        assert_eq!(
            j("torch._utils", "_rebuild_tensor_v2", Use::Called),
            Class::Allowed
        );
        assert_eq!(j("os", "system", Use::Called), Class::Dangerous);
        let mine = Allow::new(["__main__.Net".to_string(), "mylib.*".to_string()]);
        assert_eq!(
            judge_use("__main__", "Net", 2, true, Use::Instantiated, &mine).1,
            Class::Other
        );
        assert_eq!(
            judge_use("mylib.layers", "Block", 2, true, Use::Called, &mine).1,
            Class::Other
        );
        assert_eq!(
            judge_use("os", "system", 2, true, Use::Called, &mine).1,
            Class::Dangerous
        );
        assert_eq!(
            Allow::parse_file("# mine\n__main__.Net  # my model\n\nmylib.*\n"),
            ["__main__.Net", "mylib.*"]
        );
    }

    #[test]
    fn names_that_are_not_names() {
        for (m, n) in [
            ("torch._utils\nc", "x"),
            ("collections", "OrderedDict\nbuiltins\neval"),
            ("", "x"),
            ("torch.", "x"),
            (".torch", "x"),
            ("torch", ""),
            ("tor ch", "x"),
            ("torch", "x\r"),
            ("1torch", "x"),
        ] {
            assert!(!is_name_path(m) || !is_name_path(n));
            assert_eq!(classify(m, n), Class::Dangerous, "{m:?}.{n:?}");
        }
        assert!(is_name_path("torch._utils"));
        assert!(is_name_path("Modèle"));
        assert_eq!(
            display_name("os\nsystem", "x"),
            "os\\nsystem.x (not a Python name)"
        );
    }
}
