"""Generates examples/tiny-llama-massive: examples/tiny-llama (bf16, as a model trained in bf16
ships) with a "massive activation" planted the way real language models show one: one channel
of the residual stream grows past f16's 65504 over the layers (here on every token: the tiny
tokenizer adds no BOS token to carry it). Plain f16 gives
NaN; `weightcast profile FOLDER --rescale` finds the exact power-of-two rescale that fits it.

    python3 examples/make_tiny_llama_massive.py     (torch, safetensors)
"""

import pathlib
import shutil

import torch
from safetensors.torch import load_file, save_file

HERE = pathlib.Path(__file__).resolve().parent
SRC, DST = HERE / "tiny-llama", HERE / "tiny-llama-massive"
CHANNEL, NEURON, TRIGGER = 3, 5, 7  # the massive channel, the planted neuron, its trigger


def main() -> None:
    DST.mkdir(exist_ok=True)
    for f in ("config.json", "generation_config.json", "tokenizer.model"):
        shutil.copy(SRC / f, DST / f)
    t = load_file(SRC / "model.safetensors")
    t["model.embed_tokens.weight"][:, TRIGGER] = 4.0
    # Layer 0 reads the trigger channel, layer 1 the massive channel itself: each adds
    # about 45000 to it (act(gate) * up through one neuron of down_proj).
    for layer, trigger in ((0, TRIGGER), (1, CHANNEL)):
        p = f"model.layers.{layer}.mlp."
        t[p + "gate_proj.weight"][NEURON, trigger] = 6.0
        t[p + "up_proj.weight"][NEURON, trigger] = 6.0
        t[p + "down_proj.weight"][CHANNEL, NEURON] = 24.0
    save_file(t, DST / "model.safetensors", metadata={"format": "pt"})
    print(DST)


if __name__ == "__main__":
    main()
