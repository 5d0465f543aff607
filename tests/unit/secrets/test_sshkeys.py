"""SSH public key sources: parsing, files, GitHub/GitLab fetching over real local HTTP(S), key pairs.

The network tests talk to real ``http.server`` instances on 127.0.0.1 (one with TLS from a throwaway
CA); the cache's age is moved with an injected clock, never by sleeping.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import os
import shutil
import socket
import ssl
import stat
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from clonebox_core.errors import AlreadyExists, CloneboxError, FailedPrecondition, InvalidArgument, Unavailable
from clonebox_core.secret import Secret
from clonebox_core.secrets.sshkeys import (
    MAX_KEYS_BYTES,
    KeyFetcher,
    KeySource,
    KeySourceKind,
    ResolvedKeys,
    generate_ed25519_keypair,
    key_fingerprint,
    key_identity,
    parse_public_key,
    read_key_file,
    resolve_ssh_keys,
    write_private_key,
)

pytestmark = pytest.mark.unit

T0 = dt.datetime(2025, 3, 1, 12, 0, tzinfo=dt.UTC)


# --- key material --------------------------------------------------------------------------------


def wire(*parts: bytes) -> bytes:
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def ed25519_line(comment: str = "") -> str:
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    line = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return f"{line} {comment}".strip()


def ecdsa_line(curve: ec.EllipticCurve) -> str:
    key = ec.generate_private_key(curve).public_key()
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def sk_ed25519_line() -> str:
    raw = (
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )
    return "sk-ssh-ed25519@openssh.com " + b64(wire(b"sk-ssh-ed25519@openssh.com", raw, b"ssh:"))


def sk_ecdsa_line() -> str:
    point = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    )
    kind = b"sk-ecdsa-sha2-nistp256@openssh.com"
    return f"{kind.decode()} " + b64(wire(kind, b"nistp256", point, b"ssh:"))


@pytest.fixture(scope="module")
def rsa_keys() -> dict[int, rsa.RSAPrivateKey]:
    return {bits: rsa.generate_private_key(public_exponent=65537, key_size=bits) for bits in (1024, 2048)}


def rsa_line(key: rsa.RSAPrivateKey) -> str:
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def no_echo(err: BaseException, *fragments: str) -> None:
    """None of ``fragments`` shows in the error's message, repr, args, metadata or chained cause."""
    texts = [str(err), repr(err), *(repr(a) for a in err.args)]
    if isinstance(err, CloneboxError):
        texts += [repr(err.metadata)]
    chained = err.__cause__ or err.__context__
    if chained is not None:
        texts += [str(chained), repr(chained)]
    for fragment in fragments:
        assert len(fragment) >= 12
        for text in texts:
            assert fragment not in text, text


def body_fragments(pem: str) -> list[str]:
    """Distinctive pieces of each base64 line of a PEM body (the part that must never be echoed)."""
    lines = [ln for ln in pem.splitlines() if ln and not ln.startswith("-----")]
    assert lines
    return [ln[20:44] for ln in lines if len(ln) >= 44]


def ssh_keygen() -> str:
    path = shutil.which("ssh-keygen")
    assert path, "ssh-keygen is missing: install openssh-client (CI installs it)"
    return path


# --- a real key server ---------------------------------------------------------------------------


class KeyServer:
    """An HTTP(S) server on 127.0.0.1:0 that serves ``routes`` and records each request path."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.routes: dict[str, tuple[int, bytes, dict[str, str]]] = {}
        self.omit_length: set[str] = set()
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append(self.path)
                status, body, headers = server.routes.get(self.path, (404, b"Not Found", {}))
                self.send_response(status)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                if self.path not in server.omit_length:
                    self.send_header("Content-Length", str(len(body)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.scheme = "https" if tls else "http"
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        # a short poll interval: shutdown() waits for the serving loop to notice
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()
        self.stopped = False

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.httpd.server_address[1]}"

    def keys(self, path: str, *lines: str) -> None:
        self.routes[path] = (200, "".join(f"{line}\n" for line in lines).encode(), {})

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.httpd.shutdown()
            self.httpd.server_close()
            self.thread.join()


@pytest.fixture
def server() -> Iterator[KeyServer]:
    srv = KeyServer()
    yield srv
    srv.stop()


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, **kwargs: float) -> None:
        self.now += dt.timedelta(**kwargs)


@pytest.fixture
def clock() -> Clock:
    return Clock()


def fetcher_for(srv_url: str, tmp_path: Path, clock: Clock, **kwargs: object) -> KeyFetcher:
    options: dict[str, object] = {
        "github_base_url": srv_url,
        "gitlab_base_url": srv_url,
        "cache_dir": tmp_path / "cache" / "ssh-keys",
        "clock": clock,
        "timeout": 5.0,
        **kwargs,
    }
    return KeyFetcher(**options)  # type: ignore[arg-type]


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# --- parse_public_key ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda r: ed25519_line(),
        lambda r: ecdsa_line(ec.SECP256R1()),
        lambda r: ecdsa_line(ec.SECP384R1()),
        lambda r: ecdsa_line(ec.SECP521R1()),
        lambda r: sk_ed25519_line(),
        lambda r: sk_ecdsa_line(),
        lambda r: rsa_line(r[2048]),
    ],
    ids=["ed25519", "nistp256", "nistp384", "nistp521", "sk-ed25519", "sk-ecdsa", "rsa2048"],
)
def test_every_supported_type_is_accepted(make: object, rsa_keys: dict[int, rsa.RSAPrivateKey]) -> None:
    line = make(rsa_keys)  # type: ignore[operator]
    parsed = parse_public_key(f"{line} me@laptop", field="k")
    assert parsed == f"{line} me@laptop"
    assert parse_public_key(parsed, field="k") == parsed


def test_line_is_normalised() -> None:
    key_type, data = ed25519_line().split()
    messy = f"  {key_type}\t {data}   alice\x1b[31m  at\u202e\x00 laptop \t\n"
    assert parse_public_key(messy, field="k") == f"{key_type} {data} alice[31m at laptop"
    assert parse_public_key(f"{key_type} {data}", field="k") == f"{key_type} {data}"


def test_keys_made_by_ssh_keygen_parse_and_fingerprints_match(tmp_path: Path) -> None:
    keygen = ssh_keygen()
    for kind, extra in (("ed25519", []), ("ecdsa", ["-b", "384"]), ("rsa", ["-b", "2048"])):
        path = tmp_path / f"id_{kind}"
        subprocess.run([keygen, "-q", "-t", kind, *extra, "-N", "", "-C", "me@host", "-f", str(path)], check=True)
        public = path.with_suffix(".pub").read_text()
        parsed = parse_public_key(public, field="k")
        assert parsed == public.strip()
        listed = subprocess.run([keygen, "-l", "-f", str(path) + ".pub"], check=True, capture_output=True, text=True)
        assert listed.stdout.split()[1] == key_fingerprint(parsed)


def test_ecdsa_wrong_curve_inside() -> None:
    point = (
        ec.generate_private_key(ec.SECP384R1())
        .public_key()
        .public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    )
    line = "ecdsa-sha2-nistp256 " + b64(wire(b"ecdsa-sha2-nistp256", b"nistp384", point))
    with pytest.raises(InvalidArgument, match="curve") as info:
        parse_public_key(line, field="k")
    assert info.value.reason == "SSH_KEY_INVALID"


def _ed_raw() -> bytes:
    return (
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )


_MALFORMED = [
    ("", "empty"),
    ("ssh-ed25519", "no key data"),
    ("ssh-ed25519 AAAA$$$$", "not base64"),
    ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI", "base64"),  # bad padding
    (f"ssh-rsa {b64(wire(b'ssh-ed25519', _ed_raw()))}", "'ssh-ed25519' key"),
    (f"ssh-ed25519 {b64(wire(b'ssh-ed25519', _ed_raw())[:-5])}", "corrupt"),
    (f"ssh-ed25519 {b64(wire(b'ssh-ed25519', _ed_raw()) + b'extra')}", "corrupt"),
    (f"ssh-ed25519 {b64(wire(b'ssh-ed25519', _ed_raw()[:31]))}", "corrupt"),
    ("ssh-ed25519 " + b64(b"\x00\x00\x01\x00ssh"), "truncated"),
    ("hello world", "not an OpenSSH public key"),
    (f"{ed25519_line()}\n{ed25519_line()}", "more than one line"),
    ("---- BEGIN SSH2 PUBLIC KEY ----\nComment: x\nAAAA\n---- END SSH2 PUBLIC KEY ----", "more than one"),
    ("---- BEGIN SSH2 PUBLIC KEY ---- AAAA", "ssh-keygen -i"),
    ("ssh-ed25519 " + "A" * 20000, "longer than"),
]


# ids by position and expected words: the keys are generated at import, so differ between xdist workers
@pytest.mark.parametrize(("line", "words"), _MALFORMED, ids=[f"{i}-{w}" for i, (_l, w) in enumerate(_MALFORMED)])
def test_malformed_keys_are_refused(line: str, words: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_public_key(line, field="auth.ssh_keys[0]")
    assert info.value.reason == "SSH_KEY_INVALID"
    assert info.value.metadata["field"] == "auth.ssh_keys[0]"
    assert info.value.message.startswith("auth.ssh_keys[0]: ")
    assert words in info.value.message


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("ssh-dss AAAAB3NzaC1kc3MAAACBAP", "DSA"),
        ("ssh-ed25519-cert-v01@openssh.com AAAAIHNzaC1lZDI1NTE5LWNlcnQ", "certificates"),
        ("ssh-xmss@openssh.com AAAA", "'ssh-xmss@openssh.com'"),
    ],
)
def test_unsupported_types_are_named(line: str, words: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_public_key(line, field="k")
    assert info.value.reason == "SSH_KEY_TYPE_UNSUPPORTED"
    assert words in info.value.message


def test_rsa_under_2048_bits_is_refused(rsa_keys: dict[int, rsa.RSAPrivateKey]) -> None:
    with pytest.raises(InvalidArgument, match="1024 bits") as info:
        parse_public_key(rsa_line(rsa_keys[1024]), field="k")
    assert info.value.reason == "SSH_KEY_TOO_WEAK"


@pytest.mark.parametrize(
    "prefix",
    ['command="echo hi"', 'no-pty,from="10.0.0.0/8"', "restrict", 'environment="A=b c"'],
)
def test_authorized_keys_options_are_refused(prefix: str) -> None:
    with pytest.raises(InvalidArgument, match="options") as info:
        parse_public_key(f"{prefix} {ed25519_line('x')}", field="k")
    assert info.value.reason == "SSH_KEY_HAS_OPTIONS"


def _private_pems() -> dict[str, str]:
    ed = ed25519.Ed25519PrivateKey.generate()
    ecc = ec.generate_private_key(ec.SECP256R1())
    openssh = ed.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    ).decode()
    return {
        "openssh": openssh,
        "pkcs8": ed.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode(),
        "traditional-ec": ecc.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        ).decode(),
        # the body of an OpenSSH private key without its armour, as one line
        "bare-body": "".join(ln for ln in openssh.splitlines() if not ln.startswith("-----")),
        "putty": "PuTTY-User-Key-File-3: ssh-ed25519\nEncryption: none\nPrivate-Lines: 1\n"
        + "QUFBQUlHWjNLY2JhN3RhbjRhcmVhbGx5c2VjcmV0c3R1ZmZoZXJl\n",
    }


PRIVATE = _private_pems()


@pytest.mark.parametrize("kind", sorted(PRIVATE))
def test_private_key_is_refused_without_echo(kind: str, tmp_path: Path) -> None:
    text = PRIVATE[kind]
    fragments = body_fragments(text) if kind != "bare-body" else [text[20:44], text[60:84]]
    with pytest.raises(InvalidArgument) as info:
        parse_public_key(text, field="auth.ssh_keys[0]")
    assert info.value.reason == "SSH_KEY_IS_PRIVATE"
    assert "private key" in info.value.message
    no_echo(info.value, *fragments)
    # pasted inline into the spec (a YAML block keeps the newlines)
    with pytest.raises(InvalidArgument) as info:
        resolve_ssh_keys([ed25519_line(), text], fetcher=KeyFetcher(cache_dir=tmp_path), base_dir=tmp_path)
    assert info.value.reason == "SSH_KEY_IS_PRIVATE"
    assert info.value.metadata["field"] == "auth.ssh_keys[1]"
    no_echo(info.value, *fragments)


def test_fingerprint_and_identity() -> None:
    line = ed25519_line("c")
    key_type, data = key_identity(line)
    assert key_type == "ssh-ed25519"
    assert f"{key_type} {data} c" == line
    assert key_fingerprint(line).startswith("SHA256:")
    assert key_fingerprint(line) != key_fingerprint(ed25519_line("c"))


# --- key sources ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "kind", "value"),
    [
        ("github:alice", KeySourceKind.GITHUB, "alice"),
        ("GitHub:Alice-B2", KeySourceKind.GITHUB, "Alice-B2"),
        ("gitlab:a.b_c-d", KeySourceKind.GITLAB, "a.b_c-d"),
        ("  github:bob \n", KeySourceKind.GITHUB, "bob"),
        ("file:keys/a.pub", KeySourceKind.FILE, "{base}/keys/a.pub"),
        ("file:/etc/ssh/x", KeySourceKind.FILE, "/etc/ssh/x"),
        ("./id.pub", KeySourceKind.FILE, "{base}/id.pub"),
        ("id_ed25519.pub", KeySourceKind.FILE, "{base}/id_ed25519.pub"),
        ("../shared/keys", KeySourceKind.FILE, "{parent}/shared/keys"),
        ("ssh-keys/team", KeySourceKind.FILE, "{base}/ssh-keys/team"),
    ],
)
def test_source_kinds(entry: str, kind: KeySourceKind, value: str, tmp_path: Path) -> None:
    base = tmp_path / "specs"
    source = KeySource.parse(entry, base_dir=base, field="f")
    assert source.kind is kind
    assert source.value == value.format(base=base, parent=tmp_path)


def test_inline_source_is_validated_and_normalised() -> None:
    line = ed25519_line("me")
    source = KeySource.parse(f"  {line.replace(' ', '   ')}\n", field="f")
    assert (source.kind, source.value) == (KeySourceKind.INLINE, line)
    assert str(source) == f"ssh-ed25519 {key_fingerprint(line)}"


@pytest.mark.parametrize(
    ("entry", "words"),
    [
        ("github:-alice", "GitHub user name"),
        ("github:alice-", "GitHub user name"),
        ("github:a/b", "GitHub user name"),
        ("github:" + "a" * 40, "GitHub user name"),
        ("github:", "GitHub user name"),
        ("gitlab:x.git", "GitLab user name"),
        ("gitlab:.hidden", "GitLab user name"),
        ("gitlab:a b", "GitLab user name"),
        ("https://github.com/alice.keys", "unknown key source 'https:'"),
        ("alice", "github:NAME"),
        ("", "empty"),
        ("   ", "empty"),
        ("file:", "names no path"),
        ("~nosuchuser-4f1a/keys.pub", "cannot expand"),
    ],
)
def test_bad_sources(entry: str, words: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument) as info:
        KeySource.parse(entry, base_dir=tmp_path, field="auth.ssh_keys[3]")
    assert info.value.reason == "SSH_KEY_SOURCE_INVALID"
    assert info.value.metadata["field"] == "auth.ssh_keys[3]"
    assert words in info.value.message


def test_tilde_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    line = ed25519_line("home")
    (home / ".ssh" / "id_ed25519.pub").write_text(line + "\n")
    monkeypatch.setenv("HOME", str(home))
    source = KeySource.parse("~/.ssh/id_ed25519.pub", base_dir=tmp_path / "elsewhere", field="f")
    assert source.value == str(home / ".ssh" / "id_ed25519.pub")
    result = resolve_ssh_keys(
        ["file:~/.ssh/id_ed25519.pub"], fetcher=KeyFetcher(cache_dir=tmp_path / "c"), base_dir=tmp_path
    )
    assert result == ResolvedKeys((line,), ())


# --- key files -----------------------------------------------------------------------------------


def test_file_with_comments_blank_lines_crlf_and_duplicates(tmp_path: Path) -> None:
    a, b = ed25519_line("a"), ecdsa_line(ec.SECP256R1())
    (tmp_path / "team.keys").write_bytes(
        (
            "\ufeff# the team's keys\r\n\r\n" + a + "\r\n   # bob\r\n" + b + "\r\n" + a.replace(" a", " again") + "\n"
        ).encode()
    )
    assert read_key_file(tmp_path / "team.keys") == (a, b)
    result = resolve_ssh_keys(["./team.keys"], fetcher=KeyFetcher(cache_dir=tmp_path / "c"), base_dir=tmp_path)
    assert result.keys == (a, b)


def test_bad_line_in_file_names_entry_path_and_line(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"# comment\n{ed25519_line()}\nssh-ed25519 AAAA$$\n")
    with pytest.raises(InvalidArgument) as info:
        resolve_ssh_keys([ed25519_line(), "file:keys"], fetcher=KeyFetcher(cache_dir=tmp_path), base_dir=tmp_path)
    err = info.value
    assert err.reason == "SSH_KEY_INVALID"
    assert err.metadata == {"field": "auth.ssh_keys[1]", "path": str(path), "line": "3"}
    assert err.message.startswith(f"auth.ssh_keys[1]: {path}, line 3: ")


def test_missing_large_empty_and_odd_files(tmp_path: Path) -> None:
    fetcher = KeyFetcher(cache_dir=tmp_path / "c")
    with pytest.raises(FailedPrecondition) as info:
        resolve_ssh_keys(["file:nope.pub"], fetcher=fetcher, base_dir=tmp_path)
    assert info.value.reason == "SSH_KEY_FILE_NOT_FOUND"
    assert str(tmp_path / "nope.pub") in info.value.message
    assert info.value.metadata["field"] == "auth.ssh_keys[0]"

    big = tmp_path / "big.pub"
    big.write_text((ed25519_line() + "\n") * (MAX_KEYS_BYTES // 80 + 10))
    assert big.stat().st_size > MAX_KEYS_BYTES
    with pytest.raises(FailedPrecondition, match="larger than") as info:
        resolve_ssh_keys(["file:big.pub"], fetcher=fetcher, base_dir=tmp_path)
    assert info.value.reason == "SSH_KEY_FILE_UNREADABLE"

    (tmp_path / "empty.pub").write_text("# nothing here yet\n\n")
    with pytest.raises(InvalidArgument, match="holds no SSH public key") as empty:
        resolve_ssh_keys(["file:empty.pub"], fetcher=fetcher, base_dir=tmp_path)
    assert empty.value.reason == "SSH_KEYS_NONE"

    (tmp_path / "dir.pub").mkdir()
    with pytest.raises(FailedPrecondition, match="not a regular file"):
        resolve_ssh_keys(["file:dir.pub"], fetcher=fetcher, base_dir=tmp_path)

    (tmp_path / "bin.pub").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(FailedPrecondition, match="not UTF-8"):
        resolve_ssh_keys(["file:bin.pub"], fetcher=fetcher, base_dir=tmp_path)


def test_private_key_file_is_refused_and_the_pub_suggested(tmp_path: Path) -> None:
    private = PRIVATE["openssh"]
    (tmp_path / "id_ed25519").write_text(private)
    (tmp_path / "id_ed25519.pub").write_text(ed25519_line() + "\n")
    with pytest.raises(InvalidArgument) as info:
        resolve_ssh_keys(["file:id_ed25519"], fetcher=KeyFetcher(cache_dir=tmp_path / "c"), base_dir=tmp_path)
    assert info.value.reason == "SSH_KEY_IS_PRIVATE"
    assert f"did you mean {tmp_path / 'id_ed25519.pub'}" in info.value.message
    no_echo(info.value, *body_fragments(private))


# --- fetching from GitHub / GitLab ---------------------------------------------------------------


def test_fetch_caches_and_a_fresh_cache_makes_no_request(server: KeyServer, tmp_path: Path, clock: Clock) -> None:
    a, b = ed25519_line("a@1"), ecdsa_line(ec.SECP384R1())
    server.keys("/alice.keys", a, b)
    fetcher = fetcher_for(server.url, tmp_path, clock)
    assert fetcher.fetch("github", "alice") == ResolvedKeys((a, b), ())
    assert server.requests == ["/alice.keys"]

    cache_dir = tmp_path / "cache" / "ssh-keys"
    assert stat.S_IMODE(cache_dir.stat().st_mode) == 0o700
    files = list(cache_dir.iterdir())
    assert len(files) == 1
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600

    server.keys("/alice.keys", a)  # changed upstream; a fresh cache does not notice
    clock.advance(hours=23)
    assert fetcher.fetch("github", "Alice").keys == (a, b)  # user names are case-insensitive
    assert server.requests == ["/alice.keys"]
    # a new fetcher (a new CLI run) uses the same cache
    assert fetcher_for(server.url, tmp_path, clock).fetch("github", "alice").keys == (a, b)
    assert len(server.requests) == 1

    clock.advance(hours=2)  # now 25 h old: stale, so asked again
    assert fetcher.fetch("github", "alice").keys == (a,)
    assert server.requests == ["/alice.keys", "/alice.keys"]


def test_cache_is_per_provider_and_base_url(tmp_path: Path, clock: Clock) -> None:
    hub, lab = KeyServer(), KeyServer()
    try:
        a, b = ed25519_line("hub"), ed25519_line("lab")
        hub.keys("/alice.keys", a)
        lab.keys("/alice.keys", b)
        fetcher = fetcher_for(hub.url, tmp_path, clock, gitlab_base_url=lab.url + "/")
        assert fetcher.fetch("github", "alice").keys == (a,)
        assert fetcher.fetch("gitlab", "alice").keys == (b,)
        assert fetcher.url("gitlab", "alice") == f"{lab.url}/alice.keys"
        # the same provider on another base URL (a self-hosted GitLab) has its own cache entry
        other = fetcher_for(hub.url, tmp_path, clock, gitlab_base_url=hub.url)
        assert other.fetch("gitlab", "alice").keys == (a,)
        assert (len(hub.requests), len(lab.requests)) == (2, 1)
    finally:
        hub.stop()
        lab.stop()


def test_stale_cache_and_server_down_gives_cached_keys_and_a_warning(
    server: KeyServer, tmp_path: Path, clock: Clock
) -> None:
    a = ed25519_line("a")
    server.keys("/alice.keys", a)
    fetcher = fetcher_for(server.url, tmp_path, clock)
    fetcher.fetch("github", "alice")
    url = fetcher.url("github", "alice")
    server.stop()
    clock.advance(days=3)
    result = fetcher.fetch("github", "alice")
    assert result.keys == (a,)
    (warning,) = result.warnings
    assert url in warning
    assert "connection refused" in warning
    assert "cached 3 days ago" in warning


def test_no_cache_and_server_down_is_unreachable(tmp_path: Path, clock: Clock) -> None:
    base = closed_port_url()
    with pytest.raises(Unavailable) as info:
        fetcher_for(base, tmp_path, clock).fetch("github", "alice")
    err = info.value
    assert err.reason == "SSH_KEYS_UNREACHABLE"
    assert f"{base}/alice.keys" in err.message
    assert "are you offline?" in err.message
    assert "inline" in err.message and "file:" in err.message
    assert err.metadata == {"url": f"{base}/alice.keys", "user": "alice"}


def test_server_that_never_answers_times_out(tmp_path: Path, clock: Clock) -> None:
    with socket.socket() as listener:  # accepts connections (kernel backlog) but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        base = f"http://127.0.0.1:{listener.getsockname()[1]}"
        with pytest.raises(Unavailable, match=r"no answer within 0\.3 s") as info:
            fetcher_for(base, tmp_path, clock, timeout=0.3).fetch("github", "alice")
    assert info.value.reason == "SSH_KEYS_UNREACHABLE"


def test_unknown_user_is_an_error_even_with_a_cached_copy(server: KeyServer, tmp_path: Path, clock: Clock) -> None:
    fetcher = fetcher_for(server.url, tmp_path, clock)
    with pytest.raises(InvalidArgument) as info:
        fetcher.fetch("gitlab", "ghost")
    assert info.value.reason == "SSH_KEYS_USER_NOT_FOUND"
    assert "no such GitLab user" in info.value.message
    server.keys("/alice.keys", ed25519_line())
    fetcher.fetch("github", "alice")
    del server.routes["/alice.keys"]  # the account was deleted or renamed
    clock.advance(days=2)
    with pytest.raises(InvalidArgument) as info:
        fetcher.fetch("github", "alice")
    assert info.value.reason == "SSH_KEYS_USER_NOT_FOUND"


def test_user_without_keys(server: KeyServer, tmp_path: Path, clock: Clock) -> None:
    server.routes["/alice.keys"] = (200, b"", {})
    with pytest.raises(InvalidArgument) as info:
        fetcher_for(server.url, tmp_path, clock).fetch("github", "alice")
    assert info.value.reason == "SSH_KEYS_NONE"
    assert "GitHub user alice has no usable SSH key" in info.value.message
    assert not (tmp_path / "cache" / "ssh-keys").exists()  # nothing cached


@pytest.mark.parametrize(
    "body",
    [
        f"{ed25519_line()}\nssh-ed25519 AAAA$$not-a-key\n".encode(),
        b"<!doctype html>\n<html><body>Sign in to the hotel Wi-Fi</body></html>\n",
        b"\xff\xfe not text",
    ],
    ids=["one-bad-line", "captive-portal", "not-utf8"],
)
def test_an_answer_that_is_not_a_key_list(body: bytes, server: KeyServer, tmp_path: Path, clock: Clock) -> None:
    good = ed25519_line("cached")
    server.routes["/alice.keys"] = (200, body, {})
    fetcher = fetcher_for(server.url, tmp_path, clock)
    with pytest.raises(Unavailable) as info:
        fetcher.fetch("github", "alice")
    assert info.value.reason == "SSH_KEYS_BAD_RESPONSE"
    assert "nothing is cached" in info.value.message
    # with a (stale) cached copy, the copy stands in, with a warning
    server.keys("/alice.keys", good)
    fetcher.fetch("github", "alice")
    server.routes["/alice.keys"] = (200, body, {})
    clock.advance(days=1, minutes=1)
    result = fetcher.fetch("github", "alice")
    assert result.keys == (good,)
    assert len(result.warnings) == 1 and "cached 24 hours ago" in result.warnings[0]
    assert len(server.requests) == 3


def test_unsupported_and_weak_keys_are_skipped_with_a_warning(
    server: KeyServer, tmp_path: Path, clock: Clock, rsa_keys: dict[int, rsa.RSAPrivateKey]
) -> None:
    good = ed25519_line()
    server.keys("/alice.keys", "ssh-dss AAAAB3NzaC1kc3MAAACBAP", rsa_line(rsa_keys[1024]), good)
    fetcher = fetcher_for(server.url, tmp_path, clock)
    result = fetcher.fetch("github", "alice")
    assert result.keys == (good,)
    assert len(result.warnings) == 2
    assert "github:alice: skipped key 1: DSA" in result.warnings[0]
    assert "skipped key 2: RSA key of 1024 bits" in result.warnings[1]
    assert fetcher.fetch("github", "alice") == result  # from the cache, same warnings

    server.keys("/bob.keys", rsa_line(rsa_keys[1024]))
    with pytest.raises(InvalidArgument, match="RSA key of 1024 bits") as info:
        fetcher.fetch("github", "bob")
    assert info.value.reason == "SSH_KEYS_NONE"


@pytest.mark.parametrize("with_length", [True, False])
def test_oversized_answer(with_length: bool, server: KeyServer, tmp_path: Path, clock: Clock) -> None:
    server.routes["/alice.keys"] = (200, (ed25519_line() + "\n").encode() * 1000, {})
    if not with_length:
        server.omit_length.add("/alice.keys")
    with pytest.raises(Unavailable, match=f"larger than {MAX_KEYS_BYTES} bytes") as info:
        fetcher_for(server.url, tmp_path, clock).fetch("github", "alice")
    assert info.value.reason == "SSH_KEYS_BAD_RESPONSE"


def test_server_error(server: KeyServer, tmp_path: Path, clock: Clock) -> None:
    server.routes["/alice.keys"] = (503, b"busy", {})
    fetcher = fetcher_for(server.url, tmp_path, clock)
    with pytest.raises(Unavailable, match="HTTP 503") as info:
        fetcher.fetch("github", "alice")
    assert info.value.reason == "SSH_KEYS_UNREACHABLE"


def test_loopback_is_never_sent_to_a_proxy(
    server: KeyServer, tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead_proxy = closed_port_url()
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, dead_proxy)
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    server.keys("/alice.keys", a := ed25519_line())
    assert fetcher_for(server.url, tmp_path, clock).fetch("github", "alice").keys == (a,)


def test_invalid_user_makes_no_request(server: KeyServer, tmp_path: Path, clock: Clock) -> None:
    fetcher = fetcher_for(server.url, tmp_path, clock)
    for user in ("../etc/passwd", "a/b", "", "x?y"):
        with pytest.raises(InvalidArgument) as info:
            fetcher.fetch("github", user)
        assert info.value.reason == "SSH_KEY_SOURCE_INVALID"
    with pytest.raises(ValueError, match="unknown key provider"):
        fetcher.fetch("bitbucket", "alice")
    assert server.requests == []


@pytest.mark.parametrize(
    "url",
    ["http://github.com", "ftp://127.0.0.1", "file:///etc", "https://user:pw@github.com", "https://x.org/?a=1"],
)
def test_base_url_must_be_https_unless_loopback(url: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument) as info:
        KeyFetcher(gitlab_base_url=url, cache_dir=tmp_path)
    assert info.value.reason == "SSH_KEYS_BASE_URL_INVALID"
    assert info.value.metadata["field"] == "gitlab_base_url"
    KeyFetcher(github_base_url="http://127.0.0.1:1", gitlab_base_url="http://[::1]:2", cache_dir=tmp_path)


def test_cache_others_can_write_or_that_is_corrupt_is_not_trusted(
    server: KeyServer, tmp_path: Path, clock: Clock
) -> None:
    a = ed25519_line("a")
    server.keys("/alice.keys", a)
    fetcher = fetcher_for(server.url, tmp_path, clock)
    fetcher.fetch("github", "alice")
    (cache_file,) = (tmp_path / "cache" / "ssh-keys").iterdir()

    cache_file.chmod(0o666)  # anyone could have put their key in
    assert fetcher.fetch("github", "alice").keys == (a,)
    assert len(server.requests) == 2
    assert stat.S_IMODE(cache_file.stat().st_mode) == 0o600  # rewritten

    cache_file.write_text(cache_file.read_text().replace(a.split()[1][:30], "A" * 30))
    assert fetcher.fetch("github", "alice").keys == (a,)
    assert len(server.requests) == 3

    cache_file.write_text("{not json")
    assert fetcher.fetch("github", "alice").keys == (a,)
    assert len(server.requests) == 4
    assert fetcher.fetch("github", "alice").keys == (a,)
    assert len(server.requests) == 4  # intact again


def test_existing_cache_folder_is_made_private(server: KeyServer, tmp_path: Path, clock: Clock) -> None:
    folder = tmp_path / "cache" / "ssh-keys"
    folder.mkdir(parents=True)
    folder.chmod(0o755)
    server.keys("/alice.keys", ed25519_line())
    fetcher_for(server.url, tmp_path, clock).fetch("github", "alice")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


# --- HTTPS ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1: (ca.pem, server.pem, server.key)."""
    folder = tmp_path_factory.mktemp("tls")
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "throwaway test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_pem, cert_pem, key_pem = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return ca_pem, cert_pem, key_pem


@pytest.fixture
def tls_server(tls_files: tuple[Path, Path, Path]) -> Iterator[KeyServer]:
    _, cert_pem, key_pem = tls_files
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_pem, key_pem)
    srv = KeyServer(tls=context)
    yield srv
    srv.stop()


def test_https_with_a_trusted_private_ca(
    tls_server: KeyServer, tls_files: tuple[Path, Path, Path], tmp_path: Path, clock: Clock
) -> None:
    a = ed25519_line("tls")
    tls_server.keys("/alice.keys", a)
    tls_server.routes["/old-name.keys"] = (301, b"", {"Location": "/alice.keys"})
    trusting = ssl.create_default_context(cafile=str(tls_files[0]))
    fetcher = fetcher_for(tls_server.url, tmp_path, clock, ssl_context=trusting)
    assert tls_server.url.startswith("https://")
    assert fetcher.fetch("gitlab", "alice").keys == (a,)
    assert fetcher.fetch("gitlab", "old-name").keys == (a,)  # an HTTPS redirect is followed
    assert tls_server.requests == ["/alice.keys", "/old-name.keys", "/alice.keys"]


def test_https_with_an_untrusted_certificate_fails(tls_server: KeyServer, tmp_path: Path, clock: Clock) -> None:
    tls_server.keys("/alice.keys", ed25519_line())
    with pytest.raises(Unavailable, match="certificate verification failed") as info:
        fetcher_for(tls_server.url, tmp_path, clock).fetch("gitlab", "alice")  # system trust store only
    assert info.value.reason == "SSH_KEYS_UNREACHABLE"
    assert tls_server.requests == []


def test_redirect_from_https_to_plain_http_is_refused(
    tls_server: KeyServer, server: KeyServer, tls_files: tuple[Path, Path, Path], tmp_path: Path, clock: Clock
) -> None:
    server.keys("/alice.keys", ed25519_line())
    tls_server.routes["/alice.keys"] = (302, b"", {"Location": f"{server.url}/alice.keys"})
    trusting = ssl.create_default_context(cafile=str(tls_files[0]))
    with pytest.raises(Unavailable, match="refused a redirect to a non-HTTPS URL") as info:
        fetcher_for(tls_server.url, tmp_path, clock, ssl_context=trusting).fetch("github", "alice")
    assert info.value.reason == "SSH_KEYS_UNREACHABLE"
    assert tls_server.requests == ["/alice.keys"]
    assert server.requests == []


# --- resolve_ssh_keys ----------------------------------------------------------------------------


def test_resolve_mixed_sources_in_order_without_duplicates(server: KeyServer, tmp_path: Path, clock: Clock) -> None:
    a, b, c = ed25519_line("a"), ecdsa_line(ec.SECP256R1()), ed25519_line("c")
    server.keys("/alice.keys", a.replace(" a", ""), b)  # same key as the inline one, without its comment
    (tmp_path / "more.pub").write_text(f"{c}\n{b}\n")
    result = resolve_ssh_keys(
        [a, "github:alice", "more.pub"], fetcher=fetcher_for(server.url, tmp_path, clock), base_dir=tmp_path
    )
    assert result == ResolvedKeys((a, b, c), ())
    assert resolve_ssh_keys([], fetcher=fetcher_for(server.url, tmp_path, clock), base_dir=None) == ResolvedKeys()


def test_each_error_names_its_entry(server: KeyServer, tmp_path: Path, clock: Clock) -> None:
    server.keys("/alice.keys", ed25519_line())
    good = ed25519_line()
    fetcher = fetcher_for(server.url, tmp_path, clock)
    cases: list[tuple[list[str], type[CloneboxError], str]] = [
        ([good, good, "ssh-ed25519 AAAA$$"], InvalidArgument, "auth.ssh_keys[2]"),
        ([good, "github:-x"], InvalidArgument, "auth.ssh_keys[1]"),
        (["github:alice", good, "gitlab:ghost"], InvalidArgument, "auth.ssh_keys[2]"),
        (["file:missing.pub"], FailedPrecondition, "auth.ssh_keys[0]"),
    ]
    for entries, error, field in cases:
        with pytest.raises(error) as info:
            resolve_ssh_keys(entries, fetcher=fetcher, base_dir=tmp_path)
        assert info.value.metadata["field"] == field
        assert info.value.message.startswith(f"{field}: ")
    offline = fetcher_for(closed_port_url(), tmp_path / "other", clock)
    with pytest.raises(Unavailable) as unavailable:
        resolve_ssh_keys([good, "gitlab:bob"], fetcher=offline, base_dir=tmp_path, field="spec.auth.ssh_keys")
    assert unavailable.value.metadata["field"] == "spec.auth.ssh_keys[1]"
    assert unavailable.value.reason == "SSH_KEYS_UNREACHABLE"
    assert unavailable.value.metadata["user"] == "bob"


def test_a_user_named_twice_is_fetched_once_and_cache_failures_warn(
    server: KeyServer, tmp_path: Path, clock: Clock
) -> None:
    a = ed25519_line()
    server.keys("/alice.keys", a)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    fetcher = fetcher_for(server.url, tmp_path, clock, cache_dir=blocker / "ssh-keys")
    result = resolve_ssh_keys(["github:alice", "github:ALICE"], fetcher=fetcher, base_dir=tmp_path)
    assert result.keys == (a,)
    assert server.requests == ["/alice.keys"]
    (warning,) = result.warnings
    assert warning.startswith(f"not caching SSH keys in {blocker / 'ssh-keys'}")


def test_resolve_refuses_a_plain_string(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        resolve_ssh_keys("github:alice", fetcher=KeyFetcher(cache_dir=tmp_path), base_dir=tmp_path)


# --- generated key pairs -------------------------------------------------------------------------


def test_generated_key_pair(tmp_path: Path) -> None:
    private, public = generate_ed25519_keypair("clonebox@web\x07")
    assert isinstance(private, Secret)
    assert "OPENSSH PRIVATE KEY" not in repr(private) + str(private)
    assert public.endswith(" clonebox@web")
    assert parse_public_key(public, field="k") == public

    loaded = serialization.load_ssh_private_key(private.reveal().encode(), password=None)
    assert isinstance(loaded, ed25519.Ed25519PrivateKey)
    derived = loaded.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    assert key_identity(public) == tuple(derived.decode().split())

    path = tmp_path / "keys" / "id_ed25519"
    write_private_key(path, private)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert path.read_text() == private.reveal()
    out = subprocess.run([ssh_keygen(), "-y", "-f", str(path)], check=True, capture_output=True, text=True)
    assert key_identity(parse_public_key(out.stdout, field="k")) == key_identity(public)

    other_private, other_public = generate_ed25519_keypair("")
    assert other_private != private
    assert key_identity(other_public) != key_identity(public)
    assert other_public == " ".join(key_identity(other_public))


def test_write_private_key_never_overwrites_or_follows_links(tmp_path: Path) -> None:
    private, _ = generate_ed25519_keypair("x")
    path = tmp_path / "id"
    path.write_text("keep me")
    with pytest.raises(AlreadyExists) as info:
        write_private_key(path, private)
    assert info.value.reason == "SSH_KEY_FILE_EXISTS"
    assert path.read_text() == "keep me"
    no_echo(info.value, *body_fragments(private.reveal()))

    target = tmp_path / "target"
    link = tmp_path / "link"
    link.symlink_to(target)  # dangling: O_EXCL must not create the target through it
    with pytest.raises(AlreadyExists):
        write_private_key(link, private)
    assert not target.exists()

    with pytest.raises(TypeError):
        write_private_key(tmp_path / "plain", private.reveal())  # type: ignore[arg-type]
    assert not (tmp_path / "plain").exists()


def test_write_private_key_mode_ignores_a_permissive_umask(tmp_path: Path) -> None:
    private, _ = generate_ed25519_keypair("x")
    old = os.umask(0)
    try:
        write_private_key(tmp_path / "new" / "id", private)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new" / "id").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o700
