"""A batch run over many photos: the manifest is cut into shards of consecutive rows, each shard's
results are written as one Parquet file when its last row is scored, and a restarted run skips the
shards already on disk. The two stages (`stages.py`) run either in this process or on Ray Data,
where decoding runs as CPU tasks across the cluster and the model as a pool of actors; in both cases
the results stream back to this process, which alone writes the shards, so a shard is never half
written or written twice.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from binsight.batch.config import BatchConfig
from binsight.batch.plan import SHARDS, check_plan, make_plan, previous_plan
from binsight.batch.sources import NO_RECORD, Manifest, list_source
from binsight.batch.stages import Batch, DecodeSettings, Scorer, ScorerSettings, SharedModel, fetch_and_decode
from binsight.errors import BinsightError
from binsight.imaging import Preprocess
from binsight.inference.runtime import LoadedModel, model_info
from binsight.utils.io import atomic_write_bytes, atomic_write_json, exclusive_folder, read_shards
from binsight.utils.progress import bar

log = logging.getLogger(__name__)
_FETCHED_PHOTO_BYTES = 1 << 20  # an ABID JPEG is ~50-200 kB; a phone photo a few MB
_WORKER_BYTES = 256 << 20  # a Ray worker with NumPy, Pillow and boto3 loaded (measured ~200 MB)
MANIFEST, REJECTED = "manifest.parquet", "rejected_rows.json"


@dataclass(frozen=True)
class BatchRun:
    """What one invocation did: written to `run.json` beside the shards."""

    out: str
    photos: int
    shards: int
    shards_resumed: int  # already on disk from an earlier, interrupted run
    photos_scored: int  # by this invocation
    unreadable: int  # of the photos this invocation scored
    seconds: float
    photos_per_s: float
    model_version: str
    executor: str
    rejected_rows: list[dict[str, str]]  # manifest rows that could not be used, with the reason


def write_parquet(table: pa.Table, path: Path) -> None:
    """Atomically, as every result binsight writes: a crash leaves the old file or none, never half."""
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    atomic_write_bytes(path, buffer.getvalue().to_pybytes())


def shard_path(out: Path, shard: int) -> Path:
    return out / SHARDS / f"part-{shard:06d}.parquet"


def _finished(out: Path, shard: int, rows: int) -> bool:
    """Whether a shard is done: its footer reads and it holds all its rows. Shards are written
    atomically, so anything else is disk damage or a hand edit, scored again rather than trusted."""
    path = shard_path(out, shard)
    if not path.is_file():
        return False
    try:
        found: int = pq.read_metadata(path).num_rows
    except (OSError, pa.ArrowException) as exc:
        log.warning("%s is damaged (%s): scoring its photos again", path, exc)
        return False
    if found != rows:
        log.warning("%s holds %d rows, not %d: scoring its photos again", path, found, rows)
    return found == rows


def _source(config: BatchConfig, out: Path) -> str:
    """The photos to score: as given, or those of the run already in `out` (resuming need not name
    them again)."""
    if config.source is not None:
        return config.source
    previous = previous_plan(out)
    if previous is None or previous.source is None:
        raise BinsightError("give the photos to score: a manifest, a folder or an s3:// prefix")
    return previous.source


def _list(source: str, config: BatchConfig, out: Path, judge: bool) -> Manifest:
    """The input as it is now, listed afresh on every run: a resumed run must cover the same photos and
    records as the first, and `check_plan` refuses one whose input changed since."""
    manifest = list_source(
        source, judge, config.s3_endpoint_url, config.s3_unsigned, tuple(config.allow_roots)
    )
    if manifest.rejected:
        log.warning("%d rows of %s cannot be used (see %s)", len(manifest.rejected), source, out / REJECTED)
    atomic_write_json(out / REJECTED, manifest.rejected)
    write_parquet(manifest.table(), out / MANIFEST)
    return manifest


def _to_table(parts: list[Batch]) -> pa.Table:
    columns = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    order = np.argsort(columns["row"], kind="stable")
    arrays: dict[str, pa.Array] = {}
    for name, values in columns.items():
        values = values[order]
        if values.ndim == 2:  # probabilities: one fixed-width list per photo
            flat = pa.array(values.astype(np.float32).ravel())
            arrays[name] = pa.FixedSizeListArray.from_arrays(flat, values.shape[1])
        elif values.dtype == object:
            arrays[name] = pa.array([str(v) for v in values], pa.string())
        elif values.dtype.kind == "f":
            arrays[name] = pa.array(values, from_pandas=True)  # NaN -> null: "no value", not a number
        else:
            arrays[name] = pa.array(values)
    return pa.table(arrays)


class ShardWriter:
    """Gathers scored rows by shard and writes each shard atomically once complete."""

    def __init__(self, out: Path, shard_size: int, photos: int, metadata: dict[str, str]) -> None:
        self.out, self.shard_size, self.photos = out, shard_size, photos
        self.metadata = {k.encode(): v.encode() for k, v in metadata.items()}
        self.parts: dict[int, list[Batch]] = {}
        self.filled: dict[int, int] = {}
        self.unreadable = 0
        (out / SHARDS).mkdir(parents=True, exist_ok=True)

    def expected(self, shard: int) -> int:
        return min(self.shard_size, self.photos - shard * self.shard_size)

    def add(self, batch: Batch) -> None:
        shards = np.asarray(batch["row"]) // self.shard_size
        self.unreadable += int(np.sum(np.asarray(batch["problem"], dtype=object) != ""))
        for shard in np.unique(shards):
            mask = shards == shard
            part = {name: np.asarray(values)[mask] for name, values in batch.items()}
            key = int(shard)
            self.parts.setdefault(key, []).append(part)
            self.filled[key] = self.filled.get(key, 0) + int(mask.sum())
            if self.filled[key] == self.expected(key):
                self._write(key)

    def _write(self, shard: int) -> None:
        table = _to_table(self.parts.pop(shard))
        write_parquet(table.replace_schema_metadata(self.metadata), shard_path(self.out, shard))


def _row_batches(table: pa.Table, batch_size: int) -> Iterator[Batch]:
    for start in range(0, table.num_rows, batch_size):
        chunk = table.slice(start, batch_size)
        yield {name: np.asarray(chunk.column(name).to_pylist(), dtype=object) for name in chunk.column_names}


def _in_process(
    pending: pa.Table, scorer: Scorer, decoding: DecodeSettings, batch_size: int
) -> Iterator[Batch]:
    """The same two stages in this process; the next batch is fetched while this one is scored."""
    with ThreadPoolExecutor(1) as prefetch:
        batches = _row_batches(pending, batch_size)
        upcoming = next(batches, None)
        future = prefetch.submit(fetch_and_decode, upcoming, decoding) if upcoming else None
        while future is not None:
            decoded = future.result()
            upcoming = next(batches, None)
            future = prefetch.submit(fetch_and_decode, upcoming, decoding) if upcoming else None
            yield scorer(decoded)


def score_photos(
    counter: LoadedModel,
    images: list[str],
    batch_size: int = 32,
    endpoint_url: str | None = None,
    unsigned: bool = False,
) -> tuple[np.ndarray, list[str | None]]:
    """Probabilities for each photo (NaN rows where it could not be read) and the problems, in memory:
    for evaluations over a split, where shards and resumption are not wanted."""
    manifest = Manifest(images, [NO_RECORD] * len(images), [""] * len(images))
    decoding = DecodeSettings(Preprocess.from_card(counter.info.card), endpoint_url, unsigned)
    probabilities = np.full((len(images), len(counter.info.classes)), np.nan, dtype=np.float32)
    problems: list[str | None] = [None] * len(images)
    scorer = Scorer(counter, ScorerSettings())
    with bar(len(images), "scoring", unit="photo") as progress:
        for batch in _in_process(manifest.table(), scorer, decoding, batch_size):
            probabilities[batch["row"]] = batch["probabilities"]
            for row, problem in zip(batch["row"], batch["problem"], strict=True):
                problems[row] = problem or None
            progress.update(len(batch["row"]))
    return probabilities, problems


def _decode_settings(config: BatchConfig, preprocess: Preprocess) -> DecodeSettings:
    return DecodeSettings(
        preprocess,
        config.s3_endpoint_url,
        config.s3_unsigned,
        config.fetch_threads,
        config.max_image_bytes,
        config.max_image_pixels,
    )


class _HideProgressNotice(logging.Filter):
    """Ray Data says once per process that its bars are off; binsight draws its own."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Progress bars disabled" not in record.getMessage()


def _quiet_ray_data() -> None:
    """Ray Data prints its plan and timings at INFO on the console; keep its warnings only."""
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)
            handler.addFilter(_HideProgressNotice())


def _on_ray(
    pending: pa.Table, config: BatchConfig, model: Path, settings: ScorerSettings, preprocess: Preprocess
) -> Iterator[Batch]:
    try:
        import ray
        import ray.data  # configures Ray Data's loggers, which _quiet_ray_data then adjusts
    except ImportError:
        raise BinsightError("--ray needs Ray", hint="pip install 'binsight[ray]'") from None

    if not ray.is_initialized():
        address = None if config.ray == "auto" else config.ray
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        except (ConnectionError, RuntimeError) as exc:
            raise BinsightError(
                f"cannot join the Ray cluster at {config.ray}: {str(exc).splitlines()[0]}",
                hint="check the address (ray status on the head node) and that this machine has the "
                "cluster's token (RAY_AUTH_TOKEN or ~/.ray/auth_token)",
            ) from None
    if not log.isEnabledFor(logging.DEBUG):
        _quiet_ray_data()
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # this process draws one bar for the whole run
    # Several blocks, so decoding spreads over tasks from the start.
    block_rows = max(config.batch_size, 4 * config.batch_size)
    blocks = [pending.slice(start, block_rows) for start in range(0, pending.num_rows, block_rows)]
    model_ref = ray.put(model.read_bytes())
    # Threads may exceed the replica's logical CPUs: on a small node the model then also uses the
    # cycles decoding leaves idle (Ray's CPUs are a scheduling count, not a pinning).
    threads = config.threads or config.replica_cpus
    decoded = ray.data.from_arrow(blocks).map_batches(
        fetch_and_decode,  # type: ignore[arg-type]
        fn_args=(_decode_settings(config, preprocess),),
        batch_size=config.batch_size,
        batch_format="numpy",
        num_cpus=config.decode_cpus,
        # What a task holds at once (photos as fetched, then pixels), so Ray does not pack more on a node
        # than fits. It also keeps Ray from fusing this stage into the model's actors (it fuses stages
        # whose resource requests match), which would leave decoding to the few model replicas.
        memory=_WORKER_BYTES
        + config.batch_size * (_FETCHED_PHOTO_BYTES + 3 * preprocess.input_hw[0] * preprocess.input_hw[1]),
    )
    scored = decoded.map_batches(
        Scorer,
        fn_constructor_args=(SharedModel(model_ref), dataclasses.replace(settings, threads=threads)),
        batch_size=config.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=config.replicas),
        num_cpus=config.replica_cpus,
    )
    for batch in scored.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
        yield dict(batch)


def run_batch(config: BatchConfig, model: Path, settings: ScorerSettings) -> BatchRun:
    """Score every photo of `config.source` into Parquet shards under `config.out`, resuming.
    `settings.judge` adds verdicts against recorded quantities (an audit)."""
    out = Path(config.out)
    with exclusive_folder(out, "batch run"):
        # A run killed while writing a shard leaves its temporary file; nothing else will remove it.
        for stale in (out / SHARDS).glob(".*.part") if (out / SHARDS).is_dir() else ():
            stale.unlink(missing_ok=True)
        source = _source(config, out)
        manifest = _list(source, config, out, settings.judge)
        check_plan(out, make_plan(source, config, manifest, model, settings), config.restart)
        shards = -(-len(manifest) // config.shard_size)
        rows_of = [min(config.shard_size, len(manifest) - s * config.shard_size) for s in range(shards)]
        done = {s for s in range(shards) if _finished(out, s, rows_of[s])}
        table = manifest.table()
        shard_of_row = np.arange(len(manifest)) // config.shard_size
        pending = table.filter(pa.array(~np.isin(shard_of_row, list(done))))
        info = model_info(model, settings.version)
        writer = ShardWriter(
            out,
            config.shard_size,
            len(manifest),
            {
                "binsight.model_version": info.version,
                "binsight.classes": json.dumps(info.classes),
                "binsight.card": info.card.model_dump_json(),
            },
        )
        if done:
            log.info("resuming: %d of %d shards already done", len(done), shards)
        started = time.perf_counter()
        if config.ray is None:
            scorer = Scorer(str(model), settings)
            decoding = _decode_settings(config, Preprocess.from_card(info.card))
            batches = _in_process(pending, scorer, decoding, config.batch_size)
            executor = "in process"
        else:
            batches = _on_ray(pending, config, model, settings, Preprocess.from_card(info.card))
            executor = f"ray ({config.ray}), {config.replicas} model replica(s)"
        with bar(pending.num_rows, "scoring", unit="photo") as progress:
            for batch in batches:
                writer.add(batch)
                progress.update(len(batch["row"]))
        seconds = time.perf_counter() - started
        missing = [s for s in range(shards) if not shard_path(out, s).is_file()]
        if missing:
            raise BinsightError(f"{len(missing)} shards got no results (first: {missing[0]})")
        result = BatchRun(
            out=str(out),
            photos=len(manifest),
            shards=shards,
            shards_resumed=len(done),
            photos_scored=pending.num_rows,
            unreadable=writer.unreadable,
            seconds=round(seconds, 3),
            photos_per_s=round(pending.num_rows / seconds, 2) if seconds > 0 else 0.0,
            model_version=info.version,
            executor=executor,
            rejected_rows=manifest.rejected,
        )
        atomic_write_json(out / "run.json", dataclasses.asdict(result))
        return result


def read_results(out: Path) -> pa.Table:
    """Every shard of a finished run, in manifest order."""
    files = sorted((out / SHARDS).glob("part-*.parquet"))
    if not files:
        raise BinsightError(f"no results under {out / SHARDS}")
    return read_shards(files)


def model_file(config: BatchConfig) -> tuple[Path, str | None]:
    """The ONNX file to run, and the registry version name when it came from one."""
    if config.model is not None:
        return config.model, None
    from binsight.registry import fetch_alias

    assert config.registry is not None  # the config validator allows exactly one source
    return fetch_alias(config.registry, config.alias, None, config.s3_endpoint_url)


def predict(config: BatchConfig) -> BatchRun:
    """`binsight predict`: every photo of the source scored into Parquet shards, resumably."""
    model, version = model_file(config)
    return run_batch(config, model, ScorerSettings(config.backend, config.precision, config.threads, version))
