"""``python -m clonebox_cli``."""

from clonebox_cli.main import run

run()
