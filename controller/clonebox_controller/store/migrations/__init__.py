"""Alembic migrations of the fleet store.

Run programmatically by :func:`clonebox_controller.store.engine.upgrade_to_head` (``Store.open``
does it); no ``alembic.ini`` is needed. To write a new revision, add ``versions/NNNN_<what>.py`` by
hand with ``down_revision`` set to the previous one and keep ``tables.py`` in step: the test suite
fails when the migrated schema and the ORM tables differ.
"""
