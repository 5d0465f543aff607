"""
The libvirt adapter: the only package of CloneBox that imports ``libvirt``.

``LibvirtHypervisor`` implements the agent's ``Hypervisor`` port on ``qemu:///system`` (real guests)
and on ``test:///default`` (libvirt's in-memory test driver, for fast tests).
"""

from clonebox_agent.adapters.common import QEMU_CAPABILITIES, TEST_DRIVER_CAPABILITIES
from clonebox_agent.adapters.libvirt.hypervisor import LibvirtHypervisor, capabilities_for

__all__ = ["QEMU_CAPABILITIES", "TEST_DRIVER_CAPABILITIES", "LibvirtHypervisor", "capabilities_for"]
