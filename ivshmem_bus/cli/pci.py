"""The PCI commands: list, vmid, bind, unbind: their parsers and handlers (printing only)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from ..errors import IvshmemBusError, PciError
from .args import bdf_arg

if TYPE_CHECKING:  # the VFIO edge loads only for the commands that use it
    from ..backends.vfio.pci import PciFunction


def _read_vmid(fn: PciFunction, args: argparse.Namespace) -> tuple[int | None, str | None]:
    """(VMID, None) or (None, why it cannot be read), the way the device allows."""
    from ..backends.vfio import pci

    if fn.driver == pci.VFIO_PCI:
        from ..backends.vfio.device import open_device

        try:
            with open_device(fn.bdf, sysfs=args.sysfs, dev=args.dev) as dev:
                return dev.vmid, None
        except (IvshmemBusError, OSError) as exc:
            return None, f"VFIO: {exc}"
    if fn.driver is None:
        try:
            return pci.read_vmid_from_resource0(fn, root=args.sysfs), None
        except (IvshmemBusError, OSError) as exc:
            return None, f"resource0: {exc}"
    return None, f"owned by {fn.driver}: bind it to vfio-pci (ivshmem-bus bind {fn.bdf})"


def _group_label(fn: PciFunction, dev_root: str) -> str:
    """The group as its VFIO node is named: ``N``, or ``noiommu-N`` in no-IOMMU mode."""
    from ..backends.vfio import pci

    if fn.iommu_group is None:
        return "-"
    node = pci.find_group_node(fn.iommu_group, dev_root)
    return str(fn.iommu_group) if node is None else node.name


def cmd_list(args: argparse.Namespace) -> int:
    from ..backends.vfio import pci

    rows: list[dict[str, Any]] = []  # the --json objects; the table formats the same values
    for fn in pci.list_ivshmem(args.sysfs):
        vmid, why = _read_vmid(fn, args)
        rows.append(
            {
                "bdf": fn.bdf,
                "kind": "doorbell" if fn.is_doorbell else "plain",
                "revision": fn.revision,
                "driver": fn.driver,
                "iommu_group": _group_label(fn, args.dev),
                "bar2_size": fn.shmem_size,
                "msix_vectors": fn.msix_vectors,
                "vmid": vmid,
                "vmid_error": why,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no ivshmem devices (1af4:1110); try the fake device: ivshmem-bus demo")
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for col in ("BDF", "TYPE", "REV", "DRIVER", "GROUP", "BAR2", "MSI-X", "VMID"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["bdf"], r["kind"], str(r["revision"]), r["driver"] or "none", r["iommu_group"],
            _size(r["bar2_size"]), str(r["msix_vectors"] if r["msix_vectors"] is not None else "-"),
            f"0x{r['vmid']:x}" if r["vmid"] is not None else f"? ({r['vmid_error']})",
        )  # fmt: skip
    Console(soft_wrap=True).print(table)
    return 0


def _size(n: int) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def cmd_vmid(args: argparse.Namespace) -> int:
    from ..backends.vfio import pci

    if args.bdf:
        fn = pci.get_function(args.bdf, args.sysfs)
        if not fn.is_ivshmem:
            raise PciError(
                f"{fn.bdf} is not an ivshmem device (1af4:1110): 'ivshmem-bus list' shows them"
            )
    else:
        doorbells = [fn for fn in pci.list_ivshmem(args.sysfs) if fn.is_doorbell]
        if not doorbells:
            raise PciError(
                "no ivshmem-doorbell device: start the guest with -device ivshmem-doorbell"
            )
        if len(doorbells) > 1:
            raise PciError(
                f"several ivshmem-doorbell devices ({', '.join(f.bdf for f in doorbells)}): "
                f"name one: ivshmem-bus vmid BDF"
            )
        fn = doorbells[0]
    vmid, why = _read_vmid(fn, args)
    if vmid is None:
        raise PciError(f"{fn.bdf}: cannot read the VMID: {why}")
    print(vmid if args.format == "dec" else f"0x{vmid:x}")
    return 0


def cmd_bind(args: argparse.Namespace) -> int:
    from ..backends.vfio import pci

    b = pci.bind(args.bdf, root=args.sysfs, dev_root=args.dev, noiommu=args.noiommu)
    if args.noiommu:  # said once it applies: not before refusing a non-ivshmem device
        print(
            "warning: no-IOMMU mode gives the device unrestricted DMA and taints the kernel",
            file=sys.stderr,
        )
    before = b.previous_driver or "no driver"
    if b.previous_driver == pci.VFIO_PCI:
        print(f"{b.bdf} is already bound to vfio-pci ({b.node})")
    else:
        print(f"{b.bdf} bound to vfio-pci ({b.node}); it was on {before}")
    return 0


def cmd_unbind(args: argparse.Namespace) -> int:
    from ..backends.vfio import pci

    now = pci.unbind(args.bdf, root=args.sysfs)
    print(f"{pci.normalize_bdf(args.bdf)} released from vfio-pci; now on {now or 'no driver'}")
    return 0


# -- parsers ---------------------------------------------------------------------------------


def add_pci_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The PCI commands' parsers, in the order ``--help`` lists them."""
    for add in (_add_list, _add_vmid, _add_bind, _add_unbind):
        add(sub)


def _add_list(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``list``: every ivshmem function, as a table or JSON."""
    lst = sub.add_parser("list", help="every ivshmem PCI function, like lspci")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=cmd_list)


def _add_vmid(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``vmid [BDF]``: this machine's IVPosition (also ``ivshmem-vmid``)."""
    vmid = sub.add_parser("vmid", help="this machine's VMID (IVPosition), for the other side")
    vmid.add_argument("bdf", nargs="?", type=bdf_arg, metavar="BDF")
    vmid.add_argument("--format", choices=["hex", "dec"], default="hex")
    vmid.set_defaults(func=cmd_vmid)


def _add_bind(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``bind BDF``: to vfio-pci, no-IOMMU only when asked."""
    bind = sub.add_parser("bind", help="bind an ivshmem function to vfio-pci (root)")
    bind.add_argument("bdf", type=bdf_arg, metavar="BDF")
    bind.add_argument(
        "--noiommu",
        action="store_true",
        help="allow no-IOMMU mode (unrestricted DMA; taints the kernel)",
    )
    bind.set_defaults(func=cmd_bind)


def _add_unbind(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``unbind BDF``: back to the previous driver."""
    unbind = sub.add_parser("unbind", help="give the function back to its previous driver (root)")
    unbind.add_argument("bdf", type=bdf_arg, metavar="BDF")
    unbind.set_defaults(func=cmd_unbind)
