"""The agent's crash-safe local journal (SQLite, synchronous writes)."""
