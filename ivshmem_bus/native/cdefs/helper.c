/*
 * The compiled helper: single-access MMIO words, fences, typed ioctl wrappers, and the SPSC
 * queue's block copies.
 *
 * Built by tools/build_helper.py into ivshmem_bus._helper (cffi API mode); loaded only by
 * ivshmem_bus/_ffi.py. Compiled with -Wconversion: keep every conversion explicit.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>

#include "helper.h"

uint32_t ivb_read32(const volatile void *base, size_t off)
{
    /* volatile: the compiler may not split, merge, widen or drop this load. */
    return *(const volatile uint32_t *)((const volatile uint8_t *)base + off);
}

void ivb_write32(volatile void *base, size_t off, uint32_t v)
{
    /* One store: QEMU's ivshmem matches a doorbell on the whole 32-bit value. */
    *(volatile uint32_t *)((volatile uint8_t *)base + off) = v;
}

void ivb_fence_full(void)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

/*
 * ioctl is variadic; these fix the third argument's type so cffi calls them as ordinary
 * functions. Nothing runs between ioctl() and the return, so errno is the kernel's, and cffi
 * saves it for ffi.errno right after the call.
 */
int ivb_ioctl_ptr(int fd, unsigned long req, void *arg)
{
    return ioctl(fd, req, arg);
}

int ivb_ioctl_int(int fd, unsigned long req, unsigned long arg)
{
    return ioctl(fd, req, arg);
}

/* Block copies for the SPSC queue: see helper.h. Layout constants of ivshmem_bus/queue.py. */
#define IVB_Q_HEADER 128u
#define IVB_Q_SLOT 64u
#define IVB_Q_HEAD 0x00u
#define IVB_Q_TAIL 0x40u

static uint32_t ivb_q_used(uint32_t head, uint32_t tail, uint32_t cap)
{
    return head >= tail ? head - tail : head + (cap - tail);
}

static void ivb_q_store(uint8_t *q, uint32_t off, uint32_t v)
{
    /* One aligned 32-bit store, ordered after the slot copies (release). */
    __atomic_store_n((uint32_t *)(void *)(q + off), v, __ATOMIC_RELEASE);
}

static uint32_t ivb_q_load(const uint8_t *q, uint32_t off)
{
    /* One aligned 32-bit load, ordered before the slot copies that depend on it (acquire). */
    return __atomic_load_n((const uint32_t *)(const void *)(q + off), __ATOMIC_ACQUIRE);
}

int64_t ivb_q_put_block(uint8_t *q, uint32_t cap, uint32_t mine, uint32_t cached,
                        const uint8_t *src, uint32_t n)
{
    if (cap < 2 || mine >= cap || cached >= cap)
        return INT64_MIN;
    uint32_t room = cap - 1u - ivb_q_used(mine, cached, cap);
    if (room < n) {  /* full by the cache: look at the consumer's tail */
        cached = ivb_q_load(q, IVB_Q_TAIL);
        if (cached >= cap)
            return -1 - (int64_t)cached;
        room = cap - 1u - ivb_q_used(mine, cached, cap);
    }
    if (n > room)
        n = room;
    if (n) {
        uint32_t first = cap - mine < n ? cap - mine : n;  /* slots before the wrap */
        memcpy(q + IVB_Q_HEADER + (size_t)mine * IVB_Q_SLOT, src, (size_t)first * IVB_Q_SLOT);
        memcpy(q + IVB_Q_HEADER, src + (size_t)first * IVB_Q_SLOT,
               (size_t)(n - first) * IVB_Q_SLOT);
        uint32_t next = mine + n;
        ivb_q_store(q, IVB_Q_HEAD, next >= cap ? next - cap : next);
    }
    return (int64_t)(((uint64_t)cached << 32) | n);
}

int64_t ivb_q_get_block(uint8_t *q, uint32_t cap, uint32_t mine, uint32_t cached,
                        uint8_t *dst, uint32_t n)
{
    if (cap < 2 || mine >= cap || cached >= cap)
        return INT64_MIN;
    uint32_t avail = ivb_q_used(cached, mine, cap);
    if (avail < n) {  /* fewer than n by the cache: look at the producer's head */
        cached = ivb_q_load(q, IVB_Q_HEAD);
        if (cached >= cap)
            return -1 - (int64_t)cached;
        avail = ivb_q_used(cached, mine, cap);
    }
    if (n > avail)
        n = avail;
    if (n) {
        uint32_t first = cap - mine < n ? cap - mine : n;
        memcpy(dst, q + IVB_Q_HEADER + (size_t)mine * IVB_Q_SLOT, (size_t)first * IVB_Q_SLOT);
        memcpy(dst + (size_t)first * IVB_Q_SLOT, q + IVB_Q_HEADER,
               (size_t)(n - first) * IVB_Q_SLOT);
        uint32_t next = mine + n;
        ivb_q_store(q, IVB_Q_TAIL, next >= cap ? next - cap : next);
    }
    return (int64_t)(((uint64_t)cached << 32) | n);
}
