"""``python -m tools.qemu_e2e``: set up, smoke-test, or run commands in two guests.

    python -m tools.qemu_e2e setup [--noiommu]   apt packages, kernel, initramfs (cached; root)
    python -m tools.qemu_e2e smoke               one guest: python3 -c 'import ivshmem_bus'
    python -m tools.qemu_e2e run [--mode viommu|plain|noiommu] [--timeout S] -- A_CMD -- B_CMD
                                                 server + two guests, A_CMD in a, B_CMD in b
    python -m tools.qemu_e2e test [--mode ...]   the pytest scenarios (tests/e2e), -m e2e

Exit status: 0 when every guest command exited 0, 1 otherwise, 2 on bad usage. Each guest's
stdout and stderr are printed with their exit status; on a timeout, the console log.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from .assets import REPO, AssetsMissing
from .machine import IVSHMEM_BDF, MODES, Cluster, GuestError, single_guest
from .setup import setup


def _print_result(res) -> None:
    print(f"=== {res.guest}: {res.command!r} -> exit {res.returncode} ({res.seconds:.1f} s)")
    if res.stdout:
        print(res.stdout, end="" if res.stdout.endswith("\n") else "\n")
    if res.stderr:
        print(f"--- {res.guest} stderr ---")
        print(res.stderr, end="" if res.stderr.endswith("\n") else "\n")


def _cmd_setup(args: argparse.Namespace) -> int:
    assets = setup(noiommu=args.noiommu)
    print(f"qemu:      {assets.qemu} ({assets.accel})")
    print(f"kernel:    {assets.kernel}")
    print(f"initramfs: {assets.initramfs}")
    print(f"noiommu:   {assets.initramfs_noiommu or 'not built (setup --noiommu)'}")
    return 0


def _cmd_smoke(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    with single_guest(iommu=args.iommu) as guest:
        print(f"booted to the agent in {guest.boot_seconds:.1f} s (root: {guest.rootfs})")
        res = guest.run(
            '"$PY" -c "import sys, ivshmem_bus; print(sys.version.split()[0], '
            'ivshmem_bus.__file__)"; uname -r',
            timeout=args.timeout,
        )
        _print_result(res)
    print(f"total {time.monotonic() - t0:.1f} s")
    return 0 if res.returncode == 0 else 1


def _split_commands(rest: list[str]) -> list[str]:
    """``-- A -- B``: each group of words after a ``--`` is one guest's shell command."""
    groups: list[list[str]] = []
    for word in rest:
        if word == "--":
            groups.append([])
        elif groups:
            groups[-1].append(word)
        else:
            groups.append([word])
    return [" ".join(g) for g in groups if g]


def _cmd_run(args: argparse.Namespace) -> int:
    commands = _split_commands(args.commands)
    if not commands:
        print("run: give one command per guest: run -- 'A_CMD' -- 'B_CMD'", file=sys.stderr)
        return 2
    names = [chr(ord("a") + i) for i in range(len(commands))]
    t0 = time.monotonic()
    with Cluster(args.mode, names) as cluster:
        for name, vmid in cluster.vmids.items():
            print(f"guest {name}: vmid {vmid} (device {IVSHMEM_BDF})")
        results = cluster.run_all(dict(zip(names, commands, strict=True)), args.timeout)
    for res in results.values():
        _print_result(res)
    print(f"total {time.monotonic() - t0:.1f} s")
    return 0 if all(r.returncode == 0 for r in results.values()) else 1


def _cmd_test(args: argparse.Namespace) -> int:
    env = {**os.environ}
    if args.mode:
        env["IVSHMEM_E2E_MODES"] = ",".join(args.mode)
    cmd = [sys.executable, "-m", "pytest", "-m", "e2e", "tests/e2e", *args.pytest_args]
    return subprocess.call(cmd, cwd=REPO, env=env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.qemu_e2e",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("setup", help="install and cache what the guests need (root)")
    p.add_argument("--noiommu", action="store_true", help="also rebuild vfio.ko with NOIOMMU")
    p.set_defaults(func=_cmd_setup)
    p = sub.add_parser("smoke", help="boot one guest and import ivshmem_bus in it")
    p.add_argument("--iommu", choices=["none", "viommu", "noiommu"], default="none")
    p.add_argument("--timeout", type=float, default=120.0)
    p.set_defaults(func=_cmd_smoke)
    p = sub.add_parser("run", help="server + one guest per command; run them; power off")
    p.add_argument("--mode", choices=MODES, default="viommu")
    p.add_argument("--timeout", type=float, default=300.0, help="per command, seconds")
    p.add_argument("commands", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_run)
    p = sub.add_parser("test", help="run the e2e pytest scenarios")
    p.add_argument("--mode", choices=MODES, action="append")
    p.add_argument("pytest_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_test)
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "test":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "test":  # everything test does not know goes to pytest
        args.pytest_args = [*extra, *args.pytest_args]
    try:
        return args.func(args)
    except AssetsMissing as exc:
        print(f"qemu-e2e: {exc}", file=sys.stderr)
        return 1
    except GuestError as exc:
        print(f"qemu-e2e: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
