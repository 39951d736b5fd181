"""Training speed of the shipped recipes, per CPU class: img/s of one optimiser step, as the recipe
runs it and with the settings a user would try where it is slow.

For `abid` (Lite0 fine-tuned at 224x304, batch 32) the variants are the precision (bf16 autocast where
the CPU has it natively, fp32), the memory layout (channels_last or not) and `torch.compile`
(inductor; "compiled": its compile minutes are the warm-up column, not in img/s). For `abid-dinov2` the two
phases are timed apart: the cache pass (the 8 frozen blocks, once per photo and view, no gradient) and
the training step (the last 4 blocks and the head on cached tokens). Steps run on tensors already in
memory, so the figure is the model's speed, not the loader's (bench_train.py measures the loader).

Every variant runs in a fresh process; `--caps native,avx2` repeats them with PyTorch and oneDNN
capped to AVX2 (`ATEN_CPU_CAPABILITY=avx2`, `ONEDNN_MAX_CPU_ISA=AVX2`: no AVX-512, no VNNI, no
bf16), which is what a Zen 3 or most laptops offer. The baseline of each table is the recipe's own
default on this machine; every other row prints its ratio to it. Minutes per epoch are for the 2,744
training photos of bench_accuracy's split of ../shared/abid.

Run: .venv/bin/python benchmarks/bench_recipe_speed.py [--steps 6] [--caps native,avx2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

TRAIN_PHOTOS = 2744
# Inductor honours ATEN_CPU_CAPABILITY for its explicit vectorisation but compiles with -march=native,
# which lets the C++ compiler use AVX-512 anyway: x86-64-v3 is the AVX2 level (Haswell, Zen 1-3).
CAPS = {
    "native": {},
    "avx2": {
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "TORCHINDUCTOR_CPP_MARCH": "x86-64-v3",
    },
}
VARIANTS = {
    "abid": [
        ("recipe default (auto precision, auto layout)", {}),
        ("fp32, channels_last", {"amp": "off", "channels_last": "on"}),
        ("fp32, contiguous", {"amp": "off", "channels_last": "off"}),
        (
            "fp32, channels_last, torch.compile (inductor)",
            {"amp": "off", "channels_last": "on", "compile": "1"},
        ),
        ("recipe default, compiled", {"compile": "1"}),
    ],
    "abid-dinov2": [
        ("recipe default: train step on cached tokens", {"phase": "tail"}),
        ("cache pass (frozen blocks, once per photo and view)", {"phase": "prefix"}),
        ("fp32 train step on cached tokens", {"phase": "tail", "amp": "off"}),
    ],
}


def measure(recipe: str, settings: dict[str, str], steps: int) -> dict[str, float | str]:
    """Images per second of `steps` timed steps (after two warm-up steps), in this process."""
    import torch

    from binsight.cpu import cpu_class
    from binsight.models.factory import build_model
    from binsight.training.config import load_config
    from binsight.training.hardware import Precision, wants_channels_last

    phase = settings.pop("phase", "full")
    compiled = settings.pop("compile", "") == "1"
    config = load_config(None, {"data": ".", "out": "unused", **settings}, recipe=recipe)
    torch.manual_seed(0)
    model = build_model(config.arch, config.head, config.num_classes, False, None, 0.0, config.input_hw)
    precision = Precision(config, torch.device("cpu"))
    batch = config.batch_size
    images = torch.randn(batch, 3, *config.input_hw)
    targets = torch.randint(0, config.num_classes, (batch,))
    if phase == "full":
        channels_last = wants_channels_last(config, torch.device("cpu"))
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
            images = images.contiguous(memory_format=torch.channels_last)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        # Compiled once, at the first steps below (the warm-up, untimed: its minutes are stated apart).
        forward = torch.compile(model) if compiled else model

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with precision.autocast():
                loss = torch.nn.functional.cross_entropy(forward(images), targets)
            loss.backward()
            optimizer.step()

    else:
        backbone = model.backbone
        frozen = config.frozen_blocks or 0
        with torch.no_grad(), precision.autocast():
            tokens = backbone.prefix(images, frozen).float()
        tail = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(tail, lr=1e-4)
        model.train()

        def step() -> None:
            if phase == "prefix":
                with torch.no_grad(), precision.autocast():
                    backbone.prefix(images, frozen)
                return
            optimizer.zero_grad(set_to_none=True)
            with precision.autocast():
                loss = torch.nn.functional.cross_entropy(model.head(backbone.tail(tokens, frozen)), targets)
            loss.backward()
            optimizer.step()

    warm_up = time.perf_counter()
    for _ in range(2):
        step()
    warm_up_s = time.perf_counter() - warm_up
    started = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - started
    return {
        "images_per_s": steps * batch / seconds,
        "bf16": str(precision.enabled),
        "cpu_class": cpu_class(),
        "threads": torch.get_num_threads(),
        "warm_up_s": warm_up_s,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--caps", default="native,avx2")
    parser.add_argument("--recipes", default=",".join(VARIANTS), help="comma-separated")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        recipe, settings = json.loads(args.worker)
        print(json.dumps(measure(recipe, settings, args.steps)))
        return 0
    env = dict(os.environ, BINSIGHT_PROGRESS="0")
    for cap in args.caps.split(","):
        for recipe in args.recipes.split(","):
            variants = VARIANTS[recipe]
            baseline = None
            print(f"\n{recipe}, CPU {cap}:")
            print(
                "| variant | CPU class | bf16 | img/s | vs default | min/epoch (2,744 photos) | warm-up s |"
            )
            print("| --- | --- | --- | --- | --- | --- | --- |")
            for name, settings in variants:
                command = [sys.executable, __file__, "--steps", str(args.steps), "--worker"]
                done = subprocess.run(
                    [*command, json.dumps([recipe, settings])],
                    capture_output=True,
                    text=True,
                    env={**env, **CAPS[cap]},
                    timeout=1800,
                )
                if done.returncode:
                    print(f"| {name} | failed: {done.stderr.strip().splitlines()[-1:]} | | | | | |")
                    continue
                result = json.loads(done.stdout.strip().splitlines()[-1])
                speed = float(result["images_per_s"])
                baseline = baseline or speed
                print(
                    f"| {name} | {result['cpu_class']} | {result['bf16']} | {speed:.1f} "
                    f"| {speed / baseline:.2f}x | {TRAIN_PHOTOS / speed / 60:.1f} "
                    f"| {result['warm_up_s']:.0f} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
