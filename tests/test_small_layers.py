"""Issue 20: n_clusters larger than a layer (a two-channel squeeze-and-excitation layer) works where
layers are not clustered one by one; a partition with no subcluster to test says so in words, with
the reason and what to try, in the printed summary and the HTML report; recurrent layers are
refused as such."""

import numpy as np
import pytest
import torch
from torch import nn

import modlens
from modlens.core.partition import Partition
from modlens.nn import NetworkAdapter, UnsupportedModelError

pytestmark = pytest.mark.filterwarnings("ignore:Graph is not fully connected", "ignore::UserWarning")


class SENet(nn.Module):
    """conv -> squeeze-excitation with a two-channel bottleneck -> conv -> head."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.se_reduce, self.se_expand = nn.Conv2d(8, 2, 1), nn.Conv2d(2, 8, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        g = torch.sigmoid(self.se_expand(torch.relu(self.se_reduce(h.mean((2, 3), keepdim=True)))))
        h = torch.relu(self.conv2(h * g))
        return self.fc(h.mean((2, 3)))


@pytest.mark.parametrize("method", ["weights/global", "weights/local", "activations/global", "activations/local"])
def test_n_clusters_above_a_two_channel_layer(method):
    torch.manual_seed(0)
    model = SENet().eval()
    x = torch.randn(40, 3, 8, 8)
    a = NetworkAdapter(model, x)
    assert 2 in a.layer_sizes
    p = modlens.partition(a, method, n_clusters=4, data=x if method.startswith("activations") else None,
                          random_state=0)
    assert [len(l) for l in p.labels] == a.layer_sizes
    two = a.layer_sizes.index(2)
    assert len(set(p.labels[two].tolist()) - {-1}) <= 2
    if method.endswith("local"):  # each layer gets at most the clusters it got globally, at most its width
        glob = modlens.partition(a, method.replace("local", "global"), n_clusters=4,
                                 data=x if method.startswith("activations") else None, random_state=0)
        assert all(l <= g for l, g in zip(p.clusters_per_layer(), glob.clusters_per_layer()))


def test_n_clusters_above_every_hidden_neuron_is_one_line():
    torch.manual_seed(0)
    a = NetworkAdapter(SENet().eval(), torch.randn(4, 3, 8, 8))
    with pytest.raises(ValueError, match=r"n_clusters=40 is larger than the 26 hidden neurons .*'se_reduce': 2"):
        modlens.partition(a, "weights/global", n_clusters=40)


def test_reason_when_no_subcluster_qualifies():
    whole = Partition.from_labels([np.zeros(4, int), np.ones(3, int)], ["a", "b"], [4, 3], method="weights/global",
                                  n_clusters=2)
    reason = whole.no_subclusters_reason()
    assert "every cluster spans whole layers" in reason and "larger n_clusters (k = 2 now, for 2 layers)" in reason
    local = Partition.from_labels([np.zeros(4, int), np.ones(3, int)], ["a", "b"], [4, 3], method="weights/local",
                                  n_clusters=2)
    assert "splits a layer only where the global one does" in local.no_subclusters_reason()
    singles = Partition.from_labels([np.arange(4), np.zeros(3, int)], ["a", "b"], [4, 3], method="weights/global",
                                    n_clusters=4)
    reason = singles.no_subclusters_reason()
    assert "1 lie whole in one cluster, 1 are split into pieces of fewer than 2 neurons" in reason
    assert "a local partitioning (each layer clustered with its neighbouring layers only)" in reason
    some = Partition.from_labels([np.array([0, 0, 1, 1]), np.zeros(3, int)], ["a", "b"], [4, 3])
    assert some.no_subclusters_reason() is None


def test_summary_and_report_say_why_there_is_nothing_to_test(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    x = torch.randn(60, 6)
    y = model(x).argmax(-1).detach()
    part = Partition.from_labels([np.zeros(8, int), np.ones(5, int)], ["0", "2"], [8, 5], method="weights/global",
                                 n_clusters=2)
    res = modlens.analyze(model, (x, y), partition=part, n_random=2)
    assert (res.summary["n_subclusters"] == 0).all() and res.summary["p_value"].isna().all()
    text = repr(res)
    assert "user: p values n/a, no subcluster qualifies: every cluster spans whole layers" in text
    assert "no subcluster qualifies" in res._repr_html_()
    folder = res.save(tmp_path / "r")
    from modlens.report import write_result_report

    html = write_result_report(folder).read_text()
    assert "no subcluster qualifies: every cluster spans whole layers" in html and "larger n_clusters" in html


@pytest.mark.parametrize("cell, kind", [(nn.LSTM, "nn.LSTM"), (nn.GRU, "nn.GRU"), (nn.RNN, "nn.RNN")])
def test_recurrent_layers_are_refused_as_such(cell, kind):
    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = cell(4, 8, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            out, _ = self.rnn(x)
            return self.head(out[:, -1])

    x = torch.randn(5, 7, 4)
    for data in (x, None):
        with pytest.raises(UnsupportedModelError) as info:
            modlens.partition(Classifier(), "weights/global", n_clusters=2, example=data,
                              input_shape=None if data is not None else (7, 4))
        msg = str(info.value)
        assert f"recurrent layers ({kind} at 'rnn') are not supported" in msg and "\n" not in msg
        assert "no hidden" not in msg
