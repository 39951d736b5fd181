"""The main job on the embedded default: synthetic bins, end to end, with no network and no GPU."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from binsight.data.index import build_index
from binsight.data.split import SplitConfig, write_splits
from binsight.data.stats import dataset_stats, format_stats
from binsight.data.synth import SynthConfig, generate_dataset

log = logging.getLogger(__name__)


DemoTraining = Literal["auto", "fine-tune", "frozen"]


class DemoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    out: Path = Field(Path("runs/demo"), description="output directory")
    n_images: int = Field(1500, ge=100, description="synthetic bin photos to generate")
    seed: int = Field(0, description="seed of the photos, the split and the training")
    epochs: int = Field(6, ge=1, description="fine-tuning epochs (a head on frozen features trains 40)")
    training: DemoTraining = Field(
        "auto",
        description="fine-tune the backbone, or train a head on its frozen features (auto: by the CPU)",
    )


def choose_training(requested: DemoTraining) -> tuple[str, str]:
    """Fine-tune where the CPU computes bf16 natively (AVX512-BF16, AMX: minutes); elsewhere keep the
    pretrained backbone frozen, compute its features once and train the head on them, which fits the
    demo's minutes on any x86 laptop (fine-tuning in fp32 on 2 AVX2 cores took 13 minutes)."""
    from binsight.cpu import native_bf16

    if requested != "auto":
        return requested, "asked for"
    if native_bf16():
        return "fine-tune", "this CPU computes bf16 natively (AVX512-BF16 or AMX)"
    return "frozen", "this CPU has no native bf16, where fine-tuning would take over ten minutes"


def run_demo(config: DemoConfig) -> None:
    from binsight.audit.evaluation import evaluate_audit
    from binsight.export.onnx import ExportConfig, export
    from binsight.inference.runtime import load_counter
    from binsight.training.config import load_config
    from binsight.training.engine import train
    from binsight.training.evaluate import EvaluateConfig, evaluate

    out, seed = config.out, config.seed
    data_dir = out / "data"
    started = time.perf_counter()
    written = generate_dataset(data_dir, SynthConfig(n_images=config.n_images, seed=seed))
    print(f"[1/8] synthesized {written} bin photos in {time.perf_counter() - started:.1f}s -> {data_dir}")
    index = build_index(data_dir)
    print(f"[2/8] indexed {len(index.rows)} images ({len(index.skipped)} skipped)")
    summary = write_splits(data_dir, SplitConfig(seed=seed))
    print("[3/8] split: " + ", ".join(f"{k} {v.images}" for k, v in summary.splits.items()))
    stats = dataset_stats(data_dir, out / "stats")
    print("[4/8] dataset statistics:\n" + format_stats(stats))

    # The packaged ImageNet weights: offline, and a head start that the synthetic bins share with
    # real ones. The abid recipe's settings at a small input, so the demo stays a couple of minutes.
    mode, why = choose_training(config.training)
    settings: dict[str, object] = {
        "data": data_dir,
        "out": out / "model",
        # Synthetic photos are square: a square input, unlike the recipe's 4:3 for real ABID.
        "image_size": 128,
        "image_width": 128,
        "epochs": config.epochs,
        "seed": seed,
    }
    if mode == "frozen":
        # The head alone trains, on features computed once: more epochs cost seconds.
        settings.update(
            train_on_cache=True, cache_views=["o", "h", "v", "hv"], epochs=40, lr=3e-3, batch_size=64
        )
    training = load_config(None, settings, recipe="abid")
    what = "fine-tuning" if mode == "fine-tune" else "training a head on the frozen features of"
    print(f"[5/8] {what} {training.arch} (ImageNet weights), {training.epochs} epochs on CPU ({why})...")
    result = train(training)
    best = result.best
    print(
        f"      best val accuracy {best.value or float('nan'):.3f} at epoch {best.epoch} "
        f"(always answering the most common count: {result.majority_baseline_val_accuracy:.3f})"
    )
    metrics = evaluate(EvaluateConfig(checkpoint=out / "model" / "best.pt", split="test"))
    print(
        f"[6/8] test: accuracy {metrics.accuracy:.3f}, off-by-one {metrics.off_by_one_accuracy:.3f}, "
        f"MAE {metrics.mae:.3f}, RMSE {metrics.rmse:.3f}, ECE {metrics.ece:.3f}"
    )
    onnx = export(ExportConfig(checkpoint=out / "model" / "best.pt", out=out / "model.onnx", quantize="int8"))
    int8 = onnx.int8
    assert int8 is not None  # asked for
    print(
        f"[7/8] exported {onnx.onnx} "
        f"(ONNX Runtime vs PyTorch max diff {onnx.max_abs_diff_vs_pytorch:.1e}); "
        f"int8: accuracy {int8.int8_accuracy:.3f} vs {int8.fp32_accuracy:.3f} fp32 "
        f"({'serves' if int8.serving == 'ok' else 'marked not for serving: ' + int8.serving})"
    )
    audit = evaluate_audit(
        load_counter(out / "model.onnx"), data_dir, "test", out / "audit", error_rate=0.1, seed=seed
    )
    caught = ", ".join(f"{100 * v.errors_caught:.0f}% at {k}" for k, v in audit.caught_at_budget.items())
    print(
        f"[8/8] audit: {audit.simulated_errors} wrong records hidden among {audit.bins} bins; "
        f"re-checking the most suspicious bins catches {caught} of bins re-checked"
    )
    print(
        f"done in {time.perf_counter() - started:.0f}s. "
        f"Reports: {out / 'model' / 'eval-test' / 'report.html'}, {out / 'audit' / 'report.html'}"
    )
    print(
        f"Serve it: .venv/bin/binsight serve --model {out / 'model.onnx'} --capture-dir {out / 'capture'} "
        "and open http://127.0.0.1:8080/"
    )
