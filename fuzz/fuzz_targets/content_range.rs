//! The remote reader's parsing of a server's `Content-Range` answer on arbitrary text: never a
//! panic; what it accepts is a range inside the file (START <= END < TOTAL) that prints back as
//! the same answer, so a range the server did not send can never be taken for the one asked.
#![no_main]
use libfuzzer_sys::fuzz_target;
use weightcast::remote::http::parse_content_range;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Some((s, e, t)) = parse_content_range(text) {
        assert!(s <= e && e < t);
        let again = format!("bytes {s}-{e}/{t}");
        assert_eq!(parse_content_range(&again), Some((s, e, t)));
        // Only digits were read: the text is the canonical form up to leading zeros.
        let strip = |x: &str| x.trim_start_matches('0').to_string();
        let parts: Vec<String> = text["bytes ".len()..]
            .split(['-', '/'])
            .map(strip)
            .collect();
        let canon: Vec<String> = again["bytes ".len()..]
            .split(['-', '/'])
            .map(strip)
            .collect();
        assert_eq!(parts, canon);
    }
});
