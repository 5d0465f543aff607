"""
The controller's fleet store (SQLAlchemy 2 + alembic; SQLite or PostgreSQL).

The application layer talks to :class:`Store` only (through the ``FleetStore`` port); it returns
``clonebox_core.model`` dataclasses.
"""

from .store import VANISHED_REASON, Store, VmChange

__all__ = ["VANISHED_REASON", "Store", "VmChange"]
