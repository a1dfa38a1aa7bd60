"""The ``modlens`` command line: demo, train, analyze, correlation-maps, report, study run/list/status.

The options of ``analyze`` and ``demo`` are generated from the fields of
:class:`~modlens.analysis.AnalysisConfig` (:func:`modlens.analysis.config.options`), one option per
field under the same name, so the command line, the Python API and study specs cannot drift apart.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from modlens._version import __version__
from modlens.experiments.train import ARCHS, DIGITS_MLP_EPOCHS
from modlens.report.paper import BH_SCOPES
from modlens.study.executors import EXECUTORS


def _option_type(o):
    """The argparse type of an analysis option: its value type, where an int option whose default is
    a word (n_init's "auto") also takes that word."""
    if o.kind is int and isinstance(o.default, str):
        def int_or_word(text: str):
            try:
                return int(text)
            except ValueError:
                if text == o.default:
                    return text
                raise argparse.ArgumentTypeError(f"expected an integer or {o.default!r}, got {text!r}") from None
        return int_or_word
    return o.kind


def _add_options(p: argparse.ArgumentParser, opts, prefix: str = "", skip=()) -> None:
    """One command-line option per analysis option (the fields of ``AnalysisConfig``, or the keys
    of its ``vis_options`` with ``prefix="vis-"``): ``--name-with-dashes``, the field's type,
    choices and help; defaults are the config's (not repeated here)."""
    for o in opts:
        if o.name in skip or o.kind is None or o.kind is dict:
            continue
        flag = "--" + prefix + o.name.replace("_", "-")
        dest = (prefix.replace("-", "_") + o.name)
        default = o.default if not isinstance(o.default, tuple) else list(o.default)
        shown = "" if default is None else f" (default {' '.join(default) if isinstance(default, list) else default})"
        if o.kind is bool:
            p.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=o.help + shown)
        elif o.many:
            p.add_argument(flag, dest=dest, nargs="+", choices=o.choices, metavar=o.name.upper()[:-1] or "VALUE",
                           default=None, help=f"{o.help}; any of {', '.join(o.choices)}{shown}")
        else:
            p.add_argument(flag, dest=dest, type=_option_type(o), choices=o.choices, default=None,
                           metavar=None if o.choices else o.name.upper(), help=o.help + shown)


def _add_analysis_options(p: argparse.ArgumentParser, skip=()) -> None:
    from modlens.analysis.config import options, vis_options

    _add_options(p, options(), skip=skip)
    _add_options(p, vis_options(), prefix="vis-")


def _analysis_kwargs(a, skip=()) -> dict:
    """The analysis options given on the command line (the others keep the config's defaults); a
    --vis-* option implies --feature-vis."""
    from modlens.analysis.config import options, vis_options

    out = {o.name: getattr(a, o.name) for o in options() if o.name not in skip and getattr(a, o.name, None) is not None}
    vis = {o.name: getattr(a, "vis_" + o.name) for o in vis_options() if getattr(a, "vis_" + o.name, None) is not None}
    if "partitionings" in out:
        out["partitionings"] = tuple(out["partitionings"])
    if vis:
        out["vis_options"] = vis
        out.setdefault("feature_vis", True)
    return out


def _model_arg(text: str):
    from modlens.study.inputs import parse_model_arg

    try:
        return parse_model_arg(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_input_options(p: argparse.ArgumentParser) -> None:
    """The options of a model's data and random init (modlens.study.inputs.INPUT_OPTIONS: the keys of
    a study spec's [[networks]] under the same names)."""
    from modlens.study.inputs import INPUT_OPTIONS

    for o in INPUT_OPTIONS:
        p.add_argument("--" + o.name.replace("_", "-"), dest=o.name, type=o.kind, choices=o.choices, nargs=o.n,
                       default=None, metavar=None if o.choices else (o.name.upper() if o.n is None else "V"), help=o.help)


def _input_kwargs(a) -> dict:
    from modlens.study.inputs import INPUT_OPTIONS

    given = {o.name: getattr(a, o.name) for o in INPUT_OPTIONS}
    out = {k: given.pop(k) for k in ("test_data", "activation_data")}
    out["init_seed"] = given.pop("init_seed") or 0
    out["data_options"] = {k: v for k, v in given.items() if v is not None}
    return out


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds must be comma-separated integers such as 0,1,2,3,4, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds must list distinct integers such as 0,1,2,3,4, got {text!r}")
    return seeds


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modlens", description="Is this trained network modular, and which neurons are the modules?")
    parser.add_argument("--version", action="version", version=f"modlens {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="train a small MLP on embedded data and test its partitions (no download)")
    d.add_argument("--dataset", default="digits", choices=["digits", "halves-digits", "halves-same-digits",
                                                           "stack-diff-digits", "stack-same-digits"])
    d.add_argument("--seed", type=int, default=0, help="seed of training (and of the analysis unless --random-state)")
    d.add_argument("--epochs", type=int, default=DIGITS_MLP_EPOCHS)
    d.add_argument("--out", type=Path, default=None, help="also write the result tables to this folder")
    d.add_argument("--overwrite", action="store_true")
    _add_analysis_options(d)

    t = sub.add_parser("train", help="train a reference network of the paper and save it (safetensors + manifest)")
    t.add_argument("--dataset", required=True, help="mnist, fashion-mnist, halves-mnist, halves-same-mnist, stack-diff-mnist, "
                                                     "stack-same-mnist (and the fashion-mnist/digits variants), cifar10; "
                                                     "text (the two-genre corpus, for --arch gpt)")
    t.add_argument("--arch", choices=ARCHS, default="mlp",
                   help="mlp: 4x256 MLP; cnn: the small CNN; vgg: the CIFAR VGG; gpt: the reference decoder language "
                        "model on --dataset text (default mlp)")
    t.add_argument("--steps", type=int, default=None, help="gpt: training steps (default: the recipe's, 400)")
    t.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="rotation/shift/flip augmentation (default: on for vgg, off otherwise)")
    t.add_argument("--l2", type=float, default=None, help="L2 coefficient on kernels (default: 5e-4 for vgg, 0 otherwise)")
    t.add_argument("--no-regularization", action="store_true", help="VGG without dropout and L2 (the paper's unregularized VGG)")
    seeds = t.add_mutually_exclusive_group(required=True)
    seeds.add_argument("--seed", type=int, help="seed of initialization, shuffling and the held-out split")
    seeds.add_argument("--seeds", type=_seed_list, metavar="S1,S2,...",
                       help="several replicates, each the network --seed S would give; saved in OUT/seedS")
    t.add_argument("--together", action="store_true",
                   help="with --seeds and mlp or cnn: train the replicates in one batched computation (pays on a "
                        "GPU; on the CPU it was measured not to, and one by one is the default)")
    t.add_argument("--out", type=Path, required=True, help="folder to save the model in (with --seeds: one folder per seed in it)")
    t.add_argument("--data-dir", type=Path, default=None, help="folder with mnist/ and fashion-mnist/ (default: $MODLENS_DATA or ~/.cache/modlens/data)")
    t.add_argument("--epochs", type=int, default=None, help="default: the recipe's (mlp 20, cnn 10, vgg 200; mlp on digits 60)")
    t.add_argument("--batch-size", type=int, default=None, help="default: the recipe's (mlp 128, cnn 64, vgg 128)")
    t.add_argument("--n-val", type=int, default=5000, help="training examples held out for activation graphs")

    a = sub.add_parser("analyze", help="partition models and run the lesion tests",
                       description="Models: modlens model folders, pkg.module:factory (or FILE.py:factory), timm:NAME, "
                                   "torchvision:NAME, hf:REPO_OR_FOLDER; several are replicates.")
    a.add_argument("models", nargs="+", metavar="MODEL", help="model folder(s) or name(s); several are treated as replicates")
    a.add_argument("--out", type=Path, required=True, help="folder for the result tables (Parquet, CSV, JSON)")
    a.add_argument("--data-dir", type=Path, default=None)
    a.add_argument("--overwrite", action="store_true")
    a.add_argument("--weights", nargs="+", metavar="FILE", default=None,
                   help="weights of each model: a .safetensors file or a PyTorch state dict (read with "
                        "torch.load(weights_only=True)), or 'pretrained' (timm/torchvision weights from the local cache); "
                        "several files for one model are replicates")
    a.add_argument("--model-arg", dest="model_args", action="append", type=_model_arg, metavar="KEY=VALUE", default=None,
                   help="keyword argument of the model's factory or constructor (e.g. num_classes=10); repeatable")
    _add_input_options(a)
    _add_analysis_options(a)

    c = sub.add_parser("correlation-maps", help="draw first-layer correlation maps of a saved MLP (paper figures 1 and 6)")
    c.add_argument("model", type=Path, help="model folder (e.g. an MLP trained on halves-mnist)")
    c.add_argument("--out", type=Path, required=True, help="PNG file to write")
    c.add_argument("--method", default="weights/global", help="partitioning method (default weights/global)")
    c.add_argument("--n-clusters", type=int, default=16)
    c.add_argument("--n-random", type=int, default=4, help="random subclusters drawn under each true one")
    c.add_argument("--random-state", type=int, default=0)
    c.add_argument("--data-dir", type=Path, default=None)
    c.add_argument("--n-images", type=int, default=None, help="use only the first N test images")

    r = sub.add_parser("report", help="write a self-contained HTML report of a saved analyze result or a study folder")
    r.add_argument("result", type=Path, help="folder written by `modlens analyze --out`, or a study folder "
                                              "(its tables/, figures/ and report.html are rewritten)")
    r.add_argument("--out", type=Path, default=None, help="HTML file to write (default: RESULT/report.html)")
    r.add_argument("--bh-scope", choices=BH_SCOPES, default=None,
                   help="Benjamini-Hochberg within each table family (the paper's text; default) or over lesion and "
                        "visualization tests together (what reproduces the paper's critical p of 0.025)")
    _add_study_parser(sub)
    return parser


def _add_study_parser(sub) -> None:
    s = sub.add_parser("study", help="run a whole study (train, partition, lesion, visualize, statistics), resumable")
    ss = s.add_subparsers(dest="study_command", required=True)
    r = ss.add_parser("run", help="run a built-in study or a TOML spec; a rerun skips the tasks already done")
    r.add_argument("spec", metavar="NAME_OR_SPEC", help="a built-in study (modlens study list) or a .toml spec file")
    r.add_argument("--out", type=Path, required=True, help="study folder (task cache and outputs)")
    r.add_argument("--data-dir", type=Path, default=None, help="folder with mnist/, fashion-mnist/, cifar-10-batches-py/, imagenet/")
    r.add_argument("--executor", choices=EXECUTORS, default="auto",
                   help="auto (the default: a process pool on every CPU core, or every GPU when there are several and "
                        "--device is not cpu; inline where there is one core), inline (this process), processes "
                        "(local pool), ray (pip install 'modlens[ray]'; $RAY_ADDRESS or --ray-address, else a local "
                        "instance listening on 127.0.0.1 only); all give the same tables")
    r.add_argument("--workers", type=int, default=None, help="tasks at once (default: CPU cores, or GPUs when several)")
    r.add_argument("--replicates", type=int, default=None, help="replicates of every trained group (seeds 0..N-1)")
    r.add_argument("--groups", nargs="+", default=None, metavar="GROUP",
                   help="run only these network groups of the study (e.g. mlp-mnist mlp-fashion)")
    r.add_argument("--ray-address", default=None, help="address of a running Ray cluster")
    r.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu",
                   help="where partitioning, lesions and visualizations run (training runs on the CPU)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    ss.add_parser("list", help="list the built-in studies")
    st = ss.add_parser("status", help="tasks done, running and left in a study folder, and the time the finished ones took")
    st.add_argument("folder", type=Path, metavar="DIR", help="the study folder (--out of modlens study run)")


def _run_study(args) -> int:
    if args.study_command == "list":
        from modlens.study.builtin import BUILTIN

        width = max(len(n) for n in BUILTIN)
        for name, b in BUILTIN.items():
            print(f"{name.ljust(width)}  {b.summary}")
        return 0
    if args.study_command == "status":
        from modlens.study.status import format_status, study_status

        print(format_status(study_status(args.folder), args.folder))
        return 0
    import pandas as pd

    from modlens.study.runner import run_study
    from modlens.study.spec import load_spec

    spec = load_spec(args.spec, data_dir=args.data_dir, replicates=args.replicates, groups=args.groups)
    out = run_study(spec, args.out, data_dir=args.data_dir, executor=args.executor, workers=args.workers,
                    progress=not args.no_progress, device=args.device, ray_address=args.ray_address)
    rows = pd.read_parquet(out / "study_rows.parquet")
    with pd.option_context("display.width", 160, "display.max_rows", 200):
        print(rows[["group", "k", "partitioning", "metric", "p_value", "effect", "effect_se", "n_networks"]]
              .to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    record = out.record
    util = (record.get("utilization") or {}).get("value")
    print(f"\nstudy {spec.name!r} written to {out} (study_rows.csv, networks/, study.json); {record['executor']}, "
          f"{record['workers']} worker(s)" + ("" if util is None else f", utilization {util:.2f}"))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("modlens: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, ImportError, FileNotFoundError, FileExistsError, OSError, RuntimeError) as exc:
        print(f"modlens: error: {exc}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from modlens.analysis.text import format_summary
    from modlens.study import commands

    if args.command == "study":
        return _run_study(args)
    if args.command == "demo":
        result = commands.demo(dataset=args.dataset, seed=args.seed, epochs=args.epochs, out=args.out,
                               overwrite=args.overwrite, **_analysis_kwargs(args))
        o = result.config["options"]
        print(f"\nmodlens demo: {args.dataset}, 4x256 MLP, test accuracy {result.config['model']['test_accuracy']:.4f}, "
              f"k={o['n_clusters']}, {o['n_random']} random sets per subcluster ({result.config['seconds']:.1f} s analysis)\n")
        print(format_summary(result.summary))
        if args.out:
            print(f"\ntables written to {args.out}")
        return 0
    if args.command == "train":
        def report(epoch, n, loss):
            print(f"epoch {epoch}/{n}  loss {loss:.4f}", file=sys.stderr, flush=True)

        if args.steps is not None and args.arch != "gpt":
            raise ValueError("--steps applies to --arch gpt (the image networks train for --epochs)")
        epochs = args.steps if args.arch == "gpt" else args.epochs
        options = dict(out=args.out, data_dir=args.data_dir, epochs=epochs, batch_size=args.batch_size,
                       n_val=args.n_val, arch=args.arch, augment=args.augment, l2=args.l2,
                       regularize=not args.no_regularization)
        if args.seeds is not None:
            def report_all(epoch, n, losses):
                shown = " ".join("-" if v is None else f"{v:.4f}" for v in losses)
                print(f"epoch {epoch}/{n}  loss {shown}", file=sys.stderr, flush=True)

            together = "together" if args.together else "auto"
            for model_out in commands.train_and_save(args.dataset, seeds=args.seeds, progress=report_all,
                                                     together=together, **options):
                m = model_out[1]
                print(f"saved {args.out / ('seed' + str(m['seed']))} (test accuracy {m['accuracy']:.4f}, "
                      f"trained {m['training'].get('trained', 'alone')})")
            return 0
        if args.arch == "gpt":
            def report(step, n, loss):  # noqa: F811  (the language model reports steps)
                if step == n or step % 20 == 0:
                    print(f"step {step}/{n}  loss {loss:.4f}", file=sys.stderr, flush=True)

        [(_, manifest)] = commands.train_and_save(args.dataset, seeds=[args.seed], folders=False, progress=report,
                                                  **options)
        what = "next-token accuracy" if args.arch == "gpt" else "test accuracy"
        print(f"saved {args.out} ({what} {manifest['accuracy']:.4f})")
        return 0
    if args.command == "analyze":
        result = commands.analyze_saved(args.models, out=args.out, data_dir=args.data_dir, overwrite=args.overwrite,
                                        progress=True, weights=args.weights, model_args=dict(args.model_args or []),
                                        **_input_kwargs(args), **_analysis_kwargs(args))
        print(format_summary(result.summary))
        print(f"\ntables written to {args.out}")
        return 0
    if args.command == "correlation-maps":
        path, maps = commands.correlation_figure(args.model, args.out, method=args.method, n_clusters=args.n_clusters,
                                                 n_random=args.n_random, random_state=args.random_state,
                                                 data_dir=args.data_dir, n_images=args.n_images)
        true_pref = float(maps.true_half_preference.mean()) if len(maps.true_half_preference) else float("nan")
        rand_pref = float(maps.random_half_preference.mean()) if maps.random_half_preference.size else float("nan")
        print(f"wrote {path}: {len(maps.subclusters)} first-layer subclusters; mean left/right half preference "
              f"{true_pref:.3f} (true) vs {rand_pref:.3f} (random)")
        return 0
    if args.command == "report":
        from modlens.report import write_report

        path = write_report(args.result, args.out, bh_scope=args.bh_scope)
        print(f"wrote {path}")
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
