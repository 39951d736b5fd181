"""Files people write (labels, count folders, metadata, manifests, lists, settings) never crash a command.

Each case was a traceback before it was a test: `str.isdigit` accepts `"²"` and `"①"`, which `int`
refuses; Python's JSON reads NaN, Infinity and arbitrarily deep nesting; a settings file can hold a
list. A bad row is skipped and reported where the rest of the file is usable, and otherwise the
command stops with a `binsight: error:` line naming the file and the problem.
"""

from __future__ import annotations

import ast
import json
import logging
import string
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from binsight.cli import main
from binsight.data.abid import BinRecord, MetadataError, image_id_order, parse_metadata
from binsight.data.download import read_file_list
from binsight.data.index import build_index
from binsight.errors import BinsightError
from binsight.inference.runtime import META_PREFIX, read_info
from binsight.monitoring.capture_record import CaptureRecord
from binsight.serving.auth import TokenStore
from binsight.utils.io import read_csv
from binsight.utils.text import MAX_COUNT, whole_number
from tests.test_real_photo_pieces import write_photos

SIZES = {"a": (64, 48), "b": (40, 30), "c": (30, 41)}


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """The exit status, and what the command printed (errors go to stderr, results to stdout)."""
    code = main(argv)
    printed = capsys.readouterr()
    return code, printed.out + printed.err


@pytest.mark.parametrize("cell", ["²", "①", "٣", "9" * 40, "-1", "2.0", ""])
def test_a_labels_cell_that_is_no_count_is_skipped_and_named(tmp_path: Path, cell: str) -> None:
    write_photos(tmp_path / "images", SIZES)
    (tmp_path / "labels.csv").write_text(f"id,count\na,{cell}\nb, 3 \nc\n", encoding="utf-8")
    result = build_index(tmp_path, out=tmp_path / "work")
    problems = {s["id"]: s["problem"] for s in result.skipped}
    assert problems == {
        "a": f"count {cell!r} is not a whole number",
        "c": "count '' is not a whole number",  # a short row
    }
    assert [(r["id"], r["count"]) for r in read_csv(tmp_path / "work" / "index.csv")] == [("b", "3")]


def test_only_ascii_digit_folders_are_count_folders(tmp_path: Path) -> None:
    write_photos(tmp_path / "²", {"a": (64, 48)})
    write_photos(tmp_path / "3", {"b": (40, 30)})
    write_photos(tmp_path / "03", {"c": (30, 41)})  # also 3: both folders are read
    result = build_index(tmp_path, out=tmp_path / "work")
    assert result.layout == "count-folders"
    assert sorted((r["id"], r["count"]) for r in result.rows) == [("b", 3), ("c", 3)]


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        ('{"EXPECTED_QUANTITY": NaN}', "EXPECTED_QUANTITY is nan, not a whole number"),
        ('{"EXPECTED_QUANTITY": -Infinity}', "EXPECTED_QUANTITY is -inf, not a whole number"),
        ('{"BIN_FCSKU_DATA": {"A": {"quantity": Infinity}}}', "quantity of item 'A' is inf, not a whole"),
        ('{"EXPECTED_QUANTITY": 1e300}', "EXPECTED_QUANTITY is over 999,999,999, more than any bin holds"),
        ('{"EXPECTED_QUANTITY": ' + "9" * 400 + "}", "EXPECTED_QUANTITY is over 999,999,999"),
        ("[" * 100_000 + "]" * 100_000, "not valid JSON (maximum recursion depth exceeded"),
    ],
)
def test_metadata_no_count_can_be_read_from_is_skipped_and_named(
    tmp_path: Path, document: str, problem: str
) -> None:
    write_photos(tmp_path / "images", {"7": (64, 48), "8": (40, 30)})
    (tmp_path / "metadata").mkdir()
    (tmp_path / "metadata" / "7.json").write_text(document)
    (tmp_path / "metadata" / "8.json").write_text('{"EXPECTED_QUANTITY": 2}')
    result = build_index(tmp_path, out=tmp_path / "work")
    assert [r["id"] for r in result.rows] == ["8"]
    [skipped] = result.skipped
    assert skipped["id"] == "7" and skipped["problem"].startswith(f"bad metadata: {problem}")


def test_a_recount_file_that_is_missing_or_not_counts_stops_the_index(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_photos(tmp_path / "images", SIZES)
    (tmp_path / "labels.csv").write_text("id,count\na,1\nb,2\nc,3\n")
    recounts = tmp_path / "recounts.csv"
    recounts.write_text("id,count\na,²\n")
    code, err = run(["data", "index", str(tmp_path), "--recounts", str(recounts)], capsys)
    assert code == 2 and f"{recounts} is not a recount labels file" in err
    code, err = run(["data", "index", str(tmp_path), "--recounts", str(tmp_path / "none.csv")], capsys)
    assert code == 2 and f"cannot read {tmp_path / 'none.csv'}: No such file or directory" in err
    assert not (tmp_path / "index.csv").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[1, 2]", "must hold a JSON object of settings, not list"),
        ('"threads"', "must hold a JSON object of settings, not str"),
        ("{broken", "is not valid JSON"),
        (b"\xff\xfe{}", "is not UTF-8 text (byte 0 is 0xff)"),
    ],
)
def test_a_settings_file_that_is_not_an_object_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | bytes, message: str
) -> None:
    config = tmp_path / "settings.json"
    config.write_bytes(content if isinstance(content, bytes) else content.encode())
    code, err = run(
        ["predict", str(tmp_path), "--model", str(tmp_path / "m.onnx"), "--config", str(config)], capsys
    )
    assert code == 2 and f"settings file {config} {message}" in err and "Traceback" not in err


def test_a_manifest_or_list_in_another_encoding_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    latin1 = tmp_path / "photos.txt"
    latin1.write_bytes("/photos/bin-é.jpg\n".encode("latin-1"))
    code, err = run(["predict", str(latin1), "--model", str(tmp_path / "m.onnx")], capsys)
    assert code == 2 and f"{latin1} is not UTF-8 text (byte 12 is 0xe9)" in err
    storage = f"sqlite:///{tmp_path / 'labels.db'}"
    code, err = run(["recheck", "load", "--list", str(latin1), "--storage", storage], capsys)
    assert code == 2 and f"{latin1} is not UTF-8 text" in err
    code, err = run(["recheck", "load", "--list", str(tmp_path / "none.txt"), "--storage", storage], capsys)
    assert code == 2 and "No such file or directory" in err
    tokens = tmp_path / "tokens"
    tokens.write_bytes("ops-é sha256:00\n".encode("latin-1"))
    code, err = run(["token", "new", "--name", "ci", "--scopes", "invoke", "--file", str(tokens)], capsys)
    assert code == 2 and f"the tokens file {tokens} is not UTF-8 text (byte 4 is 0xe9)" in err
    assert tokens.read_bytes() == "ops-é sha256:00\n".encode("latin-1")  # nothing appended
    with pytest.raises(BinsightError, match="is not UTF-8 text"):
        TokenStore.load(tokens)


def test_recheck_load_names_what_is_wrong_in_its_inputs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    storage = f"sqlite:///{tmp_path / 'labels.db'}"
    listed = tmp_path / "bins.csv"
    listed.write_text("image,recorded_quantity\na.jpg,3\nb.jpg,²\n")
    code, err = run(["recheck", "load", "--list", str(listed), "--storage", storage], capsys)
    assert code == 2 and f"recorded_quantity '²' of b.jpg in {listed} is not a whole number" in err

    audit = tmp_path / "audit"
    audit.mkdir()
    header = "rank,image,recorded_quantity,predicted_count,p_record_wrong,verdict,problem\n"
    (audit / "audit.csv").write_text(header + "1,a.jpg,3,4,0.9,mismatch,\n")
    (audit / "audit.json").write_text("{broken")
    code, err = run(["recheck", "load", "--audit", str(audit), "--storage", storage], capsys)
    assert code == 2 and f"audit summary {audit / 'audit.json'} is not valid JSON" in err
    (audit / "audit.json").write_text('{"model_version": "v1"}')
    (audit / "audit.csv").write_text(header + "1,a.jpg,3,4,NaN,mismatch,\n")
    code, err = run(["recheck", "load", "--audit", str(audit), "--storage", storage], capsys)
    assert code == 2 and "p_record_wrong of a.jpg" in err and "is 'NaN', not a probability" in err
    (audit / "audit.csv").write_text(header + "1,a.jpg,3,4,0.9,mismatch,\n")
    code, err = run(["recheck", "load", "--audit", str(audit), "--storage", storage], capsys)
    assert code == 0, err  # the same folder, mended, loads


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"1": 5}', "is neither a JSON list of ids nor an object of such lists"),
        (b'{"1": "metadata/523.json"}', "is neither a JSON list of ids nor an object of such lists"),
        (b"[" * 100_000, "is not valid JSON"),
        (b"523\n\xe9\n", "is not UTF-8 text"),
    ],
)
def test_a_file_list_that_names_no_ids_is_named(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "file_list.json"
    path.write_bytes(content)
    with pytest.raises(BinsightError, match=message):
        read_file_list(path)


@given(st.text(max_size=12) | st.text(alphabet=string.digits + " ", max_size=12))
def test_whole_number_reads_ascii_digits_and_nothing_else(text: str) -> None:
    number = whole_number(text)
    digits = text.strip()
    if digits.isascii() and digits.isdigit() and len(digits) <= 9:
        assert number == int(digits)
    else:
        assert number is None
    assert number is None or 0 <= number <= MAX_COUNT


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=12,
)
COUNTS = st.integers() | st.floats() | JSON_VALUES  # NaN, infinities and huge numbers included
DOCUMENTS = st.fixed_dictionaries(
    {},
    optional={
        "EXPECTED_QUANTITY": COUNTS,
        "BIN_FCSKU_DATA": st.dictionaries(
            st.text(max_size=4),
            st.fixed_dictionaries({}, optional={"quantity": COUNTS, "length": JSON_VALUES}) | JSON_VALUES,
            max_size=3,
        ),
    },
)


@settings(max_examples=300)
@given(DOCUMENTS | JSON_VALUES)
def test_any_metadata_document_gives_a_count_or_a_metadata_error(document: object) -> None:
    try:
        record = parse_metadata(json.dumps(document), "7")
    except MetadataError:
        return
    # Each item's quantity is at most MAX_COUNT, so even their sum fits the index's int64 column.
    assert isinstance(record, BinRecord) and 0 <= record.count < 2**63


@given(st.lists(st.text(max_size=25) | st.text(alphabet=string.digits, min_size=1, max_size=25)))
def test_any_ids_sort_numbers_first_then_text(ids: list[str]) -> None:
    ordered = sorted(ids, key=image_id_order)
    numeric = [i for i in ordered if i.isascii() and i.isdigit() and len(i) <= 18]
    assert ordered[: len(numeric)] == numeric
    assert [int(i) for i in numeric] == sorted(int(i) for i in numeric)


def test_an_output_path_the_system_refuses_is_named_not_traced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    a_file, a_folder = tmp_path / "notes.txt", tmp_path / "labels"
    a_file.write_text("keep me")
    a_folder.mkdir()
    storage = f"sqlite:///{tmp_path / 'labels.db'}"
    code, err = run(["recheck", "export", "--out", str(a_folder), "--storage", storage], capsys)
    assert code == 2 and f"binsight: error: {a_folder}: Is a directory" in err and "Traceback" not in err
    code, err = run(["data", "synth", str(a_file), "--n-images", "3"], capsys)
    assert code == 2 and f"binsight: error: {a_file / 'images'}: Not a directory" in err
    assert a_file.read_text() == "keep me" and not any(a_folder.iterdir())
    caplog.set_level(logging.DEBUG, logger="binsight")
    code, err = run(["-v", "data", "synth", str(a_file), "--n-images", "3"], capsys)
    # -v logs the traceback (rendered into the message by the redacting filter)
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    [where] = [message for message in logged if "Traceback" in message]
    assert code == 2 and "NotADirectoryError" in where and "synth" in where


def test_stats_of_an_index_without_photos_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "index.csv").write_text("id,image,count\n")
    code, err = run(["data", "stats", str(tmp_path)], capsys)
    assert code == 2 and f"the index of {tmp_path} lists no photos" in err


def test_a_settings_file_may_carry_comments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "recheck.json"
    storage = f"sqlite:///{tmp_path / 'labels.db'}"
    config.write_text(json.dumps({"_about": "the team's label store", "storage": storage}))
    code, err = run(["recheck", "status", "--config", str(config)], capsys)
    assert code == 0, err
    assert (tmp_path / "labels.db").is_file()


def test_a_hand_edited_index_or_split_is_refused_by_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_photos(tmp_path / "images", {f"p{i}": (40 + i, 30) for i in range(6)})
    (tmp_path / "labels.csv").write_text("id,count\n" + "".join(f"p{i},{i % 3}\n" for i in range(6)))
    assert run(["data", "index", str(tmp_path)], capsys)[0] == 0
    assert run(["data", "split", str(tmp_path)], capsys)[0] == 0
    train = tmp_path / "splits" / "train.csv"
    lines = train.read_text().splitlines()
    header = lines[0].split(",")
    cells = lines[1].split(",")
    cells[header.index("count")] = "two"
    train.write_text("\n".join([lines[0], ",".join(cells), *lines[2:]]) + "\n")
    code, err = run(["data", "stats", str(tmp_path)], capsys)
    assert code == 2 and f"{train} line 2: count 'two' is not a whole number" in err
    out = tmp_path / "run"
    code, err = run(["train", "--data", str(tmp_path), "--out", str(out), "--epochs", "1"], capsys)
    assert code == 2 and f"{train} line 2: count 'two' is not a whole number" in err


@pytest.mark.parametrize("image_id", ["../outside", "..", ".", "a/b", "/etc/passwd", "bin\x00"])
def test_download_ids_cannot_name_a_path_outside_the_dataset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], image_id: str
) -> None:
    out = tmp_path / "abid"
    # An unreachable endpoint: the ids are refused before anything is asked of it.
    argv = ["data", "download", str(out), "--ids", f"523,{image_id}", "--endpoint-url", "http://127.0.0.1:9"]
    code, err = run(argv, capsys)
    assert code == 2 and f"{image_id!r} is not an image id" in err
    assert not out.exists() and not (tmp_path / "outside.jpg").exists()


def test_capture_lines_someone_else_wrote_are_skipped_not_stored(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = CaptureRecord(
        time="2026-12-08T00:00:00Z", source="s3://bins/site-7/1.jpg", image_sha256="0" * 64, bytes=10,
        width=40, height=30, count=2, confidence=0.4, model_version="v1", latency_ms=3.0,
        probabilities=[0.05, 0.2, 0.4, 0.2, 0.1, 0.03, 0.02], signals={}, embedding=[],
        expected_count=4, verdict="mismatch",
    )  # fmt: skip
    lines = [good.line()]
    for i, bad in enumerate([{"expected_count": 10**30}, {"expected_count": -5}, {"count": 2**70}]):
        lines.append(json.dumps({**json.loads(good.line()), "source": f"s3://bins/site-7/x{i}.jpg", **bad}))
    (tmp_path / "capture").mkdir()
    (tmp_path / "capture" / "capture-1.jsonl").write_text("\n".join(lines) + "\n")
    storage = f"sqlite:///{tmp_path / 'labels.db'}"
    argv = ["recheck", "load", "--traffic", str(tmp_path / "capture"), "--storage", storage]
    code, printed = run(argv, capsys)
    assert code == 0 and "recheck: 1 bins queued (1 suspicious)" in printed, printed


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"image_size": "224", "mean": "[0.5, 0.5, 0.5]", "std": "[0.5, 0.5, 0.5]", "classes": "5"},
        {"image_size": "tall", "mean": "[0.5]", "std": "[0.5]", "classes": "[0, 1]"},
        {"card": "[1, 2]"},
        {"card": '{"input_height": "x"}'},
    ],
)
def test_an_onnx_file_without_binsight_metadata_is_named(fields: dict[str, str]) -> None:
    metadata = {META_PREFIX + key: value for key, value in fields.items()}
    with pytest.raises(BinsightError, match="lacks binsight metadata"):
        read_info(metadata, "0" * 64)


def test_an_s3_call_without_credentials_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance role to ask for either
    # The endpoint is never reached: botocore finds no credentials to sign with first.
    argv = ["models", "list", "--registry", "s3://bins/registry", "--s3-endpoint-url", "http://127.0.0.1:9"]
    code, printed = run(argv, capsys)
    assert code == 2 and "binsight: error: S3: Unable to locate credentials" in printed
    assert "hint: check the credentials" in printed and "Traceback" not in printed


def test_serve_refuses_a_capture_folder_that_is_a_file_before_starting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    notes = tmp_path / "notes"
    notes.write_text("not a folder")
    code, printed = run(["serve", "--model", str(tmp_path / "m.onnx"), "--capture-dir", str(notes)], capsys)
    assert code == 2 and f"--capture-dir: Value error, {notes} is a file; give a folder" in printed
    assert notes.read_text() == "not a folder"


# Run in its own process: a DataLoader worker is a fork, and the pytest worker has thread pools
# (OpenVINO, ONNX Runtime, servers of earlier tests) that a fork should not copy.
LOADER_SCRIPT = """
import torch.utils.data as data
from binsight.errors import BinsightError

class PhotoGone(data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        if index == 2:
            raise BinsightError("cannot decode images/2.jpg: gone", hint="re-run `binsight data index`")
        return index

try:
    list(data.DataLoader(PhotoGone(), batch_size=1, num_workers=1))
except BinsightError as exc:
    print(repr((exc.message, exc.hint, str(exc))))
"""


def test_an_error_in_a_loader_worker_reads_as_it_was_raised() -> None:
    # PyTorch rebuilds a worker's error in the main process from its whole traceback as one string.
    done = subprocess.run([sys.executable, "-c", LOADER_SCRIPT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    message, hint, shown = ast.literal_eval(done.stdout.strip())
    assert (message, hint) == ("cannot decode images/2.jpg: gone", "re-run `binsight data index`")
    assert shown == "cannot decode images/2.jpg: gone\n  hint: re-run `binsight data index`"


def test_tune_stops_on_what_would_fail_every_trial(
    synth_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    assert run(["data", "index", str(synth_dir), "--out", str(data)], capsys)[0] == 0
    # Before any trial: a dataset without splits, a base config that is not one.
    # (--timeout-s bounds each command should a regression loop over failing trials again)
    bounded = ["--timeout-s", "60"]
    code, printed = run(["tune", "--data", str(data), "--out", str(tmp_path / "a"), *bounded], capsys)
    assert code == 2 and "no train split" in printed and not (tmp_path / "a").exists()
    assert run(["data", "split", str(data)], capsys)[0] == 0
    listed = tmp_path / "base.json"
    listed.write_text("[]")
    code, printed = run(
        ["tune", "--data", str(data), "--out", str(tmp_path / "b"), "--base-config", str(listed), *bounded],
        capsys,
    )
    assert code == 2 and "must hold a JSON object of settings, not list" in printed

    # A cause only a trial meets (ImageNet weights nobody fetched): three failures, then a stop
    # naming it, instead of failed trials until the timeout.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-weights"))
    out = tmp_path / "c"
    code, printed = run(
        ["tune", "--data", str(data), "--out", str(out), "--archs", "resnet18", "--n-trials", "2", *bounded],
        capsys,
    )
    assert (
        code == 2
        and "3 trials in a row failed, so this worker stopped; the last: ImageNet weights for resnet18"
        in printed
    )
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["trials"], summary["states"]) == (3, {"FAIL": 3})
