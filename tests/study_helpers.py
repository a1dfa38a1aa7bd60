"""Shared by the study tests: a small study spec that runs in seconds, and byte comparisons."""

from __future__ import annotations

import filecmp
from pathlib import Path

TINY = """
name = "tiny"
[analysis]
n_clusters = [4]
n_random = 3
partitionings = ["weights/global", "activations/local"]
feature_vis = true
[analysis.vis_options]
steps = 5
[[networks]]
group = "mlp-digits"
label = "MLP, digits"
arch = "mlp"
dataset = "digits"
replicates = 2
epochs = 3
"""

TABLES = ("summary", "subclusters", "tests", "visualizations")


def write_spec(folder: Path, text: str = TINY, name: str = "tiny.toml") -> Path:
    path = Path(folder) / name
    path.write_text(text)
    return path


def table_files(study: Path) -> list[Path]:
    """The files whose bytes must not depend on how the study was run."""
    study = Path(study)
    files = [study / "study_rows.parquet", study / "study_rows.csv"]
    for net in sorted((study / "networks").iterdir()):
        for name in TABLES:
            files += [net / f"{name}.parquet", net / f"{name}.csv"]
    return files


def assert_same_tables(a: Path, b: Path) -> None:
    fa, fb = table_files(a), table_files(b)
    assert [p.relative_to(a) for p in fa] == [p.relative_to(b) for p in fb]
    different = [str(p.relative_to(a)) for p, q in zip(fa, fb) if not filecmp.cmp(p, q, shallow=False)]
    assert not different, f"files differ between {a} and {b}: {different}"
    # the images: same arrays (an npz archive stamps its members with the time they were written)
    import numpy as np

    for net in sorted((Path(a) / "networks").iterdir()):
        with np.load(net / "vis_images.npz") as x, np.load(Path(b) / "networks" / net.name / "vis_images.npz") as y:
            assert sorted(x.files) == sorted(y.files)
            for name in x.files:
                assert np.array_equal(x[name], y[name]), f"{net.name}: images of {name} differ"
