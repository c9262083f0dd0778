"""The error classes' shared contract: errno kept alike on VfioError and PciError, one-line
messages, and pickling (multiprocessing) that keeps every attribute."""

from __future__ import annotations

import errno
import pickle

import pytest

from ivshmem_bus.errors import (
    DeviceNotFound,
    IvshmemBusError,
    PciError,
    ServerClientError,
    ServerClosedError,
    VfioError,
)


@pytest.mark.parametrize(
    "exc",
    [
        VfioError(errno.EACCES, "opening group /dev/vfio/7"),
        PciError("writing /sys/bus/pci/drivers/vfio-pci/bind", errno=errno.EACCES, path="/x"),
    ],
)
def test_vfio_and_pci_errors_carry_errno_alike(exc: OSError) -> None:
    assert isinstance(exc, OSError) and isinstance(exc, IvshmemBusError)
    assert (exc.errno, exc.strerror) == (errno.EACCES, "Permission denied")
    assert "[Errno" not in str(exc)


def test_pci_error_without_errno_is_its_message() -> None:
    exc = PciError("0000:00:03.0 is 8086:100e, not ivshmem")
    assert (exc.errno, exc.strerror, exc.path) == (None, None, None)
    assert str(exc) == "0000:00:03.0 is 8086:100e, not ivshmem"


def test_pci_errors_pickle_with_errno_path_and_message() -> None:
    exc = pickle.loads(pickle.dumps(PciError("reading x", errno=errno.ENOENT, path="/sys/x")))
    assert type(exc) is PciError
    assert (str(exc), exc.errno, exc.path) == ("reading x", errno.ENOENT, "/sys/x")
    nf = pickle.loads(pickle.dumps(DeviceNotFound("0000:00:09.0", "/fake/devices")))
    assert type(nf) is DeviceNotFound
    assert (nf.bdf, nf.path, nf.errno) == ("0000:00:09.0", "/fake/devices/0000:00:09.0", None)
    assert str(nf) == (
        "no PCI device 0000:00:09.0 in /fake/devices: check the address with `lspci -D`"
    )


def test_vfio_error_pickles_with_what_and_fix() -> None:
    exc = pickle.loads(pickle.dumps(VfioError(errno.EBUSY, "opening /dev/vfio/3", fix="stop it")))
    assert (exc.errno, exc.what, exc.fix) == (errno.EBUSY, "opening /dev/vfio/3", "stop it")
    assert str(exc) == "opening /dev/vfio/3: EBUSY (Device or resource busy); stop it"


def test_server_closed_error_is_a_server_client_error() -> None:
    assert issubclass(ServerClosedError, ServerClientError)
