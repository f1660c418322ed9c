"""Generates examples/tiny-llama: a small Llama-shaped model folder (bf16 weights from a seeded
numpy generator, a config.json, a SentencePiece tokenizer.model) for trying the GGUF paths
without downloading anything. It is the `tiny-llama` folder the GGUF tests build, so the file
weightcast writes from it is the one llama.cpp's converter was checked against.

    python3 examples/make_tiny_llama.py     (numpy only)
"""

import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "fixtures" / "gguf"))

from models import tiny_llama  # noqa: E402

print(tiny_llama(HERE))
