//! The library API: cancellation leaves nothing behind; plans are made before any data is read.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use weightcast::convert::{convert, NoProgress, Options};
use weightcast::rules::RuleSet;
use weightcast::{formats, DType, Error, Plan};

fn write_model(path: &std::path::Path) {
    let header = r#"{"w":{"dtype":"F32","shape":[1024,1024],"data_offsets":[0,4194304]}}"#;
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v.extend((0..1024 * 1024).flat_map(|i| (i as f32 * 1e-3).to_le_bytes()));
    std::fs::write(path, v).unwrap();
}

#[test]
fn cancelled_conversion_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let inp = dir.path().join("in.safetensors");
    write_model(&inp);
    let cat = formats::open(&inp).unwrap();
    let plan = Plan::new(&cat, &RuleSet::default(), DType::F16);
    let opts = Options {
        cancel: Some(Arc::new(AtomicBool::new(true))),
        ..Options::default()
    };
    let out = dir.path().join("out.safetensors");
    let err = convert(&cat, &plan, &out, &opts, &NoProgress).unwrap_err();
    assert!(matches!(err, Error::Interrupted), "{err}");
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        names,
        vec![std::ffi::OsString::from("in.safetensors")],
        "no temp file left"
    );

    // the same job, not cancelled, writes the output
    let s = convert(&cat, &plan, &out, &Options::default(), &NoProgress).unwrap();
    assert_eq!((s.tensors_cast, s.bytes_out), (1, 2 * 1024 * 1024));
    let bytes = std::fs::read(&out).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    assert_eq!(n % 8, 0, "header padded to 8 bytes");
    assert_eq!(bytes.len() as u64, 8 + n + s.bytes_out);
}

/// Thousands of mutated and truncated PyTorch fixtures: the reader answers Ok or a clean error,
/// never a panic.
#[test]
fn mutated_torch_files_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/torch");
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut errors = 0;
    for entry in std::fs::read_dir(&fixtures).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_none_or(|e| e != "pt") {
            continue;
        }
        let data = std::fs::read(&p).unwrap();
        let bad = dir.path().join("bad.pt");
        for cut in (0..data.len()).step_by((data.len() / 40).max(1)) {
            std::fs::write(&bad, &data[..cut]).unwrap();
            errors += formats::open(&bad).is_err() as usize;
        }
        for _ in 0..300 {
            let mut b = data.clone();
            for _ in 0..(next() % 6 + 1) {
                let i = (next() % b.len() as u64) as usize;
                b[i] = next() as u8;
            }
            std::fs::write(&bad, &b).unwrap();
            if let Ok(cat) = formats::open(&bad) {
                // whatever was read must lie inside the file
                for t in &cat.tensors {
                    let covered = t.strided.as_ref().map_or(t.nbytes, |s| s.span);
                    assert!(t.offset + covered <= b.len() as u64, "{}", t.name);
                }
            } else {
                errors += 1;
            }
        }
    }
    assert!(errors > 100, "mutations were detected: {errors}");
}
