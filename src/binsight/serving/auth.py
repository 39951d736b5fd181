"""Who may call the server: bearer tokens with scopes, and which Host names the server answers to.

Tokens live in a file (`--tokens-file`) or in the environment (`BINSIGHT_TOKENS`), one per line::

    # name      scopes          secret (sha256 of the token, as `binsight token new` writes it)
    camera-7    invoke          sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae
    ops         invoke,admin    sha256:fcde2b2edba56bf408601fb721fe9b5c338d10ee429ea04fae5511b68fbf8fb9

A secret may also be the token itself (for a quick test); hashed is the default because a file that
leaks then grants nothing. A presented token is hashed and compared with every stored hash in constant
time (`hmac.compare_digest`, all entries, no early exit), so neither timing nor the order of the file
tells anything about a token.

Scopes: `invoke` counts photos (`/invocations`, `/v1/count`, `/v1/model`); `admin` reads other
clients' traffic and the server's metrics (`/v1/traffic`, `/metrics`); `recheck` records recounts.

Authentication is on whenever tokens are configured. Without tokens the server runs open only when it
listens on loopback; on any other interface it refuses to start unless told `--no-auth` (SageMaker's
contract: no auth inside the container, IAM in front), and then says so in a warning.

The Host header is checked against an allow-list for the HTML pages always, and for every route when
authentication is off: a browser tricked by DNS rebinding (evil.example resolving to 127.0.0.1) sends
`Host: evil.example`, and gets nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import secrets
import stat
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from starlette.types import ASGIApp, Message, Receive, Send
from starlette.types import Scope as ASGIScope

from binsight.errors import BinsightError
from binsight.serving.api_schema import error_json
from binsight.utils.io import read_text

log = logging.getLogger(__name__)

TOKENS_ENV = "BINSIGHT_TOKENS"
TOKEN_PREFIX = "bsk_"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
_HASHED = re.compile(r"^sha256:([0-9a-f]{64})$")
MIN_PLAIN_TOKEN = 16


class Scope(StrEnum):
    INVOKE = "invoke"
    ADMIN = "admin"
    RECHECK = "recheck"


@dataclass(frozen=True)
class Caller:
    name: str
    scopes: frozenset[Scope]


@dataclass(frozen=True)
class _Entry:
    caller: Caller
    digest: bytes


def digest_of(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def new_token() -> str:
    """A fresh token: 256 random bits, URL-safe, with a prefix that secret scanners can recognise."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_line(name: str, scopes: list[Scope], token: str) -> str:
    """The line of a tokens file for `token`, hashed."""
    if not _NAME.match(name):
        raise BinsightError(f"token name {name!r}: use letters, digits, '_', '.', '@' or '-' (at most 64)")
    return f"{name} {','.join(s.value for s in scopes)} sha256:{digest_of(token).hex()}"


class TokenConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    action: Literal["new"] = Field("new", description="new: make a token and add its hash to the file")
    name: str = Field(description="who holds it (shown in logs and errors), e.g. camera-7")
    scopes: list[Scope] = Field(
        default_factory=lambda: [Scope.INVOKE], description="invoke, admin, recheck (comma-separated)"
    )
    file: Path = Field(Path("tokens.txt"), description="tokens file to append to (created 0600)")


@dataclass(frozen=True)
class IssuedToken:
    name: str
    scopes: list[Scope]
    token: str  # shown once, never stored
    file: Path


def issue_token(config: TokenConfig) -> IssuedToken:
    """A new token: its hash appended to the tokens file (created private), the token returned once."""
    token = new_token()
    line = token_line(config.name, config.scopes, token)
    existing = read_text(config.file, "the tokens file") if config.file.exists() else ""
    if any(part.split()[:1] == [config.name] for part in existing.splitlines()):
        raise BinsightError(f"{config.file} already has a token named {config.name!r}")
    descriptor = os.open(config.file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(descriptor, "a", encoding="utf-8") as out:
        out.write(("" if not existing or existing.endswith("\n") else "\n") + line + "\n")
    return IssuedToken(config.name, config.scopes, token, config.file)


def _parse(text: str, where: str) -> list[_Entry]:
    entries: list[_Entry] = []
    names: set[str] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 3:
            raise BinsightError(
                f"{where} line {number}: expected 'NAME SCOPES SECRET', got {len(parts)} fields",
                hint="create lines with `binsight token new --name NAME --scopes invoke --file FILE`",
            )
        name, scope_text, secret = parts
        if not _NAME.match(name) or name in names:
            raise BinsightError(f"{where} line {number}: bad or repeated token name {name[:64]!r}")
        try:
            scopes = frozenset(Scope(s) for s in scope_text.split(","))
        except ValueError:
            raise BinsightError(
                f"{where} line {number}: scopes must be among {', '.join(s.value for s in Scope)}",
            ) from None
        hashed = _HASHED.match(secret)
        if hashed:
            digest = bytes.fromhex(hashed.group(1))
        elif len(secret) >= MIN_PLAIN_TOKEN:
            digest = digest_of(secret)
        else:
            raise BinsightError(
                f"{where} line {number}: the secret is neither sha256:<64 hex digits> nor a token of "
                f"{MIN_PLAIN_TOKEN}+ characters"
            )
        names.add(name)
        entries.append(_Entry(Caller(name, scopes), digest))
    return entries


class TokenStore:
    """The configured tokens; `authenticate` maps a presented token to its caller."""

    def __init__(self, entries: list[_Entry]) -> None:
        self._entries = entries

    def __len__(self) -> int:
        return len(self._entries)

    @classmethod
    def load(cls, path: Path | None) -> TokenStore:
        """From `path` and from $BINSIGHT_TOKENS (both, when both are given)."""
        entries: list[_Entry] = []
        if path is not None:
            text = read_text(path, "the tokens file")
            mode = path.stat().st_mode
            entries += _parse(text, str(path))
            if mode & (stat.S_IRWXG | stat.S_IRWXO) and any(
                not _HASHED.match(line.split()[-1])
                for line in text.splitlines()
                if line.strip()[:1] not in "#"
            ):
                log.warning("%s holds plain tokens and others may read it: chmod 600 it, or hash them", path)
        env = os.environ.get(TOKENS_ENV, "")
        if env.strip():
            entries += _parse(env.replace(";", "\n"), f"${TOKENS_ENV}")
        return cls(entries)

    def authenticate(self, presented: str) -> Caller | None:
        digest = digest_of(presented)
        found: Caller | None = None
        for entry in self._entries:  # every entry, whatever matched: no timing by position
            if hmac.compare_digest(digest, entry.digest):
                found = entry.caller
        return found


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    kind, _, value = authorization.partition(" ")
    return value.strip() or None if kind.lower() == "bearer" else None


LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The name in a Host header, without the port (IPv6 literals keep no brackets)."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


@dataclass(frozen=True)
class AccessPolicy:
    """What the server demands of a request, decided once at start-up from its settings."""

    tokens: TokenStore
    auth_required: bool
    allowed_hosts: frozenset[str]  # "*" admits any
    metrics_public: bool

    def host_allowed(self, header: str | None) -> bool:
        if "*" in self.allowed_hosts:
            return True
        return header is not None and host_name(header) in self.allowed_hosts


def access_policy(
    host: str,
    tokens_file: Path | None,
    no_auth: bool,
    allowed_hosts: list[str],
    metrics_public: bool,
) -> AccessPolicy:
    """Refuses what a reviewer would not sign off: an open server on a shared network by default."""
    tokens = TokenStore.load(tokens_file)
    if no_auth and len(tokens):
        raise BinsightError("--no-auth and tokens were both given", hint="drop one of them")
    hosts = set(LOOPBACK_NAMES) | {h.lower() for h in allowed_hosts}
    if host not in ("0.0.0.0", "::", ""):
        hosts.add(host.lower())
    if len(tokens):
        required = True
        log.info(
            "authentication on: %d tokens; pages answer to Host %s", len(tokens), ", ".join(sorted(hosts))
        )
    elif is_loopback(host):
        required = False
        log.info("authentication off: no tokens, and the server listens on loopback only (%s)", host)
    elif no_auth:
        required = False
        log.warning(
            "AUTHENTICATION IS OFF on %s: anyone who reaches this port can count photos, read other "
            "clients' captured traffic and the metrics. Use this only behind a proxy or IAM that "
            "authenticates callers (SageMaker); otherwise give --tokens-file.",
            host,
        )
    else:
        raise BinsightError(
            f"refusing to listen on {host} without authentication",
            hint="create a token with `binsight token new --name NAME --scopes invoke,admin "
            "--file tokens.txt` and pass --tokens-file tokens.txt; or --no-auth where a proxy or IAM "
            "authenticates callers",
        )
    return AccessPolicy(tokens, required, frozenset(hosts), metrics_public)


# ------------------------------------------------------------------ the ASGI guard

PUBLIC_ROUTES = frozenset({"/ping", "/openapi.json"})
PAGE_ROUTES = frozenset({"/", "/traffic", "/recheck"})


def route_scope(path: str, metrics_public: bool) -> Scope | None:
    """The scope a route needs; None for public routes (health, the contract, pages, static files)."""
    if path in ("/invocations", "/v1/count", "/v1/model"):
        return Scope.INVOKE
    if path == "/v1/traffic" or (path == "/metrics" and not metrics_public):
        return Scope.ADMIN
    if path.startswith("/v1/recheck"):
        return Scope.RECHECK
    return None


def _json_error(status: int, code: str, message: str, extra: list[tuple[bytes, bytes]]) -> Response:
    body = error_json(code, message)
    return Response(body, status, [(b"content-type", b"application/json"), *extra])


@dataclass(frozen=True)
class Response:
    body: bytes
    status: int
    headers: list[tuple[bytes, bytes]]


SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]
# The pages load nothing from elsewhere; their scripts are inline.
PAGE_HEADERS = [
    *SECURITY_HEADERS,
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' blob: data:; script-src 'self' 'unsafe-inline'; "
        b"style-src 'self' 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'",
    ),
]


def check_request(policy: AccessPolicy, path: str, headers: dict[bytes, bytes]) -> Response | None:
    """None when the request may proceed; else the refusal to send."""
    host = headers.get(b"host", b"").decode("latin-1")
    is_page = path in PAGE_ROUTES or path.startswith("/static/")
    if (is_page or not policy.auth_required) and path != "/ping" and not policy.host_allowed(host):
        return _json_error(
            403,
            "host_not_allowed",
            "this server does not answer to that host name; the operator can add it with --allowed-hosts",
            [],
        )
    scope = route_scope(path, policy.metrics_public)
    if scope is None or not policy.auth_required:
        return None
    challenge = [(b"www-authenticate", b'Bearer realm="binsight"')]
    token = bearer_token(headers.get(b"authorization", b"").decode("latin-1"))
    if token is None:
        return _json_error(401, "unauthenticated", "send 'Authorization: Bearer <token>'", challenge)
    caller = policy.tokens.authenticate(token)
    if caller is None:
        return _json_error(401, "unauthenticated", "the token is not valid", challenge)
    if scope not in caller.scopes:
        return _json_error(
            403,
            "insufficient_scope",
            f"the token {caller.name!r} lacks the {scope.value!r} scope",
            [(b"www-authenticate", f'Bearer realm="binsight", scope="{scope.value}"'.encode())],
        )
    return None


class AccessControl:
    """ASGI middleware: the Host allow-list, bearer tokens and security headers, before any routing."""

    def __init__(
        self, app: ASGIApp, policy: AccessPolicy, on_refused: Callable[[str, int, str], None]
    ) -> None:
        self.app, self.policy, self.on_refused = app, policy, on_refused

    async def __call__(self, scope: ASGIScope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        headers = dict(scope["headers"])
        refusal = check_request(self.policy, path, headers)
        if refusal is not None:
            self.on_refused(path, refusal.status, json.loads(refusal.body)["error"]["code"])
            head = [*refusal.headers, *SECURITY_HEADERS, (b"content-length", str(len(refusal.body)).encode())]
            await send({"type": "http.response.start", "status": refusal.status, "headers": head})
            await send({"type": "http.response.body", "body": refusal.body})
            return
        extra = PAGE_HEADERS if path in PAGE_ROUTES else SECURITY_HEADERS

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, with_headers)
