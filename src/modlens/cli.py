"""The ``modlens`` command line: demo, train, analyze."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from modlens._version import __version__


def _add_analysis_options(p: argparse.ArgumentParser) -> None:
    from modlens.experiments.partitioning import METHODS

    p.add_argument("--n-clusters", type=int, default=16, help="clusters per partitioning (default 16)")
    p.add_argument("--n-random", type=int, default=19, help="random subclusters per true subcluster (default 19)")
    p.add_argument("--seed", type=int, default=0, help="seed of clustering and random draws (default 0)")
    p.add_argument("--partitionings", nargs="+", default=list(METHODS), choices=METHODS, metavar="METHOD",
                   help=f"which partitionings to test (default: all of {', '.join(METHODS)})")
    p.add_argument("--accuracy", choices=["accuracy", "balanced"], default="accuracy",
                   help="'balanced' reproduces the original code's mean per-class accuracy (notes row 9)")
    p.add_argument("--class-range", choices=["range", "normalized"], default="range",
                   help="'normalized' reproduces the original code's range / |mean change| (notes row 10)")
    p.add_argument("--ties", choices=["mid", "original"], default="mid",
                   help="tie rule of percentiles; 'original' counts ties in favour of modularity (notes row 11)")
    p.add_argument("--effect-rule", choices=["paper", "original"], default="paper",
                   help="'original': a lesion effect is 0 unless true and random drops are both positive (notes row 14)")
    p.add_argument("--engine", choices=["incremental", "plain"], default="incremental",
                   help="lesion evaluation path; 'plain' is the slow one-lesion-per-pass reference")
    p.add_argument("--alpha", type=float, default=0.05, help="false discovery rate for Benjamini-Hochberg")


def _analysis_kwargs(a) -> dict:
    return dict(n_clusters=a.n_clusters, n_random=a.n_random, random_state=a.seed, partitionings=a.partitionings,
                accuracy=a.accuracy, class_range=a.class_range, ties=a.ties, effect_rule=a.effect_rule,
                engine=a.engine, alpha=a.alpha)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modlens", description="Is this trained network modular, and which neurons are the modules?")
    parser.add_argument("--version", action="version", version=f"modlens {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="train a small MLP on embedded data and test its partitions (no download)")
    d.add_argument("--dataset", default="digits", choices=["digits", "halves-digits", "halves-same-digits",
                                                           "stack-diff-digits", "stack-same-digits"])
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--epochs", type=int, default=60)
    d.add_argument("--n-clusters", type=int, default=16)
    d.add_argument("--n-random", type=int, default=19)
    d.add_argument("--out", type=Path, default=None, help="also write the result tables to this folder")
    d.add_argument("--overwrite", action="store_true")

    t = sub.add_parser("train", help="train the paper's reference MLP and save it (safetensors + manifest)")
    t.add_argument("--dataset", required=True, help="mnist, fashion-mnist, halves-mnist, halves-same-mnist, stack-diff-mnist, "
                                                     "stack-same-mnist (and the fashion-mnist/digits variants)")
    t.add_argument("--seed", type=int, required=True, help="seed of initialization, shuffling and the held-out split")
    t.add_argument("--out", type=Path, required=True, help="folder to save the model in")
    t.add_argument("--data-dir", type=Path, default=None, help="folder with mnist/ and fashion-mnist/ (default: $MODLENS_DATA or ~/.cache/modlens/data)")
    t.add_argument("--epochs", type=int, default=None, help="default 20 (60 for digits)")
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--n-val", type=int, default=5000, help="training examples held out for activation graphs")

    a = sub.add_parser("analyze", help="partition saved models and run the lesion tests")
    a.add_argument("models", nargs="+", type=Path, help="model folder(s); several are treated as replicates")
    a.add_argument("--out", type=Path, required=True, help="folder for the result tables (Parquet, CSV, JSON)")
    a.add_argument("--data-dir", type=Path, default=None)
    a.add_argument("--overwrite", action="store_true")
    _add_analysis_options(a)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("modlens: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, OSError) as exc:
        print(f"modlens: error: {exc}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from modlens.study import runs
    from modlens.study.report import format_summary

    if args.command == "demo":
        result = runs.demo(dataset=args.dataset, seed=args.seed, epochs=args.epochs, n_clusters=args.n_clusters,
                           n_random=args.n_random, out=args.out, overwrite=args.overwrite)
        print(f"\nmodlens demo: {args.dataset}, 4x256 MLP, test accuracy {result.config['model']['test_accuracy']:.4f}, "
              f"k={args.n_clusters}, {args.n_random} random sets per subcluster ({result.config['seconds']:.1f} s analysis)\n")
        print(format_summary(result.summary))
        if args.out:
            print(f"\ntables written to {args.out}")
        return 0
    if args.command == "train":
        def report(epoch, n, loss):
            print(f"epoch {epoch}/{n}  loss {loss:.4f}", file=sys.stderr, flush=True)

        _, manifest = runs.train_reference(args.dataset, seed=args.seed, out=args.out, data_dir=args.data_dir,
                                           epochs=args.epochs, batch_size=args.batch_size, n_val=args.n_val, progress=report)
        print(f"saved {args.out} (test accuracy {manifest['accuracy']:.4f})")
        return 0
    if args.command == "analyze":
        result = runs.analyze_saved(args.models, out=args.out, data_dir=args.data_dir, overwrite=args.overwrite,
                                    progress=True, **_analysis_kwargs(args))
        print(format_summary(result.summary))
        print(f"\ntables written to {args.out}")
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
