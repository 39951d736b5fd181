"""The re-check loop: bins queued from an audit, recounted by people through the server, settled by the
rules, exported as labels, merged into the dataset without moving the test set."""

from __future__ import annotations

import csv
import threading
from datetime import timedelta
from pathlib import Path

import httpx
import numpy as np
import pytest
import sqlalchemy as sa

from binsight.cli import main
from binsight.data.index import build_index
from binsight.data.split import SplitConfig, load_split, write_splits
from binsight.errors import BinsightError
from binsight.recheck import store as store_module
from binsight.recheck.queue import informative_order, split_budget
from binsight.recheck.resolve import next_item, resolve
from binsight.recheck.store import Item, LabelStore, QueueEntry, Recount, now
from binsight.serving.app import create_app
from binsight.serving.auth import digest_of, new_token
from binsight.serving.config import ServeConfig
from binsight.utils.io import read_csv
from tests.background import BackgroundServer

from .conftest import launch_chromium, needs_chromium, wait_in_page


def entries(n: int, queue: str = "q") -> list[QueueEntry]:
    return [
        QueueEntry(f"{i:05d}", f"/photos/{i:05d}.jpg", queue, "suspicious", float(n - i), 2, 3)
        for i in range(n)
    ]


def _item(recorded: int | None = 2, predicted: int | None = 3) -> Item:
    return Item(1, "p", "/p.jpg", "q", "suspicious", 1.0, recorded, predicted, "v1")


def _recounts(*answers: tuple[str, int | None]) -> list[Recount]:
    return [
        Recount(1, "p", outcome, count, f"person-{i}", now(), "q", "v1")
        for i, (outcome, count) in enumerate(answers)
    ]


def test_the_rules_settle_a_bin_only_when_people_agree() -> None:
    item = _item(recorded=2, predicted=3)
    assert resolve(item, []).open
    assert resolve(item, _recounts(("counted", 2))).settled_by == "record"
    assert resolve(item, _recounts(("counted", 3))).settled_by == "model"
    # Disagrees with both: a second, independent recount; two that disagree: a third.
    assert resolve(item, _recounts(("counted", 4))).open
    assert resolve(item, _recounts(("counted", 4), ("counted", 4))).count == 4
    assert resolve(item, _recounts(("counted", 4), ("counted", 5))).open
    assert resolve(item, _recounts(("counted", 4), ("counted", 5), ("counted", 5))).count == 5
    assert resolve(item, _recounts(("counted", 4), ("counted", 5), ("counted", 6))).status == "disputed"
    assert resolve(item, _recounts(("skip", None), ("cant_tell", None))).open
    assert resolve(item, _recounts(("cant_tell", None), ("cant_tell", None))).status == "unreadable"
    assert resolve(item, _recounts(("not_found", None))).status == "not_found"


def test_the_store_keeps_every_answer_and_one_claim(tmp_path: Path) -> None:
    store = LabelStore(f"sqlite:///{tmp_path / 'labels.db'}")
    assert store.add(entries(3)) == 3 and store.add(entries(3)) == 0  # a queue holds a photo once
    first = store.items()[0]
    assert first.photo_id == "00000"  # highest priority first
    # Two people claim the same bin at once: one gets it.
    outcomes: list[bool] = []
    barrier = threading.Barrier(2)

    def claim(who: str) -> None:
        mine = LabelStore(store.url)
        barrier.wait()
        outcomes.append(mine.claim(first.id, who, timedelta(minutes=5)))

    threads = [threading.Thread(target=claim, args=(w,)) for w in ("ana", "ben")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == [False, True]
    # Two people recounting the same bin at the same moment: both answers are kept.
    barrier = threading.Barrier(8)

    def recount(i: int) -> None:
        mine = LabelStore(store.url)
        barrier.wait()
        mine.record(first.id, f"person-{i}", "counted", i)

    threads = [threading.Thread(target=recount, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r.count for r in store.recounts(first.id)) == list(range(8))  # type: ignore[type-var]
    with pytest.raises(BinsightError, match="exactly when"):
        store.record(first.id, "ana", "counted", None)
    assert store.state() == {"items": 3, "recounts": 8, "schema": store_module.SCHEMA_VERSION}


def test_an_older_store_is_upgraded_and_a_newer_one_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = sa.create_engine(url)
    with engine.begin() as connection:  # a store written by the first schema
        store_module.metadata.create_all(connection, tables=[store_module.schema_table])
        store_module._version_1(connection)
        connection.execute(sa.insert(store_module.schema_table).values(version=1))
    LabelStore(url)
    with engine.connect() as connection:
        assert connection.execute(sa.select(store_module.schema_table.c.version)).scalar() == 2
        assert "recounts_by_who" in {
            i["name"] for i in sa.inspect(connection).get_indexes("recheck_recounts")
        }
    with engine.begin() as connection:
        connection.execute(sa.update(store_module.schema_table).values(version=99))
    with pytest.raises(BinsightError, match="newer than this binsight"):
        LabelStore(url)


def test_the_store_on_postgresql(postgres_url: str) -> None:
    store = LabelStore(postgres_url)
    store.add(entries(2, queue="pg"))
    item = next_item(store, "ana")
    assert item is not None and next_item(store, "ben") is not None  # ana holds the first; ben gets the next
    store.record(item.id, "ana", "counted", 2)
    assert [r.count for r in store.recounts(item.id)] == [2]


def test_informative_bins_are_unsure_middle_and_spread() -> None:
    probabilities = np.array(
        [
            [0.0, 0.95, 0.05, 0.0, 0.0, 0.0, 0.0],  # sure of 1
            [0.0, 0.0, 0.0, 0.48, 0.47, 0.05, 0.0],  # torn between 3 and 4
            [0.0, 0.0, 0.0, 0.48, 0.47, 0.05, 0.0],  # the same again
            [0.0, 0.5, 0.0, 0.0, 0.0, 0.5, 0.0],  # torn between 1 and 5
            [0.0, 0.0, 0.45, 0.45, 0.1, 0.0, 0.0],  # torn between 2 and 3
        ]
    )
    order = informative_order(probabilities, k=3)
    assert set(order[:2]) in ({1, 4}, {2, 4})  # torn between middle counts first
    assert order[2] == 3  # then 1-or-5, before the twin of a bin already chosen; the sure bin last
    suspicious, informative = entries(10, "a"), entries(10, "b")
    today = split_budget(suspicious, informative, 10, 0.3)
    assert [e.queue for e in today].count("b") == 3 and len(today) == 10


@pytest.fixture()
def audited(trained: dict[str, Path], tmp_path: Path) -> Path:
    """An audit run over 12 bins whose records are all off by two: the model flags most of them."""
    photos = sorted((trained["data"] / "images").glob("*.jpg"))[:12]
    manifest = tmp_path / "night.csv"
    rows = {r["image"].rsplit("/", 1)[-1]: int(r["count"]) for r in read_csv(trained["data"] / "index.csv")}
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "recorded_quantity"])
        for photo in photos:
            writer.writerow([str(photo), rows[photo.name] + 2])
    out = tmp_path / "audit"
    assert (
        main(
            [
                "audit",
                str(manifest),
                "--model",
                str(trained["onnx_a"]),
                "--out",
                str(out),
                "--review-budget",
                "1.0",
            ]
        )
        == 0
    )
    return out


def test_a_day_of_the_loop_from_audit_to_labels(
    trained: dict[str, Path], audited: Path, tmp_path: Path
) -> None:
    storage = f"sqlite:///{tmp_path / 'labels.db'}"
    assert main(["recheck", "load", "--audit", str(audited), "--storage", storage]) == 0
    store = LabelStore(storage)
    queued = store.items()
    assert len(queued) == 12 and all(i.reason == "suspicious" for i in queued)
    tokens = tmp_path / "tokens.txt"
    people = {name: new_token() for name in ("ana", "ben", "cam")}
    tokens.write_text("".join(f"{n} recheck sha256:{digest_of(t).hex()}\n" for n, t in people.items()))
    config = ServeConfig(
        model=trained["onnx_a"],
        reload_interval_s=0,
        recheck=True,
        recheck_storage=storage,
        tokens_file=tokens,
    )
    truth = {r["id"]: int(r["count"]) for r in read_csv(trained["data"] / "index.csv")}
    with BackgroundServer(create_app(config), config) as server:

        def call(who: str, method: str, path: str, **kwargs: object) -> httpx.Response:
            return httpx.request(
                method, f"{server.url}{path}", headers={"authorization": f"Bearer {people[who]}"}, **kwargs
            )  # type: ignore[arg-type]

        assert httpx.get(f"{server.url}/v1/recheck/next").status_code == 401
        shown = call("ana", "GET", "/v1/recheck/next").json()
        assert shown["who"] == "ana" and "recorded" not in shown["item"]  # no anchoring by default
        photo = call("ana", "GET", shown["item"]["photo"])
        assert photo.status_code == 200 and photo.headers["content-type"] == "image/jpeg"
        answered = 0
        while (nxt := call("ana", "GET", "/v1/recheck/next").json()["item"]) is not None:
            item = store.item(nxt["id"])
            assert item is not None
            # ana recounts the truth, which agrees with neither the record (off by two) nor, often,
            # the model: those bins wait for an independent second recount.
            answer = call(
                "ana", "POST", f"/v1/recheck/{item.id}", json={"count": truth[item.photo_id]}
            ).json()
            answered += 1
            assert answer["status"] in ("settled", "open")
        assert answered == 12
        waiting = [i for i in store.items() if resolve(i, store.recounts(i.id)).open]
        # ben sees exactly those, never one ana settled, and never the one he answered.
        seen = set()
        while (nxt := call("ben", "GET", "/v1/recheck/next").json()["item"]) is not None:
            seen.add(nxt["id"])
            item = store.item(nxt["id"])
            assert item is not None
            call("ben", "POST", f"/v1/recheck/{item.id}", json={"count": truth[item.photo_id]})
        assert seen == {i.id for i in waiting}
        bad = call("cam", "POST", f"/v1/recheck/{queued[0].id}", json={"count": -1})
        assert bad.status_code == 400
        # A recount is a few bytes: a large or deeply nested body is refused, not read whole or parsed.
        padded = b'{"count": 3, "note": "' + b"a" * 8000 + b'"}'
        huge = call("cam", "POST", f"/v1/recheck/{queued[0].id}", content=padded)
        assert (huge.status_code, huge.json()["error"]["code"]) == (413, "body_too_large")
        deep = call("cam", "POST", f"/v1/recheck/{queued[0].id}", content=b"[" * 3000)
        assert (deep.status_code, deep.json()["error"]["code"]) == (400, "bad_json")
        for beyond in (2**70, 0):  # past the database's integers, or before its first row: no such bin
            missing = call("cam", "POST", f"/v1/recheck/{beyond}", json={"count": 3})
            assert (missing.status_code, missing.json()["error"]["code"]) == (404, "no_such_bin")
            assert call("cam", "GET", f"/v1/recheck/photo/{beyond}").status_code == 404
    out = tmp_path / "recounts.csv"
    assert main(["recheck", "export", "--storage", storage, "--out", str(out)]) == 0
    exported = {r["id"]: int(r["count"]) for r in read_csv(out)}
    assert len(exported) == 12 and all(exported[k] == truth[k] for k in exported)
    # The audit, run again over the same bins, now says what each recount found.
    rerun = ["audit", str(tmp_path / "night.csv"), "--model", str(trained["onnx_a"]), "--out", str(audited)]
    assert main([*rerun, "--review-budget", "1.0", "--recheck-storage", storage]) == 0
    findings = {r["recount"] for r in read_csv(audited / "audit.csv")}
    assert findings and all(f.startswith("recounted ") and "the record was wrong" in f for f in findings)
    assert "recounted" in (audited / "report.html").read_text()


def test_recounts_outrank_records_and_the_test_set_stays(trained: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(trained["data"] / "images", data / "images")
    shutil.copytree(trained["data"] / "metadata", data / "metadata")
    build_index(data)
    write_splits(data, SplitConfig(val_fraction=0.2, test_fraction=0.2))
    test_before = sorted(r["id"] for r in load_split(data, "test"))
    rows = read_csv(data / "index.csv")
    changed = {r["id"]: int(r["count"]) + 1 for r in rows[::3]}  # a third of the bins recounted
    recounts = tmp_path / "recounts.csv"
    recounts.write_text("id,count\n" + "".join(f"{k},{v}\n" for k, v in changed.items()))
    assert main(["data", "index", str(data), "--recounts", str(recounts)]) == 0
    merged = {r["id"]: r for r in read_csv(data / "index.csv")}
    for photo_id, count in changed.items():
        assert int(merged[photo_id]["count"]) == count and merged[photo_id]["count_source"] == "recount"
        assert int(merged[photo_id]["recorded_count"]) == count - 1  # the record is kept beside it
    write_splits(data, SplitConfig(val_fraction=0.2, test_fraction=0.2))
    assert sorted(r["id"] for r in load_split(data, "test")) == test_before  # the same photos


@needs_chromium
def test_two_people_recount_in_browsers(trained: dict[str, Path], audited: Path, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    storage = f"sqlite:///{tmp_path / 'labels.db'}"
    assert main(["recheck", "load", "--audit", str(audited), "--storage", storage]) == 0
    store = LabelStore(storage)
    config = ServeConfig(model=trained["onnx_a"], reload_interval_s=0, recheck=True, recheck_storage=storage)
    with BackgroundServer(create_app(config), config) as server, sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            pages = []
            for name in ("ana", "ben"):
                # Separate sessions, as two phones; the page's CSP forbids eval, which Playwright's
                # waiting predicates use (the page's own scripts run under the CSP either way).
                page = browser.new_context(bypass_csp=True).new_page()
                page.goto(f"{server.url}/recheck")
                page.wait_for_selector("#who-form:not([hidden])")
                page.fill("#who-input", name)
                page.click("#who-form button")
                page.wait_for_selector("#work:not([hidden])")
                wait_in_page(page, "document.getElementById('photo').naturalWidth > 0")
                pages.append(page)
            ana, ben = pages
            assert ana.get_attribute("#photo", "data-item") != ben.get_attribute("#photo", "data-item")
            assert ana.is_hidden("#record")  # no recorded quantity or model answer shown
            first = ana.get_attribute("#photo", "data-item")
            ana.fill("#count", "3")
            ana.keyboard.press("Enter")
            wait_in_page(ana, f"document.getElementById('photo').dataset.item !== '{first}'")
            second = ana.get_attribute("#photo", "data-item")
            ana.keyboard.press("s")  # skip
            wait_in_page(ana, f"document.getElementById('photo').dataset.item !== '{second}'")
            third = ana.get_attribute("#photo", "data-item")
            ana.reload()  # mid-queue: the claimed bin comes back to the same person
            ana.wait_for_selector("#work:not([hidden])")
            assert ana.get_attribute("#photo", "data-item") == third
            ben.click("#gone")  # bin not found
            wait_in_page(ben, "document.getElementById('status').textContent.startsWith('Bin')")
        finally:
            browser.close()
    answers = {(r.who, r.outcome) for r in store.recounts()}
    assert {("ana", "counted"), ("ana", "skip"), ("ben", "not_found")} <= answers


def test_the_pipeline_records_the_labels_it_trained_on(trained: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    from binsight.pipeline.retrain import PipelineConfig, ingest

    data = tmp_path / "data"
    shutil.copytree(trained["data"] / "images", data / "images")
    shutil.copytree(trained["data"] / "metadata", data / "metadata")
    storage = f"sqlite:///{tmp_path / 'labels.db'}"
    LabelStore(storage).add(entries(4))
    first = read_csv(trained["data"] / "index.csv")[0]
    recounts = tmp_path / "recounts.csv"
    recounts.write_text(f"id,count\n{first['id']},{int(first['count']) + 1}\n")
    config = PipelineConfig(
        data=data, registry=str(tmp_path / "registry"), recounts=recounts, recheck_storage=storage
    )
    labels = ingest(config).labels
    assert labels is not None and labels.photos_recounted == 1
    assert labels.store == {"items": 4, "recounts": 0, "schema": store_module.SCHEMA_VERSION}


def test_the_record_is_absent_when_hidden_and_sent_even_when_null_when_shown() -> None:
    """`/v1/recheck/next` answers with unset fields left out (`response_model_exclude_unset`): the page
    tells "not shown" (absent) from "no record" (null) by presence."""
    from binsight.serving.recheck import NextBin, ShownBin

    hidden = NextBin(item=ShownBin(id=1, photo="/v1/recheck/photo/1", who="ana"), who="ana")
    assert hidden.model_dump(exclude_unset=True)["item"] == {
        "id": 1,
        "photo": "/v1/recheck/photo/1",
        "who": "ana",
    }
    shown = ShownBin(id=1, photo="/v1/recheck/photo/1", who="ana")
    shown.recorded, shown.predicted = None, 3  # as the route does when the operator shows the record
    item = NextBin(item=shown, who="ana").model_dump(exclude_unset=True)["item"]
    assert item["recorded"] is None and item["predicted"] == 3
