//! The content sniffer on arbitrary file bytes: whatever it says, the safetensors reader agrees.
//! Every file the reader accepts is sniffed as safetensors (so no valid file is ever read as a
//! pickle, zip or tar), and `foreign` never names another format for such a file.
#![no_main]
use libfuzzer_sys::fuzz_target;
use weightcast::formats::safetensors::parse_header;
use weightcast::formats::sniff::{by_magic, is_safetensors, Kind, HEAD};

fuzz_target!(|bytes: &[u8]| {
    let len = bytes.len() as u64;
    let head = &bytes[..bytes.len().min(HEAD)];
    let read_at = |buf: &mut [u8], pos: u64| {
        buf.copy_from_slice(&bytes[pos as usize..pos as usize + buf.len()]);
        Ok(())
    };
    let sniffed = is_safetensors(head, len, read_at).expect("in-memory reads do not fail");
    let _ = by_magic(head, len);
    if bytes.len() >= 8 {
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
        if n <= len - 8 {
            let header = &bytes[8..8 + n as usize];
            if parse_header(std::path::Path::new("fuzz.safetensors"), header, len).is_ok() {
                assert!(
                    sniffed,
                    "a file the reader accepts must sniff as safetensors"
                );
            }
        }
    }
    if sniffed {
        assert_ne!(by_magic(head, len), Kind::Empty);
    }
});
