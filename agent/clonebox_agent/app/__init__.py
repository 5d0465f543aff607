"""Use cases of the agent (transport-free)."""
