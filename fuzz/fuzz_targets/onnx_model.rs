//! The ONNX model scanner on arbitrary bytes: it never panics, never allocates by a length it
//! has not checked against the bytes that hold it, and every weight it accepts has as many bytes
//! as its dims and dtype say, inside the model (or inside the decoded values) for data that is
//! not external; names are unique.
#![no_main]
use libfuzzer_sys::fuzz_target;
use weightcast::formats::onnx::{scan_bytes, Place};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = scan_bytes(std::path::Path::new("fuzz.onnx"), data) else {
        return;
    };
    let mut names = std::collections::HashSet::new();
    for f in &s.found {
        assert!(names.insert(f.name.clone()), "two weights named {}", f.name);
        let numel = f
            .shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .expect("checked");
        let nbytes = f.dtype.bytes_for(numel).expect("checked");
        match &f.place {
            Place::Model { offset, nbytes: n } => {
                assert_eq!(*n, nbytes);
                assert!(offset + n <= data.len() as u64);
            }
            Place::Memory { offset, nbytes: n } => {
                assert_eq!(*n, nbytes);
                assert!(offset + n <= s.decoded.len() as u64);
            }
            Place::External { nbytes: n, .. } => assert_eq!(*n, nbytes),
        }
    }
});
