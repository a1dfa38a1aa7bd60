"""The built-in studies (``modlens study list``), each a TOML spec in the format of
:mod:`modlens.study.spec`.

* ``digits``: the demo as a study: the 4x256 MLP on scikit-learn's bundled digits, 3 replicates,
  all four partitionings, lesions and feature visualization. No download.
* ``paper-small``: the paper's MLP and small CNN on MNIST and Fashion-MNIST, 5 replicates each
  (Tables 1, 4 and 5; the Fashion-MNIST rows have no counterpart in the paper's tables).
* ``paper-halves``: MLPs on the halves, halves-same, stack-diff and stack-same variants of MNIST
  (appendix A.4; their first-layer correlation maps are Figures 1 and 6).
* ``paper-vgg``: the CIFAR-10 VGG, regularized (the paper's) and unregularized, 5 replicates each.
* ``paper-k``: the regularized CIFAR-10 VGG at k = 8, 12 and 16 (Tables 2 and 3).
* ``paper-imagenet``: VGG-16, VGG-19 and ResNet-18 from weights the user supplies (saved as modlens
  model folders) and an ImageNet validation folder; 9 random sets, as in the paper.
* ``lm-tiny``: the reference decoder language model (4 blocks of width 128, 512 MLP units, byte
  tokens, context 128) trained on the two-genre text corpus (English prose and Python source), 5
  replicates, the next-token task: all four partitionings at k = 8, importance (accuracy drop,
  cross-entropy increase), coherence by byte class of the target (class range), by genre (label
  range) and the top-activating-positions test (issue 18; docs/language-models.md). Needs
  ``<data-dir>/text/{prose,code}.txt``.
* ``paper-original``: ``paper-small`` with every original-code option of ``analyze`` switched on
  (the graph: matrix 1-norm conv edges and activation reduction, the original batch-norm folding;
  the statistics: balanced accuracy, normalized class range, original ties and effect rule, max
  fraction 0.99; the original feature visualization), to compare the paper's numbers with both
  definitions. The graph options (rows 1-3 of the notes) change nothing for the MLPs and move the
  CNNs' partitions (docs/fidelity.md, section 6).

CIFAR-10 studies need ``<data-dir>/cifar-10-batches-py/`` (or ``cifar-10-python.tar.gz``);
``paper-imagenet`` needs ``<data-dir>/imagenet/val/<wnid>/*.JPEG`` and model folders
``<data-dir>/imagenet-models/{vgg16,vgg19,resnet18}/`` (``model.safetensors`` + ``manifest.json``
with ``{"type": "torchvision", "name": ...}``, see :func:`modlens.nn.io.save_model`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Builtin:
    summary: str
    toml: str


_ALL = '["weights/global", "weights/local", "activations/global", "activations/local"]'


def _head(name: str, description: str, *, k: str = "[16]", n_random: int = 19, extra: str = "") -> str:
    """The spec's name and its ``[analysis]`` table: every partitioning, lesions and visualizations."""
    return f"""
name = "{name}"
description = "{description}"

[analysis]
n_clusters = {k}
n_random = {n_random}
partitionings = {_ALL}
feature_vis = true
{extra}"""


def _net(group: str, label: str, arch: str, dataset: str, replicates: int = 5, extra: str = "") -> str:
    """One ``[[networks]]`` entry: replicates of a reference recipe trained on a dataset."""
    return f"""
[[networks]]
group = "{group}"
label = "{label}"
arch = "{arch}"
dataset = "{dataset}"
{extra}replicates = {replicates}
"""


_PAPER_SMALL_NETS = "".join(_net(g, label, arch, ds) for g, label, arch, ds in (
    ("mlp-mnist", "MLP, MNIST", "mlp", "mnist"), ("mlp-fashion", "MLP, Fashion-MNIST", "mlp", "fashion-mnist"),
    ("cnn-mnist", "CNN, MNIST", "cnn", "mnist"), ("cnn-fashion", "CNN, Fashion-MNIST", "cnn", "fashion-mnist")))

_VGG = _net("vgg-cifar10", "VGG, CIFAR-10", "vgg", "cifar10")

BUILTIN: dict[str, Builtin] = {
    "digits": Builtin(
        "4x256 MLP on the bundled digits, 3 replicates, 4 partitionings, lesions + feature vis (no download)",
        _head("digits", "The demo as a study: MLPs on scikit-learn's digits, lesion and feature-visualization tests.")
        + _net("mlp-digits", "MLP, digits", "mlp", "digits", replicates=3, extra="epochs = 60\n")),
    "paper-small": Builtin(
        "MLP and small CNN on MNIST and Fashion-MNIST, 5 replicates each (Tables 1, 4, 5)",
        _head("paper-small", "The paper's small networks: Tables 1, 4 and 5 for MLPs and CNNs on MNIST (and Fashion-MNIST).")
        + _PAPER_SMALL_NETS),
    "paper-halves": Builtin(
        "MLPs on halves / halves-same / stack-diff / stack-same MNIST, 5 replicates each (Figures 1, 6)",
        _head("paper-halves", "Two-image MNIST variants (appendix A.4): does modularity follow the task's structure?")
        + "".join(_net(f"mlp-{v}-mnist", f"MLP, {v}-MNIST", "mlp", f"{v}-mnist")
                  for v in ("halves", "halves-same", "stack-diff", "stack-same"))),
    "paper-vgg": Builtin(
        "CIFAR-10 VGG, regularized and unregularized, 5 replicates each (needs the CIFAR-10 files)",
        _head("paper-vgg", "The mid-sized CNNs: VGGs on CIFAR-10 with and without dropout and L2.")
        + _VGG + _net("vgg-cifar10-unreg", "VGG (unregularized), CIFAR-10", "vgg", "cifar10", extra="regularize = false\n")),
    "paper-k": Builtin(
        "the regularized CIFAR-10 VGG at k = 8, 12, 16 (Tables 2, 3; needs the CIFAR-10 files)",
        _head("paper-k", "Robustness to the number of clusters (appendix A.6).", k="[8, 12, 16]") + _VGG),
    "paper-imagenet": Builtin(
        "VGG-16, VGG-19, ResNet-18 from your weights and an ImageNet validation folder, 9 random sets",
        _head("paper-imagenet", "The ImageNet networks, from weights the user supplies (one network each, as in the paper).",
              n_random=9)
        + "".join(f"""
[[networks]]
group = "{g}-imagenet"
label = "{label}, ImageNet"
models = ["{{data_dir}}/imagenet-models/{g}"]
imagenet = {{ folder = "{{data_dir}}/imagenet/val", per_class = 10, activation_per_class = 5 }}
""" for g, label in (("vgg16", "VGG-16"), ("vgg19", "VGG-19"), ("resnet18", "ResNet-18")))),
    "lm-tiny": Builtin(
        "byte-level decoder LM on prose + Python source, 5 replicates, next-token task, k = 8 (needs text/)",
        _head("lm-tiny", "Is a small decoder language model modular, and are its modules specific to a genre? "
                         "Next-token importance and coherence by byte class and by genre.", k="[8]",
              extra='task = "next-token"\n')
        + _net("gpt-text", "GPT 4x128 (MLP 512), two-genre text", "gpt", "text")),
    "paper-original": Builtin(
        "paper-small with every original-code option switched on (rows 1-3, 7, 9-11, 14-16 of the notes)",
        _head("paper-original", "paper-small analysed with the original code's definitions, for comparison with the paper's numbers.",
              extra="""conv_edge = "matrix_1_norm"
act_reduce = "matrix_1_norm"
bn_fold = "original"
accuracy = "balanced"
class_range = "normalized"
ties = "original"
effect_rule = "original"
max_fraction = 0.99

[analysis.vis_options]
original = true
""") + _PAPER_SMALL_NETS),
}

__all__ = ["BUILTIN", "Builtin"]
