//! The safetensors header parser on arbitrary header bytes and file lengths.
#![no_main]
use libfuzzer_sys::fuzz_target;
use weightcast::formats::safetensors::parse_header;

fuzz_target!(|input: (u32, &[u8])| {
    let (extra, header) = input;
    let len = 8 + header.len() as u64 + extra as u64;
    if let Ok(h) = parse_header(std::path::Path::new("fuzz.safetensors"), header, len) {
        let last = h.tensors.last().map_or(0, |t| t.end);
        assert_eq!(h.data_start + last, len);
    }
});
