"""`binsight export`, `serve`, `loadtest` and `monitor`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from binsight.cliargs import add_config_arguments, config_from_args
from binsight.errors import BinsightError

log = logging.getLogger("binsight")


def _cmd_export(args: argparse.Namespace) -> int:
    from binsight.export.onnx import export

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


def _cmd_monitor(args: argparse.Namespace) -> int:
    from binsight.inference.runtime import load_counter
    from binsight.monitoring.baseline import Baseline
    from binsight.monitoring.report import monitor, read_capture, write_report

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


def register(verbs: Any) -> None:
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
