"""
``clonebox``: the fleet CLI, a client of the controller only.

One typer app with a command group per module (``host``, ``vm``, ``snapshot``, ``operation``, ``pki``,
``health``, ``dev``, ...). The root command class catches every CloneboxError a command raises and hands
it to ``clonebox_cli.errors``, the one place that prints errors and picks exit codes; ``run()`` is the
console-script entry point.

Global options: ``--controller`` (where), ``--tls-dir`` (this client's certificate, see
``clonebox_cli.credentials``), ``--insecure`` (plaintext, loopback only), ``--output`` and ``--trace``.

Tracing: every command is one trace. The root command class opens the root span (``clonebox vm
create``) around the whole command; the gRPC channel carries its context to the controller (W3C
``traceparent``), which carries it on to the agent. Spans are exported only when the ``OTEL_EXPORTER_OTLP_*``
variables name a collector, and are flushed before the CLI exits (waiting at most ``_FLUSH_SECONDS``).
``--trace`` prints the trace id on stderr (``{"trace_id": ...}`` with ``-o json``).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from clonebox_cli import (
    audit,
    config,
    credentials,
    dev,
    errors,
    health,
    host,
    logs,
    operation,
    pki,
    plan,
    recover,
    secret,
    snapshot,
    vm,
    volume,
)
from clonebox_cli.context import DEFAULT_CONTROLLER, Settings
from clonebox_cli.output import OutputFormat
from clonebox_core.errors import CloneboxError

#: the longest the CLI waits, at exit, for its spans to reach the collector
_FLUSH_SECONDS = 3.0


def _command_path(group: Any, ctx: Any) -> list[str]:
    """``["vm", "create"]`` for ``clonebox -o json vm create -f x.yaml`` (the subcommands, no options)."""
    names: list[str] = []
    command = group
    for token in [*getattr(ctx, "_protected_args", ()), *ctx.args]:
        get_command = getattr(command, "get_command", None)
        if get_command is None or token.startswith("-"):
            break
        command = get_command(ctx, token)
        if command is None:
            break
        names.append(token)
    return names


@contextmanager
def _command_span(group: Any, ctx: Any) -> Iterator[Any]:
    """The root span of this command's trace; prints its trace id (``--trace``) and flushes at the end."""
    from opentelemetry.trace import SpanKind

    from clonebox_core.telemetry.tracing import flush_tracing, init_tracing, span_ids

    provider = init_tracing("clonebox")
    name = " ".join(["clonebox", *_command_path(group, ctx)])
    tracer = provider.get_tracer("clonebox_cli")
    span: Any = None
    try:
        with tracer.start_as_current_span(
            name, kind=SpanKind.CLIENT, record_exception=False, set_status_on_exception=False
        ) as span:
            span.set_attribute("clonebox.command", name)
            yield span
    finally:
        ids = span_ids(span) if span is not None else None
        if ctx.params.get("trace"):
            trace_id = ids[0] if ids else ""
            if ctx.params.get("output") == OutputFormat.json:
                sys.stderr.write(json.dumps({"trace_id": trace_id}) + "\n")
            else:
                sys.stderr.write(f"trace id: {trace_id or '(tracing is disabled)'}\n")
        flush_tracing(_FLUSH_SECONDS, provider)


def _fail(span: Any, code: int, description: str) -> None:
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute("process.exit.code", code)
    if code != 0:
        span.set_status(Status(StatusCode.ERROR, description))


class _RootGroup(TyperGroup):
    """Maps errors escaping any subcommand to a one-line message and an exit code; one trace per command."""

    def invoke(self, ctx: Any) -> Any:
        with _command_span(self, ctx) as span:
            try:
                return super().invoke(ctx)
            except CloneboxError as err:
                code = errors.report(err)
                _fail(span, code, f"{err.code} {err.reason}")
                raise typer.Exit(code) from None
            except (typer.Exit, typer.Abort, typer.TyperException, KeyboardInterrupt) as exc:
                # typer's own control flow: usage errors (2), --help, Ctrl-C (130)
                exit_code = getattr(exc, "exit_code", 1)
                _fail(span, exit_code if isinstance(exit_code, int) else 1, type(exc).__name__)
                raise
            except Exception as exc:
                code = errors.report_unexpected(exc)
                _fail(span, code, type(exc).__name__)
                raise typer.Exit(code) from None


app = typer.Typer(
    cls=_RootGroup,
    name="clonebox",
    help="CloneBox fleet: create and manage libvirt/QEMU VMs through the controller.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(host.app, name="host")
app.add_typer(vm.app, name="vm")
app.add_typer(operation.app, name="operation")
app.add_typer(pki.app, name="pki")
app.add_typer(audit.app, name="audit")
app.add_typer(health.app, name="health")
app.add_typer(snapshot.app, name="snapshot")
app.add_typer(recover.app, name="recover")
app.add_typer(dev.app, name="dev")
app.add_typer(config.app, name="config")
app.add_typer(secret.app, name="secret")
app.add_typer(plan.app, name="plan")
app.add_typer(volume.app, name="volume")
# multi-VM plans: the everyday verbs are top-level, like docker compose's
app.command("up")(plan.up)
app.command("down")(plan.down)
app.command("ps")(plan.ps)
# a VM's serial console, like docker logs
app.command("logs")(logs.logs)


def _default_tls_dir(dev_controller: bool) -> str:
    """The dev user's folder (made by 'dev up'), unless another controller is asked for and ours exists."""
    own, made_by_dev = credentials.default_tls_dir(), dev.recorded_tls_dir()
    if made_by_dev and (dev_controller or not credentials.user_files(own).exists()):
        return made_by_dev
    return str(own)


def _version(value: bool) -> None:
    if value:
        try:
            version = metadata.version("clonebox")
        except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
            version = "unknown"
        typer.echo(f"clonebox {version}")
        raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    controller: Annotated[
        str | None,
        typer.Option(
            "--controller",
            envvar="CLONEBOX_CONTROLLER",
            metavar="HOST:PORT",
            help=f"Controller address \\[default: recorded by 'clonebox dev up', else {DEFAULT_CONTROLLER}]",
            show_default=False,
        ),
    ] = None,
    tls_dir: Annotated[
        str | None,
        typer.Option(
            "--tls-dir",
            envvar="CLONEBOX_TLS_DIR",
            metavar="DIR",
            help="Folder with this client's ca.crt, user.crt and user.key "
            "\\[default: the one 'clonebox dev up' made when talking to its controller, else "
            "$XDG_CONFIG_HOME/clonebox/tls]",
            show_default=False,
        ),
    ] = None,
    insecure: Annotated[
        bool,
        typer.Option(
            "--insecure",
            envvar="CLONEBOX_INSECURE",
            help="Plaintext gRPC without certificates; only to a loopback controller that runs with insecure: true.",
        ),
    ] = False,
    output: Annotated[
        OutputFormat, typer.Option("--output", "-o", help="table for people, json for programs.")
    ] = OutputFormat.table,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    trace: Annotated[
        bool,
        typer.Option(
            "--trace",
            help="Print this command's trace id on stderr (spans go to the collector named by OTEL_EXPORTER_OTLP_*).",
        ),
    ] = False,
) -> None:
    """CloneBox fleet CLI."""
    recorded = dev.recorded_controller()
    address = controller or recorded or DEFAULT_CONTROLLER
    if not tls_dir and not insecure and address == recorded and dev.recorded_insecure():
        insecure = True  # the local fleet was started with 'clonebox dev up --insecure'
    folder = tls_dir or _default_tls_dir(address == recorded)
    ctx.obj = Settings(controller=address, output=output, tls_dir=folder, insecure=insecure)
    ctx.call_on_close(ctx.obj.close)


def run() -> None:
    """Console-script entry point: never a traceback, always a meaningful exit code."""
    try:
        app(prog_name="clonebox")
    except KeyboardInterrupt:
        sys.exit(errors.EXIT_INTERRUPTED)
    except BrokenPipeError:
        # `clonebox vm list | head`: the reader went away; stay quiet like other Unix tools
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(141)
    except CloneboxError as err:  # raised outside a command (option callbacks)
        sys.exit(errors.report(err))
    except Exception as exc:
        sys.exit(errors.report_unexpected(exc))


if __name__ == "__main__":  # pragma: no cover
    run()
