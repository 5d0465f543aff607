"""A FAKE HashiCorp Vault HTTP server for the Vault provider's tests. It is NOT Vault.

No real Vault server can be installed on this machine (Vault is not packaged in Debian and there is no
PyPI server package), so the tests run against this fake. It replays the small part of Vault's documented
HTTP API that :class:`~clonebox_core.secrets.providers.VaultProvider` uses, with the status codes and
JSON shapes of the API documentation:

- KV version 2 read, ``GET /v1/:mount/data/:path`` (https://developer.hashicorp.com/vault/api-docs/secret/kv/kv-v2):
  ``200 {"data": {"data": {...}, "metadata": {"created_time", "custom_metadata", "deletion_time",
  "destroyed", "version"}}, ...}``; ``404 {"errors": []}`` for a path with no secret; ``404`` with the
  version metadata (``deletion_time`` set) and ``"data": null`` when the newest version was deleted;
  ``404 {"errors": ["no handler for route ..."]}`` for a mount that does not exist;
- AppRole login, ``POST /v1/auth/:mount/login`` with ``{"role_id", "secret_id"}``
  (https://developer.hashicorp.com/vault/api-docs/auth/approle): ``200 {"auth": {"client_token",
  "accessor", "policies", "token_policies", "metadata", "lease_duration", "renewable", ...}}``, or
  ``400 {"errors": ["invalid role or secret ID"]}``;
- a missing, unknown, revoked or expired token, or one whose policy does not cover the path:
  ``403 {"errors": ["permission denied"]}``; a sealed server: ``503 {"errors": ["Vault is sealed"]}``.

Policies are reduced to a set of readable secret paths (``mount/path``) per token, or ``"*"`` for all.
Token expiry is in the hands of the test (:meth:`FakeVault.revoke_all`), so nothing waits on a clock.
Every request is recorded (method, path, headers) so tests can check what the client sent.
"""

from __future__ import annotations

import json
import secrets
import ssl
import threading
import urllib.parse
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ALL = "*"


@dataclass
class Recorded:
    """One request the fake received."""

    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any] | None = None


@dataclass
class KvSecret:
    """The newest version of one KV v2 secret."""

    data: dict[str, Any]
    version: int = 1
    deleted: bool = False
    destroyed: bool = False


@dataclass
class AppRole:
    """An AppRole's credentials and the policy its tokens get."""

    role_name: str
    secret_id: str
    readable: set[str] | str = ALL


@dataclass
class FakeVault:
    """A FAKE Vault (see the module docstring), served on 127.0.0.1 on a free port in a thread."""

    tls: ssl.SSLContext | None = None
    #: KV v2 mounts and their secrets: ``{"secret": {"apps/web": KvSecret(...)}}``
    mounts: dict[str, dict[str, KvSecret]] = field(default_factory=lambda: {"secret": {}})
    #: token -> readable ``mount/path`` set (or ALL)
    tokens: dict[str, set[str] | str] = field(default_factory=dict)
    #: AppRole auth mounts -> role_id -> AppRole
    approles: dict[str, dict[str, AppRole]] = field(default_factory=lambda: {"approle": {}})
    #: the lease_duration (seconds) of tokens issued by AppRole logins
    lease_duration: int = 60
    #: when set, every request must carry this ``X-Vault-Namespace`` (otherwise: 404, as in a wrong namespace)
    namespace: str | None = None
    #: when True every request answers 503 "Vault is sealed"
    sealed: bool = False
    #: when set, every request answers 307 to this address (what a standby node without forwarding does)
    redirect: str | None = None
    requests: list[Recorded] = field(default_factory=list)
    logins: int = 0
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    # --- test controls -------------------------------------------------------------------------------

    def put(self, path: str, data: dict[str, Any], *, mount: str = "secret") -> None:
        """Write a new version of ``mount/path`` (like ``vault kv put``)."""
        old = self.mounts[mount].get(path)
        self.mounts[mount][path] = KvSecret(dict(data), version=(old.version + 1) if old else 1)

    def add_token(self, token: str, readable: set[str] | str = ALL) -> None:
        """A token that may read ``readable`` (``mount/path`` strings, or ALL)."""
        self.tokens[token] = readable

    def add_approle(
        self, role_id: str, secret_id: str, readable: set[str] | str = ALL, *, mount: str = "approle"
    ) -> None:
        """An AppRole whose login gives tokens that may read ``readable``."""
        roles = self.approles.setdefault(mount, {})
        roles[role_id] = AppRole(f"role-{len(roles)}", secret_id, readable)

    def revoke_all(self) -> None:
        """Revoke every token (what a token's expiry or ``vault token revoke`` does server-side)."""
        self.tokens.clear()

    # --- serving -------------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    @property
    def addr(self) -> str:
        """The address to give the client (``VAULT_ADDR``)."""
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def start(self) -> FakeVault:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        server.daemon_threads = True
        if self.tls is not None:
            server.socket = self.tls.wrap_socket(server.socket, server_side=True)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.02}, name="fake-vault", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeVault:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- the protocol --------------------------------------------------------------------------------

    def answer(self, method: str, path: str, headers: dict[str, str], body: dict[str, Any] | None) -> tuple[int, Any]:
        """Status and JSON body for one request, as Vault's API documentation describes them."""
        self.requests.append(Recorded(method, path, headers, body))
        if self.sealed:
            return 503, {"errors": ["Vault is sealed"]}
        if not path.startswith("/v1/"):
            return 404, {"errors": []}
        if self.namespace is not None and headers.get("x-vault-namespace") != self.namespace:
            return 404, {"errors": [f"no handler for route {path[4:]!r}. route entry not found."]}
        route = urllib.parse.unquote(path[4:])  # Vault routes on the decoded path
        if method == "POST" and route.startswith("auth/") and route.endswith("/login"):
            return self._login(route[len("auth/") : -len("/login")], body)
        if method == "GET":
            mount, _, rest = route.partition("/")
            if mount in self.mounts and rest.startswith("data/"):
                return self._kv_read(mount, rest[len("data/") :], headers.get("x-vault-token"))
            if self._readable(headers.get("x-vault-token")) is None:
                return 403, {"errors": ["permission denied"]}
        return 404, {"errors": [f"no handler for route {route!r}. route entry not found."]}

    def _readable(self, token: str | None) -> set[str] | str | None:
        return self.tokens.get(token) if token else None

    def _kv_read(self, mount: str, secret_path: str, token: str | None) -> tuple[int, Any]:
        readable = self._readable(token)
        if readable is None or (readable != ALL and f"{mount}/{secret_path}" not in readable):
            return 403, {"errors": ["1 error occurred:\n\t* permission denied\n\n"]}
        stored = self.mounts[mount].get(secret_path)
        if stored is None:
            return 404, {"errors": []}
        metadata = {
            "created_time": "2026-01-01T00:00:00.000000Z",
            "custom_metadata": None,
            "deletion_time": "2026-01-02T00:00:00.000000Z" if stored.deleted or stored.destroyed else "",
            "destroyed": stored.destroyed,
            "version": stored.version,
        }
        if stored.deleted or stored.destroyed:
            return 404, _envelope({"data": None, "metadata": metadata})
        return 200, _envelope({"data": dict(stored.data), "metadata": metadata})

    def _login(self, mount: str, body: dict[str, Any] | None) -> tuple[int, Any]:
        roles = self.approles.get(mount)
        if roles is None:
            return 404, {"errors": [f"no handler for route 'auth/{mount}/login'. route entry not found."]}
        if not isinstance(body, dict) or not body.get("role_id"):
            return 400, {"errors": ["missing role_id"]}
        role = roles.get(str(body["role_id"]))
        if role is None or body.get("secret_id") != role.secret_id:
            return 400, {"errors": ["invalid role or secret ID"]}
        self.logins += 1
        token = "hvs." + secrets.token_urlsafe(24)
        self.tokens[token] = role.readable
        policies = ["default", role.role_name]
        return 200, {
            **_envelope(None),
            "auth": {
                "client_token": token,
                "accessor": secrets.token_urlsafe(18),
                "policies": policies,
                "token_policies": policies,
                "metadata": {"role_name": role.role_name},
                "lease_duration": self.lease_duration,
                "renewable": True,
                "entity_id": str(uuid.uuid4()),
                "token_type": "service",
                "orphan": True,
                "mfa_requirement": None,
                "num_uses": 0,
            },
        }


def _envelope(data: Any) -> dict[str, Any]:
    """The fields every Vault response carries around ``data``."""
    return {
        "request_id": str(uuid.uuid4()),
        "lease_id": "",
        "renewable": False,
        "lease_duration": 0,
        "data": data,
        "wrap_info": None,
        "warnings": None,
        "auth": None,
        "mount_type": "kv",
    }


def _handler_for(vault: FakeVault) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet

        def _serve(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = None
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, doc = vault.answer(method, self.path, headers, body)
            payload = json.dumps(doc).encode()
            if vault.redirect is not None:
                status, payload = 307, b""
            self.send_response(status)
            if vault.redirect is not None:
                self.send_header("Location", vault.redirect + self.path)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self) -> None:
            self._serve("GET")

        def do_POST(self) -> None:
            self._serve("POST")

    return Handler
