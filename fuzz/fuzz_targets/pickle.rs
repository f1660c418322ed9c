//! The pickle engine on arbitrary bytes: parse never panics; whatever parses and our writer
//! accepts reads back as the same tree with the same globals (plus only the ones protocol 2
//! needs for bytes and sets); the writer never accepts a global that is not a Python name, so
//! no name read from an input can become opcodes of its own.
#![no_main]
use libfuzzer_sys::fuzz_target;
use weightcast::audit::is_name_path;
use weightcast::formats::pickle;

fuzz_target!(|data: &[u8]| {
    let limits = pickle::Limits {
        max_nodes: 100_000,
        max_stack: 100_000,
        max_marks: 1_000,
        max_memo: 100_000,
        // joblib's reading (array bytes stepped over after a NumpyArrayWrapper) for inputs
        // whose last byte is odd
        joblib_arrays: data.last().is_some_and(|b| b & 1 == 1),
    };
    // The partial parse agrees with the full one, and what it kept was read from the data.
    let (full, partial) = pickle::parse_prefix_partial(data, limits);
    assert_eq!(full.is_ok(), pickle::parse_with(data, limits).is_ok());
    if let (Err(_), Some(p)) = (&full, &partial) {
        assert!(p.global_sites.values().all(|s| s.offset < data.len()));
        assert!(!p.globals().is_empty(), "a partial is kept only when it read a global");
    }
    let Ok(pk) = pickle::parse_with(data, limits) else {
        return;
    };
    let before = pickle::reachable_globals(&pk);
    match pickle::write(&pk) {
        Ok(bytes) => {
            assert!(before
                .iter()
                .all(|(m, n)| is_name_path(m) && is_name_path(n)));
            let back = pickle::parse(&bytes).expect("what we write parses");
            assert!(pickle::equivalent(&pk, &back), "round trip changed the tree");
            let after = pickle::reachable_globals(&back);
            assert!(before.is_subset(&after));
            assert!(after.difference(&before).all(|(m, n)| pickle::WRITER_GLOBALS
                .contains(&(m.as_str(), n.as_str()))));
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains("not a Python name")
                    || msg.contains("nesting")
                    || msg.contains("contains itself"),
                "{msg}"
            );
        }
    }
});
