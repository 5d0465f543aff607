"""Shared, transport-free building blocks of CloneBox: errors, models, spec files, RPC plumbing."""
