"""The recount page and its API, served by `binsight serve --recheck`.

- ``GET /recheck`` — the page: one bin at a time, the photo large (tap or wheel to zoom), a count, and
  skip / can't tell / bin not found; keys: digits then Enter, S, C, N. Usable on a phone.
- ``GET /v1/recheck/next`` — the next bin for the caller (claimed for them for ten minutes).
- ``GET /v1/recheck/photo/{item}`` — its photo.
- ``POST /v1/recheck/{item}`` — ``{"count": 3}`` or ``{"outcome": "skip" | "cant_tell" | "not_found"}``.

By default a person sees neither the recorded quantity nor the model's answer: knowing them biases the
count (anchoring), and these recounts become training labels. `--recheck-show-record` shows both.
The caller is the token's name when the server requires tokens (scope `recheck`); on an open loopback
server the page asks for a name.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel

from binsight.imaging import sniff_format
from binsight.recheck.resolve import next_item, resolve
from binsight.recheck.store import OUTCOMES, LabelStore, storage_url
from binsight.serving.auth import AccessPolicy, bearer_token
from binsight.serving.config import ServeConfig
from binsight.serving.inputs import RequestError, parse_json_object, read_body
from binsight.serving.web import static_file
from binsight.utils.reading import read_source

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@ -]{0,63}$")
_MEDIA = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
# A recount is `{"count": 3}`; anything much larger is not one, and is refused before it is read whole.
RECOUNT_BODY_BYTES = 4096


def _caller(request: Request, policy: AccessPolicy) -> str:
    if policy.auth_required:
        token = bearer_token(request.headers.get("authorization"))
        caller = policy.tokens.authenticate(token) if token else None
        assert caller is not None  # the access guard let the request through
        return caller.name
    name = request.headers.get("x-binsight-who", "").strip()
    if not _NAME.match(name):
        raise RequestError(400, "who_missing", "say who is recounting (a name of letters and digits)")
    return name


class ShownBin(BaseModel):
    """A bin to recount as the page gets it. The record and the model's answer are sent only when the
    operator turned them on (anchoring biases the count): unset fields are left out of the answer, so
    the page tells "not shown" (absent) from "no record" (null)."""

    id: int
    photo: str
    who: str
    recorded: int | None = None
    predicted: int | None = None


class NextBin(BaseModel):
    item: ShownBin | None
    who: str


class SavedRecount(BaseModel):
    item: int
    outcome: str
    count: int | None


class RecountAnswer(BaseModel):
    saved: SavedRecount
    status: str


def add_recheck_routes(app: FastAPI, config: ServeConfig, policy: AccessPolicy) -> None:
    store = LabelStore(storage_url(config.recheck_storage, Path("runs/recheck")))
    page = static_file("recheck.html")
    loop = asyncio.get_running_loop  # the store is synchronous: every call runs in a thread

    @app.get("/recheck", response_class=HTMLResponse, include_in_schema=False)
    async def recheck_page() -> str:
        return page

    @app.get("/v1/recheck/next", response_model_exclude_unset=True)
    async def next_bin(request: Request) -> NextBin:
        who = _caller(request, policy)
        item = await loop().run_in_executor(None, next_item, store, who)
        if item is None:
            return NextBin(item=None, who=who)
        shown = ShownBin(id=item.id, photo=f"/v1/recheck/photo/{item.id}", who=who)
        if config.recheck_show_record:
            shown.recorded, shown.predicted = item.recorded, item.predicted  # set: sent, even if null
        return NextBin(item=shown, who=who)

    @app.get("/v1/recheck/photo/{item_id}")
    async def photo(item_id: int, request: Request) -> Response:
        _caller(request, policy)
        item = await loop().run_in_executor(None, store.item, item_id)
        if item is None:
            raise RequestError(404, "no_such_bin", f"no queued bin {item_id}")
        try:
            data = await loop().run_in_executor(None, _read_photo, item.image, config)
        except OSError:
            raise RequestError(404, "photo_unavailable", "the bin's photo cannot be read") from None
        kind = sniff_format(data[:12])
        if kind is None:
            raise RequestError(415, "not_an_image", "the bin's photo is not a JPEG, PNG or WebP image")
        return Response(data, media_type=_MEDIA[kind], headers={"cache-control": "private, max-age=600"})

    @app.post("/v1/recheck/{item_id}")
    async def recount(item_id: int, request: Request) -> RecountAnswer:
        who = _caller(request, policy)
        body = parse_json_object(await read_body(request, RECOUNT_BODY_BYTES))
        count = body.get("count")
        outcome = body.get("outcome", "counted" if count is not None else None)
        valid_count = isinstance(count, int) and not isinstance(count, bool) and 0 <= count <= 100_000
        if outcome not in OUTCOMES or (outcome == "counted") != valid_count:
            raise RequestError(
                400,
                "bad_recount",
                "give a count from 0 to 100000, or an outcome among skip, cant_tell, not_found",
            )
        if await loop().run_in_executor(None, store.item, item_id) is None:
            raise RequestError(404, "no_such_bin", f"no queued bin {item_id}")
        saved = await loop().run_in_executor(
            None, store.record, item_id, who, outcome, count if outcome == "counted" else None
        )
        item = await loop().run_in_executor(None, store.item, item_id)
        assert item is not None
        resolution = resolve(item, await loop().run_in_executor(None, store.recounts, item_id))
        return RecountAnswer(
            saved=SavedRecount(item=item_id, outcome=saved.outcome, count=saved.count),
            status=resolution.status,
        )


def _read_photo(image: str, config: ServeConfig) -> bytes:
    """A queued photo (from the operator's audit run or list, not from a client): a local file or S3."""
    return read_source(image, config.s3_endpoint_url, config.s3_unsigned)
