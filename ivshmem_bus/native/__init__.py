"""The compiled edge: cffi declarations (cdefs/), the ABI-mode VFIO binding's ffi, and the
optional API-mode helper (exact-width accesses, fences, queue block copies).

Only ``ffi.py`` imports the compiled ``_helper``; everything above asks ``ffi`` for a callable
and gets a pure-Python fallback (or ``None``) when the helper was not built.
"""
