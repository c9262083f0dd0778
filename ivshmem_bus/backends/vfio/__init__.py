"""The VFIO backend: the kernel binding (``kernel``), the ivshmem device over it (``device``),
and sysfs discovery and vfio-pci binding (``pci``)."""
