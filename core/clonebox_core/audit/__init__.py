"""The tamper-evident audit log: events, the keyed hash chain, its verification and head witnesses.

Storage lives with each daemon (the controller's SQL store, the agent's journal outbox); this package
holds what both need and what must be identical everywhere: the event model, the canonical bytes a MAC
covers, and the verifier.
"""
