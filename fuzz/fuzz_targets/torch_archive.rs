//! The torch.save reader (zip and legacy) on arbitrary files: a catalogue or an error, and
//! every tensor it reports lies inside the file.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("weightcast-fuzz-{}.pt", std::process::id()));
    std::fs::write(&path, data).unwrap();
    if let Ok(cat) = weightcast::formats::open(&path) {
        for t in &cat.tensors {
            let covered = t.strided.as_ref().map_or(t.nbytes, |s| s.span);
            assert!(t.offset + covered <= data.len() as u64);
        }
    }
});
