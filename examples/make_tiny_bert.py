"""Generates examples/tiny-bert: a small BERT-shaped model folder (random f32 weights made by
torch, a config.json, a vocab and its tokenizer.json) for trying weightcast without
downloading anything.

    .venv/bin/python examples/make_tiny_bert.py
"""

import json
import pathlib

import torch
from safetensors.torch import save_file

out = pathlib.Path(__file__).parent / "tiny-bert"
out.mkdir(exist_ok=True)
g = torch.Generator().manual_seed(0)
H, I, V, L, P = 32, 64, 100, 2, 64


def w(*shape):
    return torch.randn(*shape, generator=g) * 0.05


t = {
    "embeddings.word_embeddings.weight": w(V, H),
    "embeddings.position_embeddings.weight": w(P, H),
    "embeddings.token_type_embeddings.weight": w(2, H),
    "embeddings.LayerNorm.weight": torch.ones(H),
    "embeddings.LayerNorm.bias": torch.zeros(H),
    "embeddings.position_ids": torch.arange(P).unsqueeze(0),
}
for i in range(L):
    p = f"encoder.layer.{i}."
    for name in ["attention.self.query", "attention.self.key", "attention.self.value",
                 "attention.output.dense"]:
        t[p + name + ".weight"] = w(H, H)
        t[p + name + ".bias"] = w(H)
    t[p + "attention.output.LayerNorm.weight"] = torch.ones(H)
    t[p + "attention.output.LayerNorm.bias"] = torch.zeros(H)
    t[p + "intermediate.dense.weight"] = w(I, H)
    t[p + "intermediate.dense.bias"] = w(I)
    t[p + "output.dense.weight"] = w(H, I)
    t[p + "output.dense.bias"] = w(H)
    t[p + "output.LayerNorm.weight"] = torch.ones(H)
    t[p + "output.LayerNorm.bias"] = torch.zeros(H)
save_file(t, out / "model.safetensors", metadata={"format": "pt"})
config = {
    "architectures": ["BertModel"], "model_type": "bert", "hidden_size": H,
    "intermediate_size": I, "num_attention_heads": 4, "num_hidden_layers": L,
    "vocab_size": V, "max_position_embeddings": P, "type_vocab_size": 2,
    "hidden_act": "gelu", "layer_norm_eps": 1e-12, "torch_dtype": "float32",
}
(out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
# Common words of weightcast eval's built-in sentences, so that `weightcast eval` on this folder
# sees different inputs as different token sequences.
words = """a the is . , ! ? man woman girl cat dog monkey horse eating food bread piece of playing
riding carrying baby violin guitar drums movie new great awesome so weather lovely today sunny
outside to in on and it that for with by was are after rates stock markets fell interest
federal reserve raised quarter point wednesday energy light chemical cell plants water recipe
cups flour salt eggs memory safety rust half precision model weights tokyo paris capital
japan museums time ago galaxy far away small rebellion empire neural networks trained
quantum computers""".split()
vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
assert len(vocab) == V, len(vocab)
(out / "vocab.txt").write_text("\n".join(vocab) + "\n")
# tokenizer.json (what `weightcast eval` reads), a BERT WordPiece tokenizer over that vocab.
from tokenizers import BertWordPieceTokenizer  # noqa: E402

BertWordPieceTokenizer(str(out / "vocab.txt"), lowercase=True).save(str(out / "tokenizer.json"))
print(f"wrote {out}")
