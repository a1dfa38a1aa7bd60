"""Failure survey (issue 18): decoder language models through today's modlens.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/lm_survey.py [--out benchmarks/results/lm_survey_after.json]

``benchmarks/results/lm_survey.json`` is the survey made before issue 18 was built (every family
failed somewhere; the stages were those of that code); ``lm_survey_after.json`` the same survey
with the decoder rewrites and the next-token task (this version of the script).
    PYTHONPATH=src python benchmarks/lm_survey.py --families gpt2,llama --heads causal

Builds every decoder family of issue 18 from a tiny Hugging Face config (random weights, nothing
downloaded): GPT-2, GPT-NeoX (Pythia), OPT, Llama, Qwen2, Mistral, Gemma, Phi, each as
``*ForSequenceClassification`` ("seqcls") and ``*ForCausalLM`` ("causal"), plus a plain PyTorch
decoder of our own (nn.Linear, causal ``scaled_dot_product_attention``, tied input/output
embedding; "seqcls": a Linear head on the last position, ``h[:, -1]``). Each model goes through
the stages below on random token ids; every stage records ``ok`` or the exception (type, first
line of the message, and where in modlens it was raised: the innermost frame under
``src/modlens``). A stage that fails does not stop the later ones where they can still run
(they get a fresh adapter), so one row shows every place the model breaks today.

Stages:

* ``forward``: the model's own forward on the ids (a sanity check of the config);
* ``causal`` (unmodified models): the model is causal, position t sees tokens <= t only: the
  logits of the first t positions do not change when the later tokens change (what right
  padding without an attention mask and lesions that share a prefix rely on);
* ``capture``: ``NetworkAdapter(model, ids, input_name="input_ids")`` (torch.export, then the
  Structure: output layer, attention detection, MLP neurons);
* ``inspect`` (when capture succeeded): the neuron layers found, the node layers of the weight
  graph, and whether the residual weight graph saw every norm (``gamma`` found vs the model's
  norm modules before each MLP and before the head);
* ``weights``: ``modlens.partition(model, "weights/global", data=ids)``;
* ``activations``: ``modlens.partition(model, "activations/global", data=ids)``;
* ``analyze``: ``modlens.analyze(model, (ids, y), ...)`` for seqcls (``y`` = the model's own
  predictions), ``modlens.analyze(model, ids, task="next-token", ...)`` for causal; one
  partitioning, 3 random sets, activation data a held-out batch of other random ids (the survey
  before issue 18 passed ``(N, T)`` targets and the test ids as activation data, and recorded in
  ``analyze_flat`` where ``(N,)`` labels broke);
* ``exact`` (when capture succeeded): the incremental lesion engine against the plain oracle on
  two lesion sets per layer (seqcls: correct counts equal; causal: the next-token engines, counts
  per cell equal and cross-entropy sums within 1e-4 relative in float32).

Probe rows (``--probes``, on by default) work around a first failure from the outside, without
changing modlens, to show what breaks next:

* ``+select`` (seqcls of every HF family): a wrapper that computes the same class scores as the
  model with the last position read by ``h[:, -1]`` (a select) instead of the data-dependent
  ``logits[arange(B), last_non_pad]`` (index.Tensor): ``score(base(ids).last_hidden_state[:, -1])``;
* ``+linear`` (GPT-2 causal): every ``Conv1D`` replaced by an ``nn.Linear`` with the transposed weight;
* ``+gelu`` (GPT-2 and Phi causal; with ``+select`` for seqcls): ``NewGELUActivation`` (``gelu_new``, written out as
  ``0.5 x (1 + tanh(...))``) replaced by ``nn.GELU(approximate="tanh")`` (the same function).

Probes change the model that is analysed; they are diagnostics, not support.

Not a test. Tiny sizes: vocabulary 64, context 8, width 16, 2 blocks, MLP 32, 24 sequences.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

V, T, D, L, H, KV, MLP, N, C = 64, 8, 16, 2, 4, 2, 32, 24, 3
FAMILIES = ["gpt2", "gpt-neox", "opt", "llama", "qwen2", "mistral", "gemma", "phi", "plain"]
HEADS = ["seqcls", "causal"]
SRC = str(Path(__file__).resolve().parents[1] / "src" / "modlens")


# ----- models ---------------------------------------------------------------------------------------
def _config(family: str):
    import transformers as t

    common = dict(vocab_size=V, num_labels=C, pad_token_id=0)
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
    raise ValueError(family)


_CLASSES = {
    "gpt2": ("GPT2ForSequenceClassification", "GPT2LMHeadModel"),
    "gpt-neox": ("GPTNeoXForSequenceClassification", "GPTNeoXForCausalLM"),
    "opt": ("OPTForSequenceClassification", "OPTForCausalLM"),
    "llama": ("LlamaForSequenceClassification", "LlamaForCausalLM"),
    "qwen2": ("Qwen2ForSequenceClassification", "Qwen2ForCausalLM"),
    "mistral": ("MistralForSequenceClassification", "MistralForCausalLM"),
    "gemma": ("GemmaForSequenceClassification", "GemmaForCausalLM"),
    "phi": ("PhiForSequenceClassification", "PhiForCausalLM"),
}


class Block(nn.Module):
    """Pre-norm decoder block: causal multi-head attention (one qkv Linear, SDPA) and a GELU MLP."""

    def __init__(self, d: int, heads: int, d_mlp: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, d_mlp), nn.Linear(d_mlp, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class PlainDecoder(nn.Module):
    """A decoder as people write it: token + learned position embedding, blocks, final LayerNorm,
    an unembedding tied to the token embedding (``causal``) or a class head on the last position."""

    def __init__(self, head: str):
        super().__init__()
        self.tok, self.pos = nn.Embedding(V, D), nn.Embedding(T, D)
        self.blocks = nn.ModuleList(Block(D, H, MLP) for _ in range(L))
        self.ln = nn.LayerNorm(D)
        self.head_kind = head
        if head == "causal":
            self.lm_head = nn.Linear(D, V, bias=False)
            self.lm_head.weight = self.tok.weight  # tied
        else:
            self.score = nn.Linear(D, C)

    def forward(self, input_ids):
        x = self.tok(input_ids) + self.pos(torch.arange(input_ids.shape[1], device=input_ids.device))
        for b in self.blocks:
            x = b(x)
        x = self.ln(x)
        return self.lm_head(x) if self.head_kind == "causal" else self.score(x[:, -1])


def build(family: str, head: str, seed: int = 0) -> nn.Module:
    """The model with weights drawn from ``seed``. Module constructors (ours and Hugging Face's)
    draw from torch's global generator; it is seeded inside ``fork_rng`` so that the caller's
    generator state is left as it was."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if family == "plain":
            return PlainDecoder(head).eval()
        import transformers

        cls = getattr(transformers, _CLASSES[family][0 if head == "seqcls" else 1])
        return cls(_config(family)).eval()


class LastToken(nn.Module):
    """A ``*ForSequenceClassification`` read at the last position by a select (probe ``+select``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.base = getattr(model, model.base_model_prefix)
        self.score = model.score

    def forward(self, input_ids):
        return self.score(self.base(input_ids=input_ids).last_hidden_state[:, -1])


def _conv1d_to_linear(model: nn.Module) -> None:
    from transformers.pytorch_utils import Conv1D

    for m in list(model.modules()):
        for child_name, child in list(m.named_children()):
            if isinstance(child, Conv1D):
                lin = nn.Linear(child.weight.shape[0], child.weight.shape[1])
                with torch.no_grad():
                    lin.weight.copy_(child.weight.T)
                    lin.bias.copy_(child.bias)
                setattr(m, child_name, lin)


def _gelu_new_to_gelu(model: nn.Module) -> None:
    from transformers.activations import NewGELUActivation

    for m in list(model.modules()):
        for child_name, child in list(m.named_children()):
            if isinstance(child, NewGELUActivation):
                setattr(m, child_name, nn.GELU(approximate="tanh"))


PROBES = {  # family -> list of (probe name, patches applied in order)
    "gpt2": [("+linear", ["linear"]), ("+linear+gelu", ["linear", "gelu"])],
    "phi": [("+gelu", ["gelu"])],
}


def patched(model: nn.Module, patches: list[str]) -> nn.Module:
    for p in patches:
        if p == "linear":
            _conv1d_to_linear(model)
        elif p == "gelu":
            _gelu_new_to_gelu(model)
    return model


# ----- stages ---------------------------------------------------------------------------------------
def _where(exc: BaseException) -> str:
    """The innermost frame under src/modlens (else the innermost frame), as 'path:line function'."""
    frames = traceback.extract_tb(exc.__traceback__)
    mine = [f for f in frames if f.filename.startswith(SRC)]
    f = (mine or frames or [None])[-1]
    if f is None:
        return "?"
    name = f.filename[len(SRC) + 1:] if f.filename.startswith(SRC) else os.path.basename(f.filename)
    return f"{name}:{f.lineno} {f.name}"


def _run(fn):
    start = time.perf_counter()
    try:
        value = fn()
        return {"ok": True, "seconds": round(time.perf_counter() - start, 2), "value": value}
    except Exception as exc:  # noqa: BLE001  (the survey records whatever breaks)
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return {"ok": False, "seconds": round(time.perf_counter() - start, 2), "error": type(exc).__name__,
                "message": msg[:400], "where": _where(exc)}


def _norm_modules(model: nn.Module) -> list[str]:
    """Names of the norm-like modules (anything whose class name ends in Norm/LayerNorm/RMSNorm)."""
    return [n for n, m in model.named_modules() if type(m).__name__.lower().endswith("norm")]


def _inspect(adapter):
    parts = adapter.residual_parts()
    out = {
        "layers": adapter.layer_names,
        "layer_sizes": adapter.layer_sizes,
        "node_layer_sizes": adapter.node_layer_sizes(),
        "output_layer": adapter.structure.output_layer.target,
        "n_classes": adapter.n_classes,
        "embedding": None if parts["embedding"] is None else list(parts["embedding"].shape),
        "head": None if parts["head"] is None else list(parts["head"].shape),
        "block_gamma_found": [b.gamma is not None for b in parts["blocks"]],
        "gated": [b.w_gate is not None for b in parts["blocks"]],
        "final_gamma_found": parts["final_gamma"] is not None,
        "norm_modules": _norm_modules(adapter.model),
        "capture": adapter.capture_method,
    }
    return out


def survey_one(family: str, head: str, probe: str = "", patches: tuple = (), select: bool = False) -> dict:
    import modlens
    from modlens.nn.adapter import NetworkAdapter
    from modlens.nn.lesion import IncrementalLesions, correct_counts_plain
    from modlens.nn.token_lesion import IncrementalTokenLesions, token_counts_plain
    from modlens.nn.tokens import as_token_data

    row = {"family": family, "head": head, "probe": probe}
    model = patched(build(family, head), list(patches))
    row["class"] = type(model).__name__
    if select:
        model = LastToken(model).eval()
        family_call = "plain"
    else:
        family_call = family
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, V, (N, T), generator=g)  # no pad token (id 0) inside the sequences
    kw = {} if family_call == "plain" else {"input_name": "input_ids"}

    def forward():
        with torch.no_grad():
            out = model(ids) if family_call == "plain" else model(input_ids=ids)
        logits = out if torch.is_tensor(out) else out.logits
        return list(logits.shape)

    row["forward"] = _run(forward)
    if not row["forward"]["ok"]:
        return row
    if not probe and head == "causal":
        def causal():
            other = ids.clone()
            other[:, T // 2:] = torch.randint(1, V, (N, T - T // 2), generator=torch.Generator().manual_seed(2))
            with torch.no_grad():
                a = model(ids) if family_call == "plain" else model(input_ids=ids).logits
                b = model(other) if family_call == "plain" else model(input_ids=other).logits
            diff = float((a[:, : T // 2] - b[:, : T // 2]).abs().max())
            if diff > 1e-5:
                raise AssertionError(f"logits of the first {T // 2} positions changed by {diff:.2e}")
            return diff
        row["causal"] = _run(causal)
    logits_shape = row["forward"]["value"]
    with torch.no_grad():
        out = model(ids) if family_call == "plain" else model(input_ids=ids)
        logits = out if torch.is_tensor(out) else out.logits
    if head == "seqcls":
        y = logits.argmax(-1)
    else:
        y = torch.cat([ids[:, 1:], torch.full((N, 1), -100)], dim=1)  # next-token targets, last ignored

    holder = {}

    def capture():
        holder["a"] = NetworkAdapter(model, ids, **kw)
        return holder["a"].capture_method

    row["capture"] = _run(capture)
    if row["capture"]["ok"]:
        row["inspect"] = _run(lambda: _inspect(holder["a"]))
        def exact():
            a = holder["a"]
            out = []
            if head == "seqcls":
                ev = IncrementalLesions(a, ids, y)
            else:  # next-token lesions (counts per cell and cross-entropy sums)
                data = as_token_data(ids)
                ev = IncrementalTokenLesions(a, data)
            for layer, width in enumerate(a.layer_sizes):
                sets = [list(range(0, width // 4)), list(range(width // 2, width))]
                if head == "seqcls":
                    fast, plain = ev.correct_counts(layer, sets), correct_counts_plain(a, layer, sets, ids, y)
                    out.append(bool((torch.as_tensor(fast) == torch.as_tensor(plain)).all()))
                else:
                    (fc, fe), (pc, pe) = ev.lesion_counts(layer, sets), token_counts_plain(a, layer, sets, data)
                    out.append(bool((fc == pc).all()) and bool(abs(fe - pe).max() <= 1e-4 * abs(pe).max()))
            if not all(out):
                raise AssertionError(f"incremental lesion counts differ from the plain oracle in layers {out}")
            return out
        row["exact"] = _run(exact)
    task = {"task": "next-token"} if head == "causal" else {}
    row["weights"] = _run(lambda: [len(l) for l in modlens.partition(model, "weights/global", n_clusters=3, data=ids,
                                                                     **kw, **task).labels])
    row["activations"] = _run(lambda: [len(l) for l in modlens.partition(model, "activations/global", n_clusters=3,
                                                                         data=ids, **kw, **task).labels])
    # activation data: a held-out batch of other random ids (analyze refuses the test set as
    # activation data; the survey before issue 18 passed the test ids themselves)
    held_out = torch.randint(1, V, (N, T), generator=torch.Generator().manual_seed(3))
    common = dict(activation_data=held_out, n_clusters=3, n_random=3, partitionings=["weights/global"], random_state=0,
                  **kw)
    if head == "causal":  # the next-token task (issue 18): ids alone, each position against the next token
        row["analyze"] = _run(lambda: modlens.analyze(model, ids, task="next-token", **common).summary.shape[0])
    else:
        row["analyze"] = _run(lambda: modlens.analyze(model, (ids, y), **common).summary.shape[0])
    row["logits_shape"] = logits_shape
    return row


STAGES = ["forward", "causal", "capture", "inspect", "exact", "weights", "activations", "analyze"]


def silent(row: dict) -> str:
    """What capture accepted but read incompletely: the token embedding (input layer) or the norm
    scales that the residual weight graph did not find."""
    r = row.get("inspect")
    if not r or not r["ok"]:
        return ""
    v = r["value"]
    notes = []
    if v["embedding"] is None:
        notes.append("no token embedding found (the weight graph has no input layer)")
    if not all(v["block_gamma_found"]):
        notes.append(f"no MLP norm scale found in {v['block_gamma_found'].count(False)} of {len(v['block_gamma_found'])} blocks")
    if not v["final_gamma_found"] and v["head"] is not None:
        notes.append("final norm scale not found")
    return "; ".join(notes)


def first_failure(row: dict) -> str:
    for stage in STAGES:
        r = row.get(stage)
        if r is not None and not r["ok"]:
            return f"{stage}: {r['error']} at {r['where']}: {r['message'][:160]}"
    return "none"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--heads", default=",".join(HEADS))
    ap.add_argument("--no-probes", dest="probes", action="store_false", help="only the unmodified models")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "lm_survey_after.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    rows = []
    jobs = []
    for family in args.families.split(","):
        for head in args.heads.split(","):
            jobs.append((family, head, "", (), False))
            if not args.probes:
                continue
            if head == "causal":
                for probe, patches in PROBES.get(family, []):
                    jobs.append((family, head, probe, tuple(patches), False))
            if head == "seqcls" and family != "plain":
                last = PROBES.get(family, [("", [])])[-1]
                jobs.append((family, head, last[0] + "+select", tuple(last[1]), True))
    for family, head, probe, patches, select in jobs:
        start = time.perf_counter()
        row = survey_one(family, head, probe, patches, select)
        row["seconds"] = round(time.perf_counter() - start, 1)
        rows.append(row)
        row["first_failure"], row["silent"] = first_failure(row), silent(row)
        note = f"  [silent: {row['silent']}]" if row["silent"] else ""
        print(f"{family:9s} {head:7s} {probe:20s} {row['seconds']:6.1f}s  {row['first_failure']}{note}", flush=True)
    meta = {"torch": torch.__version__, "transformers": transformers.__version__, "python": sys.version.split()[0],
            "sizes": {"vocab": V, "context": T, "d_model": D, "blocks": L, "heads": H, "kv_heads": KV, "d_mlp": MLP,
                      "sequences": N, "classes": C}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
