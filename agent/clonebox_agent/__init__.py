"""CloneBox agent: the only code that touches libvirt."""
