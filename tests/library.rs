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
