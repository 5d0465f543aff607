"""Composition root of the controller: ``Controller(config)`` wires store, agent gateway, use cases, gRPC.

``clonebox-controller --config FILE`` runs it until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from clonebox.controller.v1 import (
    host_service_pb2,
    host_service_pb2_grpc,
    operation_service_pb2,
    operation_service_pb2_grpc,
    vm_service_pb2,
    vm_service_pb2_grpc,
)

from clonebox_controller.agents.pool import GrpcAgentGateway
from clonebox_controller.app.hosts import HostRegistry
from clonebox_controller.app.operations import OperationQueries
from clonebox_controller.app.vms import VmManager
from clonebox_controller.config import ControllerConfig
from clonebox_controller.grpc.servicers import HostServicer, OperationServicer, VmServicer
from clonebox_controller.store import Store
from clonebox_core.config import load_config
from clonebox_core.errors import CloneboxError
from clonebox_core.logs import setup_logging
from clonebox_core.rpc.server import ServerHandle, split_host_port, start_server

log = logging.getLogger("clonebox_controller")


def _service(module: object, name: str) -> str:
    return module.DESCRIPTOR.services_by_name[name].full_name  # type: ignore[attr-defined, no-any-return]


class Controller:
    """A running controller."""

    def __init__(self, config: ControllerConfig) -> None:
        self.config = config
        self.store = Store.open(config.database_url)
        self.gateway = GrpcAgentGateway()
        self.hosts = HostRegistry(
            self.store,
            self.gateway,
            heartbeat_timeout=config.heartbeat_timeout_seconds,
            heartbeat_interval=config.heartbeat_interval_seconds,
        )
        self.vms = VmManager(self.store, self.hosts, stop_timeout_seconds=config.stop_timeout_seconds)
        self.operations = OperationQueries(self.store)
        self.server: ServerHandle | None = None

    @property
    def address(self) -> str:
        """Address clients reach the controller at."""
        assert self.server is not None
        host, _ = split_host_port(self.config.listen)
        return f"{host}:{self.server.port}"

    async def start(self) -> None:
        """Start serving and resume unfinished operations."""
        await self.hosts.start()
        self.server = await start_server(
            self.config.listen,
            [
                (
                    host_service_pb2_grpc.add_HostServiceServicer_to_server,
                    HostServicer(self.hosts, self.store, self.vms),
                    _service(host_service_pb2, "HostService"),
                ),
                (
                    vm_service_pb2_grpc.add_VmServiceServicer_to_server,
                    VmServicer(self.vms, self.store),
                    _service(vm_service_pb2, "VmService"),
                ),
                (
                    operation_service_pb2_grpc.add_OperationServiceServicer_to_server,
                    OperationServicer(self.operations),
                    _service(operation_service_pb2, "OperationService"),
                ),
            ],
        )
        await self.vms.resume()
        log.info("controller listening on %s", self.address)

    async def stop(self) -> None:
        """Stop serving and background work."""
        if self.server is not None:
            await self.server.stop()
        await self.vms.close()
        await self.hosts.close()
        await self.gateway.close()
        self.store.close()


async def serve(config: ControllerConfig) -> None:
    """Run a controller until a termination signal."""
    controller = Controller(config)
    await controller.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await controller.stop()


def run(argv: list[str] | None = None) -> None:
    """Entry point of ``clonebox-controller``."""
    parser = argparse.ArgumentParser(prog="clonebox-controller", description="CloneBox controller (fleet state)")
    parser.add_argument("--config", help="YAML config file (environment CLONEBOX_CONTROLLER_* overrides it)")
    args = parser.parse_args(argv)
    try:
        config = load_config(ControllerConfig, args.config, "CLONEBOX_CONTROLLER_")
        setup_logging("clonebox-controller", config.log_level)
        asyncio.run(serve(config))
    except CloneboxError as exc:
        print(f"clonebox-controller: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    run()
