"""The lesion stage of ``analyze`` with one probe pass per layer, and with the layers' caches filled
together (``IncrementalLesions.prepare``), on one model of the zoos, in the same process.

    OMP_NUM_THREADS=1 python benchmarks/lesion_prefill.py --zoo timm --name halonet_h1
    OMP_NUM_THREADS=1 python benchmarks/lesion_prefill.py --zoo torchvision --name resnet50

The model is built as ``benchmarks/zoo.py`` builds it (random weights, 10 classes, the smallest input
size it accepts, 8 random test inputs labelled by the model itself) and every neuron layer is split
into random halves; ``lesion_test`` then lesions each half and 2 random sets of its size, as the census's
lesion stage does. ``plain``: ``prepare`` disabled, so each layer's cache is filled by its own probe
pass (the engine before ``prepare`` existed); ``prepared``: as ``lesion_test`` runs it. The two tables
must be equal; the ratio of the wall times and the number of probe passes are printed.
Needs timm / torchvision (the zoo venv). Not a test: times depend on the machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import zoo  # noqa: E402

from modlens.core.partition import Partition  # noqa: E402
from modlens.experiments.lesion_test import lesion_test  # noqa: E402
from modlens.nn.adapter import NetworkAdapter  # noqa: E402
from modlens.nn.lesion import IncrementalLesions  # noqa: E402


def run(adapter, x, y, part, prepared: bool):
    engine = IncrementalLesions(adapter, x, y)
    passes = []
    fill = engine._fill_many

    def counted(plans, start, stop):
        passes.append(len(plans))
        return fill(plans, start, stop)

    engine._fill_many = counted
    if not prepared:
        engine.prepare = lambda layers: None
    t0 = time.perf_counter()
    table = lesion_test(engine, part, n_random=2, random_state=0)
    return table, time.perf_counter() - t0, passes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zoo", choices=("timm", "torchvision"), default="torchvision")
    ap.add_argument("--name", default="resnet50")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, input_name, shape, kind, _ = zoo.BUILDERS[args.zoo]({"name": args.name, "zoo": args.zoo})
    model.eval()
    zoo.unzero_norm_scales(model)
    x, y = zoo.make_data(model, input_name, kind, shape, None, 1)
    adapter = NetworkAdapter(model, x, input_name=input_name)
    rng = np.random.default_rng(0)
    labels = [rng.permutation(np.arange(n) % (2 if n >= 4 else 1)) for n in adapter.layer_sizes]
    part = Partition.from_labels(labels, adapter.layer_names, adapter.layer_sizes)
    print(f"{args.name}: input {tuple(shape)}, {len(adapter.layer_sizes)} layers, {sum(adapter.layer_sizes):,} neurons")
    plain, t_plain, p_plain = run(adapter, x, y, part, prepared=False)
    fast, t_fast, p_fast = run(adapter, x, y, part, prepared=True)
    pd.testing.assert_frame_equal(plain, fast)
    print(f"plain    (one probe pass per layer): {t_plain:7.1f} s, {len(p_plain)} probe passes")
    print(f"prepared (layers filled together)  : {t_fast:7.1f} s, {len(p_fast)} probe passes "
          f"(layers per pass: {p_fast})")
    print(f"ratio plain / prepared: {t_plain / t_fast:.2f}x; tables equal ({len(fast)} lesions)")


if __name__ == "__main__":
    main()
