"""The scale symmetries of each architecture family, written down as data.

A pre-norm residual stream is read only by scale-invariant norms and by further residual adds.
Multiplying the stream by ``alpha`` therefore changes nothing, in exact arithmetic, when every
tensor that writes into it is multiplied by ``alpha`` and every norm reading it has its epsilon
multiplied by ``alpha**2``. Which modules those are is a fact about the modelling code of each
family, read from transformers' modelling files (the file named in each entry):

- ``writers``: modules whose output is added into the stream (or, for sandwich norms, is read
  by a norm that shares the stream norms' epsilon): their output is multiplied by ``alpha``
  (a linear layer's weight and bias; an embedding's weight; a norm's weight, in the norm's
  form).
- ``eps_readers``: modules whose output must also carry ``alpha`` because they feed a norm whose
  epsilon comes from the same config key (Qwen3's and Gemma 3's ``q_norm``/``k_norm`` read
  ``q_proj``/``k_proj``): multiplied by ``alpha`` like the writers, their norm's output
  unchanged.
- ``tied_final_norms``: the norm before an output head tied to the scaled embedding: its
  output is divided by ``alpha`` so the logits are unchanged.
- ``pairs``: a linear path inside a block (``producer`` times ``beta``, ``consumer``'s input
  side divided by ``beta``): an MLP's up projection and its down projection (the gate's
  activation multiplies the up projection's output, so the product is linear in it), a value
  and output projection (attention is linear in the values), T5's ``wi``/``wo`` where the
  activation is ReLU (positively homogeneous). ``when`` names a condition on the config.

Patterns are regular expressions searched in a module's name in memory, so they hold for the model
with or without its head (``model.layers.0`` and ``layers.0``); the rules name each tensor as the
files do too, through transformers' own reverse of its loading conversions (ViT's renamed
layers, MoE experts fused in memory and stored one per expert). Each entry is covered by a test that
builds the family from a small config and checks the rescaled model equals the original.
"""

import re
from dataclasses import dataclass, replace
from typing import Optional, Tuple

_BLOCK = r"(?:^|\.)(?:layers|h|block)\.\d+"


@dataclass(frozen=True)
class Pair:
    """A linear path inside a block: `producer`'s output times beta, `consumer`'s weight divided
    by beta. `consumer` is written from the producer's match (``\\g<b>`` is its block)."""

    producer: str
    consumer: str
    why: str
    when: Optional[str] = None  # a condition on the config (see `_CONDITIONS`)


@dataclass(frozen=True)
class Family:
    """One family's symmetries (see the module's documentation)."""

    name: str
    model_types: Tuple[str, ...]
    source: str  # the modelling file the entry was read from
    eps_keys: Tuple[str, ...]  # the config keys of the norms' epsilon (times alpha**2)
    blocks: str  # the blocks whose inputs and outputs are the residual stream
    writers: Tuple[str, ...]
    eps_readers: Tuple[str, ...]
    tied_final_norms: Tuple[str, ...]
    pairs: Tuple[Pair, ...]
    norm_form: str  # "w" (norm output times w) or "1+w" (times 1 + w: Gemma)
    # Parameters that write into the stream on their own (ViT's class token and position
    # embeddings; MoE experts fused into one tensor per layer): their full names.
    writer_params: Tuple[str, ...] = ()

    def matches(self, pattern_set: Tuple[str, ...], name: str) -> bool:
        return any(re.search(p, name) for p in pattern_set)


_MLP_PAIR = Pair(r"(?P<b>.*)\.mlp\.up_proj$", r"\g<b>.mlp.down_proj",
                 "the MLP's output is linear in up_proj's output (act(gate) * up)")
_ATTN_PAIR = Pair(r"(?P<b>.*)\.self_attn\.v_proj$", r"\g<b>.self_attn.o_proj",
                  "attention is linear in the values")

_LLAMA = Family(
    name="llama",
    model_types=("llama", "mistral", "qwen2"),
    source="transformers/models/llama/modeling_llama.py (Mistral and Qwen2 are copies)",
    eps_keys=("rms_norm_eps",),
    blocks=_BLOCK + "$",
    writers=(r"embed_tokens$", r"\.self_attn\.o_proj$", r"\.mlp\.down_proj$"),
    eps_readers=(),
    tied_final_norms=(r"(?:^|\.)norm$",),
    pairs=(_MLP_PAIR, _ATTN_PAIR),
    norm_form="w",
)
_QK_NORMS = (r"\.self_attn\.q_proj$", r"\.self_attn\.k_proj$")
_GEMMA2 = replace(
    _LLAMA, name="gemma2", model_types=("gemma2",), norm_form="1+w",
    source="transformers/models/gemma2/modeling_gemma2.py: Gemma's norms; sandwich norms "
           "(post_attention_layernorm, post_feedforward_layernorm) write into the stream and "
           "read o_proj/down_proj with the same epsilon",
    writers=_LLAMA.writers + (r"\.post_attention_layernorm$", r"\.post_feedforward_layernorm$"))

FAMILIES: Tuple[Family, ...] = (
    _LLAMA,
    replace(_LLAMA, name="qwen3", model_types=("qwen3",), eps_readers=_QK_NORMS,
            source="transformers/models/qwen3/modeling_qwen3.py: Llama's, and q_norm/k_norm "
                   "that take config.rms_norm_eps"),
    replace(_LLAMA, name="gemma", model_types=("gemma",), norm_form="1+w",
            source="transformers/models/gemma/modeling_gemma.py: norms compute x * (1 + w); "
                   "the embedding is scaled by sqrt(hidden_size) in the model (linear: the "
                   "factor passes through)"),
    _GEMMA2,
    replace(_GEMMA2, name="gemma3", model_types=("gemma3_text",), eps_readers=_QK_NORMS,
            source="transformers/models/gemma3/modeling_gemma3.py: Gemma 2's, and "
                   "q_norm/k_norm that take config.rms_norm_eps"),
    Family(
        name="moe",
        model_types=("qwen2_moe", "mixtral"),
        source="transformers/models/qwen2_moe/modeling_qwen2_moe.py (a shared expert beside "
               "the routed ones) and mixtral: the experts' down projections (fused into one "
               "tensor per layer in memory by transformers 5, one per expert on disk) write "
               "into the stream",
        eps_keys=("rms_norm_eps",),
        blocks=_BLOCK + "$",
        writers=(r"embed_tokens$", r"\.self_attn\.o_proj$", r"\.mlp\.shared_expert\.down_proj$"),
        eps_readers=(),
        tied_final_norms=(r"(?:^|\.)norm$",),
        pairs=(Pair(r"(?P<b>.*)\.mlp\.shared_expert\.up_proj$", r"\g<b>.mlp.shared_expert.down_proj",
                    "the shared expert's output is linear in up_proj's output"),
               _ATTN_PAIR),
        norm_form="w",
        writer_params=(r"\.mlp\.experts\.down_proj$",),
    ),
    Family(
        name="vit",
        model_types=("vit",),
        source="transformers/models/vit/modeling_vit.py: pre-norm LayerNorms "
               "(layernorm_before/after, the final layernorm) read the stream; the patch "
               "projection, the class token and the position embeddings start it",
        eps_keys=("layer_norm_eps",),
        blocks=r"(?:^|\.)(?:encoder\.layer|layers)\.\d+$",
        # transformers 5 names (attention.o_proj, mlp.fc2); 4's (attention.output.dense,
        # output.dense) are the names on disk in both
        writers=(r"embeddings\.patch_embeddings\.projection$",
                 r"\.attention\.(?:output\.dense|o_proj)$",
                 r"(?:\.layer\.\d+\.output\.dense|\.mlp\.fc2)$"),
        eps_readers=(),
        tied_final_norms=(),
        pairs=(Pair(r"(?P<b>.*)\.attention\.attention\.value$", r"\g<b>.attention.output.dense",
                    "attention is linear in the values"),
               Pair(r"(?P<b>.*)\.attention\.v_proj$", r"\g<b>.attention.o_proj",
                    "attention is linear in the values")),
        norm_form="w",
        writer_params=(r"embeddings\.cls_token$", r"embeddings\.position_embeddings$",
                       r"embeddings\.mask_token$"),
    ),
    Family(
        name="t5",
        model_types=("t5", "mt5", "umt5"),
        source="transformers/models/t5/modeling_t5.py: every T5LayerNorm reads the stream; the "
               "tied head reads the decoder's final_layer_norm times d_model**-0.5",
        eps_keys=("layer_norm_epsilon",),
        blocks=r"(?:^|\.)block\.\d+$",
        writers=(r"(?:^|\.)shared$", r"embed_tokens$", r"\.SelfAttention\.o$",
                 r"\.EncDecAttention\.o$", r"\.DenseReluDense\.wo$"),
        eps_readers=(),
        tied_final_norms=(r"(?:^|\.)decoder\.final_layer_norm$",),
        pairs=(
            Pair(r"(?P<b>.*)\.DenseReluDense\.wi$", r"\g<b>.DenseReluDense.wo",
                 "ReLU is positively homogeneous", when="relu"),
            Pair(r"(?P<b>.*)\.DenseReluDense\.wi_1$", r"\g<b>.DenseReluDense.wo",
                 "the gated feed-forward is linear in wi_1's output"),
            Pair(r"(?P<b>.*)\.SelfAttention\.v$", r"\g<b>.SelfAttention.o",
                 "attention is linear in the values"),
            Pair(r"(?P<b>.*)\.EncDecAttention\.v$", r"\g<b>.EncDecAttention.o",
                 "attention is linear in the values"),
        ),
        norm_form="w",
    ),
)


FAMILIES += (replace(
    next(f for f in FAMILIES if f.name == "moe"),
    name="qwen3_moe", model_types=("qwen3_moe",),
    source="transformers/models/qwen3_moe/modeling_qwen3_moe.py: the moe entry, and q_norm/k_norm "
           "that take config.rms_norm_eps",
    eps_readers=(r"\.self_attn\.q_proj$", r"\.self_attn\.k_proj$")),)


def _relu(config) -> bool:
    act = getattr(config, "dense_act_fn", None) or getattr(config, "feed_forward_proj", "")
    return act == "relu"


_CONDITIONS = {"relu": _relu}


def holds(pair: Pair, config) -> bool:
    """Whether a pair's condition holds for a model's config."""
    return pair.when is None or _CONDITIONS[pair.when](config)


def family_of(config) -> Optional[Family]:
    """The family of a transformers config (by ``model_type``), or None."""
    model_type = getattr(config, "model_type", None)
    for f in FAMILIES:
        if model_type in f.model_types:
            return f
    return None
