//! The torch.save reader (zip and legacy) on arbitrary files: a catalogue or an error, every
//! tensor it reports lies inside the file (or inside its inflated record, for a deflated one),
//! and reading every tensor's bytes (which inflates deflated records) ends in data or an error.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("weightcast-fuzz-{}.pt", std::process::id()));
    std::fs::write(&path, data).unwrap();
    if let Ok(cat) = weightcast::formats::open(&path) {
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
