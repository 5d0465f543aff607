"""What one run of one health check does, per probe type (``app/health.py`` schedules the runs).

Every function here returns a :class:`Finding` (a sample and a short detail) or raises; the caller bounds
each run by the probe's timeout and turns exceptions into samples. Nothing here keeps probe *state*
except the two helpers of resource probes: the shared :class:`StatsSampler` (one bulk statistics call for
every VM) and the :class:`CpuMeter` (CPU use is a rate between two samples).

Probes are not a way into the host: ``http`` and ``tcp`` probes only reach the addresses the hypervisor
gives as ``ProbeTarget`` (numeric, never resolved), through the target's libvirt bridge when it names
one; ``script`` probes only run executables from the agent's own root-owned ``probe_scripts_dir``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import pwd
import re
import signal
import socket
import ssl
import stat
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from clonebox_agent.ports import DomainStats, Hypervisor, ProbeTarget
from clonebox_core.errors import CloneboxError, invalid_field
from clonebox_core.health import (
    CommandProbe,
    FileProbe,
    HttpProbe,
    Probe,
    ProbeType,
    ResourceProbe,
    Sample,
    ScriptProbe,
    judge_percent,
)

#: at most this much of a response, guest file or output is read
MAX_READ = 64 * 1024
#: kept of a script's standard error (only its last line is reported)
_STDERR_TAIL = 4096
_DETAIL_CHARS = 200
_STATUS_LINE = re.compile(rb"^HTTP/\d(?:\.\d)?\s+(\d{3})\b")
#: the environment of script probes: nothing of the agent's own environment leaks into them
_SCRIPT_PATH = "/usr/bin:/bin"
#: strongest first: the sample of a resource probe is the worst of its figures
_SEVERITY = {Sample.FAIL: 3, Sample.WARN: 2, Sample.PASS: 1, Sample.NO_DATA: 0}


@dataclass(frozen=True)
class Finding:
    """What one run found: the sample and a short, secret-free detail."""

    sample: Sample
    detail: str


class ProbeFailure(Exception):
    """A run failed for a reason worth reporting as the detail (not an error of the agent)."""


def _short(text: str, limit: int = _DETAIL_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _os_reason(exc: OSError) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    return exc.strerror or type(exc).__name__


# ------------------------------------------------------------------------------------ network probes


async def _connect(target: ProbeTarget, port: int) -> socket.socket:
    """A connected non-blocking socket to ``target``, bound to its bridge when it names one."""
    loop = asyncio.get_running_loop()
    # targets are addresses, never names: parsed here, no resolver call (loop.getaddrinfo would also
    # hand every probe to a worker thread, a fifth of the agent's CPU at 1500 probes a second)
    address, _, zone = target.address.partition("%")
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise ProbeFailure(f"{target.address} is not an IP address") from None
    sockaddr: tuple[Any, ...]
    if ip.version == 4:
        family, sockaddr = socket.AF_INET, (address, port)
    else:
        try:
            scope = socket.if_nametoindex(zone) if zone and not zone.isdigit() else int(zone or 0)
        except OSError:
            raise ProbeFailure(f"{target.address}: no interface {zone}") from None
        family, sockaddr = socket.AF_INET6, (address, port, 0, scope)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if target.interface:
            # traffic may only leave through the VM's libvirt bridge; never fall back to an unbound socket
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, target.interface.encode() + b"\0")
            except OSError as exc:
                raise ProbeFailure(f"cannot bind to interface {target.interface}: {_os_reason(exc)}") from None
        try:
            await loop.sock_connect(sock, sockaddr)
        except OSError as exc:
            raise ProbeFailure(f"{_display(target.address)}:{port}: {_os_reason(exc)}") from None
    except BaseException:
        sock.close()
        raise
    return sock


def _display(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def _host_header(address: str, port: int) -> str:
    # the zone of a link-local IPv6 address is local to this host, never part of a Host header
    return f"{_display(address.split('%', 1)[0])}:{port}"


def _tls_context(verify: bool) -> ssl.SSLContext:
    if verify:
        # the system's trust store, and the VM's address must be in the certificate (an IP SAN)
        return ssl.create_default_context()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def http_request(p: HttpProbe, target: ProbeTarget) -> bytes:
    """The HTTP/1.0 request a probe sends (``Connection: close``: one request, read to the end)."""
    lines = [f"{p.method} {p.path} HTTP/1.0", f"Host: {_host_header(target.address, p.port)}"]
    lines += [f"{name}: {value}" for name, value in p.headers]
    if p.method in ("POST", "PUT"):
        lines.append("Content-Length: 0")
    lines += ["User-Agent: clonebox-agent-probe", "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1", errors="replace")


def judge_http(p: HttpProbe, response: bytes) -> Finding:
    """Judge a (possibly truncated) HTTP response: status in ``expect_status``, body matching."""
    head, _, body = response.partition(b"\r\n\r\n")
    match = _STATUS_LINE.match(head)
    if match is None:
        return Finding(Sample.FAIL, "not an HTTP response" if response else "empty response")
    status = int(match.group(1))
    if status not in p.expect_status:
        expected = ", ".join(str(s) for s in p.expect_status)
        return Finding(Sample.FAIL, f"status {status}, expected {expected}")
    if p.body_regex and re.search(p.body_regex, body.decode("utf-8", errors="replace")) is None:
        return Finding(Sample.FAIL, f"status {status}, body does not match {_short(p.body_regex, 60)!r}")
    return Finding(Sample.PASS, f"status {status}")


async def _http_one(p: HttpProbe, target: ProbeTarget) -> Finding:
    sock = await _connect(target, p.port)
    if p.scheme != "https":
        return judge_http(p, await _exchange_plain(sock, http_request(p, target), target, p.port))
    tls = _tls_context(p.tls_verify)
    # "" turns hostname checking off; when verifying, the VM's address is the name to check
    server_hostname = target.address.split("%", 1)[0] if p.tls_verify else ""
    try:
        reader, writer = await asyncio.open_connection(sock=sock, ssl=tls, server_hostname=server_hostname)
    except ssl.SSLCertVerificationError as exc:
        sock.close()
        raise ProbeFailure(f"TLS certificate not accepted: {exc.verify_message or exc.reason}") from None
    except (ssl.SSLError, OSError) as exc:
        sock.close()
        raise ProbeFailure(f"TLS handshake failed: {_short(str(exc), 120)}") from None
    try:
        writer.write(http_request(p, target))
        await writer.drain()
        data = b""
        while len(data) < MAX_READ:
            chunk = await reader.read(MAX_READ - len(data))
            if not chunk:
                break
            data += chunk
    except OSError as exc:
        raise ProbeFailure(f"{_display(target.address)}:{p.port}: {_os_reason(exc)}") from None
    finally:
        # abort, not close: a probe does not wait for a TLS close_notify or a lingering peer
        writer.transport.abort()
    return judge_http(p, data)


async def _exchange_plain(sock: socket.socket, request: bytes, target: ProbeTarget, port: int) -> bytes:
    """Send ``request`` and read the response (at most MAX_READ) on a connected non-blocking socket.

    Plain HTTP goes straight through the loop's socket calls: no transport, protocol and stream objects
    per probe (they were most of the agent's CPU per run at 1500 probes a second).
    """
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_sendall(sock, request)
        data = b""
        while len(data) < MAX_READ:
            chunk = await loop.sock_recv(sock, MAX_READ - len(data))
            if not chunk:
                break
            data += chunk
        return data
    except OSError as exc:
        raise ProbeFailure(f"{_display(target.address)}:{port}: {_os_reason(exc)}") from None
    finally:
        sock.close()


async def _each_target(targets: Sequence[ProbeTarget], one: Callable[[ProbeTarget], Awaitable[Finding]]) -> Finding:
    """PASS at the first target that passes; FAIL naming every target's failure otherwise.

    A VM may have several addresses (several libvirt networks) and serve on only one of them: probes
    never name a host, so the operator has no way to pick one; a service reachable on any is up.
    """
    if not targets:
        return Finding(Sample.FAIL, "no address on an up libvirt bridge")
    failures: list[str] = []
    for target in targets:
        try:
            found = await one(target)
        except ProbeFailure as exc:
            found = Finding(Sample.FAIL, str(exc))
        if found.sample is Sample.PASS:
            return Finding(Sample.PASS, f"{_display(target.address)}: {found.detail}")
        failures.append(found.detail if target.address in found.detail else f"{target.address}: {found.detail}")
    return Finding(Sample.FAIL, _short("; ".join(failures)))


async def http_probe(p: HttpProbe, targets: Sequence[ProbeTarget]) -> Finding:
    """Send the probe's request to the VM's targets (see :func:`_each_target`)."""
    return await _each_target(targets, lambda t: _http_one(p, t))


async def tcp_probe(port: int, targets: Sequence[ProbeTarget]) -> Finding:
    """Connect to ``port`` on the VM's targets and close again."""

    async def one(target: ProbeTarget) -> Finding:
        (await _connect(target, port)).close()
        return Finding(Sample.PASS, f"port {port} open")

    return await _each_target(targets, one)


# -------------------------------------------------------------------------------------- guest probes


async def guest_agent_probe(hv: Hypervisor, vm: str) -> Finding:
    """qemu-ga answers a ping."""
    await hv.guest_ping(vm)
    return Finding(Sample.PASS, "guest agent answers")


async def command_probe(hv: Hypervisor, vm: str, p: CommandProbe, timeout: float) -> Finding:
    """Run ``argv`` in the guest: its exit code must be ``expect_exit`` (and stdout match)."""
    result = await hv.guest_exec(vm, p.argv, timeout=timeout)
    if result.exit_code != p.expect_exit:
        # the output is not reported: a guest program may print anything, secrets included
        return Finding(Sample.FAIL, f"exit {result.exit_code}, expected {p.expect_exit}")
    if p.output_regex and re.search(p.output_regex, result.stdout.decode("utf-8", errors="replace")) is None:
        return Finding(Sample.FAIL, f"exit {result.exit_code}, output does not match {_short(p.output_regex, 60)!r}")
    return Finding(Sample.PASS, f"exit {result.exit_code}")


async def file_probe(hv: Hypervisor, vm: str, p: FileProbe) -> Finding:
    """The guest file exists (and its start matches)."""
    content = await hv.guest_file_read(vm, p.path, MAX_READ)
    if content is None:
        return Finding(Sample.FAIL, f"no such file: {_short(p.path, 120)}")
    if p.regex and re.search(p.regex, content.decode("utf-8", errors="replace")) is None:
        return Finding(Sample.FAIL, f"content does not match {_short(p.regex, 60)!r}")
    return Finding(Sample.PASS, "present")


# ----------------------------------------------------------------------------------- resource probes


class StatsSampler:
    """One bulk ``domain_stats`` call shared by every resource probe of every VM.

    The last result is reused while it is younger than ``min_age`` seconds (half the shortest resource
    probe interval: each probe still sees a fresh figure every run); concurrent callers of a refresh all
    await the same call. Errors are not cached.
    """

    def __init__(self, fetch: Callable[[], Awaitable[dict[str, DomainStats]]], clock: Callable[[], float]) -> None:
        """``fetch`` is ``Hypervisor.domain_stats``; ``clock`` a monotonic clock in seconds."""
        self._fetch = fetch
        self._clock = clock
        self.min_age = 0.0
        self._last: dict[str, DomainStats] | None = None
        self._at = 0.0
        self._inflight: asyncio.Task[dict[str, DomainStats]] | None = None

    async def get(self) -> dict[str, DomainStats]:
        """Counters of every running domain (cached, see the class docstring)."""
        if self._last is not None and self._clock() - self._at < self.min_age:
            return self._last
        if self._inflight is None:
            self._inflight = asyncio.create_task(self._refresh(), name="domain-stats")
        # shielded: a caller's timeout must not cancel the call the others wait for
        return await asyncio.shield(self._inflight)

    async def _refresh(self) -> dict[str, DomainStats]:
        try:
            found = await self._fetch()
            self._last, self._at = found, self._clock()
            return found
        finally:
            self._inflight = None


class CpuMeter:
    """CPU use in percent of a VM's vCPUs, from two samples of its cumulative CPU time."""

    def __init__(self) -> None:
        """No samples yet."""
        self._prev: dict[str, DomainStats] = {}
        self._last: dict[str, float] = {}

    def forget(self, vm: str) -> None:
        """Drop ``vm``'s samples (a new QEMU process starts its counters again)."""
        self._prev.pop(vm, None)
        self._last.pop(vm, None)

    def percent(self, vm: str, stats: DomainStats, *, record: bool = True) -> tuple[float | None, str]:
        """The use since the previous sample (None and why when there is none); ``record`` keeps ``stats``."""
        if stats.cpu_time_ns is None or stats.vcpus <= 0:
            return None, ""
        prev = self._prev.get(vm)
        if prev is not None and prev.sampled_at == stats.sampled_at:
            # the same bulk sample again (the sampler's cache): the same figure
            last = self._last.get(vm)
            return (last, "") if last is not None else (None, "first sample")
        if prev is None or prev.cpu_time_ns is None or stats.cpu_time_ns < prev.cpu_time_ns:
            if record:
                self._prev[vm] = stats
            return None, "first sample"
        elapsed = stats.sampled_at - prev.sampled_at
        if elapsed <= 0:
            return None, ""
        value = (stats.cpu_time_ns - prev.cpu_time_ns) / (elapsed * 1e9 * stats.vcpus) * 100
        value = min(max(value, 0.0), 100.0)
        if record:
            self._prev[vm] = stats
            self._last[vm] = value
        return value, ""


def _worst(samples: Sequence[Sample]) -> Sample:
    return max(samples, key=lambda s: _SEVERITY[s], default=Sample.NO_DATA)


async def resource_probe(
    hv: Hypervisor, vm: str, p: ResourceProbe, sampler: StatsSampler, meter: CpuMeter, *, record: bool = True
) -> Finding:
    """CPU, memory and disk use judged by their bands; the sample is the worst figure's."""
    figures: list[tuple[str, float | None, str]] = []
    stats: DomainStats | None = None
    if p.cpu is not None or p.memory is not None:
        stats = (await sampler.get()).get(vm)
    if p.cpu is not None:
        cpu, why = meter.percent(vm, stats, record=record) if stats is not None else (None, "")
        figures.append(("cpu", cpu, why))
    if p.memory is not None:
        memory = None
        if stats is not None and stats.memory_available_kib and stats.memory_unused_kib is not None:
            used = stats.memory_available_kib - stats.memory_unused_kib
            memory = min(max(used / stats.memory_available_kib * 100, 0.0), 100.0)
        figures.append(("memory", memory, ""))
    if p.disk is not None:
        disk = None
        try:
            sizes = [f.used_bytes / f.total_bytes * 100 for f in await hv.guest_filesystems(vm) if f.total_bytes > 0]
            disk = max(sizes) if sizes else None
        except CloneboxError:
            pass  # qemu-ga does not answer: this figure has no data, the others still count
        figures.append(("disk", disk, ""))
    bands = {"cpu": p.cpu, "memory": p.memory, "disk": p.disk}
    samples = []
    for name, value, _ in figures:
        band = bands[name]
        assert band is not None
        samples.append(judge_percent(value, band))
    detail = " ".join(
        f"{name} {value:.0f}%" if value is not None else f"{name} n/a" + (f" ({why})" if why else "")
        for name, value, why in figures
    )
    sample = _worst([s for s in samples if s is not Sample.NO_DATA])
    if sample is Sample.NO_DATA and stats is None and (p.cpu is not None or p.memory is not None):
        detail = f"statistics unavailable ({detail})"
    return Finding(sample, detail)


# -------------------------------------------------------------------------------------- script probes


class ScriptPolicy:
    """Which host executables ``script`` probes may run: regular files in one root-owned folder.

    A script runs on the host, so the folder and the file must be owned by ``expected_uid`` (root in
    production; injectable so that tests can run as anyone) and writable by nobody else; a symbolic link
    may only point to a file inside the folder.
    """

    def __init__(self, directory: str, *, expected_uid: int = 0) -> None:
        """``directory`` is the agent's ``probe_scripts_dir`` (absolute)."""
        self.directory = os.path.abspath(directory)
        self.expected_uid = expected_uid

    def _owned(self, st: os.stat_result) -> str:
        if st.st_uid != self.expected_uid:
            return f"is owned by uid {st.st_uid}, not {self.expected_uid}"
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return "is writable by group or others"
        return ""

    def resolve(self, name: str, field: str) -> str:
        """The real path of script ``name``, or InvalidArgument naming ``field`` and why not."""
        try:
            dir_st = os.stat(self.directory)
        except OSError as exc:
            raise invalid_field(field, f"probe_scripts_dir {self.directory} is not usable: {_os_reason(exc)}") from None
        if not stat.S_ISDIR(dir_st.st_mode):
            raise invalid_field(field, f"probe_scripts_dir {self.directory} is not a folder")
        if problem := self._owned(dir_st):
            raise invalid_field(field, f"probe_scripts_dir {self.directory} {problem}")
        if "/" in name or name in ("", ".", ".."):
            raise invalid_field(field, "the name of an executable in the agent's probe_scripts_dir, not a path")
        path = os.path.join(self.directory, name)
        try:
            link = os.lstat(path)
        except FileNotFoundError:
            raise invalid_field(field, f"no script {name!r} in the agent's probe_scripts_dir") from None
        except OSError as exc:
            raise invalid_field(field, f"script {name!r}: {_os_reason(exc)}") from None
        real = path
        if stat.S_ISLNK(link.st_mode):
            real = os.path.realpath(path)
            root = os.path.realpath(self.directory)
            if os.path.commonpath([real, root]) != root or real == root:
                raise invalid_field(field, f"script {name!r} is a link pointing outside probe_scripts_dir")
        try:
            st = os.stat(real)
        except OSError as exc:
            raise invalid_field(field, f"script {name!r}: {_os_reason(exc)}") from None
        if not stat.S_ISREG(st.st_mode):
            raise invalid_field(field, f"script {name!r} is not a regular file")
        if problem := self._owned(st):
            raise invalid_field(field, f"script {name!r} {problem}")
        if not st.st_mode & stat.S_IXUSR:
            raise invalid_field(field, f"script {name!r} is not executable")
        return real


def check_script_probes(
    policy: ScriptPolicy | None, probes: Sequence[Probe], prefix: str = "spec.health_checks"
) -> None:
    """InvalidArgument naming ``<prefix>[i].script.name`` for a script probe this agent cannot run."""
    for i, probe in enumerate(probes):
        if probe.type is not ProbeType.SCRIPT or probe.script is None:
            continue
        field = f"{prefix}[{i}].script.name"
        if policy is None:
            raise invalid_field(field, "script probes are disabled on this agent (its probe_scripts_dir is not set)")
        policy.resolve(probe.script.name, field)


async def _tail(stream: asyncio.StreamReader) -> bytes:
    kept = b""
    while chunk := await stream.read(65536):
        kept = (kept + chunk)[-_STDERR_TAIL:]
    return kept


class ScriptRunner:
    """Runs script probes as ``user`` with a clean environment, killing the process group on timeout."""

    def __init__(self, policy: ScriptPolicy, user: str = "nobody") -> None:
        """``user`` is the agent's ``probe_user``."""
        self.policy = policy
        self.user = user

    def _identity(self) -> dict[str, Any]:
        # Only root can switch users. An agent not running as root (tests, a developer's machine) runs
        # scripts as itself: that user is already unprivileged, and refusing would disable the feature.
        if os.geteuid() != 0:
            return {}
        try:
            pw = pwd.getpwnam(self.user)
        except KeyError:
            raise ProbeFailure(f"probe_user {self.user!r} does not exist on this host") from None
        return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}

    async def run(self, vm: str, p: ScriptProbe, address: str) -> Finding:
        """Run script ``p`` for ``vm``: exit 0 passes."""
        try:
            # checked again at each run: the folder may have changed since the VM was created
            path = self.policy.resolve(p.name, "script.name")
        except CloneboxError as exc:
            raise ProbeFailure(exc.message) from None
        env = {"PATH": _SCRIPT_PATH, "CLONEBOX_VM": vm, "CLONEBOX_VM_ADDRESS": address}
        proc = await asyncio.create_subprocess_exec(
            path,
            *p.args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            cwd="/",
            # its own process group: a timeout kills the script and everything it started
            start_new_session=True,
            **self._identity(),
        )
        try:
            assert proc.stderr is not None
            err = await _tail(proc.stderr)
            code = await proc.wait()
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        if code == 0:
            return Finding(Sample.PASS, "exit 0")
        lines = err.decode("utf-8", errors="replace").strip().splitlines()
        why = f"exit {code}" if code > 0 else f"killed by signal {-code}"
        return Finding(Sample.FAIL, why + (f": {_short(lines[-1])}" if lines else ""))
