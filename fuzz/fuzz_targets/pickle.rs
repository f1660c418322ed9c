//! The pickle engine on arbitrary bytes: parse never panics; whatever parses and our writer
//! accepts reads back as the same tree with the same globals (plus only the ones protocol 2
//! needs for bytes and sets); the writer never accepts a global that is not a Python name, so
//! no name read from an input can become opcodes of its own. Frames: read as CPython's C
//! unpickler reads a file, a pickle whose frames skip no byte is the same pickle read from
//! memory; one whose frames do skip bytes reports the skips, and its globals include every
//! global the reading from memory sees.
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
        reading: pickle::Reading::File,
    };
    // The partial parse agrees with the full one, and what it kept was read from the data.
    let (full, partial) = pickle::parse_prefix_partial(data, limits);
    assert_eq!(full.is_ok(), pickle::parse_with(data, limits).is_ok());
    if let (Err(e), Some(p)) = (&full, &partial) {
        assert!(p.global_sites.values().all(|s| s.offset < data.len()));
        assert!(
            !p.globals().is_empty() || !p.frame_skips.is_empty() || e.opcode == "FRAME",
            "a partial is kept only when it read a global or its frames read differently"
        );
    }
    let memory = pickle::Limits {
        reading: pickle::Reading::Buffer,
        ..limits
    };
    let (in_memory, in_memory_partial) = pickle::parse_prefix_partial(data, memory);
    let file_pk = match (&full, &partial) {
        (Ok((p, _)), _) | (Err(_), Some(p)) => Some(p),
        _ => None,
    };
    let memory_pk = match (&in_memory, &in_memory_partial) {
        (Ok((p, _)), _) | (Err(_), Some(p)) => Some(p),
        _ => None,
    };
    let skips = file_pk.is_some_and(|p| !p.frame_skips.is_empty())
        || matches!(&full, Err(e) if e.opcode == "FRAME");
    if !skips {
        if let (Ok((a, n)), Ok((b, m))) = (&full, &in_memory) {
            assert_eq!(n, m, "no byte skipped: both readings end at the same STOP");
            assert!(pickle::equivalent(a, b), "no byte skipped: the same pickle");
        }
    } else if let Some(mem) = memory_pk {
        let have: std::collections::HashSet<_> =
            file_pk.map(|p| p.globals()).unwrap_or_default().into_iter().collect();
        assert!(
            mem.globals().iter().all(|g| have.contains(g)),
            "frames read differently: every global of the reading from memory is judged"
        );
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
