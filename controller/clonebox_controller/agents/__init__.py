"""Clients the controller uses to reach agents."""
