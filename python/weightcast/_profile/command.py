"""`weightcast profile MODEL_FOLDER ...`, the package's own command (``weightcast.__main__`` runs
it; it needs torch and transformers): a Hugging Face model folder loaded with its tokenizer,
transformers' own output held back, built-in or given texts as batches, :func:`profile` run,
and its table, JSON, rules file or HTML report written."""

import contextlib
import logging
import os
import re
import warnings
from typing import Any, Dict, List

from .._weightcast import Error, UsageError
from .run import profile

_TEXTS = [
    "A man is eating food.", "A man is eating a piece of bread.",
    "The girl is carrying a baby.", "A man is riding a horse.", "A woman is playing violin.",
    "Two men pushed carts through the woods.", "A monkey is playing drums.",
    "A cheetah is running behind its prey.", "The new movie is awesome.",
    "The cat sits outside.", "Half precision halves the memory of every weight.",
    "Some layers overflow in float16 and need float32.",
]


@contextlib.contextmanager
def _transformers_held():
    """transformers' own output held back while the command loads a model and its tokenizer:
    its log (the load report, a table of MISSING or UNEXPECTED keys such as an unused pooler's,
    printed as a warning), Python warnings and its "Loading weights" progress bar. The command
    owns its output. Yields the list of what was held (text), for an error that refers to it
    ("look at the above report"); transformers' handlers, propagation, verbosity and progress
    bars are as before afterwards."""
    from transformers.utils import logging as hf_logging

    hf_logging.get_logger("transformers")  # transformers sets its handler up on first use
    lib = logging.getLogger("transformers")
    saved = (lib.handlers[:], lib.propagate, lib.level)
    held: List[str] = []

    class Hold(logging.Handler):
        def emit(self, record):
            held.append(record.getMessage())

    bars = getattr(hf_logging, "is_progress_bar_enabled", lambda: False)()
    lib.handlers, lib.propagate = [Hold()], False
    if bars:
        hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                yield held
            finally:
                held.extend(str(w.message) for w in caught)
    finally:
        lib.handlers, lib.propagate = saved[0], saved[1]
        lib.setLevel(saved[2])
        if bars:
            hf_logging.enable_progress_bar()


def cli(argv: List[str]) -> int:
    """`weightcast profile MODEL_FOLDER ...`; returns the exit code."""
    import argparse
    import json as _json
    import sys

    ap = argparse.ArgumentParser(
        prog="weightcast profile",
        description="Measure each precision on a Hugging Face model folder with PyTorch and "
                    "transformers: accuracy against f32 down to the layer, speed on this "
                    "machine; --search finds the modules to keep in f32. (`weightcast eval` "
                    "runs BERT and Llama-family folders without Python.)")
    ap.add_argument("model", help="a model folder transformers can load")
    ap.add_argument("--dtypes", default="f16,bf16", help="candidates (default f16,bf16)")
    ap.add_argument("--keep", action="append", default=[], help="keep matching tensors")
    ap.add_argument("--only", action="append", default=[], help="cast only matching tensors")
    ap.add_argument("--rules", help="a rules file applied to every candidate")
    ap.add_argument("--preset", action="append", default=[], help="a named preset")
    ap.add_argument("--inputs", help="a text file, one input per line (default: built-in)")
    ap.add_argument("--batch", type=int, default=4, help="inputs per batch (default 4)")
    ap.add_argument("--search", action="store_true", help="find the modules to keep")
    ap.add_argument("--tolerance", action="append", default=[], metavar="NAME=VALUE",
                    help="cosine=0.9999 (at least), max_abs=0.01 (at most)")
    ap.add_argument("--rules-out", help="write the recommended candidate's rules here")
    ap.add_argument("--report", help="write the HTML report here")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes (default 3)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    ap.add_argument("--rescale", action="store_true",
                    help="find power-of-two factors that make the model fit --to without "
                         "overflow (the same model: its function is unchanged); with "
                         "--rules-out, write them for convert --rules")
    ap.add_argument("--to", default="f16", help="the dtype --rescale fits (default f16)")
    ap.add_argument("--headroom", type=float, default=4.0,
                    help="--rescale keeps every activation below the dtype's max / HEADROOM "
                         "(default 4)")
    a = ap.parse_args(argv)

    def fail(msg: str, code: int) -> int:
        sys.stderr.write(f"weightcast: error: {msg}\n")
        if a.json:
            print(_json.dumps({"error": msg, "exit_code": code}))
        return code

    try:
        import torch
        from transformers import AutoTokenizer
    except ImportError as e:
        return fail(f"profile needs torch and transformers ({e}): pip install torch transformers", 2)
    tolerance = {}
    for t in a.tolerance:
        k, _, v = t.partition("=")
        try:
            tolerance[k] = float(v)
        except ValueError:
            return fail(f"--tolerance {t}: give NAME=NUMBER (cosine=0.9999)", 2)
    if not os.path.isdir(a.model) or not os.path.isfile(os.path.join(a.model, "config.json")):
        return fail(f"{a.model}: profile needs a Hugging Face model folder (config.json and "
                    "the weights)", 2)
    vocab_files = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model")
    try:
        if not any(os.path.isfile(os.path.join(a.model, f)) for f in vocab_files):
            raise FileNotFoundError("no tokenizer files")
        with _transformers_held():
            tok = AutoTokenizer.from_pretrained(a.model)
        if tok.pad_token is None:  # Llama's tokenizers have none: batches need one
            tok.pad_token = tok.eos_token or tok.unk_token
    except Exception:
        return fail(f"{a.model}: no tokenizer: this model needs images or audio; profile it "
                    "from Python with weightcast.profile(model, inputs)", 2)
    texts = _TEXTS
    if a.inputs:
        with open(a.inputs, encoding="utf-8") as f:
            texts = [line.strip() for line in f if line.strip()]
        if not texts:
            return fail(f"{a.inputs}: no input (one per line)", 2)
    held: List[str] = []
    try:
        # transformers' load report (the keys it initialised, e.g. an unused pooler) is its
        # log, not this command's output: held back, shown only when loading fails.
        with _transformers_held() as held:
            model = _auto_class(a.model, a.rescale).from_pretrained(
                a.model, dtype=torch.float32).eval()
    except Exception as e:  # transformers' own message: what is missing or unknown
        for text in held:  # the report its message refers to
            sys.stderr.write(re.sub(r"\x1b\[[0-9;]*m", "", text).rstrip() + "\n")
        return fail(f"{a.model}: transformers cannot load it: {' '.join(str(e).split())}", 1)
    batches = [dict(tok(texts[i:i + a.batch], padding=True, return_tensors="pt"))
               for i in range(0, len(texts), a.batch)]
    if getattr(model.config, "is_encoder_decoder", False):
        for b in batches:  # the decoder reads the same text (teacher forcing)
            b["decoder_input_ids"] = b["input_ids"]
    if a.rescale:
        return _rescale(model, batches, a, fail)
    candidates = []
    for d in a.dtypes.split(","):
        spec: Dict[str, Any] = {"to": d.strip(), "name": d.strip()}
        if a.keep:
            spec["keep"] = a.keep
        if a.only:
            spec["only"] = a.only
        if a.rules:
            spec["rules"] = a.rules
        if a.preset:
            spec["preset"] = a.preset
        candidates.append(spec)
    try:
        p = profile(model, batches, candidates, search=a.search, tolerance=tolerance or None,
                    repeats=a.repeats, progress=not a.json and sys.stderr.isatty())
    except Error as e:
        return fail(str(e), 2 if isinstance(e, UsageError) else 1)
    if a.rules_out:
        if p.recommended is None:
            return fail("no candidate meets the tolerance: no rules written", 1)
        p.save_rules(a.rules_out)
    if a.report:
        p.report(a.report)
    if a.json:
        print(_json.dumps(p.to_dict(), indent=2, default=str))
    else:
        print(p)
        if a.rules_out:
            print(f"rules: {a.rules_out}")
        if a.report:
            print(f"report: {a.report}")
    return 0


def _auto_class(folder: str, with_head: bool):
    """transformers' class for a folder: with its head (causal LM, seq2seq LM) when `with_head`
    and the config names one (a rescale scales a tied head's embedding), else the base model."""
    import transformers

    if with_head:
        config = transformers.AutoConfig.from_pretrained(folder)
        archs = " ".join(getattr(config, "architectures", None) or [])
        if "ForCausalLM" in archs:
            return transformers.AutoModelForCausalLM
        if "ForConditionalGeneration" in archs and getattr(config, "is_encoder_decoder", False):
            return transformers.AutoModelForSeq2SeqLM
    return transformers.AutoModel


def _rescale(model, batches, a, fail) -> int:
    """`--rescale`: the factors, their report, and the rules file when the proof holds."""
    import json as _json

    from .._rescale import rescale

    try:
        r = rescale(model, batches, a.to, headroom=a.headroom)
    except Error as e:
        return fail(str(e), 2 if isinstance(e, UsageError) else 1)
    if a.json:
        print(_json.dumps(r.to_dict(), indent=2, default=str))
    else:
        print(r)
    if not r.ok:
        names = ", ".join(u["module"] for u in r.unreachable[:5]) or "see the report"
        return fail(f"the rescaled model does not fit {a.to} on these inputs ({names}): no "
                    "rules written; profile --search finds the modules to keep in f32", 1)
    if a.rules_out:
        r.save_rules(a.rules_out)
        if not a.json:
            print(f"rules: {a.rules_out}")
    return 0
