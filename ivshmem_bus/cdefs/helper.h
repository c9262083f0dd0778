/*
 * The compiled helper's prototypes (body in helper.c). Read as a cdef by
 * tools/build_helper.py, so cffi-legal: no #include, no include guard.
 *
 * Why C at all: a BAR register must see exactly one aligned 32-bit access, and Python's
 * struct.pack_into, slice assignment and cffi ABI-mode stores issue two (measured; see
 * vfio-notes.md). A volatile access in compiled C is one instruction.
 */

/* Exactly one aligned 32-bit volatile load/store at base + off (off a multiple of 4). */
uint32_t ivb_read32(const volatile void *base, size_t off);
void ivb_write32(volatile void *base, size_t off, uint32_t v);

/* Memory barriers for shared-memory queues on weakly ordered CPUs. */
void ivb_fence_acquire(void);
void ivb_fence_release(void);
void ivb_fence_full(void);

/* ioctl with a pointer or an integer argument: -1 on failure, errno left as the kernel set it. */
int ivb_ioctl_ptr(int fd, unsigned long req, void *arg);
int ivb_ioctl_int(int fd, unsigned long req, unsigned long arg);
