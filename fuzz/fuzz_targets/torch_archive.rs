//! The torch.save reader (zip and legacy) on arbitrary files: a catalogue or an error, every
//! tensor it reports lies inside the file (or inside its inflated record, for a deflated one),
//! and reading every tensor's bytes (which inflates deflated records) ends in data or an error.
//! The audit scan (zip, legacy stack, tar) ends in a verdict or an error; every pickle it
//! reports starts inside the file; a file the reader accepts is one the scan reads too.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("weightcast-fuzz-{}.pt", std::process::id()));
    std::fs::write(&path, data).unwrap();
    let scan = weightcast::formats::torch::scan::scan(&path);
    if let Ok(s) = &scan {
        assert!(s.pickles.iter().all(|p| p.offset <= data.len() as u64));
    }
    if let Ok(cat) = weightcast::formats::open(&path) {
        if cat.kind.is_torch() {
            assert!(scan.is_ok(), "the reader read what the scan could not: {scan:?}");
        }
        for t in &cat.tensors {
            let covered = t.strided.as_ref().map_or(t.nbytes, |s| s.span);
            let limit = t.packed.as_ref().map_or(data.len() as u64, |p| p.size);
            assert!(t.offset + covered <= limit);
        }
        if let Ok(sources) = weightcast::source::Sources::open(&cat) {
            for t in cat.tensors.iter().filter(|t| t.nbytes <= 1 << 20) {
                let mut buf = vec![0u8; t.nbytes as usize];
                let _ = sources.read(t, 0, &mut buf);
            }
        }
    }
});
