"""
``clonebox``: the fleet CLI, a client of the controller only.

One typer app with a command group per module (``host``, ``vm``, ``operation``, ``dev``). The root
command class catches every CloneboxError a command raises and hands it to ``clonebox_cli.errors``,
the one place that prints errors and picks exit codes; ``run()`` is the console-script entry point.
"""

from __future__ import annotations

import os
import sys
from importlib import metadata
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from clonebox_cli import dev, errors, host, operation, vm
from clonebox_cli.context import DEFAULT_CONTROLLER, Settings
from clonebox_cli.output import OutputFormat
from clonebox_core.errors import CloneboxError


class _RootGroup(TyperGroup):
    """Maps errors escaping any subcommand to a one-line message and an exit code."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except CloneboxError as err:
            raise typer.Exit(errors.report(err)) from None
        except (typer.Exit, typer.Abort, typer.TyperException, KeyboardInterrupt):
            raise  # typer's own control flow: usage errors (2), --help, Ctrl-C (130)
        except Exception as exc:
            raise typer.Exit(errors.report_unexpected(exc)) from None


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
app.add_typer(dev.app, name="dev")


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
            help=f"Controller address [default: recorded by 'clonebox dev up', else {DEFAULT_CONTROLLER}]",
            show_default=False,
        ),
    ] = None,
    output: Annotated[
        OutputFormat, typer.Option("--output", "-o", help="table for people, json for programs.")
    ] = OutputFormat.table,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """CloneBox fleet CLI."""
    address = controller or dev.recorded_controller() or DEFAULT_CONTROLLER
    ctx.obj = Settings(controller=address, output=output)
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
