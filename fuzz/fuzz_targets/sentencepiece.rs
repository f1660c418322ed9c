//! The SentencePiece `tokenizer.model` reader (a protobuf walk over untrusted bytes) never
//! panics, and what it accepts survives the writer weightcast uses for folders from GGUF: the
//! pieces it reads, written as a model and read again, are the same pieces (texts, score bits,
//! types).
#![no_main]
use libfuzzer_sys::fuzz_target;
use weightcast::formats::gguf::hf::vocab::{parse_sentencepiece, sentencepiece_model};

fuzz_target!(|data: &[u8]| {
    let path = std::path::Path::new("fuzz.model");
    let Ok(pieces) = parse_sentencepiece(path, data) else {
        return;
    };
    let bytes = sentencepiece_model(&pieces, [0, 1, 2, -1], true);
    let again = parse_sentencepiece(path, &bytes).expect("the writer's model reads back");
    assert_eq!(pieces.len(), again.len());
    for (a, b) in pieces.iter().zip(&again) {
        assert_eq!(a.text, b.text);
        assert_eq!(a.score.to_bits(), b.score.to_bits());
        assert_eq!(a.kind, b.kind);
    }
});
