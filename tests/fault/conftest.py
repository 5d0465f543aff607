"""Fixtures: a controller and an agent running as processes on real libvirt."""

from tests.realfleet import real_fleet

__all__ = ["real_fleet"]
