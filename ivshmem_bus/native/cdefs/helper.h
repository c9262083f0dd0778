/*
 * The compiled helper's prototypes (body in helper.c). Read as a cdef by
 * tools/build_helper.py, so cffi-legal: no #include, no include guard.
 *
 * Why C at all: a BAR register must see exactly one aligned 32-bit access, and Python's
 * struct.pack_into, slice assignment and cffi ABI-mode stores issue two (measured; see
 * docs/vfio.md §5). A volatile access in compiled C is one instruction.
 */

/* Exactly one aligned 32-bit volatile load/store at base + off (off a multiple of 4). */
uint32_t ivb_read32(const volatile void *base, size_t off);
void ivb_write32(volatile void *base, size_t off, uint32_t v);

/* A full (StoreLoad) barrier: queues on weakly ordered CPUs, doorbell coalescing everywhere.
 * The block copies below carry their own acquire/release, so no half fences are needed. */
void ivb_fence_full(void);

/*
 * Block copies for one SPSC queue (the layout of ivshmem_bus/queue.py): n consecutive 64-byte
 * slots between a private buffer and the ring in one call, with one index publish. Python's
 * per-slot overhead (~0.3 us) is 20x a 64-byte memcpy; a block call pays it once per block.
 *
 * q is the queue's first byte, cap its slot count; mine is the caller's own index (head for
 * put, tail for get) and cached its last value of the peer's. The peer's index is re-read
 * (load-acquire) only when the cached value does not leave room for n, and checked against
 * cap before use. Returns ((int64_t)peer_index << 32) | slots_copied, or -1 - index when
 * the peer's index is corrupt (>= cap; nothing copied), or INT64_MIN when cap < 2 or mine or
 * cached is >= cap (a caller bug; nothing copied or stored).
 */
int64_t ivb_q_put_block(uint8_t *q, uint32_t cap, uint32_t mine, uint32_t cached,
                        const uint8_t *src, uint32_t n);
int64_t ivb_q_get_block(uint8_t *q, uint32_t cap, uint32_t mine, uint32_t cached,
                        uint8_t *dst, uint32_t n);

/* ioctl with a pointer or an integer argument: -1 on failure, errno left as the kernel set it. */
int ivb_ioctl_ptr(int fd, unsigned long req, void *arg);
int ivb_ioctl_int(int fd, unsigned long req, unsigned long arg);
