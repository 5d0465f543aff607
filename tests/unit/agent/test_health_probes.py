"""Probe kinds of the agent's health runner: network probes against real local servers, guest probes on
the fake hypervisor, resource figures from scripted counters, and host scripts from a real folder."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import os
import shutil
import socket
import ssl
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from clonebox_agent.adapters.common import QEMU_CAPABILITIES
from clonebox_agent.adapters.fake import FakeHypervisor
from clonebox_agent.app.probes import (
    CpuMeter,
    StatsSampler,
    http_probe,
    http_request,
    judge_http,
    tcp_probe,
)
from clonebox_agent.ports import Capability, DomainStats, GuestExecResult, GuestFilesystem, ProbeTarget
from clonebox_core import errors
from clonebox_core.health import (
    Band,
    CommandProbe,
    FileProbe,
    HealthState,
    HttpProbe,
    Probe,
    ProbeType,
    ResourceProbe,
    Sample,
    ScriptProbe,
)

H = HealthState
LOCAL = (ProbeTarget("127.0.0.1", ""),)


def check(env: Any, vm: str, name: str) -> Any:
    return next(c for c in env.mon.health(vm).checks if c.name == name)


# ---------------------------------------------------------------------------------- http and tcp


def test_request_is_http10_to_the_vm_address_with_close() -> None:
    p = HttpProbe(port=8080, path="/h?x=1", method="POST", headers=(("X-Probe", "cb"),))
    req = http_request(p, ProbeTarget("fd00::5%virbr1", "virbr1")).decode()
    assert req.startswith("POST /h?x=1 HTTP/1.0\r\nHost: [fd00::5]:8080\r\nX-Probe: cb\r\n")
    assert "Content-Length: 0\r\n" in req and req.endswith("Connection: close\r\n\r\n")


@pytest.mark.parametrize(
    ("response", "probe", "sample", "detail"),
    [
        (b"HTTP/1.1 204 No Content\r\n\r\n", HttpProbe(expect_status=(200, 204)), Sample.PASS, "status 204"),
        (b"HTTP/1.0 500 Oops\r\n\r\nok", HttpProbe(), Sample.FAIL, "status 500, expected 200"),
        (b"HTTP/1.0 200 OK\r\n\r\nnope", HttpProbe(body_regex="ok$"), Sample.FAIL, "body does not match"),
        (b"SSH-2.0-OpenSSH\r\n", HttpProbe(), Sample.FAIL, "not an HTTP response"),
        (b"", HttpProbe(), Sample.FAIL, "empty response"),
    ],
)
def test_judge_http(response: bytes, probe: HttpProbe, sample: Sample, detail: str) -> None:
    found = judge_http(probe, response)
    assert found.sample is sample and detail in found.detail


async def _serve(host: str, body: bytes = b"fine", ssl_ctx: ssl.SSLContext | None = None) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.0 200 OK\r\n\r\n" + body)
        await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, host, 0, ssl=ssl_ctx)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_tcp_open_and_closed_port() -> None:
    server = await _serve("127.0.0.1")
    port = server.sockets[0].getsockname()[1]
    try:
        assert (await tcp_probe(port, LOCAL)).sample is Sample.PASS
    finally:
        server.close()
        await server.wait_closed()
    closed = await tcp_probe(_free_port(), LOCAL)
    assert closed.sample is Sample.FAIL and "connection refused" in closed.detail


async def test_ipv6_target() -> None:
    try:
        server = await _serve("::1")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    port = server.sockets[0].getsockname()[1]
    try:
        found = await http_probe(HttpProbe(port=port, body_regex="fine"), (ProbeTarget("::1", ""),))
        assert found.sample is Sample.PASS and found.detail == "[::1]: status 200"
    finally:
        server.close()
        await server.wait_closed()


async def test_bound_to_the_target_interface_and_never_unbound_on_failure() -> None:
    server = await _serve("127.0.0.1")
    port = server.sockets[0].getsockname()[1]
    try:
        missing = await tcp_probe(port, (ProbeTarget("127.0.0.1", "cbnosuch0"),))
        assert missing.sample is Sample.FAIL and "cannot bind to interface cbnosuch0" in missing.detail
        if os.geteuid() == 0:  # binding to a device needs CAP_NET_RAW
            assert (await tcp_probe(port, (ProbeTarget("127.0.0.1", "lo"),))).sample is Sample.PASS
    finally:
        server.close()
        await server.wait_closed()


async def test_targets_are_addresses_never_names() -> None:
    found = await tcp_probe(80, (ProbeTarget("localhost", ""),))
    assert found.sample is Sample.FAIL and "is not an IP address" in found.detail


async def test_any_target_that_answers_passes() -> None:
    server = await _serve("127.0.0.1")
    port = server.sockets[0].getsockname()[1]
    try:
        found = await http_probe(HttpProbe(port=port), (ProbeTarget("127.0.0.2", "cbnosuch0"), *LOCAL))
        assert found.sample is Sample.PASS and found.detail.startswith("127.0.0.1:")
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture
def tls_server_ctx(tmp_path: Path) -> ssl.SSLContext:
    """A self-signed certificate for 127.0.0.1 (an IP SAN), in a server context."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vm")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "k.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
    return ctx


async def test_https_verifies_unless_told_not_to(tls_server_ctx: ssl.SSLContext) -> None:
    server = await _serve("127.0.0.1", ssl_ctx=tls_server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        unverified = await http_probe(HttpProbe(port=port, scheme="https", tls_verify=False), LOCAL)
        assert unverified.sample is Sample.PASS
        verified = await http_probe(HttpProbe(port=port, scheme="https"), LOCAL)
        assert verified.sample is Sample.FAIL and "certificate not accepted" in verified.detail
    finally:
        server.close()
        await server.wait_closed()


# -------------------------------------------------------------------------------------- guest probes


async def test_command_probe_exit_code_and_output_regex(env: Any) -> None:
    answers = {"ok": GuestExecResult(0, b"accepting connections\n"), "bad": GuestExecResult(2, b"")}
    env.fake.guest_exec_handler = lambda vm, argv, stdin: answers[argv[1]]

    def cmd(name: str, arg: str, regex: str = "") -> Probe:
        return Probe(name, ProbeType.COMMAND, command=CommandProbe(("pg_isready", arg), output_regex=regex))

    await env.create("db", cmd("up", "ok", "accepting"), cmd("down", "bad"), cmd("quiet", "ok", "^ready"))
    results, _ = await env.mon.check_now("db")
    assert [(r.sample, r.detail) for r in results] == [
        (Sample.PASS, "exit 0"),
        (Sample.FAIL, "exit 2, expected 0"),
        (Sample.FAIL, "exit 0, output does not match '^ready'"),
    ]


async def test_file_probe(env: Any) -> None:
    def f(name: str, path: str, regex: str = "") -> Probe:
        return Probe(name, ProbeType.FILE, file=FileProbe(path, regex))

    await env.create("web", f("a", "/run/ready", "^ok"), f("b", "/run/ready", "^no"), f("c", "/gone"), f("d", "/e"))
    env.fake.guest_file_contents["web"] = {"/run/ready": b"ok\n"}
    env.fake.guest_files["web"] = {"/e"}
    results, _ = await env.mon.check_now("web")
    assert [(r.sample, r.detail) for r in results] == [
        (Sample.PASS, "present"),
        (Sample.FAIL, "content does not match '^no'"),
        (Sample.FAIL, "no such file: /gone"),
        (Sample.PASS, "present"),
    ]


async def test_guest_agent_probe(env: Any) -> None:
    await env.create("web", Probe("ga", ProbeType.GUEST_AGENT))
    await env.tick(0)
    assert check(env, "web", "ga").state is H.HEALTHY
    env.fake.guest_agent_down.add("web")
    (r,), _ = await env.mon.check_now("web")
    assert r.sample is Sample.FAIL and "does not answer" in r.detail


async def test_hypervisor_down_is_no_data(env: Any) -> None:
    await env.create("web", Probe("ga", ProbeType.GUEST_AGENT))
    env.fake.set_serving(False)
    (r,), _ = await env.mon.check_now("web")
    assert r.sample is Sample.NO_DATA and r.detail.startswith("hypervisor unavailable")


# ----------------------------------------------------------------------------------- resource probes


def res(**bands: Band) -> Probe:
    return Probe("load", ProbeType.RESOURCE, interval_ms=1000, timeout_ms=500, resource=ResourceProbe(**bands))


async def test_resource_cpu_memory_and_warn_band_degrades(env: Any) -> None:
    await env.create("web", res(cpu=Band(80, 95), memory=Band(50, 90)))
    c = env.fake.domain_counters
    c["web"] = DomainStats(
        "web", sampled_at=100.0, vcpus=2, cpu_time_ns=0, memory_available_kib=1000, memory_unused_kib=600
    )
    await env.tick(0)
    load = check(env, "web", "load")
    # the first sample has no CPU rate yet; memory alone passes
    assert (load.last.sample, load.last.detail) == (Sample.PASS, "cpu n/a (first sample) memory 40%")
    assert load.state is H.HEALTHY
    # 10 s later: 10 s of CPU time over 2 vCPUs is 50 %; memory 60 % is in its warning band
    c["web"] = DomainStats("web", 110.0, 2, cpu_time_ns=10 * 10**9, memory_available_kib=1000, memory_unused_kib=400)
    await env.tick(1)
    load = check(env, "web", "load")
    assert (load.last.sample, load.last.detail, load.state) == (Sample.WARN, "cpu 50% memory 60%", H.DEGRADED)
    assert env.mon.health("web").state is H.DEGRADED
    c["web"] = DomainStats("web", 111.0, 2, cpu_time_ns=10 * 10**9 + 2 * 10**9 * 96 // 100)
    await env.tick(1)
    assert check(env, "web", "load").last.detail == "cpu 96% memory n/a"
    assert check(env, "web", "load").last.sample is Sample.FAIL


async def test_resource_disk_from_guest_filesystems(env: Any) -> None:
    await env.create("web", res(disk=Band(80, 95)))
    env.fake.guest_fs["web"] = (GuestFilesystem("/", "ext4", 50, 100), GuestFilesystem("/var", "xfs", 90, 100))
    await env.tick(0)
    assert check(env, "web", "load").last.detail == "disk 90%"
    assert check(env, "web", "load").last.sample is Sample.WARN
    env.fake.guest_agent_down.add("web")
    (r,), _ = await env.mon.check_now("web")
    assert (r.sample, r.detail) == (Sample.NO_DATA, "disk n/a")


async def test_resource_without_real_stats_is_unknown(env_factory: Any) -> None:
    e = await env_factory(fake=FakeHypervisor(host_name="h", capabilities=QEMU_CAPABILITIES - {Capability.REAL_STATS}))
    await e.create("web", res(cpu=Band(80, 95)))
    e.fake.domain_counters["web"] = DomainStats("web", 1.0, 1, cpu_time_ns=5)
    await e.tick(0)
    load = check(e, "web", "load")
    assert load.state is H.UNKNOWN and load.last.sample is Sample.NO_DATA
    assert load.last.detail.startswith("statistics unavailable")


async def test_one_bulk_stats_call_per_cycle_for_twenty_vms(env: Any) -> None:
    for i in range(20):
        await env.create(f"vm{i}", res(cpu=Band(80, 95)))
        env.fake.domain_counters[f"vm{i}"] = DomainStats(f"vm{i}", 1.0, 1, cpu_time_ns=0)
    for cycle in range(1, 4):
        assert await env.tick(0 if cycle == 1 else 1) == 20
        assert env.fake.calls["domain_stats"] == cycle


async def test_sampler_shares_a_refresh_and_caches_it() -> None:
    calls = 0
    gate = asyncio.Event()
    now = [0.0]

    async def fetch() -> dict[str, DomainStats]:
        nonlocal calls
        calls += 1
        await gate.wait()
        return {}

    sampler = StatsSampler(fetch, lambda: now[0])
    sampler.min_age = 5
    waiting = [asyncio.create_task(sampler.get()) for _ in range(10)]
    await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(*waiting)
    now[0] = 4.9
    await sampler.get()
    assert calls == 1
    now[0] = 5.0
    await sampler.get()
    assert calls == 2


def test_cpu_meter_counter_reset_is_a_first_sample() -> None:
    m = CpuMeter()
    assert m.percent("v", DomainStats("v", 1.0, 1, cpu_time_ns=5 * 10**9)) == (None, "first sample")
    assert m.percent("v", DomainStats("v", 2.0, 1, cpu_time_ns=5 * 10**9 + 25 * 10**7))[0] == pytest.approx(25.0)
    assert m.percent("v", DomainStats("v", 3.0, 1, cpu_time_ns=1)) == (None, "first sample")  # a new QEMU


# -------------------------------------------------------------------------------------- script probes


@pytest.fixture
def scripts() -> Iterator[Path]:
    """A probe_scripts_dir the probe user can reach (pytest's own tmp folders are private to root)."""
    folder = Path(tempfile.mkdtemp(prefix="clonebox-probes-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


def _script(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text("#!/bin/sh\n" + text)
    path.chmod(0o755)
    return path


def script(name: str, *args: str, timeout_ms: int = 5000) -> Probe:
    return Probe(
        "ext", ProbeType.SCRIPT, interval_ms=10_000, timeout_ms=timeout_ms, script=ScriptProbe(name, tuple(args))
    )


async def test_script_probe_refused_at_create(env_factory: Any, scripts: Path, tmp_path: Path) -> None:
    e = await env_factory(scripts_dir=scripts)
    (tmp_path / "outside").write_text("#!/bin/sh\nexit 0\n")
    (scripts / "escape").symlink_to(tmp_path / "outside")
    (scripts / "folder").mkdir()
    cases = {
        "missing": "no script 'missing'",
        "escape": "pointing outside probe_scripts_dir",
        "folder": "not a regular file",
    }
    for name, why in cases.items():
        with pytest.raises(errors.InvalidArgument) as err:
            await e.svc.create(e.spec("web", Probe("ok", ProbeType.GUEST_AGENT), script(name)), request_id="")
        assert err.value.metadata["field"] == "spec.health_checks[1].script.name"
        assert why in err.value.message
    os.chmod(_script(scripts, "loose", "exit 0\n"), 0o777)
    with pytest.raises(errors.InvalidArgument, match="writable by group or others"):
        await e.svc.plan_create(e.spec("web", script("loose")))
    os.chmod(scripts, 0o777)
    with pytest.raises(errors.InvalidArgument, match=r"probe_scripts_dir .* is writable"):
        await e.svc.plan_create(e.spec("web", script("loose")))
    assert e.fake.calls["create"] == 0

    no_dir = await env_factory()
    with pytest.raises(errors.InvalidArgument, match="script probes are disabled"):
        await no_dir.svc.create(no_dir.spec("web", script("x")), request_id="")


async def test_script_owned_by_another_user_is_refused(scripts: Path) -> None:
    from clonebox_agent.app.probes import ScriptPolicy

    _script(scripts, "s", "exit 0\n")
    with pytest.raises(errors.InvalidArgument, match="owned by uid"):
        ScriptPolicy(str(scripts), expected_uid=os.geteuid() + 1).resolve("s", "f")


async def test_script_probe_runs_with_exit_code_env_and_user(env_factory: Any, scripts: Path) -> None:
    _script(
        scripts,
        "check-vm",
        'if [ "$CLONEBOX_VM" != web ] || [ "$CLONEBOX_VM_ADDRESS" != 192.0.2.7 ]; then\n'
        '  echo "wrong env: $CLONEBOX_VM $CLONEBOX_VM_ADDRESS" >&2; exit 4\n'
        "fi\n"
        'if [ "$(id -u)" = 0 ]; then echo "ran as root" >&2; exit 5; fi\n'
        '[ "$PWD" = / ] || exit 6\n'
        'echo "first line" >&2\necho "database is down" >&2\nexit "$1"\n',
    )
    e = await env_factory(scripts_dir=scripts)
    for vm in ("web", "bad"):
        e.fake.probe_addresses[vm] = ("192.0.2.7",)
    await e.create("web", script("check-vm", "0"))
    await e.create("bad", script("check-vm", "0"))
    (ok,), _ = await e.mon.check_now("web")
    assert (ok.sample, ok.detail) == (Sample.PASS, "exit 0")
    (bad,), _ = await e.mon.check_now("bad")
    assert (bad.sample, bad.detail) == (Sample.FAIL, "exit 4: wrong env: bad 192.0.2.7")


async def test_script_exit_code_and_last_stderr_line(env_factory: Any, scripts: Path) -> None:
    _script(scripts, "db", 'echo "first line" >&2\necho "database is down" >&2\nexit "$1"\n')
    e = await env_factory(scripts_dir=scripts)
    await e.create("web", script("db", "3"))
    (r,), _ = await e.mon.check_now("web")
    assert (r.sample, r.detail) == (Sample.FAIL, "exit 3: database is down")


async def test_script_timeout_kills_its_process_group(env_factory: Any, scripts: Path) -> None:
    # a duration no other test sleeps for: the check below looks at every process of the machine
    _script(scripts, "hang", "sleep 30.25 &\nsleep 30.25\n")
    e = await env_factory(scripts_dir=scripts)
    await e.create("web", script("hang", timeout_ms=300))
    (r,), _ = await e.mon.check_now("web")
    assert (r.sample, r.detail) == (Sample.FAIL, "timed out after 300ms")

    # nothing of the script's group is left (it ran in its own session). SIGKILL is delivered
    # asynchronously: on a busy machine a killed process shows for a moment (seen in a parallel run).
    def left() -> list[str]:
        return [p for p in os.listdir("/proc") if p.isdigit() and _cmdline(p) == "sleep 30.25"]

    for _ in range(100):
        if not left():
            break
        await asyncio.sleep(0.05)
    assert left() == []


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def test_fake_scripts_dir_fixture_is_private_enough(scripts: Path) -> None:
    assert not stat.S_IMODE(scripts.stat().st_mode) & 0o022
