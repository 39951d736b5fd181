"""`binsight <verb>`: a thin layer that turns arguments into typed configs and calls the library."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from binsight import __version__
from binsight.cliargs import add_config_arguments, config_from_args
from binsight.errors import BinsightError

log = logging.getLogger("binsight")


def _format_validation_error(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "config"
        problems.append(f"{where}: {error['msg']}")
    return "invalid configuration: " + "; ".join(problems)


# ---------------------------------------------------------------- data


def _cmd_data_synth(args: argparse.Namespace) -> int:
    import time

    from binsight.data.synth import SynthConfig, generate_dataset

    config = SynthConfig(
        n_images=args.n,
        image_size=args.size,
        max_count=args.max_count,
        seed=args.seed,
        start_index=args.start_index,
        **({"workers": args.workers} if args.workers else {}),
    )
    started = time.perf_counter()
    written = generate_dataset(args.out, config)
    seconds = time.perf_counter() - started
    print(
        f"synth: {written} new images ({config.n_images - written} already there) in {args.out}"
        f" at {written / max(seconds, 1e-9):.0f} images/s"
    )
    return 0


def _cmd_data_download(args: argparse.Namespace) -> int:
    from binsight.data.download import DownloadConfig, download, parse_class_range

    config = DownloadConfig(
        out=args.out,
        bucket=args.bucket,
        endpoint_url=args.endpoint_url,
        ids=[i.strip() for i in args.ids.split(",") if i.strip()] if args.ids else None,
        file_list=args.file_list,
        classes=parse_class_range(args.classes) if args.classes else None,
        per_class=args.per_class,
        limit=args.limit,
        max_scan=args.max_scan,
        seed=args.seed,
        workers=args.workers,
        retries=args.retries,
    )
    report = download(config)
    print(
        f"download: {report['selected']} selected, {report['downloaded']} downloaded, "
        f"{report['already_present']} already present, {report['failed']} failed "
        f"({report['images_per_second'] or 0} images/s); report in "
        f"{Path(args.out) / 'download_report.json'}"
    )
    for problem in report["problems"][:10]:
        print(f"  {problem['id']}: {problem['problem']}", file=sys.stderr)
    if len(report["problems"]) > 10:
        print(f"  ... and {len(report['problems']) - 10} more", file=sys.stderr)
    return 0 if report["failed"] == 0 else 1


def _cmd_data_index(args: argparse.Namespace) -> int:
    from binsight.data.index import build_index

    result = build_index(args.data, workers=args.workers, out=args.out, labels=args.labels)
    mismatches = sum(int(r["quantity_mismatch"]) for r in result.rows)
    print(
        f"index ({result.layout} layout): {len(result.rows)} images indexed, {len(result.skipped)} skipped, "
        f"{mismatches} with EXPECTED_QUANTITY != sum of item quantities -> {result.path}"
    )
    for skipped in result.skipped[:10]:
        print(f"  skipped {skipped['id']}: {skipped['problem']}", file=sys.stderr)
    return 0


def _cmd_data_split(args: argparse.Namespace) -> int:
    from binsight.data.split import SplitConfig, write_splits

    config = SplitConfig(val_fraction=args.val, test_fraction=args.test, seed=args.seed)
    summary = write_splits(args.data, config)
    for name, info in summary["splits"].items():
        print(
            f"{name:>5}: {info['images']:>6} images  fingerprint {info['fingerprint']}  "
            f"per class {info['per_class']}"
        )
    return 0


def _cmd_data_stats(args: argparse.Namespace) -> int:
    from binsight.data.stats import dataset_stats, format_stats

    stats = dataset_stats(args.data, args.out)
    print(format_stats(stats))
    print(f"plots and stats.json in {args.out or Path(args.data) / 'stats'}")
    return 0


# ---------------------------------------------------------------- training

_TRAIN_FLAGS: dict[str, tuple[type, str]] = {
    "arch": (
        str,
        "backbone: efficientnet_lite0/1/2 (weights installed), resnet18/34/50, efficientnet_b0, "
        "mobilenet_v3_small/large, convnext_tiny, or timm:NAME",
    ),
    "head": (str, "classification, ordinal or regression"),
    "weights": (Path, "ImageNet weights file (default: packaged, or $TORCH_HOME/hub/checkpoints)"),
    "num_classes": (int, "classes 0..N-1, the last meaning N-1 or more (default: largest count + 1)"),
    "image_size": (int, "input height in pixels"),
    "image_width": (int, "input width in pixels (default: the height, a square input)"),
    "normalization": (str, "pixel mean/std: backbone (its own) or imagenet"),
    "backbone_lr_scale": (float, "backbone learning rate as a fraction of the head's"),
    "neighbour_smoothing": (float, "classification: share of the target moved to adjacent counts"),
    "flip": (str, "random flips: none, h or hv"),
    "dropout": (float, "dropout before the head"),
    "momentum": (float, "SGD momentum"),
    "epochs": (int, "epochs to train"),
    "batch_size": (int, "images per step per process"),
    "optimizer": (str, "adamw or sgd"),
    "lr": (float, "peak learning rate"),
    "weight_decay": (float, "decoupled weight decay"),
    "schedule": (str, "cosine, onecycle or constant"),
    "warmup_epochs": (float, "linear warm-up length"),
    "label_smoothing": (float, "classification label smoothing"),
    "augment": (float, "augmentation strength (0 = none, 1 = default, 2 = strong)"),
    "grad_clip": (float, "clip the gradient norm to this"),
    "amp": (str, "mixed precision: auto, on, off"),
    "channels_last": (str, "auto, on, off"),
    "device": (str, "auto, cpu, cuda, cuda:N"),
    "workers": (int, "data loader processes"),
    "seed": (int, "random seed"),
    "early_stopping": (int, "stop after N epochs without improvement"),
    "select_metric": (str, "accuracy, mae, rmse or loss"),
    "max_train_batches": (int, "cap steps per epoch (quick checks)"),
    "profile_steps": (int, "profile N training steps with torch.profiler"),
    "checkpoint_dir": (
        str,
        "folder or s3://bucket/prefix that outlives the machine: checkpoints copied there each epoch; "
        "a run whose --out has none resumes from there",
    ),
}


def _cmd_train(args: argparse.Namespace) -> int:
    from binsight.training.config import load_config
    from binsight.training.engine import train
    from binsight.training.evaluate import evaluate

    overrides: dict[str, object] = {name: getattr(args, name) for name in _TRAIN_FLAGS}
    overrides.update(data=args.data, out=args.out)
    if args.no_pretrained:
        overrides["pretrained"] = False
    if args.cache:
        overrides["cache"] = True
    config = load_config(args.config, overrides, recipe=args.recipe)
    summary = train(config, fresh=args.fresh)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    best = summary["best"]
    print(
        f"train: best val {best['metric']} {best['value']:.4f} at epoch {best['epoch']} "
        f"(majority-class accuracy {summary['majority_baseline_val_accuracy']:.3f}); run in {config.out}"
    )
    result = evaluate(Path(config.out) / "best.pt", split="val", workers=config.workers)
    print(
        f"val report: {Path(config.out) / 'eval-val' / 'report.html'} "
        f"(accuracy {result['accuracy']:.3f}, MAE {result['mae']:.3f})"
    )
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from binsight.training.evaluate import evaluate

    result = evaluate(
        args.checkpoint,
        data=args.data,
        split=args.split,
        out=args.out,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
    )
    print(
        f"{args.split}: accuracy {result['accuracy']:.4f}  off-by-one {result['off_by_one_accuracy']:.4f}  "
        f"MAE {result['mae']:.4f}  RMSE {result['rmse']:.4f}  ECE {result['ece']:.4f}  n={result['n']}"
    )
    out = args.out or Path(args.checkpoint).parent / f"eval-{args.split}"
    print(f"metrics.json, confusion_matrix.png, curves.png and report.html in {out}")
    return 0


# ---------------------------------------------------------------- serving


def _cmd_export(args: argparse.Namespace) -> int:
    from binsight.serving.export import export

    report = export(
        args.checkpoint, args.out, data=args.data, quantize=args.quantize == "int8", version=args.version
    )
    print(
        f"export: {report['onnx']} ({report['bytes'] / 1e6:.1f} MB); ONNX Runtime matches PyTorch within "
        f"{report['max_abs_diff_vs_pytorch']:.1e} on {report['verified_on']} images"
    )
    if "int8" in report:
        q = report["int8"]
        print(
            f"int8: {q['onnx']} ({q['bytes'] / 1e6:.1f} MB); accuracy {q['int8_accuracy']:.4f} vs "
            f"{q['fp32_accuracy']:.4f} in fp32 on {q['evaluated_on']} validation images "
            f"(cost {100 * q['accuracy_cost']:+.2f} points)"
        )
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from binsight.serving.config import ServeConfig
    from binsight.serving.server import serve

    serve(config_from_args(args, ServeConfig))
    return 0


def _cmd_loadtest(args: argparse.Namespace) -> int:
    import asyncio

    from binsight.serving.loadtest import format_summary, run_load

    folder = Path(args.images)
    files = sorted(folder.glob("*.jpg"))[: args.max_images] if folder.is_dir() else [folder]
    if not files or not files[0].is_file():
        raise BinsightError(f"no .jpg images at {folder}", hint="point --images at a folder of bin photos")
    bodies = [f.read_bytes() for f in files]
    result = asyncio.run(
        run_load(args.url, bodies, args.duration, args.concurrency, args.rate, poisson=args.poisson)
    )
    summary = result.summary()
    print(format_summary(summary))
    return 0 if summary["ok"] else 1


# ---------------------------------------------------------------- MLOps


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BinsightError(f"{text!r} is not a comma-separated list of integers") from None


def _pair(text: str, kind: type) -> tuple:
    low, _, high = text.partition(":") if ":" in text else text.partition("-")
    try:
        return kind(low), kind(high or low)
    except ValueError:
        raise BinsightError(f"{text!r} is not a range like LOW:HIGH") from None


def _json_object(text: str, flag: str) -> dict[str, object]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BinsightError(f"{flag} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise BinsightError(f"{flag} must be a JSON object of settings")
    return value


def _cmd_tune(args: argparse.Namespace) -> int:
    from binsight.tuning.study import TuneConfig, tune

    values: dict[str, object] = {
        "data": args.data,
        "out": args.out,
        "study_name": args.study_name,
        "storage": args.storage,
        "n_trials": args.n_trials,
        "timeout_s": args.timeout,
        "metric": args.metric,
        "pruner": args.pruner,
        "base_config": args.config,
        "seed": args.seed,
    }
    if args.lr:
        values["lr"] = _pair(args.lr, float)
    if args.epochs:
        values["epochs"] = _pair(args.epochs, int)
    if args.batch_sizes:
        values["batch_sizes"] = _ints(args.batch_sizes)
    if args.archs:
        values["archs"] = [a.strip() for a in args.archs.split(",") if a.strip()]
    if args.augment:
        values["augment"] = _pair(args.augment, float)
    if args.fixed:
        values["fixed"] = _json_object(args.fixed, "--fixed")
    summary = tune(TuneConfig(**{k: v for k, v in values.items() if v is not None}))
    print(f"tune: {summary['trials']} trials {summary['states']} in {summary['storage']}")
    if "best_value" in summary:
        print(
            f"best {args.metric} {summary['best_value']:.4f} (trial {summary['best_trial']}): "
            f"{summary['best_params']}\nbest config: {summary['best_config']} (binsight train --config ...)"
        )
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from binsight.registry import Registry

    registry = Registry(args.registry, args.s3_endpoint_url)
    if args.action == "list":
        aliases = registry.aliases()
        print(f"{'version':<8} {'created':<26} {'accuracy':>9} {'mae':>7}  aliases")
        for name in registry.versions():
            version = registry.get(name)
            tags = ", ".join(a for a, v in aliases.items() if v == name)
            accuracy, mae = (version.metrics.get(k, float("nan")) for k in ("accuracy", "mae"))
            print(f"{name:<8} {version.meta.get('created', ''):<26} {accuracy:>9.4f} {mae:>7.3f}  {tags}")
    elif args.action == "show":
        version = registry.get(registry.resolve(args.target))
        print(
            json.dumps(
                {"version": version.name, "meta": version.meta, "metrics": version.metrics},
                indent=2,
                default=str,
            )
        )
    elif args.action == "promote":
        record = registry.set_alias(
            args.alias, registry.resolve(args.target), args.reason or "manual promote"
        )
        print(f"{args.alias} -> {record['version']}")
    else:
        record = registry.rollback(args.alias)
        print(f"{args.alias} rolled back to {record['version']}")
    return 0


def _cmd_pipeline(args: argparse.Namespace) -> int:
    from binsight.pipeline.retrain import Pipeline, PipelineConfig

    overrides: dict[str, object] = {}
    if args.no_pretrained:
        overrides["pretrained"] = False
    if args.train_json:
        overrides.update(_json_object(args.train_json, "--train-json"))
    values = {
        "data": args.data,
        "registry": args.registry,
        "work_dir": args.work_dir,
        "run_id": args.run_id,
        "new_data": args.new_data,
        "s3_endpoint_url": args.s3_endpoint_url,
        "train_config": args.config,
        "train_overrides": overrides,
        "metric": args.metric,
        "margin": args.margin,
        "tolerance": args.tolerance,
        "alias": args.alias,
    }
    result = Pipeline(PipelineConfig(**{k: v for k, v in values.items() if v is not None})).run()
    promote, decision = result["promote"], result["decide"]
    print(
        f"pipeline {result['run_id']}: candidate {result['register']['version']} "
        f"{'promoted' if promote['promoted'] else 'not promoted'} ({decision['reason']}); "
        f"production is {promote['production']}"
    )
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    from binsight.audit.audit import ImageLoader, audit, evaluate_audit, read_bins, write_audit
    from binsight.audit.verdict import VerdictThresholds, policy_for
    from binsight.serving.runtime import load_counter

    if (args.model is None) == (args.registry is None):
        raise BinsightError("give --model FILE.onnx or --registry URL (with --alias)")
    if args.model is not None:
        counter = load_counter(args.model)
    else:
        import tempfile

        from binsight.registry import Registry

        registry = Registry(args.registry, args.s3_endpoint_url)
        version = registry.resolve(args.alias)
        path = registry.fetch(version, "model.onnx", Path(tempfile.mkdtemp()) / f"{version}.onnx")
        counter = load_counter(path, version=version)
    try:
        thresholds = VerdictThresholds(args.ok_above, args.mismatch_below)
        policy = policy_for(counter.info.calibration, thresholds, args.alpha, args.review_alpha)
    except ValueError as exc:
        raise BinsightError(str(exc)) from None
    log.info("verdicts by %s", policy.basis)
    out = Path(args.out)
    if args.evaluate:
        if args.data is None:
            raise BinsightError("--evaluate needs --data (a dataset with splits)")
        result = evaluate_audit(counter, Path(args.data), args.split, out, args.error_rate, args.seed, policy)
        print(
            f"audit evaluation on {result['bins']} bins with {result['simulated_errors']} simulated errors:"
        )
        for budget, caught in result["caught_at_budget"].items():
            print(
                f"  re-check {budget:>4} of bins -> catch {100 * caught['errors_caught']:5.1f}% of errors "
                f"(random: {100 * caught['random_review_would_catch']:.0f}%)"
            )
        print(f"curve and report in {out}")
        return 0
    if args.bins is None:
        raise BinsightError("give a CSV of bins to audit, or --evaluate --data DIR")
    bins, rejected = read_bins(Path(args.bins))
    loader = ImageLoader(args.s3_endpoint_url, args.s3_unsigned)
    if args.review_budget is not None and not 0 < args.review_budget <= 1:
        raise BinsightError("--review-budget is a share of bins, above 0 and at most 1 (e.g. 0.1)")
    results = audit(counter, bins, policy, loader, review_budget=args.review_budget)
    summary = write_audit(results, rejected, out, counter, loader)
    print(
        f"audit: {summary['bins']} bins {summary['verdicts']}; ranked list in {out / 'audit.csv'}, "
        f"report in {out / 'report.html'}"
    )
    return 0


def _cmd_monitor(args: argparse.Namespace) -> int:
    from binsight.monitoring.baseline import Baseline
    from binsight.monitoring.report import monitor, read_capture, write_report
    from binsight.serving.runtime import load_counter

    counter = load_counter(args.model, backend="onnxruntime")
    if not counter.info.baseline:
        raise BinsightError(
            f"{args.model} has no monitoring baseline", hint="export it again with this binsight version"
        )
    baseline = Baseline.from_json(counter.info.baseline)
    seen = read_capture(Path(args.capture_dir), tuple(counter.info.classes))
    result = monitor(baseline, seen, args.window, args.alpha)
    out = Path(args.out)
    write_report(result, baseline, seen, out)
    summary = result.as_dict()
    print(
        f"monitor: {summary['photos']} captured photos, {len(result.windows)} windows of {result.window}; "
        f"latest: {summary['status']}"
        + (f" ({', '.join(summary['drifted_in_latest'])})" if summary["drifted_in_latest"] else "")
        + f"; report in {out / 'report.html'}"
    )
    return 3 if args.fail_on_drift and summary["drifted_in_latest"] else 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from binsight.demo import run_demo

    run_demo(Path(args.out), n_images=args.n, seed=args.seed)
    return 0


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="binsight",
        description="Count objects in warehouse bin photos and flag bins that disagree with "
        "the inventory record.",
    )
    parser.add_argument("--version", action="version", version=f"binsight {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    demo = verbs.add_parser("demo", help="the whole job on synthetic bins (no network, no GPU)")
    demo.add_argument("--out", default="runs/demo", help="output directory")
    demo.add_argument("--n", type=int, default=1500, help="synthetic images to generate")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(handler=_cmd_demo)

    train = verbs.add_parser("train", help="train a counting model (also under torchrun for DDP)")
    train.add_argument("--data", default=None, help="dataset directory with splits/")
    train.add_argument("--out", default=None, help="run directory (default runs/train)")
    train.add_argument(
        "--recipe",
        default=None,
        help="a named, measured set of settings (abid: real ABID photos; see docs/recipes.md); "
        "--config and flags override it",
    )
    train.add_argument("--config", type=Path, default=None, help="JSON file of settings (flags override)")
    train.add_argument("--no-pretrained", action="store_true", help="train from random initialisation")
    train.add_argument("--cache", action="store_true", help="pre-resize images into a uint8 cache")
    train.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint in --out")
    for name, (kind, text) in _TRAIN_FLAGS.items():
        train.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None, help=text)
    train.set_defaults(handler=_cmd_train)

    evaluate = verbs.add_parser("evaluate", help="metrics, confusion matrix and HTML report for a model")
    evaluate.add_argument("checkpoint", help="best.pt or last.pt of a training run")
    evaluate.add_argument("--data", default=None, help="dataset directory (default: the one trained on)")
    evaluate.add_argument("--split", default="test", choices=["train", "val", "test"])
    evaluate.add_argument("--out", default=None, help="output directory (default RUN/eval-SPLIT)")
    evaluate.add_argument("--batch-size", type=int, default=64)
    evaluate.add_argument("--workers", type=int, default=2)
    evaluate.add_argument("--device", default="auto")
    evaluate.set_defaults(handler=_cmd_evaluate)

    export = verbs.add_parser("export", help="checkpoint -> verified ONNX file (optionally int8)")
    export.add_argument("checkpoint", help="best.pt of a training run")
    export.add_argument("--out", required=True, help="ONNX file to write")
    export.add_argument(
        "--data", default=None, help="dataset for verification/calibration (default: trained on)"
    )
    export.add_argument("--quantize", choices=["int8"], default=None, help="also write MODEL.int8.onnx")
    export.add_argument("--version", default=None, help="version string stored in the file")
    export.set_defaults(handler=_cmd_export)

    serve = verbs.add_parser("serve", help="HTTP counting endpoint (SageMaker-compatible)")
    from binsight.serving.config import ServeConfig

    add_config_arguments(serve, ServeConfig, title="serving")
    serve.set_defaults(handler=_cmd_serve)

    load = verbs.add_parser("loadtest", help="drive an endpoint and report invocations/min and latency")
    load.add_argument("url", help="e.g. http://127.0.0.1:8080/invocations")
    load.add_argument("--images", required=True, help="folder of .jpg bin photos (or one file)")
    load.add_argument("--duration", type=float, default=30.0, help="seconds")
    load.add_argument("--concurrency", type=int, default=8, help="clients in flight (closed loop)")
    load.add_argument("--rate", type=float, default=None, help="requests/s (open loop) instead")
    load.add_argument(
        "--poisson", action="store_true", help="open loop: independent callers (exponential gaps)"
    )
    load.add_argument("--max-images", type=int, default=200)
    load.set_defaults(handler=_cmd_loadtest)

    tune = verbs.add_parser("tune", help="Optuna hyperparameter search (parallel workers share a study)")
    tune.add_argument("--data", required=True, help="dataset directory with splits/")
    tune.add_argument("--out", default=None, help="study folder (default runs/tune)")
    tune.add_argument("--study-name", default=None)
    tune.add_argument(
        "--storage", default=None, help="Optuna RDB URL or journal:PATH (default sqlite in --out)"
    )
    tune.add_argument("--n-trials", type=int, default=None, help="finished trials in the whole study")
    tune.add_argument("--timeout", type=float, default=None, help="seconds this worker may search")
    tune.add_argument("--metric", choices=["accuracy", "mae"], default="accuracy")
    tune.add_argument("--pruner", choices=["median", "hyperband", "none"], default=None)
    tune.add_argument("--lr", default=None, help="log range LOW:HIGH (default 1e-4:1e-1)")
    tune.add_argument("--epochs", default=None, help="range LOW:HIGH")
    tune.add_argument("--batch-sizes", default=None, help="e.g. 64,128,256")
    tune.add_argument("--archs", default=None, help="e.g. resnet18,mobilenet_v3_large")
    tune.add_argument("--augment", default=None, help="range LOW:HIGH of augmentation strength")
    tune.add_argument("--config", type=Path, default=None, help="JSON training config for the rest")
    tune.add_argument(
        "--fixed", default=None, help="JSON of fixed training settings, e.g. '{\"image_size\": 128}'"
    )
    tune.add_argument("--seed", type=int, default=None)
    tune.set_defaults(handler=_cmd_tune)

    models = verbs.add_parser("models", help="model registry: list, show, promote, rollback")
    models.add_argument("action", choices=["list", "show", "promote", "rollback"])
    models.add_argument("target", nargs="?", default="production", help="version (v0003) or alias")
    models.add_argument("--registry", required=True, help="folder or s3://bucket/prefix")
    models.add_argument("--alias", default="production", help="alias to move (promote/rollback)")
    models.add_argument("--reason", default=None)
    models.add_argument("--s3-endpoint-url", default=None)
    models.set_defaults(handler=_cmd_models)

    pipe = verbs.add_parser("pipeline", help="retrain, compare with production, promote if better")
    pipe.add_argument("--data", required=True, help="dataset directory (ABID layout)")
    pipe.add_argument("--registry", required=True, help="folder or s3://bucket/prefix")
    pipe.add_argument("--work-dir", type=Path, default=None, help="default runs/pipeline")
    pipe.add_argument("--run-id", default=None, help="re-use to finish a crashed run")
    pipe.add_argument("--new-data", default=None, help="folder or s3://bucket/prefix of new images")
    pipe.add_argument("--s3-endpoint-url", default=None)
    pipe.add_argument("--config", type=Path, default=None, help="training config JSON (e.g. tune's best)")
    pipe.add_argument("--train-json", default=None, help="training overrides as JSON")
    pipe.add_argument("--no-pretrained", action="store_true")
    pipe.add_argument("--metric", choices=["accuracy", "off_by_one_accuracy", "mae", "rmse"], default=None)
    pipe.add_argument("--margin", type=float, default=None, help="required gain on --metric")
    pipe.add_argument("--tolerance", type=float, default=None, help="allowed loss on the other metrics")
    pipe.add_argument("--alias", default=None, help="alias to promote (default production)")
    pipe.set_defaults(handler=_cmd_pipeline)

    aud = verbs.add_parser("audit", help="flag bins whose photo disagrees with the recorded quantity")
    aud.add_argument(
        "bins", nargs="?", default=None, help="CSV with image (path or s3://) and recorded_quantity"
    )
    aud.add_argument("--model", type=Path, default=None, help="ONNX model file")
    aud.add_argument("--registry", default=None, help="or a registry, with --alias")
    aud.add_argument("--alias", default="production")
    aud.add_argument("--out", default="runs/audit", help="output folder")
    aud.add_argument(
        "--alpha",
        type=float,
        default=0.05,
        help="calibrated models: mismatch when the record is outside the conformal prediction set at this "
        "level; at most this share of correct records is flagged (default 0.05)",
    )
    aud.add_argument("--review-alpha", type=float, default=0.2, help="calibrated models: review level")
    aud.add_argument(
        "--ok-above", type=float, default=0.5, help="uncalibrated models: P(recorded) above which ok"
    )
    aud.add_argument(
        "--mismatch-below", type=float, default=0.1, help="P(recorded) below which it mismatches"
    )
    aud.add_argument(
        "--review-budget",
        type=float,
        default=None,
        help="flag exactly this share of bins, the most suspicious (e.g. 0.1)",
    )
    aud.add_argument("--s3-endpoint-url", default=None)
    aud.add_argument("--s3-unsigned", action="store_true")
    aud.add_argument("--evaluate", action="store_true", help="simulate inventory errors on labelled data")
    aud.add_argument("--data", default=None, help="dataset with splits (for --evaluate)")
    aud.add_argument("--split", default="test")
    aud.add_argument("--error-rate", type=float, default=0.1, help="share of records to corrupt")
    aud.add_argument("--seed", type=int, default=0)
    aud.set_defaults(handler=_cmd_audit)

    mon = verbs.add_parser("monitor", help="drift of captured traffic against the model's baseline")
    mon.add_argument("capture_dir", help="the server's --capture-dir")
    mon.add_argument("--model", type=Path, required=True, help="the served ONNX file (holds the baseline)")
    mon.add_argument("--out", default="runs/monitor", help="output folder")
    mon.add_argument("--window", type=int, default=200, help="photos per window")
    mon.add_argument(
        "--alpha", type=float, default=0.01, help="chance that a window like the baseline raises an alarm"
    )
    mon.add_argument("--fail-on-drift", action="store_true", help="exit 3 when the latest window drifted")
    mon.set_defaults(handler=_cmd_monitor)

    data = verbs.add_parser("data", help="download, index, split, describe or synthesize data")
    data_verbs = data.add_subparsers(dest="data_verb", required=True, metavar="STEP")

    synth = data_verbs.add_parser("synth", help="generate synthetic bin photos (ABID layout)")
    synth.add_argument("out", help="dataset directory to write")
    synth.add_argument("--n", type=int, default=1200, help="number of images")
    synth.add_argument("--size", type=int, default=224, help="image side in pixels")
    synth.add_argument("--max-count", type=int, default=5, help="largest object count")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--start-index", type=int, default=0, help="first image index (to add more later)")
    synth.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    synth.set_defaults(handler=_cmd_data_synth)

    dl = data_verbs.add_parser(
        "download",
        help="fetch an ABID subset from S3 anonymously (resumable)",
        description="Select by --ids, --file-list, or --classes with optional --per-class/--limit. "
        "With no selection, the whole bucket (536k images) is fetched.",
    )
    dl.add_argument("out", help="dataset directory to write")
    dl.add_argument("--bucket", default="aft-vbi-pds")
    dl.add_argument("--endpoint-url", default=None, help="any S3-compatible endpoint")
    dl.add_argument("--ids", default=None, help="comma-separated image ids, e.g. 523,100313")
    dl.add_argument(
        "--file-list",
        type=Path,
        default=None,
        help="text file of ids/keys, or the JSON {count: [metadata paths]} subset list",
    )
    dl.add_argument("--classes", default=None, help="count range to keep, e.g. 0-5 or 1-5")
    dl.add_argument("--per-class", type=int, default=None, help="random images per count class")
    dl.add_argument("--limit", type=int, default=None, help="at most this many images")
    dl.add_argument(
        "--max-scan",
        type=int,
        default=None,
        help="read at most this many metadata files while selecting by class",
    )
    dl.add_argument("--seed", type=int, default=0, help="seed of the random selection order")
    dl.add_argument("--workers", type=int, default=16, help="parallel connections")
    dl.add_argument("--retries", type=int, default=5, help="retries per object")
    dl.set_defaults(handler=_cmd_data_download)

    index = data_verbs.add_parser("index", help="build index.csv from a dataset directory")
    index.add_argument(
        "data", help="photo folder: bucket layout, <count>/<id>.jpg folders, or images/ with labels.csv"
    )
    index.add_argument("--labels", type=Path, default=None, help="CSV of id,count (default: DATA/labels.csv)")
    index.add_argument(
        "--out", type=Path, default=None, help="where index.csv (and then splits/) go (default: DATA)"
    )
    index.add_argument("--workers", type=int, default=None)
    index.set_defaults(handler=_cmd_data_index)

    split = data_verbs.add_parser("split", help="stratified, stable train/val/test split")
    split.add_argument("data", help="dataset directory with index.csv")
    split.add_argument("--val", type=float, default=0.1, help="validation fraction")
    split.add_argument("--test", type=float, default=0.1, help="test fraction")
    split.add_argument("--seed", type=int, default=0)
    split.set_defaults(handler=_cmd_data_split)

    stats = data_verbs.add_parser("stats", help="class histogram and image-size statistics")
    stats.add_argument("data", help="dataset directory with index.csv")
    stats.add_argument("--out", default=None, help="where to write plots (default DATA/stats)")
    stats.set_defaults(handler=_cmd_data_stats)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    try:
        return int(args.handler(args) or 0)
    except BinsightError as exc:
        print(f"binsight: error: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        print(f"binsight: error: {_format_validation_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("binsight: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
