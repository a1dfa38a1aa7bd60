"""A GPT-2-small-sized decoder through modlens (issue 18): capture, two partitions, one lesion set.

    OMP_NUM_THREADS=2 python benchmarks/lm_speed.py                        # the issue's size, CPU
    OMP_NUM_THREADS=1 python benchmarks/lm_speed.py --tiny                 # the same code paths in seconds
    python benchmarks/lm_speed.py --device cuda --stages lesions           # the lesion projection on a GPU

The model is Hugging Face's ``GPT2LMHeadModel`` from a ``GPT2Config`` with GPT-2 small's shape (12
blocks, width 768, 12 heads, 3,072 MLP units per block = 36,864 neurons, vocabulary 50,257, tied
embeddings) and a context of 128, random weights (nothing downloaded). Data: random token ids,
``--act-sequences`` sequences as activation data and ``--test-sequences`` as the lesion test set.
Stages, each timed (wall seconds, and CPU seconds of all the process's threads: on a shared machine
the CPU time divided by the threads is what an idle machine's wall time would be) with the
process's peak resident memory so far (``ru_maxrss``):

1. ``capture``: :class:`~modlens.nn.adapter.NetworkAdapter` (torch.export; GPT-2's Conv1D,
   gelu_new and the tied unembedding through the decoder rewrites);
2. ``weights/global``: the residual-stream weight graph (vocabulary left out above 4,096 tokens,
   docs/language-models.md section 9; kNN above 8,192 neurons), spectral clustering (Lanczos), and
   the share of squared weight inside clusters (a second pass over the 66 block pairs);
3. ``activations/global``: per-position activation rows (at most ``--max-positions``), the kNN
   activation graph (float32 ranks), clustering;
4. ``lesions`` (``--stages``): the next-token lesion engine on the test sequences; for layers
   ``--lesion-layers``, ``--sets`` lesion sets of ``3072 / k`` neurons each are timed after one
   warm-up set, and the full lesion stage is projected: 4 partitionings x k x 12 subclusters x
   (n_random + 1) sets, at the mean time per set over the timed layers (layers spread over the
   depth, since a lesion in block i re-runs blocks i..11 and the unembedding).

Not a test: times depend on the machine and on the jobs sharing it.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
import warnings

import numpy as np
import torch

FULL = dict(vocab=50257, context=128, d=768, blocks=12, heads=12, mlp=3072)
TINY = dict(vocab=512, context=16, d=32, blocks=3, heads=2, mlp=64)


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def gpt2_sized(size: dict, seed: int = 0):
    """GPT2LMHeadModel with ``size``'s shape and random weights (seeded inside fork_rng)."""
    import transformers

    cfg = transformers.GPT2Config(vocab_size=size["vocab"], n_positions=size["context"], n_embd=size["d"],
                                  n_layer=size["blocks"], n_head=size["heads"], n_inner=size["mlp"],
                                  bos_token_id=0, eos_token_id=0, pad_token_id=0)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return transformers.GPT2LMHeadModel(cfg).eval()


def token_batch(size: dict, n: int, seed: int) -> torch.Tensor:
    return torch.randint(1, size["vocab"], (n, size["context"]), generator=torch.Generator().manual_seed(seed))


def measure_lesions(adapter, data, *, k: int, layers, sets: int, n_random: int = 19, say=print) -> dict:
    """Seconds per lesion set (each of ``mlp / k`` neurons) at ``layers``, and the projected lesion
    stage of four partitionings with ``k`` subclusters per layer."""
    from modlens.nn.token_lesion import IncrementalTokenLesions

    device = adapter.device
    t0 = time.perf_counter()
    engine = IncrementalTokenLesions(adapter, data)
    setup = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    per_layer, macs = {}, {}
    for layer in layers:
        width = adapter.layer_sizes[layer]
        size = max(1, width // k)
        engine.lesion_counts(layer, [rng.choice(width, size, replace=False)])   # warm-up, fills the cache
        chosen = [rng.choice(width, size, replace=False) for _ in range(sets)]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        engine.lesion_counts(layer, chosen)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        per_layer[layer] = (time.perf_counter() - t) / sets
        macs[layer] = adapter.lesion_plan(layer).macs(engine.shapes, size)["lesion"] * len(data)
        engine.clear_cache()
        say(f"  layer {layer}: {per_layer[layer]:.3f} s per lesion set of {size} neurons "
            f"({engine.last_stats.get('sets_per_block')} sets x {engine.last_stats.get('samples_per_block')} sequences per block)")
    mean = float(np.mean(list(per_layer.values())))
    n_sets = 4 * k * len(adapter.layers) * (n_random + 1)
    flop = 2.0 * float(np.mean(list(macs.values())))   # Linear layers only (attention products not counted)
    return {"baseline_s": setup, "per_set_s": {str(k_): v for k_, v in per_layer.items()}, "mean_per_set_s": mean,
            "projected_sets": n_sets, "projected_s": mean * n_sets, "test_sequences": len(data),
            "test_positions": int(engine.n_scored), "linear_gflop_per_set": flop / 1e9,
            "projected_linear_tflop": flop * n_sets / 1e12}


def run(*, tiny: bool = False, device: str = "cpu", stages=("capture", "weights", "activations", "lesions"),
        act_sequences: int = 64, test_sequences: int = 8, max_positions: int = 4096, k: int = 16, sets: int = 3,
        lesion_layers=None, say=print) -> dict:
    from modlens.experiments.partitioning import Partitioner
    from modlens.nn import NetworkAdapter
    from modlens.nn.tokens import as_token_data

    size = TINY if tiny else FULL
    dev = torch.device(device)
    out: dict = {"size": size, "device": device, "stages": {}}

    def stage(name, fn):
        t0, c0 = time.perf_counter(), time.process_time()
        value = fn()
        out["stages"][name] = {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
                               "peak_rss_gb": _rss_gb(), **(value or {})}
        st = out["stages"][name]
        say(f"{name}: {st['seconds']:.1f} s wall, {st['cpu_seconds']:.1f} s CPU (all threads), "
            f"peak RSS {st['peak_rss_gb']:.2f} GB")

    model = gpt2_sized(size).to(dev)
    act = as_token_data(token_batch(size, act_sequences, 1))
    test = as_token_data(token_batch(size, test_sequences, 2))
    holder = {}
    stage("capture", lambda: holder.update(adapter=NetworkAdapter(model, test.ids.to(dev), input_name="input_ids"))
          or {"layers": len(holder["adapter"].layers), "neurons": int(sum(holder["adapter"].layer_sizes))})
    adapter = holder["adapter"]
    part = Partitioner(adapter, activation_data=act, n_clusters=k, task="next-token", max_positions=max_positions)
    if "weights" in stages:
        def weights():
            p = part.partition("weights/global")
            return {"ncut": p.ncut, "graph_nodes": p.info["graph_nodes"], "weight_share": p.info["weight_share"]}
        stage("weights/global", weights)
    if "activations" in stages:
        def activations():
            p = part.partition("activations/global")
            return {"ncut": p.ncut, "rows": p.info["activation_rows"]}
        stage("activations/global", activations)
    if "lesions" in stages:
        layers = lesion_layers if lesion_layers is not None else sorted({0, len(adapter.layers) // 2, len(adapter.layers) - 1})
        test_dev = test if dev.type == "cpu" else test   # ids move to the device batch by batch
        stage("lesions", lambda: measure_lesions(adapter, test_dev, k=k, layers=layers, sets=sets, say=say))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a small GPT-2 (seconds): checks the code paths")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--stages", default="capture,weights,activations,lesions")
    ap.add_argument("--act-sequences", type=int, default=64)
    ap.add_argument("--test-sequences", type=int, default=8)
    ap.add_argument("--max-positions", type=int, default=4096)
    ap.add_argument("--clusters", type=int, default=16)
    ap.add_argument("--sets", type=int, default=3, help="timed lesion sets per layer")
    ap.add_argument("--lesion-layers", default=None, help="comma-separated layers (default: first, middle, last)")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    layers = None if args.lesion_layers is None else [int(v) for v in args.lesion_layers.split(",")]
    res = run(tiny=args.tiny, device=args.device, stages=tuple(args.stages.split(",")), act_sequences=args.act_sequences,
              test_sequences=args.test_sequences, max_positions=args.max_positions, k=args.clusters, sets=args.sets,
              lesion_layers=layers)
    total = sum(s["seconds"] for n, s in res["stages"].items() if n != "lesions")
    print(f"capture + partitions: {total:.1f} s, peak RSS {max(s['peak_rss_gb'] for s in res['stages'].values()):.2f} GB")
    if "lesions" in res["stages"]:
        les = res["stages"]["lesions"]
        print(f"lesion stage projected: {les['projected_sets']} sets x {les['mean_per_set_s']:.3f} s = "
              f"{les['projected_s'] / 3600:.2f} h on {args.device} ({les['test_sequences']} test sequences)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2, default=float)


if __name__ == "__main__":
    main()
