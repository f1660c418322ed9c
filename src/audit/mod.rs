//! Sorting the globals a pickle references: what torch's `weights_only=True` loader allows,
//! other classes (which need `weights_only=False`), and dangerous ones (code execution, files,
//! processes, network), as picklescan and fickling list them.

/// torch 2.15's weights-only allowlist (`torch.serialization.get_safe_globals` defaults), one
/// `module.name` per line; the first line is the count.
const ALLOWLIST: &str = include_str!("weights-only-allowlist.txt");

/// How risky a global is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Class {
    /// Loading it can run code or touch files, processes or the network.
    Dangerous,
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
];

/// Module prefixes whose globals are dangerous.
const DANGEROUS_PREFIXES: &[&str] = &[
    "torch.hub",
    "torch._dynamo",
    "torch._inductor",
    "torch.jit",
    "numpy.f2py",
    "numpy.distutils",
];

/// Classifies `module.name`.
pub fn classify(module: &str, name: &str) -> Class {
    let full = format!("{module}.{name}");
    let module = match module {
        "__builtin__" | "__builtins__" => "builtins",
        m => m,
    };
    let canonical = format!("{module}.{name}");
    if DANGEROUS_GLOBALS.contains(&canonical.as_str())
        || module
            .split('.')
            .chain(name.split('.'))
            .any(|c| DANGEROUS_MODULES.contains(&c))
        || DANGEROUS_PREFIXES
            .iter()
            .any(|p| module == *p || module.starts_with(&format!("{p}.")))
        || name == "eval"
        || name == "exec"
    {
        return Class::Dangerous;
    }
    if ALLOWLIST
        .lines()
        .skip(1)
        .any(|l| l.trim() == full || l.trim() == canonical)
    {
        return Class::Allowed;
    }
    Class::Other
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
    }
}
