"""Synthetic bin photos laid out exactly like the ABID bucket, with exact count labels.

What makes ABID counting hard, and what is imitated here: a fabric bin seen from the front with its
walls in view, items of any shape and colour piled so that they overlap, several units of the same
product looking alike, elastic straps across the opening hiding parts of the items, soft focus and
heavy JPEG compression. Every image is a pure function of (seed, index), so the dataset is the same
whatever the number of worker processes, and an interrupted generation resumes where it stopped.
"""

from __future__ import annotations

import colorsys
import io
import json
import math
import os
import time
from dataclasses import dataclass
from functools import lru_cache
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from pydantic import BaseModel, ConfigDict, Field, model_validator

from binsight.data import IMAGES_DIR, METADATA_DIR
from binsight.data.abid import Item, item_to_metadata
from binsight.utils.io import atomic_write_bytes, atomic_write_text
from binsight.utils.progress import bar

# Roughly the share of each count among ABID bins holding 0-5 objects (zero is rarer in ABID;
# it is kept a little more common here so the empty class is learnable).
DEFAULT_CLASS_WEIGHTS = (0.06, 0.16, 0.20, 0.20, 0.20, 0.18)
ITEM_KINDS = ("box", "bottle", "pouch", "book", "can")


class SynthConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_images: int = Field(1200, ge=1, description="how many bin photos to generate")
    image_size: int = Field(224, ge=64, le=1024, description="side of the square photo in pixels")
    max_count: int = Field(5, ge=0, le=40, description="largest number of objects in one bin")
    class_weights: tuple[float, ...] | None = Field(
        None, description="relative frequency of counts 0..max_count (default: ABID-like)"
    )
    seed: int = Field(0, description="random seed (the photos are deterministic given it)")
    start_index: int = Field(0, ge=0, description="first image index (ids continue a previous batch)")
    workers: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1, description="processes")

    @model_validator(mode="after")
    def _weights_match_classes(self) -> SynthConfig:
        if self.class_weights is not None:
            if len(self.class_weights) != self.max_count + 1:
                raise ValueError(
                    f"class_weights has {len(self.class_weights)} entries but counts 0..{self.max_count}"
                    f" need {self.max_count + 1}"
                )
            if any(w < 0 for w in self.class_weights) or sum(self.class_weights) <= 0:
                raise ValueError("class_weights must be non-negative and not all zero")
        return self

    def count_probabilities(self) -> np.ndarray:
        if self.class_weights is not None:
            weights = np.asarray(self.class_weights, dtype=float)
        elif self.max_count + 1 == len(DEFAULT_CLASS_WEIGHTS):
            weights = np.asarray(DEFAULT_CLASS_WEIGHTS)
        else:
            # Beyond the default range, ABID's counts fall off roughly geometrically.
            weights = np.array([0.5] + [0.9**k for k in range(self.max_count)])
        normalised: np.ndarray = weights / weights.sum()
        return normalised


@dataclass(frozen=True)
class Appearance:
    """What one product looks like; units of the same product share it."""

    kind: str
    rgb: tuple[int, int, int]
    accent: tuple[int, int, int]
    width: float  # fraction of the photo's side
    aspect: float  # height / width
    striped: bool


def image_id_for(index: int) -> str:
    return f"synth-{index:06d}"


@lru_cache(maxsize=4)
def _fabric_tiles(size: int) -> tuple[np.ndarray, ...]:
    """A few woven-fabric luminance textures, twice the photo size so each photo crops a new view."""
    rng = np.random.default_rng(12345)
    side = 2 * size
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    tiles = []
    for period in (3.0, 4.0, 5.5, 7.0):
        weave = np.sin(xx * 2 * math.pi / period) * np.sin(yy * 2 * math.pi / period)
        grain = rng.normal(0, 1, (side, side)).astype(np.float32)
        blotch = np.asarray(
            Image.fromarray(
                rng.normal(128, 40, (side // 16, side // 16)).clip(0, 255).astype(np.uint8)
            ).resize((side, side), Image.Resampling.BICUBIC),
            dtype=np.float32,
        )
        tile = 1.0 + 0.06 * weave + 0.05 * grain + 0.0015 * (blotch - 128)
        tiles.append(tile.astype(np.float32))
    return tuple(tiles)


def _random_rgb(
    rng: np.random.Generator, saturation: tuple[float, float], value: tuple[float, float]
) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(*saturation), rng.uniform(*value))
    return int(r * 255), int(g * 255), int(b * 255)


def _shade(rgb: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    red, green, blue = (int(min(255, max(0, c * factor))) for c in rgb)
    return red, green, blue


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """Fabric bin interior: back wall, darker side walls and floor, uneven light."""
    tile = _fabric_tiles(size)[rng.integers(4)]
    oy, ox = rng.integers(0, size, 2)
    texture = tile[oy : oy + size, ox : ox + size]
    base = np.asarray(_random_rgb(rng, (0.05, 0.35), (0.45, 0.85)), dtype=np.float32)

    ys = np.linspace(0, 1, size, dtype=np.float32)[:, None]
    xs = np.linspace(0, 1, size, dtype=np.float32)[None, :]
    light = 0.75 + 0.35 * rng.uniform(0.5, 1.0) * (1 - (xs - rng.uniform(0.3, 0.7)) ** 2 * 1.5)
    light = light * (0.85 + 0.25 * (1 - ys) * rng.uniform(0.3, 1.0))

    # Side walls recede: a wedge on each side that gets darker towards the edge of the photo.
    wall = rng.uniform(0.08, 0.18)
    edge = np.minimum(xs, 1 - xs)
    walls = np.where(edge < wall * (0.6 + 0.4 * ys), 0.65 + 0.35 * edge / wall, 1.0)
    pixels = texture[..., None] * (light * walls)[..., None] * base
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "RGB")


def _new_appearance(rng: np.random.Generator, background: tuple[int, int, int]) -> Appearance:
    kind = ITEM_KINDS[rng.integers(len(ITEM_KINDS))]
    # Some products are nearly the colour of the fabric, the hardest case in real bins.
    camouflaged = rng.random() < 0.15
    rgb = (
        _shade(background, float(rng.uniform(0.7, 1.25)))
        if camouflaged
        else _random_rgb(rng, (0.25, 1.0), (0.25, 1.0))
    )
    aspect = {
        "box": (0.6, 1.4),
        "bottle": (1.6, 2.8),
        "pouch": (0.7, 1.3),
        "book": (1.2, 1.6),
        "can": (1.1, 1.8),
    }[kind]
    width = {"bottle": (0.10, 0.17), "can": (0.12, 0.2)}.get(kind, (0.16, 0.30))
    return Appearance(
        kind=kind,
        rgb=rgb,
        accent=_random_rgb(rng, (0.0, 1.0), (0.5, 1.0)),
        width=float(rng.uniform(*width)),
        aspect=float(rng.uniform(*aspect)),
        striped=bool(rng.random() < 0.3),
    )


def _draw_item(look: Appearance, size: int, scale: float) -> Image.Image:
    """One product on a transparent patch, with shading and a label so it reads as an object."""
    w = max(6, int(look.width * size * scale))
    h = max(6, int(w * look.aspect))
    patch = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    draw = ImageDraw.Draw(patch)
    dark, light = _shade(look.rgb, 0.6), _shade(look.rgb, 1.3)
    if look.kind == "box":
        draw.rectangle((0, 0, w - 1, h - 1), fill=look.rgb, outline=dark, width=max(1, w // 30))
        draw.polygon([(0, 0), (w - 1, 0), (int(w * 0.85), h // 6), (int(w * 0.15), h // 6)], fill=light)
        draw.rectangle((w // 5, h // 3, 4 * w // 5, 2 * h // 3), fill=look.accent)
    elif look.kind == "bottle":
        neck = w // 3
        draw.rounded_rectangle((0, h // 4, w - 1, h - 1), radius=w // 3, fill=look.rgb, outline=dark)
        draw.rectangle((neck, h // 12, w - neck, h // 4 + 2), fill=look.rgb, outline=dark)
        draw.rectangle((neck - 1, 0, w - neck + 1, h // 12), fill=look.accent)
        draw.rectangle((1, h // 2, w - 2, 3 * h // 4), fill=look.accent)
        draw.line((w // 4, h // 3, w // 4, h - h // 8), fill=light, width=max(1, w // 10))
    elif look.kind == "pouch":
        draw.ellipse((0, 0, w - 1, h - 1), fill=look.rgb, outline=dark, width=max(1, w // 25))
        draw.arc((w // 6, h // 6, 5 * w // 6, 5 * h // 6), 200, 320, fill=light, width=max(1, w // 12))
        draw.ellipse((w // 3, h // 3, 2 * w // 3, 2 * h // 3), fill=look.accent)
    elif look.kind == "book":
        draw.rectangle((0, 0, w - 1, h - 1), fill=look.rgb, outline=dark, width=max(1, w // 30))
        draw.rectangle((0, 0, w // 8, h - 1), fill=dark)
        for row in range(3):
            y = h // 5 + row * h // 8
            draw.line((w // 4, y, 7 * w // 8, y), fill=look.accent, width=max(1, h // 40))
    else:  # can
        draw.rectangle((0, h // 8, w - 1, h - h // 8), fill=look.rgb)
        draw.ellipse((0, h - h // 4, w - 1, h - 1), fill=dark)
        draw.rectangle((0, h // 8, w - 1, h - h // 8), outline=dark)
        draw.ellipse((0, 0, w - 1, h // 4), fill=light, outline=dark)
        draw.rectangle((0, h // 3, w - 1, 2 * h // 3), fill=look.accent)
    if look.striped:
        for x in range(0, w, max(3, w // 6)):
            draw.line((x, h // 4, x, 3 * h // 4), fill=dark, width=1)
    return patch


def _overlap_fraction(a: tuple[int, int, int, int], boxes: list[tuple[int, int, int, int]]) -> float:
    """Largest share of `a` (or of an earlier box) covered by one other box."""
    worst = 0.0
    area_a = max(1, (a[2] - a[0]) * (a[3] - a[1]))
    for b in boxes:
        ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
        iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
        area_b = max(1, (b[2] - b[0]) * (b[3] - b[1]))
        worst = max(worst, ix * iy / min(area_a, area_b))
    return worst


def render_bin(rng: np.random.Generator, count: int, size: int) -> tuple[Image.Image, list[Item]]:
    """Draw one bin holding exactly `count` objects; return the photo and its item records."""
    photo = _background(rng, size)
    red, green, blue = photo.getpixel((size // 2, size // 2))[:3]  # type: ignore[index]  # RGB: a tuple
    fabric = (int(red), int(green), int(blue))
    products: list[tuple[Appearance, str]] = []
    quantities: list[int] = []
    placed: list[tuple[int, int, int, int]] = []
    # Crowded bins use smaller items, as real bins do, so that every object stays partly visible.
    scale = 1.0 if count <= 3 else math.sqrt(3.5 / count)
    for _ in range(count):
        if products and rng.random() < 0.3:
            which = int(rng.integers(len(products)))
            quantities[which] += 1
        else:
            products.append((_new_appearance(rng, fabric), f"SYN{rng.integers(16**7):07X}"))
            quantities.append(1)
            which = len(products) - 1
        look = products[which][0]
        patch = _draw_item(look, size, scale * rng.uniform(0.85, 1.15))
        patch = patch.rotate(float(rng.uniform(-35, 35)), Image.Resampling.BILINEAR, expand=True)
        pw, ph = patch.size
        best: tuple[float, tuple[int, int]] = (2.0, (0, 0))
        for _attempt in range(12):
            x = int(rng.uniform(0.04 * size, max(0.04 * size + 1, 0.96 * size - pw)))
            y = int(rng.uniform(0.08 * size, max(0.08 * size + 1, 0.97 * size - ph)))
            overlap = _overlap_fraction((x, y, x + pw, y + ph), placed)
            if overlap < best[0]:
                best = (overlap, (x, y))
            if overlap < 0.4:
                break
        x, y = best[1]
        alpha = patch.getchannel("A")
        shadow = Image.new("RGBA", patch.size, (0, 0, 0, 90))
        photo.paste(shadow, (x + max(1, pw // 14), y + max(1, ph // 14)), alpha)
        photo.paste(patch, (x, y), alpha)
        placed.append((x, y, x + pw, y + ph))

    _draw_straps(rng, photo)
    photo = _camera(rng, photo)
    items = [
        Item(
            asin=asin,
            name=f"{'striped ' if look.striped else ''}{look.kind} #{bytes(look.rgb).hex()}",
            quantity=quantity,
            length_in=round(look.width * 24 * look.aspect, 2),
            width_in=round(look.width * 24, 2),
            height_in=round(float(rng.uniform(0.5, 6.0)), 2),
            weight_lb=round(float(rng.uniform(0.05, 4.0)), 3),
        )
        for (look, asin), quantity in zip(products, quantities, strict=True)
    ]
    return photo, items


def _draw_straps(rng: np.random.Generator, photo: Image.Image) -> None:
    """Elastic bands stretched across the bin's front, drawn over everything inside."""
    size = photo.size[0]
    draw = ImageDraw.Draw(photo)
    n_straps = int(rng.choice([1, 2, 2, 3]))
    for k in range(n_straps):
        centre = size * (0.2 + 0.65 * (k + rng.uniform(0.2, 0.8)) / n_straps)
        thickness = size * rng.uniform(0.035, 0.09)
        tilt = size * rng.uniform(-0.06, 0.06)
        tone = int(rng.uniform(15, 70))
        colour = (tone, tone, int(tone * rng.uniform(0.9, 1.3)))
        draw.polygon(
            [
                (0, centre - tilt),
                (size, centre + tilt),
                (size, centre + tilt + thickness),
                (0, centre - tilt + thickness),
            ],
            fill=colour,
        )
        draw.line(
            (0, centre - tilt + thickness * 0.3, size, centre + tilt + thickness * 0.3),
            fill=_shade(colour, 1.8),
            width=1,
        )


def _camera(rng: np.random.Generator, photo: Image.Image) -> Image.Image:
    """Exposure, soft focus and sensor noise; JPEG compression happens when the file is written."""
    radius = float(rng.uniform(0.0, 1.2))
    if radius > 0.3:
        photo = photo.filter(ImageFilter.GaussianBlur(radius))
    pixels = np.asarray(photo, dtype=np.float32)
    gain = rng.uniform(0.8, 1.15) * rng.uniform(0.92, 1.08, 3).astype(np.float32)
    noise = rng.normal(0, rng.uniform(2, 8), pixels.shape[:2])[..., None].astype(np.float32)
    return Image.fromarray((pixels * gain + noise).clip(0, 255).astype(np.uint8), "RGB")


def render_example(seed: int, index: int, config: SynthConfig) -> tuple[bytes, dict[str, object]]:
    """The JPEG bytes and ABID-shaped metadata of example `index`; a pure function of its inputs."""
    rng = np.random.default_rng([seed, index])
    count = int(rng.choice(config.max_count + 1, p=config.count_probabilities()))
    photo, items = render_bin(rng, count, config.image_size)
    buffer = io.BytesIO()
    photo.save(buffer, "JPEG", quality=int(rng.integers(35, 91)))
    image_id = image_id_for(index)
    metadata = {
        "BIN_FCSKU_DATA": {item.asin: item_to_metadata(item) for item in items},
        "EXPECTED_QUANTITY": count,
        "image_fname": f"{image_id}.jpg",
    }
    return buffer.getvalue(), metadata


def _write_example(args: tuple[str, int, int, str]) -> int:
    root, seed, index, config_json = args
    config = SynthConfig.model_validate_json(config_json)
    image_id = image_id_for(index)
    image_path = Path(root, IMAGES_DIR, f"{image_id}.jpg")
    meta_path = Path(root, METADATA_DIR, f"{image_id}.json")
    if image_path.exists() and meta_path.exists():
        return 0
    jpeg, metadata = render_example(seed, index, config)
    # Image first: the index only counts an example once its metadata exists too.
    atomic_write_bytes(image_path, jpeg)
    atomic_write_text(meta_path, json.dumps(metadata, indent=1))
    return 1


def generate_dataset(root: str | os.PathLike[str], config: SynthConfig) -> int:
    """Write `config.n_images` examples under `root`; returns how many were newly written."""
    Path(root, IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    Path(root, METADATA_DIR).mkdir(parents=True, exist_ok=True)
    config_json = config.model_dump_json()
    indices = range(config.start_index, config.start_index + config.n_images)
    jobs = [(str(root), config.seed, index, config_json) for index in indices]
    written = 0
    with bar(len(jobs), "synth", unit="img") as progress:
        if config.workers == 1:
            for job in jobs:
                written += _write_example(job)
                progress.update(1)
        else:
            with get_context("spawn").Pool(config.workers) as pool:
                for newly in pool.imap_unordered(_write_example, jobs, chunksize=16):
                    written += newly
                    progress.update(1)
    return written


class SynthSettings(SynthConfig):
    """`binsight data synth`: the photos' settings and where to write them."""

    out: Path = Field(description="dataset directory to write")


@dataclass(frozen=True)
class Synthesized:
    out: Path
    requested: int
    written: int  # new ones (a re-run writes only what is missing)
    seconds: float


def synthesize(settings: SynthSettings) -> Synthesized:
    started = time.perf_counter()
    config = SynthConfig.model_validate(settings.model_dump(exclude={"out"}))
    written = generate_dataset(settings.out, config)
    return Synthesized(settings.out, config.n_images, written, time.perf_counter() - started)
