"""The agent's certificate: first obtained with a join token, then renewed at two thirds of its life.

Both write the new key and certificate atomically into ``tls_dir``; the gRPC server picks them up on the
next handshake (dynamic credentials) and new channels use them, so renewal needs no restart.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from pathlib import Path

import grpc
import grpc.aio
from clonebox.controller.v1 import pki_service_pb2, pki_service_pb2_grpc
from cryptography import x509

from clonebox_core.errors import CloneboxError, PermissionDenied
from clonebox_core.rpc.server import Transport, aio_channel, bootstrap_channel
from clonebox_core.rpc.status import error_from_rpc
from clonebox_core.rpc.tls import TlsFiles, install
from clonebox_core.security.identity import Kind
from clonebox_core.security.jointoken import JoinToken
from clonebox_core.security.pki import (
    identity_of,
    identity_of_ca,
    key_pem,
    make_csr,
    new_key,
)

log = logging.getLogger(__name__)

_ENROLL_TIMEOUT = 30.0
_RETRY_SECONDS = 10.0


async def enroll(tls_dir: Path, host: str, token_text: str) -> TlsFiles:
    """Exchange a join token for this host's first certificate (once, at start-up)."""
    token = JoinToken.decode(token_text)
    if token.host != host:
        raise PermissionDenied(
            f"name: the join token was made for host {token.host}, but this agent is {host}",
            reason="JOIN_TOKEN_HOST",
            metadata={"field": "name"},
        )
    key = new_key()
    trust_domain = identity_of_ca(x509.load_pem_x509_certificate(token.ca_pem))
    channel = bootstrap_channel(token.enroll_address, token.ca_pem, f"controller.{trust_domain}")
    try:
        stub = pki_service_pb2_grpc.EnrollmentServiceStub(channel)
        request = pki_service_pb2.EnrollRequest(token=token_text, host=host, csr_pem=make_csr(key, host).decode())
        resp = await stub.Enroll(request, timeout=_ENROLL_TIMEOUT)
    except grpc.aio.AioRpcError as exc:
        raise error_from_rpc(exc, target=f"controller enrolment at {token.enroll_address}") from None
    finally:
        await channel.close()
    tls = TlsFiles.in_folder(tls_dir, "agent")
    install(tls, key_pem(key), resp.certificate_pem.encode(), resp.ca_pem.encode())
    log.info("enrolled as %s", identity_of(x509.load_pem_x509_certificate(resp.certificate_pem.encode())))
    return tls


async def renew_forever(transport: Transport, controller: str) -> None:
    """Renew the certificate at two thirds of its lifetime, for as long as the agent runs."""
    tls = transport.tls
    assert tls is not None
    while True:
        delay = (tls.renew_at() - datetime.now(UTC)).total_seconds()
        await asyncio.sleep(max(delay, 0.5))
        try:
            await renew_once(transport, controller)
        except CloneboxError as exc:
            # the current certificate is still valid: try again soon rather than give up
            log.warning("certificate renewal failed, retrying in %.0fs: %s", _RETRY_SECONDS, exc)
            await asyncio.sleep(_RETRY_SECONDS)


async def renew_once(transport: Transport, controller: str) -> None:
    """Ask the controller for a new certificate for the same identity and install it."""
    tls = transport.tls
    assert tls is not None
    me = tls.identity()
    assert me.kind == Kind.AGENT
    key = new_key()
    channel = aio_channel(controller, transport, f"controller.{me.trust_domain}")
    try:
        stub = pki_service_pb2_grpc.PkiServiceStub(channel)
        resp = await stub.RenewCertificate(
            pki_service_pb2.RenewCertificateRequest(csr_pem=make_csr(key, me.name).decode()), timeout=_ENROLL_TIMEOUT
        )
    except grpc.aio.AioRpcError as exc:
        raise error_from_rpc(exc, target=f"controller at {controller}") from None
    finally:
        await channel.close()
    install(tls, key_pem(key), resp.certificate_pem.encode(), resp.ca_pem.encode())
    log.info("renewed the agent certificate; valid until %s", tls.certificate().not_valid_after_utc.isoformat())
