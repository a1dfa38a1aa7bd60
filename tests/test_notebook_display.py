"""Results, studies and partitions display themselves in a notebook (``_repr_html_``) with the
report's HTML pieces: significance and effect marks, n-cut per partitioning, degenerate metrics
flagged, figures inline (the browser check is in test_report_browser.py)."""

from __future__ import annotations

import base64
import re

import numpy as np
import pandas as pd
import pytest

from modlens.analysis.display import summary_table
from modlens.analysis.result import AnalysisResult
from modlens.core.html import table_html
from modlens.core.partition import Partition


def _summary():
    return pd.DataFrame({
        "partitioning": ["weights/global", "weights/global", "activations/global", "activations/global"],
        "metric": ["acc_drop", "class_range", "acc_drop", "class_range"],
        "p_value": [1e-5, 0.4, 0.2, 0.9], "significant": [True, False, False, False],
        "effect": [1.5, 1.01, 1.0, 0.98], "effect_se": [0.1, 0.05, 0.0, 0.01],
        "n_subclusters": [12, 12, 9, 9], "n_networks": [1, 1, 1, 1], "ncut": [0.42, 0.42, 1.37, 1.37],
        "degenerate": ["", "", "no-change,ties", "no-change,ties"], "n_unchanged": [0, 0, 9, 9],
        "n_lesions": [60, 60, 45, 45], "n_tied_pairs": [0, 0, 18, 18], "n_pairs": [24, 24, 18, 18],
    })


def test_summary_table_marks_significance_effects_and_degenerate_metrics():
    table = summary_table(_summary())
    assert table.columns[:3] == ["Partitioning", "n-cut", "Subclusters"]
    weights, acts = table.rows
    assert [c.text for c in weights[:3]] == ["Weight/Global", "0.420", "12"]
    p, effect = weights[3], weights[4]
    assert p.bold and p.html == "1.00 × 10<sup>-5</sup>"  # significant, the paper's notation
    assert effect.bold and effect.text == "1.500 ± 0.100"  # two standard errors above 1
    assert not weights[6].bold  # 1.01 ± 0.05 is not
    assert acts[4].flag and acts[4].text.endswith(" !") and not weights[4].flag
    html = table_html(table)
    assert "<strong>1.00 × 10<sup>-5</sup></strong>" in html and 'class="num flag"' in html


def _result(with_vis: bool):
    from modlens.experiments.feature_vis import VisResult

    labels = [np.array([0, 0, 1, 1, -1]), np.array([1, 0, 1, 0])]
    part = Partition.from_labels(labels, ["fc1", "fc2"], [5, 4], method="weights/global", n_clusters=2, ncut=0.25)
    tests = pd.DataFrame({"partitioning": ["weights/global"] * 4, "metric": ["acc_drop", "class_range"] * 2,
                          "percentile": [0.1, 0.3, 0.2, 0.6]})
    vis = []
    if with_vis:
        table = pd.DataFrame({"partitioning": "weights/global", "layer": 0, "layer_name": "fc1", "cluster": [0, 0],
                              "draw": [0, 1], "size": [2, 2]})
        vis = [VisResult(table, np.random.default_rng(0).random((2, 1, 6, 6)), {"value_range": (0.0, 1.0)})]
    return AnalysisResult(_summary(), pd.DataFrame(), tests, {"weights/global": part},
                          {"alpha": 0.05, "n_test": 100, "test_accuracy": 0.9}, None, vis)


@pytest.mark.parametrize("with_vis, n_figures", [(False, 1), (True, 2)])
def test_result_displays_table_notes_and_decodable_figures(with_vis, n_figures):
    html = _result(with_vis)._repr_html_()
    assert html.startswith('<div class="modlens"><style>') and "Weight/Global" in html
    assert "! activations/global Acc. drop: no-change: 9/45 lesions" in html  # the degenerate metric explained
    pngs = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(pngs) == n_figures
    assert all(base64.b64decode(p).startswith(b"\x89PNG\r\n\x1a\n") for p in pngs)
    assert "<script" not in html


def test_partition_displays_layers_sizes_and_ncut():
    part = _result(False).partitions["weights/global"]
    html = part._repr_html_()
    cells = re.findall(r"<td[^>]*>([^<]*)</td>", html)
    assert "0.2500" in cells and "weights/global" in cells
    rows = [cells[i:i + 5] for i in range(cells.index("fc1"), len(cells), 5)]
    assert rows == [["fc1", "5", "2", "1", "2"], ["fc2", "4", "2", "0", "2"]]
