"""Small models of each family in the rescale table, with activations planted beyond f16."""
import torch

HID, INTER, VOCAB = 64, 128, 100
C, J, TRIG = 3, 5, 7  # the massive channel, the planted neuron, the first token's trigger channel


def _decoder(model_type, **kw):
    import transformers as t
    cls = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
           "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
           "gemma": ("GemmaConfig", "GemmaForCausalLM"), "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
           "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM")}[model_type]
    cfg = getattr(t, cls[0])(vocab_size=VOCAB, hidden_size=HID, intermediate_size=INTER,
                             num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=16, bos_token_id=0, **kw)
    return getattr(t, cls[1])(cfg).eval()


def decoder(model_type, plant=True, tie=None, seed=0):
    torch.manual_seed(seed)
    kw = {} if tie is None else {"tie_word_embeddings": tie}
    m = _decoder(model_type, **kw)
    if not plant:
        return m
    sandwich = hasattr(m.model.layers[0], "post_feedforward_layernorm")
    with torch.no_grad():
        m.model.embed_tokens.weight[0, TRIG] = 10.0
        for i, (trig, g, d) in enumerate([(TRIG, 5.0, 25.0), (C, 5.0, 25.0), (C, 40.0, 0.4)]):
            layer = m.model.layers[i + 1]
            mlp = layer.mlp
            mlp.gate_proj.weight[J, trig] = g
            mlp.up_proj.weight[J, trig] = g
            mlp.down_proj.weight[C, J] = d
            if sandwich:
                # the block's output is normalised before the add: its norm's weight carries it
                layer.post_feedforward_layernorm.weight[C] = 5000.0
    return m


def t5(gated=False, plant=True, tie=True, model_type="t5", seed=0):
    import transformers as t
    torch.manual_seed(seed)
    cfg_cls, cls = {"t5": ("T5Config", "T5ForConditionalGeneration"),
                    "mt5": ("MT5Config", "MT5ForConditionalGeneration"),
                    "umt5": ("UMT5Config", "UMT5ForConditionalGeneration")}[model_type]
    cfg = getattr(t, cfg_cls)(vocab_size=VOCAB, d_model=HID, d_kv=16, d_ff=INTER, num_layers=3,
                              num_decoder_layers=2, num_heads=4,
                              feed_forward_proj="gated-gelu" if gated else "relu",
                              tie_word_embeddings=tie, decoder_start_token_id=0, pad_token_id=0)
    m = getattr(t, cls)(cfg).eval()
    if not tie and m.lm_head.weight is m.shared.weight:
        # transformers 5 ties T5's head whatever the argument says: untie it (T5 v1.1 ships
        # an untied head)
        m.config.tie_word_embeddings = False
        m.lm_head.weight = torch.nn.Parameter(m.shared.weight.detach().clone())
    if not plant:
        return m
    with torch.no_grad():
        m.shared.weight[0, TRIG] = 10.0
        # relu: the first block's wi output passes the limit (a beta), both blocks' wo outputs
        # add up past 65504 in the stream (alpha)
        plan = [(TRIG, 8.0, 12.0), (C, 8.0, 12.0)] if gated else [(TRIG, 3000.0, 2.0), (C, 40.0, 150.0)]
        for i, (trig, g, d) in enumerate(plan):
            ff = m.encoder.block[i + 1].layer[-1].DenseReluDense
            if gated:
                ff.wi_0.weight[J, trig] = g
                ff.wi_1.weight[J, trig] = g
            else:
                ff.wi.weight[J, trig] = g
            ff.wo.weight[C, J] = d
    return m


def batches(seq2seq=False):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(2):
        ids = torch.randint(1, VOCAB, (2, 12), generator=g)
        ids[:, 0] = 0
        b = {"input_ids": ids}
        if seq2seq:
            b["decoder_input_ids"] = torch.randint(1, VOCAB, (2, 6), generator=g)
        out.append(b)
    return out


def outputs(model, batches):
    """The first output (logits) of every batch, as float32, and the model."""
    with torch.no_grad():
        return [(model(**b) if isinstance(b, dict) else model(b))[0].float()
                for b in batches], model


def cosine(ref, got) -> float:
    """The worst batch's cosine between two lists of outputs (nan where any is non-finite)."""
    worst = 1.0
    for r, g in zip(ref, got):
        if not torch.isfinite(g).all():
            return float("nan")
        worst = min(worst, float(torch.nn.functional.cosine_similarity(
            r.double().flatten(), g.double().flatten(), dim=0)))
    return worst


def add_tokenizer(folder):
    """The SentencePiece tokenizer of examples/tiny-llama (96 pieces: ids within the models'
    vocabulary), for the command line, which tokenizes texts."""
    import pathlib
    import shutil

    root = pathlib.Path(__file__).resolve().parents[2]
    shutil.copy(root / "examples" / "tiny-llama" / "tokenizer.model", folder)


def moe(model_type, plant=True, seed=0):
    """Qwen2-MoE, Qwen3-MoE or Mixtral: the massive channel written by every routed expert's
    down projection (fused into one tensor per layer in memory)."""
    import transformers as t
    torch.manual_seed(seed)
    cfg_cls, cls = {"qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
                    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
                    "mixtral": ("MixtralConfig", "MixtralForCausalLM")}[model_type]
    cfg = getattr(t, cfg_cls)(vocab_size=VOCAB, hidden_size=HID, intermediate_size=INTER,
                              moe_intermediate_size=INTER // 2, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                              num_experts=4, num_local_experts=4, num_experts_per_tok=2,
                              shared_expert_intermediate_size=INTER, bos_token_id=0,
                              norm_topk_prob=True)
    m = getattr(t, cls)(cfg).eval()
    if not plant:
        return m
    with torch.no_grad():
        m.model.embed_tokens.weight[0, TRIG] = 10.0
        for i, (trig, g, d) in enumerate([(TRIG, 5.0, 25.0), (C, 5.0, 25.0), (C, 5.0, 25.0)]):
            ex = m.model.layers[i + 1].mlp.experts
            half = ex.gate_up_proj.shape[1] // 2
            ex.gate_up_proj[:, J, trig] = g
            ex.gate_up_proj[:, half + J, trig] = g
            ex.down_proj[:, C, J] = d
    return m


def vit(plant=True, seed=0):
    """A ViT classifier: the class token's massive channel written by the MLPs' output dense
    layers (GELU passes large values through)."""
    import transformers as t
    torch.manual_seed(seed)
    cfg = t.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=HID,
                      num_hidden_layers=4, num_attention_heads=4, intermediate_size=INTER,
                      num_labels=10)
    m = t.ViTForImageClassification(cfg).eval()
    if not plant:
        return m
    with torch.no_grad():
        m.vit.embeddings.cls_token[0, 0, TRIG] = 10.0
        for i, (trig, g, d) in enumerate([(TRIG, 40.0, 100.0), (C, 40.0, 100.0), (C, 40.0, 100.0)]):
            mlp = m.vit.layers[i + 1].mlp  # transformers 5's names (fc1, fc2); files keep 4's
            mlp.fc1.weight[J, trig] = g
            mlp.fc2.weight[C, J] = d
    return m


def images():
    g = torch.Generator().manual_seed(2)
    return [torch.randn(2, 3, 32, 32, generator=g) for _ in range(2)]
