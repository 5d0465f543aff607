"""Use cases of the controller (transport- and SQL-free)."""
