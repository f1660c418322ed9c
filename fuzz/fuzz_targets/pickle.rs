//! The pickle engine on arbitrary bytes: parse (never panic), and whatever parses writes back
//! and parses again.
#![no_main]
use libfuzzer_sys::fuzz_target;
use weightcast::formats::pickle;

fuzz_target!(|data: &[u8]| {
    let limits = pickle::Limits {
        max_nodes: 100_000,
        max_stack: 100_000,
        max_marks: 1_000,
        max_memo: 100_000,
    };
    if let Ok(pk) = pickle::parse_with(data, limits) {
        if let Ok(bytes) = pickle::write(&pk) {
            pickle::parse(&bytes).expect("what we write parses");
        }
    }
});
