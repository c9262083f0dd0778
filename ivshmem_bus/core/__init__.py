"""The sans-I/O core: bytes in shared memory and on the wire, and nothing else.

Nothing here opens a file, maps memory, makes a system call or imports a backend: every layer
above hands the core a buffer (a BAR2 view, an mmap, a bytearray in tests) and a fence.
"""
