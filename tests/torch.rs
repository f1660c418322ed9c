//! The PyTorch read and write paths from the committed fixtures (made by real torch with
//! tests/fixtures/torch/make_fixtures.py), without Python: for every fixture, output format and
//! rule set, the output read back by our own readers holds exactly what the plan says (names,
//! dtypes, shapes), and every tensor's bytes are the cast kernels' output for the input's bytes
//! (the kernels themselves are checked bit for bit against torch by the Python tests).

use std::path::{Path, PathBuf};

use weightcast::catalogue::{Catalogue, TensorEntry};
use weightcast::convert::{convert, NoProgress, OnOverflow, Options};
use weightcast::formats::torch::write::PtExport;
use weightcast::plan::Scope;
use weightcast::rules::RuleSet;
use weightcast::source::Sources;
use weightcast::{cast, formats, DType, Plan};

fn fixtures() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/torch");
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "pt"))
        .collect();
    v.sort();
    assert!(v.len() >= 15, "the committed fixtures are there");
    v
}

fn rule_sets() -> Vec<RuleSet> {
    let mut sets = vec![RuleSet::default()];
    let mut r = RuleSet::default();
    r.preset("keep-norms").unwrap();
    sets.push(r);
    let mut r = RuleSet::default();
    r.only("re:weight$", "--only").unwrap();
    sets.push(r);
    let mut r = RuleSet::default();
    r.rule("re:.*=bf16", "--rule").unwrap();
    r.keep("kind:1d", "--keep").unwrap();
    sets.push(r);
    sets
}

fn bytes_of(cat: &Catalogue, t: &TensorEntry) -> Vec<u8> {
    let src = Sources::open(cat).unwrap();
    let mut buf = vec![0u8; t.nbytes as usize];
    src.read(t, 0, &mut buf).unwrap();
    buf
}

fn cast_bytes(from: DType, to: DType, input: &[u8]) -> Vec<u8> {
    if from == to {
        return input.to_vec();
    }
    let n = input.len() / (from.bitsize() / 8);
    let mut out = vec![0u8; n * (to.bitsize() / 8)];
    cast::cast(from, to, input, &mut out).unwrap();
    out
}

/// NaN bit patterns are not promised (torch's own depend on the length): compare elementwise
/// with NaN as NaN.
fn same_values(dtype: DType, got: &[u8], want: &[u8]) -> bool {
    if got.len() != want.len() {
        return false;
    }
    if !dtype.is_float() || !dtype.is_castable() {
        return got == want;
    }
    let es = dtype.bitsize() / 8;
    got.chunks(es).zip(want.chunks(es)).all(|(a, b)| {
        let (x, y) = (cast::decode_f64(dtype, a), cast::decode_f64(dtype, b));
        a == b || (x.is_nan() && y.is_nan())
    })
}

fn check(src: &Catalogue, plan: &Plan, out: &Catalogue, what: &str) {
    let by_name: std::collections::HashMap<&str, &TensorEntry> =
        out.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    for p in plan.tensors() {
        let t = &src.tensors[p.tensor];
        let o = by_name
            .get(t.name.as_str())
            .unwrap_or_else(|| panic!("{what}: `{}` is in the plan but not the output", t.name));
        assert_eq!(o.dtype, p.to, "{what}: `{}` dtype", t.name);
        assert_eq!(o.shape, t.shape, "{what}: `{}` shape", t.name);
        let want = cast_bytes(p.from, p.to, &bytes_of(src, t));
        assert!(
            same_values(p.to, &bytes_of(out, o), &want),
            "{what}: `{}` values",
            t.name
        );
    }
    assert_eq!(
        out.tensors.len(),
        plan.tensors().len(),
        "{what}: the output's state dict holds the plan's tensors and nothing else"
    );
}

#[test]
fn every_fixture_output_and_rule_set_is_the_plan() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = Options {
        on_overflow: OnOverflow::Allow,
        force: true,
        ..Options::default()
    };
    // custom_module.pt pickles a user's own class: a .pt output carries it only when accepted
    opts.pt_export.allow = weightcast::audit::Allow::new(["__main__.Custom".to_string()]);
    let mut checked = 0;
    for path in fixtures() {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let cat = formats::open(&path).unwrap();
        for (r, rules) in rule_sets().iter().enumerate() {
            // safetensors: the state dict
            let plan = Plan::new(&cat, rules, DType::F16);
            let out = dir.path().join(format!("{name}-{r}.safetensors"));
            convert(&cat, &plan, &out, &opts, &NoProgress).unwrap();
            check(
                &cat,
                &plan,
                &formats::open(&out).unwrap(),
                &format!("{name} rules {r} -> safetensors"),
            );
            checked += 1;
            // .pt: the whole file
            let plan = Plan::with_scope(
                &cat,
                rules,
                DType::F16,
                Scope::WholeFile { cast_others: false },
            );
            let out = dir.path().join(format!("{name}-{r}.pt"));
            let res = convert(&cat, &plan, &out, &opts, &NoProgress);
            if name == "scripted.pt" || name == "malicious.pt" {
                assert!(res.is_err() && !out.exists(), "{name}: refused");
                continue;
            }
            res.unwrap();
            let back =
                formats::torch::open(&out, cat.torch.as_ref().unwrap().entry.as_deref()).unwrap();
            check(&cat, &plan, &back, &format!("{name} rules {r} -> .pt"));
            // ... and the rest of the file as the plan says (kept)
            let (a, b) = (
                &cat.torch.as_ref().unwrap().others,
                &back.torch.as_ref().unwrap().others,
            );
            assert_eq!(a.len(), b.len(), "{name}: other tensors");
            for (x, y) in a.iter().zip(b) {
                assert_eq!(
                    (&x.entry.name, x.entry.dtype),
                    (&y.entry.name, y.entry.dtype)
                );
                assert_eq!(bytes_of(&cat, &x.entry), bytes_of(&back, &y.entry));
            }
            checked += 1;
        }
    }
    assert!(checked > 100, "{checked}");
}

#[test]
fn inference_export_and_optimizer_casting() {
    let dir = tempfile::tempdir().unwrap();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/torch/training.pt");
    let cat = formats::open(&path).unwrap();
    let rules = RuleSet::default();
    // --inference: the state dict alone, optimizer dropped
    let plan = Plan::new(&cat, &rules, DType::BF16);
    assert!(plan.dropped.iter().any(|d| d.0 == "optimizer" && d.1 > 0));
    let out = dir.path().join("inf.pt");
    let opts = Options {
        pt_export: PtExport {
            inference: true,
            ..PtExport::default()
        },
        ..Options::default()
    };
    convert(&cat, &plan, &out, &opts, &NoProgress).unwrap();
    let back = formats::torch::open(&out, Some("")).unwrap();
    check(&cat, &plan, &back, "inference");
    assert!(back.torch.as_ref().unwrap().others.is_empty());
    // --cast-optimizer: moments cast, 0-d step counters kept
    let plan = Plan::with_scope(
        &cat,
        &rules,
        DType::BF16,
        Scope::WholeFile { cast_others: true },
    );
    let others = &cat.torch.as_ref().unwrap().others;
    for p in plan.others() {
        let t = &others[p.tensor].entry;
        let want = if t.dtype.is_float() && !t.shape.is_empty() {
            DType::BF16
        } else {
            t.dtype
        };
        assert_eq!(p.to, want, "{}", t.name);
    }
    let out = dir.path().join("all.pt");
    convert(&cat, &plan, &out, &Options::default(), &NoProgress).unwrap();
    let back = formats::open(&out).unwrap();
    for (p, y) in plan
        .others()
        .iter()
        .zip(&back.torch.as_ref().unwrap().others)
    {
        let x = &others[p.tensor].entry;
        assert_eq!(y.entry.dtype, p.to, "{}", x.name);
        assert!(same_values(
            p.to,
            &bytes_of(&back, &y.entry),
            &cast_bytes(p.from, p.to, &bytes_of(&cat, x))
        ));
    }
}

#[test]
fn a_storage_whose_views_disagree_is_kept_whole_in_every_output() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/torch/views.pt");
    let cat = formats::open(&path).unwrap();
    let mut rules = RuleSet::default();
    rules.rule("slice=bf16", "--rule slice=bf16").unwrap();
    let plan = Plan::new(&cat, &rules, DType::F16);
    let shared: Vec<_> = plan
        .tensors()
        .iter()
        .filter(|p| cat.tensors[p.tensor].storage == cat.tensors[plan.tensors()[0].tensor].storage)
        .collect();
    assert!(shared.len() > 1, "views of one storage");
    for p in shared {
        assert!(!p.is_cast(), "{}", cat.tensors[p.tensor].name);
        assert!(p.reason.contains("kept whole"), "{}", p.reason);
    }
}
