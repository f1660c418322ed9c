//! The real `weightcast` binary on bad input and bad usage: one-line errors that name the file,
//! the tensor or the offset, the documented exit codes, and no output file left behind.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_weightcast"))
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("run weightcast")
}

struct Dir(tempfile::TempDir);

impl Dir {
    fn new() -> Dir {
        Dir(tempfile::tempdir().unwrap())
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }
    fn s(&self, name: &str) -> String {
        self.path(name).to_string_lossy().into_owned()
    }
    /// Files in the folder (to check nothing, not even a temp file, was left).
    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.0.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

/// A safetensors file from a header string and `data` bytes of zeros.
fn raw(header: &str, data: usize) -> Vec<u8> {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v.extend(std::iter::repeat_n(0u8, data));
    v
}

/// A valid file: `a` F32 [2, 3] and `b` I32 [4].
fn valid() -> Vec<u8> {
    let h = r#"{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},"b":{"dtype":"I32","shape":[4],"data_offsets":[24,40]}}"#;
    let mut v = raw(h, 0);
    for i in 0..6 {
        v.extend_from_slice(&(i as f32 * 1.5).to_le_bytes());
    }
    for i in 0..4i32 {
        v.extend_from_slice(&i.to_le_bytes());
    }
    v
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Converting `input` fails with exit `code`, a single error line containing `want` and the file
/// name, and no output.
fn fails(d: &Dir, input: &Path, code: i32, want: &str) {
    let out = d.s("out.safetensors");
    let before = d.names();
    let o = run(&[
        "convert",
        input.to_str().unwrap(),
        "-o",
        &out,
        "--to",
        "f16",
    ]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(code), "{err}");
    assert!(err.contains(want), "expected `{want}` in: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("weightcast: error: "), "{err}");
    assert_eq!(d.names(), before, "nothing written");
}

#[test]
fn converts_a_valid_file() {
    let d = Dir::new();
    std::fs::write(d.path("in.safetensors"), valid()).unwrap();
    let o = run(&[
        "convert",
        &d.s("in.safetensors"),
        "-o",
        &d.s("out.safetensors"),
        "--to",
        "bf16",
        "-q",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        o.stdout.is_empty() && o.stderr.is_empty(),
        "-q prints nothing"
    );
    let o = run(&["inspect", &d.s("out.safetensors"), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let dtype = |name: &str| {
        v["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == name)
            .map(|t| t["dtype"].clone())
    };
    assert_eq!(dtype("a"), Some("BF16".into()));
    assert_eq!(dtype("b"), Some("I32".into()), "integers never cast");
    // Wider elements first: the int32 (4 bytes) before the bf16 (2), both aligned.
    assert_eq!(v["tensors"][0]["name"], "b");
    assert_eq!(v["bytes"], 12 + 16);
    assert_eq!(d.names(), vec!["in.safetensors", "out.safetensors"]);
}

#[test]
fn bad_inputs_get_one_line_errors() {
    let d = Dir::new();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "truncated",
            valid()[..valid().len() - 5].to_vec(),
            "truncated",
        ),
        ("short", vec![1, 2, 3], "too short"),
        (
            "header-past-end",
            {
                let mut v = valid();
                v[..8].copy_from_slice(&5000u64.to_le_bytes());
                v
            },
            "runs past the end",
        ),
        (
            "huge-header",
            {
                let mut v = valid();
                v[..8].copy_from_slice(&u64::MAX.to_le_bytes());
                v
            },
            "exceeds",
        ),
        (
            "bad-json",
            raw(r#"{"a":{"dtype":"F32""#, 0),
            "not valid JSON",
        ),
        (
            "overlap",
            raw(
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
                12,
            ),
            "tensor `b`",
        ),
        (
            "out-of-range",
            raw(
                r#"{"a":{"dtype":"F32","shape":[100],"data_offsets":[0,400]}}"#,
                8,
            ),
            "tensor `a` is cut off",
        ),
        (
            "unknown-dtype",
            raw(
                r#"{"a":{"dtype":"Q4_K","shape":[2],"data_offsets":[0,8]}}"#,
                8,
            ),
            "unknown dtype `Q4_K`",
        ),
        (
            // A name read from the file cannot break the error onto several lines.
            "newline-in-name",
            raw(
                r#"{"a\nweightcast: error: b":{"dtype":"F32","shape":[100],"data_offsets":[0,400]}}"#,
                8,
            ),
            "tensor `a\\u{a}weightcast: error: b` is cut off",
        ),
        (
            "wrong-size",
            raw(
                r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
                8,
            ),
            "needs 12 bytes",
        ),
        (
            "trailing",
            {
                let mut v = valid();
                v.extend_from_slice(b"junk");
                v
            },
            "4 unexpected bytes",
        ),
        (
            "lfs",
            b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 90868376\n".to_vec(),
            "Git LFS pointer",
        ),
        (
            "zip",
            b"PK\x03\x04rest-of-a-torch-file".to_vec(),
            "zip archive",
        ),
    ];
    for (name, bytes, want) in cases {
        let p = d.path(&format!("{name}.safetensors"));
        std::fs::write(&p, bytes).unwrap();
        fails(&d, &p, 1, want);
        fails(&d, &p, 1, &format!("{name}.safetensors"));
        // inspect reports the same
        let o = run(&["inspect", p.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(1));
        assert!(stderr(&o).contains(want), "{}", stderr(&o));
    }
}

#[test]
fn sharded_input_errors() {
    let d = Dir::new();
    std::fs::write(d.path("model-00001-of-00002.safetensors"), valid()).unwrap();
    let index = |map: &str| format!(r#"{{"metadata":{{"total_size":40}},"weight_map":{map}}}"#);
    let idx = d.path("model.safetensors.index.json");
    std::fs::write(&idx, index(r#"{"a":"model-00001-of-00002.safetensors","b":"model-00001-of-00002.safetensors","c":"model-00002-of-00002.safetensors"}"#)).unwrap();
    fails(
        &d,
        &idx,
        1,
        "shard `model-00002-of-00002.safetensors` named by the index is missing",
    );
    std::fs::write(&idx, index(r#"{"a":"model-00001-of-00002.safetensors"}"#)).unwrap();
    fails(
        &d,
        &idx,
        1,
        "tensor `b` is in this shard but not in the index",
    );
    std::fs::write(&idx, index(r#"{"a":"../../etc/passwd"}"#)).unwrap();
    fails(&d, &idx, 1, "not a plain file name");
    std::fs::write(&idx, "{not json").unwrap();
    fails(&d, &idx, 1, "not valid JSON");
    // a consistent index converts
    std::fs::write(
        &idx,
        index(r#"{"a":"model-00001-of-00002.safetensors","b":"model-00001-of-00002.safetensors"}"#),
    )
    .unwrap();
    let o = run(&[
        "convert",
        idx.to_str().unwrap(),
        "-o",
        &d.s("o.safetensors"),
        "--to",
        "f16",
        "-q",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn output_is_protected() {
    let d = Dir::new();
    let inp = d.s("in.safetensors");
    std::fs::write(&inp, valid()).unwrap();
    let original = valid();
    // output == input
    let o = run(&["convert", &inp, "-o", &inp, "--to", "f16"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("overwrite the input"));
    let o = run(&["convert", &inp, "-o", &inp, "--to", "f16", "--force"]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "--force never overwrites the input"
    );
    assert_eq!(std::fs::read(&inp).unwrap(), original, "input untouched");
    // existing output
    let out = d.s("out.safetensors");
    std::fs::write(&out, b"precious").unwrap();
    let o = run(&["convert", &inp, "-o", &out, "--to", "f16"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("already exists (use --force"),
        "{}",
        stderr(&o)
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");
    let o = run(&["convert", &inp, "-o", &out, "--to", "f16", "--force", "-q"]);
    assert!(o.status.success());
    assert_ne!(std::fs::read(&out).unwrap(), b"precious");
    // an output folder that cannot be written (/proc refuses new files, even for root)
    let o = run(&[
        "convert",
        &inp,
        "-o",
        "/proc/weightcast-test.safetensors",
        "--to",
        "f16",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("/proc: cannot create the output here"),
        "{}",
        stderr(&o)
    );
    // a missing output folder is created, as save_pretrained does ...
    let o = run(&[
        "convert",
        &inp,
        "-o",
        &d.s("no/such/dir/x.safetensors"),
        "--to",
        "f16",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(d.path("no/such/dir/x.safetensors").is_file());
    std::fs::remove_dir_all(d.path("no")).unwrap();
    // ... for shard sets too, and removed again when the conversion fails
    let o = run(&[
        "convert",
        &inp,
        "-o",
        &d.s("new/model.safetensors.index.json"),
        "--to",
        "f16",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(d.path("new/model.safetensors.index.json").is_file());
    std::fs::remove_dir_all(d.path("new")).unwrap();
    std::fs::write(d.path("big.safetensors"), {
        let mut v = raw(
            r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
            0,
        );
        v.extend(1e6f32.to_le_bytes());
        v
    })
    .unwrap();
    let o = run(&[
        "convert",
        &d.s("big.safetensors"),
        "-o",
        &d.s("gone/deeper/x.safetensors"),
        "--to",
        "f16",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        !d.path("gone").exists(),
        "created folders removed on failure"
    );
    std::fs::remove_file(d.path("big.safetensors")).unwrap();
    // an ancestor that is a file
    let o = run(&[
        "convert",
        &inp,
        "-o",
        &d.s("in.safetensors/x.safetensors"),
        "--to",
        "f16",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("not a folder"), "{}", stderr(&o));
    assert_eq!(
        d.names(),
        vec!["in.safetensors", "out.safetensors"],
        "no temp file left"
    );
}

#[test]
fn usage_errors_exit_2() {
    let d = Dir::new();
    let inp = d.s("in.safetensors");
    std::fs::write(&inp, valid()).unwrap();
    let out = d.s("out.safetensors");
    let outtxt = d.s("out.txt");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["convert", &inp, "-o", &out, "--to", "f17"],
            "unknown dtype `f17`",
        ),
        (vec!["convert", &inp, "-o", &out], "--to DTYPE is required"),
        (
            vec!["convert", &inp, "-o", &out, "--to", "int8"],
            "cannot cast to I8",
        ),
        (
            vec!["convert", &inp, "-o", &out, "--to", "f16", "--keep", "re:("],
            "invalid regex",
        ),
        (
            vec![
                "convert", &inp, "-o", &out, "--to", "f16", "--preset", "nope",
            ],
            "unknown preset `nope`",
        ),
        (
            vec!["convert", &inp, "-o", &out, "--to", "f16", "--rule", "a.b"],
            "expected PATTERN=DTYPE",
        ),
        (
            vec![
                "convert",
                &inp,
                "-o",
                &out,
                "--to",
                "f16",
                "--max-shard-size",
                "5XB",
            ],
            "unknown unit",
        ),
        (
            vec!["convert", &inp, "-o", &outtxt, "--to", "f16"],
            "must be .safetensors, .safetensors.index.json, .pt/.pth/.bin",
        ),
        (vec!["convert", &inp, "--bogus"], "unexpected argument"),
        (vec!["frobnicate"], "unrecognized subcommand"),
    ];
    for (args, want) in cases {
        let o = run(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(want), "{args:?}: {}", stderr(&o));
    }
    assert_eq!(d.names(), vec!["in.safetensors"]);
    let o = run(&[
        "convert",
        &d.s("missing.safetensors"),
        "-o",
        &out,
        "--to",
        "f16",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("missing.safetensors: No such file"),
        "{}",
        stderr(&o)
    );
    let o = run(&["--help"]);
    assert!(o.status.success() && String::from_utf8_lossy(&o.stdout).contains("convert"));
}

#[test]
fn rule_order_last_match_wins() {
    let d = Dir::new();
    let inp = d.s("in.safetensors");
    std::fs::write(&inp, valid()).unwrap();
    let plan = |args: &[&str]| -> serde_json::Value {
        let mut a = vec![
            "convert",
            &inp,
            "-o",
            "x.safetensors",
            "--to",
            "f16",
            "--dry-run",
            "--json",
        ];
        a.extend_from_slice(args);
        let o = run(&a);
        assert!(o.status.success(), "{}", stderr(&o));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    assert_eq!(
        plan(&["--keep", "a", "--rule", "a=bf16"])["tensors"][0]["to"],
        "BF16"
    );
    assert_eq!(
        plan(&["--rule", "a=bf16", "--keep", "a"])["tensors"][0]["to"],
        "F32"
    );
    assert_eq!(plan(&["--only", "zzz"])["tensors"][0]["to"], "F32");
    let toml = d.path("r.toml");
    std::fs::write(
        &toml,
        "[[rule]]\nmatch = 'zzz'\nto = 'f64'\n[[rule]]\nmatch = 'a'\nto = 'f8e4m3'\n",
    )
    .unwrap();
    let v = plan(&["--rules", toml.to_str().unwrap()]);
    assert_eq!(v["tensors"][0]["to"], "F8_E4M3");
    assert!(v["tensors"][0]["rule"].as_str().unwrap().contains("rule 2"));
    assert!(
        v["warnings"][0].as_str().unwrap().contains("rule 1"),
        "zzz matched nothing: {v}"
    );
}

#[test]
fn overflow_is_refused_by_default() {
    let d = Dir::new();
    // `a` holds 1e5, beyond f16's range.
    let h = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
    let mut v = raw(h, 0);
    v.extend_from_slice(&1e5f32.to_le_bytes());
    v.extend_from_slice(&1.0f32.to_le_bytes());
    let p = d.path("hot.safetensors");
    std::fs::write(&p, v).unwrap();
    fails(&d, &p, 1, "`a` (1 values beyond F16)");
    let o = run(&[
        "convert",
        p.to_str().unwrap(),
        "-o",
        &d.s("b.safetensors"),
        "--to",
        "bf16",
        "-q",
    ]);
    assert!(o.status.success(), "bf16 holds 1e5: {}", stderr(&o));
}

#[test]
fn messages_say_what_a_file_is_and_what_the_command_wants() {
    let d = Dir::new();
    let inp = d.s("in.safetensors");
    std::fs::write(&inp, valid()).unwrap();
    // audit on safetensors: a verdict, not a zip error
    let o = run(&["audit", &inp]);
    assert_eq!(o.status.code(), Some(0));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        out.contains("a safetensors file: no pickle, nothing to run"),
        "{out}"
    );
    // audit on a folder: every file in it
    let o = run(&["audit", &d.s("")]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    // eval on a file
    let o = run(&["eval", &inp]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("eval needs a Hugging Face model folder"));
    assert!(
        stderr(&o).contains("this is a safetensors file"),
        "{}",
        stderr(&o)
    );
    // a truncated zip
    let z = d.path("t.pt");
    std::fs::write(&z, b"PK\x03\x04\x14\x00\x08\x08\x00\x00").unwrap();
    let o = run(&[
        "convert",
        &d.s("t.pt"),
        "-o",
        &d.s("o.safetensors"),
        "--to",
        "f16",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("truncated"), "{}", stderr(&o));
    // the usage line names --to
    let o = run(&["convert", "--help"]);
    let help = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        help.contains("convert <INPUT> -o <OUTPUT> --to <DTYPE>"),
        "{help}"
    );
}

#[test]
fn rules_that_match_nothing_and_ambiguous_dtypes() {
    let d = Dir::new();
    let inp = d.s("in.safetensors");
    std::fs::write(&inp, valid()).unwrap();
    let out = d.s("o.safetensors");
    // --to fp8: two formats answer to the name
    let o = run(&["convert", &inp, "-o", &out, "--to", "fp8"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("ambiguous") && stderr(&o).contains("f8e4m3"));
    // a glob whose only miss is case gets a hint; --strict-rules makes a miss an error
    let h = r#"{"enc.LayerNorm.weight":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
    std::fs::write(&inp, raw(h, 8)).unwrap();
    let o = run(&[
        "convert",
        &inp,
        "-o",
        &out,
        "--to",
        "f16",
        "--keep",
        "*.layernorm.*",
        "--dry-run",
    ]);
    assert_eq!(o.status.code(), Some(0));
    assert!(
        stderr(&o).contains("did you mean `*.LayerNorm.*`"),
        "{}",
        stderr(&o)
    );
    let o = run(&[
        "convert",
        &inp,
        "-o",
        &out,
        "--to",
        "f16",
        "--keep",
        "nothing",
        "--strict-rules",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--strict-rules"), "{}", stderr(&o));
    assert!(!d.path("o.safetensors").exists());
    // a bad rules file is a usage error
    std::fs::write(d.path("r.toml"), "[[rule]]\nmatch = 3\n").unwrap();
    let o = run(&[
        "convert",
        &inp,
        "-o",
        &out,
        "--to",
        "f16",
        "--rules",
        &d.s("r.toml"),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let o = run(&[
        "convert",
        &inp,
        "-o",
        &out,
        "--to",
        "f16",
        "--rules",
        &d.s("missing.toml"),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

#[test]
fn convert_help_lists_every_table_entry() {
    let o = run(&["convert", "--help"]);
    let help = String::from_utf8_lossy(&o.stdout).into_owned();
    for (p, _) in weightcast::rules::PRESETS {
        assert!(help.contains(p), "preset {p} missing from --help:\n{help}");
    }
    for (k, _) in weightcast::rules::KINDS {
        assert!(
            help.contains(&format!("  {k} ")),
            "kind {k} missing:\n{help}"
        );
        weightcast::rules::Selector::parse(&format!("kind:{k}")).expect("a listed kind parses");
    }
    for (s, _) in weightcast::rules::PATTERN_SYNTAX {
        assert!(help.contains(s), "pattern syntax {s} missing:\n{help}");
    }
    assert!(help.contains("`**`"), "{help}");
    for (d, names) in weightcast::dtype::CASTABLE {
        let shown = format!("{}|{}", names[0], names[1]);
        assert!(
            help.contains(&shown),
            "dtype {d} ({shown}) missing:\n{help}"
        );
        for n in *names {
            assert_eq!(n.parse::<weightcast::DType>().unwrap(), *d, "{n}");
        }
    }
    for (o, _) in weightcast::output::OUTPUT_FORMATS {
        assert!(help.contains(o), "output {o} missing:\n{help}");
    }
    // Every castable dtype is in the table, and nothing else.
    let castable: Vec<_> = weightcast::DType::ALL
        .into_iter()
        .filter(|d| d.is_castable())
        .collect();
    assert_eq!(castable.len(), weightcast::dtype::CASTABLE.len());
}

/// A safetensors file of F32 tensors `(name, values)`.
fn f32_file(tensors: &[(&str, &[f32])]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, vals) in tensors {
        let start = data.len();
        for v in *vals {
            data.extend_from_slice(&v.to_le_bytes());
        }
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": "F32", "shape": [vals.len()], "data_offsets": [start, data.len()]}),
        );
    }
    let h = serde_json::Value::Object(header).to_string();
    let mut v = raw(&h, 0);
    v.extend_from_slice(&data);
    v
}

#[test]
fn dry_run_predicts_the_run() {
    let d = Dir::new();
    let p = d.path("hot.safetensors");
    std::fs::write(
        &p,
        f32_file(&[("a", &[1e5, 1.0]), ("tiny", &[1e-9, -1e-9])]),
    )
    .unwrap();
    let out = d.s("o.safetensors");
    // The run refuses the overflow (exit 1): so does the dry run, with the same message.
    let dry = run(&[
        "convert",
        p.to_str().unwrap(),
        "-o",
        &out,
        "--to",
        "f16",
        "--dry-run",
    ]);
    let real = run(&["convert", p.to_str().unwrap(), "-o", &out, "--to", "f16"]);
    assert_eq!(dry.status.code(), Some(1), "{}", stderr(&dry));
    assert_eq!(real.status.code(), Some(1));
    assert_eq!(stderr(&dry), stderr(&real));
    assert!(stderr(&dry).contains("`a` (1 values beyond F16)"));
    // Clamped: both go through, and both warn that `tiny` became all zeros.
    let args = ["--to", "f16", "--on-overflow", "clamp"];
    let dry = run(&[
        &["convert", p.to_str().unwrap(), "-o", &out, "--dry-run"][..],
        &args,
    ]
    .concat());
    assert_eq!(dry.status.code(), Some(0), "{}", stderr(&dry));
    assert!(stderr(&dry).contains("became all zeros") && stderr(&dry).contains("`tiny`"));
    assert!(
        !d.path("o.safetensors").exists(),
        "a dry run writes nothing"
    );
    let real = run(&[&["convert", p.to_str().unwrap(), "-o", &out][..], &args].concat());
    assert_eq!(real.status.code(), Some(0), "{}", stderr(&real));
    assert!(stderr(&real).contains("became all zeros") && stderr(&real).contains("`tiny`"));
    // The output now exists: the run refuses without --force, so does the dry run (exit 2).
    let dry = run(&[
        &["convert", p.to_str().unwrap(), "-o", &out, "--dry-run"][..],
        &args,
    ]
    .concat());
    assert_eq!(dry.status.code(), Some(2), "{}", stderr(&dry));
    assert!(stderr(&dry).contains("already exists"), "{}", stderr(&dry));
    // With --force it says it replaces the output.
    let dry = run(&[
        &[
            "convert",
            p.to_str().unwrap(),
            "-o",
            &out,
            "--dry-run",
            "--force",
        ][..],
        &args,
    ]
    .concat());
    assert_eq!(dry.status.code(), Some(0), "{}", stderr(&dry));
    let text = String::from_utf8_lossy(&dry.stdout).into_owned();
    assert!(text.contains("exists: the run replaces it"), "{text}");
    let dry = run(&[
        &[
            "convert",
            p.to_str().unwrap(),
            "-o",
            &out,
            "--dry-run",
            "--force",
            "--json",
        ][..],
        &args,
    ]
    .concat());
    let v: serde_json::Value = serde_json::from_slice(&dry.stdout).unwrap();
    assert_eq!(v["replaces_existing"], true);
}

#[test]
fn diff_fails_on_values_that_became_infinite() {
    let d = Dir::new();
    let a = d.path("a.safetensors");
    let b = d.path("b.safetensors");
    let vals: Vec<f32> = (0..64)
        .map(|i| if i % 2 == 0 { 1e5 } else { 1.0 + i as f32 })
        .collect();
    std::fs::write(&a, f32_file(&[("w", &vals)])).unwrap();
    let o = run(&[
        "convert",
        a.to_str().unwrap(),
        "-o",
        b.to_str().unwrap(),
        "--to",
        "f16",
        "--on-overflow",
        "allow",
        "-q",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    for extra in [&[][..], &["--tolerance", "40"][..]] {
        let o = run(&[
            &["diff", a.to_str().unwrap(), b.to_str().unwrap()][..],
            extra,
        ]
        .concat());
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        assert_eq!(o.status.code(), Some(1), "{out}");
        assert!(
            out.contains("FAIL `w`: 32 finite value(s) of A are inf or NaN in B"),
            "{out}"
        );
        assert!(out.contains("-inf") && !out.contains("\nok\n"), "{out}");
    }
    let o = run(&["analyze", a.to_str().unwrap(), "--to", "f16", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let w = &v["tensors"][0];
    assert_eq!(w["verdict"], "overflow");
    assert_eq!(w["nonfinite"], 32);
    assert!(
        w["snr_db"].is_null() && w["cosine"].is_null() && w["rms_err"].is_null(),
        "{w}"
    );
}

#[test]
fn options_that_cannot_be_honoured_are_refused() {
    let d = Dir::new();
    let p = d.path("in.safetensors");
    std::fs::write(&p, f32_file(&[("module.0.weight", &[1.0, 2.0])])).unwrap();
    let inp = p.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (
            &["-o", &d.s("o.pt"), "--max-shard-size", "1MB"],
            "a .pt output is one",
        ),
        (
            &["-o", &d.s("o.safetensors"), "--scale-format", "fp8"],
            "applies with --scale",
        ),
        (
            &["-o", &d.s("o.safetensors"), "--strip-prefix", "module"],
            "did you mean `module.`",
        ),
        (
            &["-o", &d.s("model.gguf")],
            "a .gguf output is written from a GGUF file or a Hugging Face model folder",
        ),
        (&["-o", &d.s("model.onnx")], "does not write .onnx"),
    ];
    for (args, want) in cases {
        let o = run(&[&["convert", inp, "--to", "f16"][..], args].concat());
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(want), "{args:?}: {}", stderr(&o));
    }
    assert_eq!(d.names(), vec!["in.safetensors"]);
}

#[test]
fn overridden_rules_are_not_unmatched() {
    let d = Dir::new();
    let p = d.path("in.safetensors");
    std::fs::write(
        &p,
        f32_file(&[("lm_head.weight", &[1.0]), ("x.weight", &[1.0])]),
    )
    .unwrap();
    let o = run(&[
        "convert",
        p.to_str().unwrap(),
        "-o",
        &d.s("o.safetensors"),
        "--to",
        "f16",
        "--keep",
        "lm_head",
        "--rule",
        "lm_head=bf16",
        "--strict-rules",
        "--dry-run",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("rule `--keep lm_head` decides no tensor"),
        "{err}"
    );
    assert!(err.contains("by `--rule lm_head=bf16`"), "{err}");
    assert!(!err.contains("did you mean"), "{err}");
    assert!(!err.contains("matches no tensor"), "{err}");
}

#[test]
fn the_documented_rules_file_passes_strict_rules() {
    // The rules file docs/rules.md shows, taken from it, on a model with the tensors it names.
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/rules.md")).unwrap();
    let start = readme
        .find("Rules file:\n")
        .expect("docs/rules.md's rules file");
    let body = &readme[start..];
    let body = &body[body.find("```toml\n").unwrap() + 8..];
    let toml: String = body[..body.find("```").unwrap()]
        .lines()
        .map(|l| l.trim_start())
        .collect::<Vec<_>>()
        .join("\n");
    let d = Dir::new();
    std::fs::write(d.path("rules.toml"), toml).unwrap();
    let p = d.path("in.safetensors");
    let names = [
        "embed.word_embeddings.weight",
        "enc.0.LayerNorm.weight",
        "enc.0.dense.weight",
        "lm_head.weight",
    ];
    let tensors: Vec<(&str, &[f32])> = names.iter().map(|n| (*n, &[1.0f32, 2.0][..])).collect();
    std::fs::write(&p, f32_file(&tensors)).unwrap();
    let o = run(&[
        "convert",
        p.to_str().unwrap(),
        "-o",
        &d.s("o.safetensors"),
        "--rules",
        &d.s("rules.toml"),
        "--strict-rules",
        "--dry-run",
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stderr(&o).contains("decides no tensor"), "{}", stderr(&o));
}

#[test]
fn a_tensor_larger_than_the_shard_size_is_told() {
    let d = Dir::new();
    let p = d.path("in.safetensors");
    let big = vec![1.0f32; 64];
    std::fs::write(&p, f32_file(&[("big", &big), ("small", &[1.0])])).unwrap();
    let o = run(&[
        "convert",
        p.to_str().unwrap(),
        "-o",
        &d.s("o.safetensors"),
        "--to",
        "f16",
        "--max-shard-size",
        "100",
        "-q",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("1 tensor(s) are larger than --max-shard-size 100 bytes")
            && stderr(&o).contains("`big`: 128 bytes"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn messages_have_no_runs_of_spaces() {
    // A string literal broken across lines without `\` keeps the next line's indentation: the
    // message then shows a run of spaces. Scan every string literal of the sources.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut bad = Vec::new();
    let mut stack = vec![
        root.join("src"),
        root.join("cli/src"),
        root.join("python/src"),
    ];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let text = std::fs::read_to_string(&p).unwrap();
                for (n, line) in text.lines().enumerate() {
                    // Text after a quote, up to the next quote, with a run of 3+ spaces between
                    // words (alignment in format specs and help tables is padded by `{:<N}`).
                    for lit in line.split('"').skip(1).step_by(2) {
                        if lit.starts_with(' ') {
                            continue; // an indented table row, aligned on purpose
                        }
                        let words: Vec<&str> = lit.split("   ").collect();
                        if words.len() > 1
                            && words.first().is_some_and(|w| !w.trim().is_empty())
                            && words.last().is_some_and(|w| !w.trim().is_empty())
                        {
                            bad.push(format!("{}:{}: {lit}", p.display(), n + 1));
                        }
                    }
                }
            }
        }
    }
    assert!(
        bad.is_empty(),
        "runs of spaces in messages:\n{}",
        bad.join("\n")
    );
}

/// The Python extension links the core library and the command-line library: the wheel's
/// `weightcast` command runs this crate's `main` in the Python process, so it is the same program
/// as the binary (and a wheel built from the source distribution has it). Resolved from the
/// lock file, fetching what this machine lacks, as any build would.
#[test]
fn python_extension_links_the_command_line_library() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out = Command::new(env!("CARGO"))
        .args(["tree", "--locked", "-p", "weightcast-python"])
        .args(["-e", "normal", "--prefix", "none"])
        .current_dir(root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    for crate_ in ["weightcast", "weightcast-cli", "pyo3", "clap"] {
        assert!(
            text.lines().any(|l| l.starts_with(&format!("{crate_} v"))),
            "{crate_} not in the extension's tree:\n{text}"
        );
    }
}

/// -q/--quiet is one global flag: every command takes it, before or after the command's name,
/// and it silences progress and notes, not the result.
#[test]
fn quiet_is_accepted_by_every_command() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let bert = root.join("examples/tiny-bert");
    let bert = bert.to_str().unwrap();
    let help = String::from_utf8_lossy(&run(&["--help"]).stdout).into_owned();
    let commands: Vec<&str> = help
        .split("Commands:")
        .nth(1)
        .expect("a command list")
        .lines()
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        // a command's line, not the continuation of a description
        .filter(|l| !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .collect();
    for c in [
        "inspect", "audit", "convert", "analyze", "eval", "diff", "profile",
    ] {
        assert!(commands.contains(&c), "{c} in {commands:?}");
    }
    for c in &commands {
        let o = run(&[c, "-q", "--help"]);
        let err = stderr(&o);
        assert!(!err.contains("unexpected argument"), "{c}: {err}");
        if *c == "profile" {
            // the Python package's command: its own arguments, whatever they are
            assert!(err.contains("Python package"), "{c}: {err}");
            continue;
        }
        let out = String::from_utf8_lossy(&o.stdout);
        assert_eq!(o.status.code(), Some(0), "{c}: {err}");
        assert!(out.contains("-q, --quiet"), "{c}: {out}");
    }
    let d = Dir::new();
    let (out, report) = (d.s("out"), d.s("r.html"));
    for args in [
        &["inspect", bert, "-q"][..],
        &["-q", "inspect", bert],
        &["--quiet", "analyze", bert, "--to", "f16"],
        &["analyze", bert, "--to", "f16", "-q", "--report", &report],
        &["audit", bert, "-q"],
        &["audit", "-q", bert, "--json"],
        &["diff", bert, bert, "-q"],
        &["convert", bert, "-o", &out, "--to", "f16", "-q"],
        &["-q", "convert", bert, "-o", &out, "--to", "f16", "--force"],
    ] {
        let o = run(args);
        let (stdout, err) = (String::from_utf8_lossy(&o.stdout), stderr(&o));
        assert_eq!(o.status.code(), Some(0), "{args:?}: {err}");
        assert!(!err.contains("unexpected argument"), "{args:?}: {err}");
        if args.contains(&"convert") {
            // no summary line
            assert!(
                err.is_empty() && stdout.is_empty(),
                "{args:?}: {err}{stdout}"
            );
        } else {
            // the result is printed
            assert!(!stdout.trim().is_empty(), "{args:?}");
        }
        if args.contains(&"--report") {
            assert!(!stdout.contains("report:"), "{stdout}");
        }
    }
    assert!(d.path("r.html").exists() && d.path("out").exists());
    // without -q, the note that names the report stays
    let o = run(&["analyze", bert, "--to", "f16", "--report", &report]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("report:"));
}
