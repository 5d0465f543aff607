"""Hypervisor adapters: libvirt (real and test driver) and a scriptable fake."""
