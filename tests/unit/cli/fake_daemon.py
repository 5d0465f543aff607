"""A stand-in for the controller and agent daemons, started by the ``clonebox dev`` tests.

Run as ``python fake_daemon.py MODULE --config FILE``: it reads ``listen`` from the config, serves
(with mTLS from the config's ``tls_dir``, as the real daemons do, unless ``insecure: true``)
``grpc.health.v1`` (and, as the controller, a HostService whose ListHosts reports the host named in
the sibling ``agent.yaml`` as READY) until SIGTERM. ``FAKE_DAEMON_FAIL=agent`` makes the agent exit at
once with an error on stderr; ``FAKE_DAEMON_IGNORE_TERM=1`` makes it ignore SIGTERM.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import yaml
from clonebox.controller.v1 import host_service_pb2, host_service_pb2_grpc
from clonebox.type.v1 import host_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from clonebox_core.rpc.tls import TlsFiles, server_credentials


class FakeHosts(host_service_pb2_grpc.HostServiceServicer):
    def __init__(self, agent_config: Path) -> None:
        self.agent_config = agent_config

    def ListHosts(self, request: Any, context: Any) -> Any:
        # read on each call: dev up writes the agent's config after the controller has started
        name = yaml.safe_load(self.agent_config.read_text())["name"] if self.agent_config.exists() else "local"
        host = host_pb2.Host(name=name, state=host_pb2.HOST_STATE_READY)
        return host_service_pb2.ListHostsResponse(hosts=[host])


def main() -> int:
    module, config = sys.argv[1], Path(sys.argv[sys.argv.index("--config") + 1])
    kind = "controller" if "controller" in module else "agent"
    settings = yaml.safe_load(config.read_text())
    print(f"fake {kind} starting with {config}", flush=True)
    if os.environ.get("FAKE_DAEMON_FAIL") == kind:
        print('{"msg": "cannot bind 127.0.0.1: address in use"}', file=sys.stderr, flush=True)
        return 3
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    if kind == "controller":
        host_service_pb2_grpc.add_HostServiceServicer_to_server(FakeHosts(config.with_name("agent.yaml")), server)
    if settings.get("insecure"):
        server.add_insecure_port(settings["listen"])
    else:
        tls = TlsFiles.in_folder(Path(settings["tls_dir"]), kind)
        server.add_secure_port(settings["listen"], server_credentials(tls))
    server.start()
    stop = threading.Event()
    if os.environ.get("FAKE_DAEMON_IGNORE_TERM") == "1":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.stop(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
