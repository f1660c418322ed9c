//! The GGUF header parser on arbitrary bytes and file lengths: it never panics nor allocates by
//! a length it has not checked; a header it accepts places every tensor inside the file without
//! overlap; and dequantizing any block-quantized tensor's bytes (taken from the input) never
//! panics. What the GGUF writer makes of an accepted header (same tensors and types) reads back
//! as the same tensor table, each tensor where the writer placed it, and as metadata that the
//! writer turns into the same bytes again.
#![no_main]
use libfuzzer_sys::fuzz_target;
use weightcast::formats::gguf::parse_header;
use weightcast::formats::gguf::write::{header, OutTensor};

fuzz_target!(|input: (u16, &[u8])| {
    let (extra, data) = input;
    let mut buf = b"GGUF\x03\x00\x00\x00".to_vec();
    buf.extend_from_slice(data);
    let len = buf.len() as u64 + extra as u64;
    let Ok(doc) = parse_header(std::path::Path::new("fuzz.gguf"), &buf, len) else {
        return;
    };
    let mut spans: Vec<(u64, u64)> = doc.tensors.iter().map(|t| (t.offset, t.nbytes)).collect();
    spans.sort_unstable();
    for w in spans.windows(2) {
        assert!(w[0].0 + w[0].1 <= w[1].0, "tensors overlap");
    }
    for t in &doc.tensors {
        assert!(t.offset + t.nbytes <= len && t.offset >= doc.data_offset);
        let (block, bytes) = (t.ggml.block as usize, t.ggml.bytes as usize);
        let raw = &data[..data.len() / bytes * bytes];
        let mut out = vec![0f32; raw.len() / bytes * block];
        let _ = weightcast::formats::gguf::ggml::dequantize(t.ggml.id, bytes, block, raw, &mut out);
    }
    let outs: Vec<OutTensor> = doc
        .tensors
        .iter()
        .map(|t| OutTensor {
            name: t.name.clone(),
            dims: t.dims.clone(),
            ggml: t.ggml,
            nbytes: t.nbytes,
        })
        .collect();
    let head = header(&doc, &[], &outs);
    let back = parse_header(std::path::Path::new("back.gguf"), &head.bytes, head.len)
        .expect("what the writer makes reads back");
    // the metadata (split keys aside) reads back as written: writing it again gives the same bytes
    assert_eq!(header(&back, &[], &outs).bytes, head.bytes);
    assert_eq!(
        back.metadata.len(),
        doc.metadata
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "split.no" | "split.count" | "split.tensors.count"))
            .count()
    );
    assert_eq!(back.tensors.len(), outs.len());
    for ((b, o), at) in back.tensors.iter().zip(&outs).zip(&head.offsets) {
        assert_eq!((&b.name, &b.dims, b.ggml, b.nbytes, b.offset), (&o.name, &o.dims, o.ggml, o.nbytes, *at));
    }
});
