"""Tiny decoder language models for the language-model tests (issue 18; nothing downloaded).

Every Hugging Face family of issue 18 from a small config with random weights (vocabulary 64,
context 8, width 16, 2 blocks, MLP 32, 4 heads, 2 key/value heads where the family has grouped
queries), as ``*ForSequenceClassification`` (``"seqcls"``, 3 classes) or ``*ForCausalLM``
(``"causal"``), and the plain PyTorch decoder of modlens (:class:`modlens.nn.models.Decoder`).
"""

from __future__ import annotations

import torch

V, T, D, L, H, KV, MLP, C = 64, 8, 16, 2, 4, 2, 32, 3
HF_FAMILIES = ["gpt2", "gpt-neox", "opt", "llama", "qwen2", "mistral", "gemma", "phi", "phi3", "glm"]
FAMILIES = HF_FAMILIES + ["plain"]

_CLASSES = {
    "gpt2": ("GPT2ForSequenceClassification", "GPT2LMHeadModel"),
    "gpt-neox": ("GPTNeoXForSequenceClassification", "GPTNeoXForCausalLM"),
    "opt": ("OPTForSequenceClassification", "OPTForCausalLM"),
    "llama": ("LlamaForSequenceClassification", "LlamaForCausalLM"),
    "qwen2": ("Qwen2ForSequenceClassification", "Qwen2ForCausalLM"),
    "mistral": ("MistralForSequenceClassification", "MistralForCausalLM"),
    "gemma": ("GemmaForSequenceClassification", "GemmaForCausalLM"),
    "phi": ("PhiForSequenceClassification", "PhiForCausalLM"),
    "phi3": ("Phi3ForSequenceClassification", "Phi3ForCausalLM"),     # fused gate/up map
    "glm": ("GlmForSequenceClassification", "GlmForCausalLM"),        # fused gate/up map
}


def _config(family: str):
    import transformers as t

    common = dict(vocab_size=V, num_labels=C, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "gpt2":
        return t.GPT2Config(n_positions=T, n_embd=D, n_layer=L, n_head=H, n_inner=MLP, **common)
    if family == "gpt-neox":
        return t.GPTNeoXConfig(hidden_size=D, num_hidden_layers=L, num_attention_heads=H, intermediate_size=MLP,
                               max_position_embeddings=T, **common)
    if family == "opt":
        return t.OPTConfig(hidden_size=D, num_hidden_layers=L, num_attention_heads=H, ffn_dim=MLP,
                           word_embed_proj_dim=D, max_position_embeddings=T, **common)
    gqa = dict(hidden_size=D, intermediate_size=MLP, num_hidden_layers=L, num_attention_heads=H,
               num_key_value_heads=KV, max_position_embeddings=T, **common)
    if family == "llama":
        return t.LlamaConfig(**gqa)
    if family == "qwen2":
        return t.Qwen2Config(tie_word_embeddings=True, **gqa)
    if family == "mistral":
        return t.MistralConfig(sliding_window=4, **gqa)
    if family == "gemma":
        return t.GemmaConfig(head_dim=D // H, **gqa)
    if family == "phi":
        return t.PhiConfig(**gqa)
    if family == "phi3":
        return t.Phi3Config(**gqa)
    if family == "glm":
        return t.GlmConfig(head_dim=D // H, **gqa)
    raise ValueError(family)


def decoder(family: str, head: str = "causal", seed: int = 0, dtype=torch.float64):
    """The model with weights drawn from ``seed`` (inside ``fork_rng``: the caller's generator is
    left alone), in eval mode and ``dtype``."""
    if family == "plain":
        from modlens.nn.models import build_model

        spec = {"type": "gpt", "vocab_size": V, "context": T, "d_model": D, "n_blocks": L, "n_heads": H, "d_mlp": MLP}
        if head == "seqcls":
            spec.update(head="classes", n_classes=C)
        return build_model(spec, generator=torch.Generator().manual_seed(seed)).to(dtype).eval()
    import transformers

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        cls = getattr(transformers, _CLASSES[family][0 if head == "seqcls" else 1])
        return cls(_config(family)).to(dtype).eval()


def logits(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def token_ids(n: int, seed: int = 0, t: int = T) -> torch.Tensor:
    """Random token ids (N, t), never the pad token 0."""
    return torch.randint(1, V, (n, t), generator=torch.Generator().manual_seed(seed))
