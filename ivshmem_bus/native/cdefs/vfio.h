/*
 * The VFIO userspace ABI that ivshmem_bus uses, declared for cffi.
 *
 * Written for this project from the documented ABI (see docs/vfio.md §2), not
 * copied from <linux/vfio.h>. This file is read twice, as data:
 *   - by ivshmem_bus/_ffi.py as an ABI-mode cdef (cffi's own C parser, no compiler), and
 *   - by tools/build_helper.py, both as the API-mode cdef and as real C in the helper's source.
 * So it must be legal for both: no #include, no #if, no include guard, and every #define an
 * integer literal (cffi cannot evaluate expressions such as `1 << 2` or _IO()).
 * Types come from <stdint.h> (cffi knows uint32_t and friends without it).
 *
 * tests/test_cdefs.py compiles a probe against the system <linux/vfio.h> and compares every
 * sizeof, offsetof, member size and constant here with it.
 */

/* ioctl numbers: _IO(';', 100 + n) == (0x3B << 8) | (100 + n); no size or direction bits. */
#define VFIO_GET_API_VERSION        0x3B64  /* container; returns VFIO_API_VERSION */
#define VFIO_CHECK_EXTENSION        0x3B65  /* container; arg: int by value */
#define VFIO_SET_IOMMU              0x3B66  /* container; arg: int by value */
#define VFIO_GROUP_GET_STATUS       0x3B67  /* group; struct vfio_group_status * */
#define VFIO_GROUP_SET_CONTAINER    0x3B68  /* group; int * (the container fd) */
#define VFIO_GROUP_UNSET_CONTAINER  0x3B69  /* group; none */
#define VFIO_GROUP_GET_DEVICE_FD    0x3B6A  /* group; NUL-terminated BDF; returns the fd */
#define VFIO_DEVICE_GET_INFO        0x3B6B  /* device; struct vfio_device_info * */
#define VFIO_DEVICE_GET_REGION_INFO 0x3B6C  /* device; struct vfio_region_info * + caps */
#define VFIO_DEVICE_GET_IRQ_INFO    0x3B6D  /* device; struct vfio_irq_info * */
#define VFIO_DEVICE_SET_IRQS        0x3B6E  /* device; struct vfio_irq_set * + data */
#define VFIO_DEVICE_RESET           0x3B6F  /* device; none */

#define VFIO_API_VERSION            0

/* VFIO_CHECK_EXTENSION / VFIO_SET_IOMMU arguments. */
#define VFIO_TYPE1_IOMMU            1
#define VFIO_TYPE1v2_IOMMU          3
#define VFIO_NOIOMMU_IOMMU          8

/* Every info struct starts with argsz (bytes the caller provides) and flags. */
struct vfio_group_status {
    uint32_t argsz;
    uint32_t flags;
};
#define VFIO_GROUP_FLAGS_VIABLE         0x1
#define VFIO_GROUP_FLAGS_CONTAINER_SET  0x2

/*
 * 24 bytes as upstream declares it today; Debian bookworm's 6.1 header stops at cap_offset
 * (20 bytes). The kernel accepts any argsz >= 16 (up to num_irqs), so the pad is harmless.
 */
struct vfio_device_info {
    uint32_t argsz;
    uint32_t flags;
    uint32_t num_regions;  /* highest region index + 1 */
    uint32_t num_irqs;     /* highest IRQ index + 1 */
    uint32_t cap_offset;   /* from the start of this struct; 0 = no capability */
    uint32_t pad;
};
#define VFIO_DEVICE_FLAGS_RESET     0x1
#define VFIO_DEVICE_FLAGS_PCI       0x2
#define VFIO_DEVICE_FLAGS_CAPS      0x80

/*
 * With FLAG_CAPS, a too-small argsz is not an error: the kernel raises argsz, leaves
 * cap_offset 0 and succeeds. The caller grows its buffer to argsz and asks again.
 */
struct vfio_region_info {
    uint32_t argsz;
    uint32_t flags;
    uint32_t index;
    uint32_t cap_offset;   /* from the start of this struct; 0 = no capability */
    uint64_t size;         /* bytes; 0 = region not implemented */
    uint64_t offset;       /* where the region starts in the device fd (never compute it) */
};
#define VFIO_REGION_INFO_FLAG_READ  0x1
#define VFIO_REGION_INFO_FLAG_WRITE 0x2
#define VFIO_REGION_INFO_FLAG_MMAP  0x4
#define VFIO_REGION_INFO_FLAG_CAPS  0x8

/* A capability chain entry; next is an offset from the start of the info buffer, 0 ends. */
struct vfio_info_cap_header {
    uint16_t id;
    uint16_t version;
    uint32_t next;
};
#define VFIO_REGION_INFO_CAP_SPARSE_MMAP    1
#define VFIO_REGION_INFO_CAP_TYPE           2
#define VFIO_REGION_INFO_CAP_MSIX_MAPPABLE  3

struct vfio_region_sparse_mmap_area {
    uint64_t offset;       /* from the start of the region */
    uint64_t size;
};

struct vfio_region_info_cap_sparse_mmap {
    struct vfio_info_cap_header header;
    uint32_t nr_areas;
    uint32_t reserved;
    struct vfio_region_sparse_mmap_area areas[];
};

/* vfio-pci's fixed region indexes (an anonymous enum in the kernel header). */
#define VFIO_PCI_BAR0_REGION_INDEX      0
#define VFIO_PCI_BAR1_REGION_INDEX      1
#define VFIO_PCI_BAR2_REGION_INDEX      2
#define VFIO_PCI_BAR3_REGION_INDEX      3
#define VFIO_PCI_BAR4_REGION_INDEX      4
#define VFIO_PCI_BAR5_REGION_INDEX      5
#define VFIO_PCI_ROM_REGION_INDEX       6
#define VFIO_PCI_CONFIG_REGION_INDEX    7
#define VFIO_PCI_VGA_REGION_INDEX       8
#define VFIO_PCI_NUM_REGIONS            9

/* vfio-pci's fixed IRQ indexes. */
#define VFIO_PCI_INTX_IRQ_INDEX     0
#define VFIO_PCI_MSI_IRQ_INDEX      1
#define VFIO_PCI_MSIX_IRQ_INDEX     2
#define VFIO_PCI_ERR_IRQ_INDEX      3
#define VFIO_PCI_REQ_IRQ_INDEX      4
#define VFIO_PCI_NUM_IRQS           5

struct vfio_irq_info {
    uint32_t argsz;
    uint32_t flags;
    uint32_t index;
    uint32_t count;        /* vectors in this index; 0 = not implemented */
};
#define VFIO_IRQ_INFO_EVENTFD       0x1
#define VFIO_IRQ_INFO_MASKABLE      0x2
#define VFIO_IRQ_INFO_AUTOMASKED    0x4
#define VFIO_IRQ_INFO_NORESIZE      0x8

/*
 * Followed by count elements of the DATA_* type: for DATA_EVENTFD, int32 fds (-1 = leave the
 * vector unassigned); argsz covers the header and the data. Enable MSI-X eventfds:
 * flags DATA_EVENTFD|ACTION_TRIGGER (0x24), index MSIX, start 0. Disable: DATA_NONE|
 * ACTION_TRIGGER (0x21) with count 0.
 */
struct vfio_irq_set {
    uint32_t argsz;
    uint32_t flags;
    uint32_t index;
    uint32_t start;
    uint32_t count;
    uint8_t data[];        /* byte 20 */
};
#define VFIO_IRQ_SET_DATA_NONE          0x1
#define VFIO_IRQ_SET_DATA_BOOL          0x2
#define VFIO_IRQ_SET_DATA_EVENTFD       0x4
#define VFIO_IRQ_SET_ACTION_MASK        0x8
#define VFIO_IRQ_SET_ACTION_UNMASK      0x10
#define VFIO_IRQ_SET_ACTION_TRIGGER     0x20
#define VFIO_IRQ_SET_DATA_TYPE_MASK     0x7
#define VFIO_IRQ_SET_ACTION_TYPE_MASK   0x38

/*
 * PCI config space (PCI Local Bus spec 6.2.2; <linux/pci_regs.h>), reached through the CONFIG
 * region. vfio-pci leaves bus mastering off, and without it QEMU drops MSI-X writes.
 */
#define PCI_COMMAND                 0x04    /* 16 bits */
#define PCI_COMMAND_MEMORY          0x2     /* respond to memory-space accesses (BARs) */
#define PCI_COMMAND_MASTER          0x4     /* bus mastering: needed for MSI-X */

/* libc's ioctl; ABI mode calls it directly when the compiled helper is absent. */
int ioctl(int, unsigned long, ...);
