/*
 * The compiled helper: single-access MMIO words, fences, and typed ioctl wrappers.
 *
 * Built by tools/build_helper.py into ivshmem_bus._helper (cffi API mode); loaded only by
 * ivshmem_bus/_ffi.py. Compiled with -Wconversion: keep every conversion explicit.
 */
#include <stddef.h>
#include <stdint.h>
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

void ivb_fence_acquire(void)
{
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
}

void ivb_fence_release(void)
{
    __atomic_thread_fence(__ATOMIC_RELEASE);
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
