"""``clonebox config``: convert CloneBox v1 project files (``.clonebox.yaml``) to fleet VM specs."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from clonebox_cli import output
from clonebox_cli.context import settings
from clonebox_core.errors import InvalidArgument

#: v1 settings a v2 file cannot express at all (paths can be: the agent decides at create)
_UNEXPRESSIBLE = frozenset({"gui", "network_mode"})

app = typer.Typer(help="Convert CloneBox v1 project files.", no_args_is_help=True)


@app.command("migrate")
def migrate(
    ctx: typer.Context,
    old: Annotated[str, typer.Argument(metavar="OLD.yaml", help="A CloneBox v1 .clonebox.yaml file.")],
    *,
    out: Annotated[
        str, typer.Option("--output", "-o", metavar="NEW.yaml", help="Where to write the v2 spec ('-': stdout).")
    ],
    image: Annotated[
        str | None, typer.Option("--image", metavar="NAME", help="Base image name instead of the v1 path's file name.")
    ] = None,
    drop: Annotated[
        list[str] | None,
        typer.Option("--drop", metavar="SETTING", help="Drop a setting v2 cannot honour (gui, network_mode, ...)."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite NEW.yaml if it exists.")] = False,
) -> None:
    """
    Write a version-2 VM spec for a CloneBox v1 file.

    A v1 password is never copied: the new file refers to it (auth.password) and this command says
    where to put it. Settings a v2 spec cannot express (gui, a v1-only network mode) are left out with
    a warning; shared paths are kept (the agent checks them against its shared_roots at create). The
    result is checked with the v2 loader before it is written.
    """
    from clonebox_core import v1import
    from clonebox_core.spec import load_spec_text

    s = settings(ctx)
    try:
        raw = Path(old).read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"{old}: cannot read: {exc.strerror}", reason="V1_INVALID") from None
    # a file is a draft for the user to review: what v2 cannot express becomes a warning, not a refusal
    drops = frozenset(drop or ()) | _UNEXPRESSIBLE
    migration = v1import.migrate_v1(raw, old, mode="file", image=image, drop=drops)
    text = v1import.dump_v2_yaml(migration.document, source_name=old)
    load_spec_text(text, f"{out} (migrated)")  # what we write must load: a bug here is not the user's to find
    if out == "-":
        typer.echo(text, nl=False)
    else:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (0 if force else os.O_EXCL)
        try:
            fd = os.open(out, flags, 0o644)
        except FileExistsError:
            raise InvalidArgument(f"{out} exists: choose another name or pass --force", reason="FILE_EXISTS") from None
        with os.fdopen(fd, "w") as f:
            f.write(text)
    for warning in migration.warnings:
        typer.echo(json.dumps({"warning": warning}) if s.json else f"warning: {warning}", err=True)
    if s.json:
        output.emit_json(
            {
                "source": old,
                "output": out,
                "warnings": list(migration.warnings),
                "password_found": migration.password_found,
                "password_hint": migration.password_hint,
            }
        )
        return
    if out != "-":
        typer.echo(f"wrote {out} (spec version 2) from {old}", err=True)
