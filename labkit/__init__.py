"""labkit: make virtualization visible (Lab KVM course)."""
