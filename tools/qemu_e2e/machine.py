"""QEMU guests that run commands, and the ivshmem server they share.

A ``Guest`` is one ``qemu-system-x86_64`` process booting the cached Debian kernel and the
harness's initramfs (``init.sh``). The host talks to the guest's init through the guest's
results directory, shared read-write over virtio-9p and mounted inside the guest at the same
path as on the host:

    ready           written once the guest can run commands (its content: the root fs kind)
    cmd.N           the host writes a shell script (by rename, so it appears whole)
    out.N err.N     the command's stdout and stderr, as it runs
    rc.N            its exit status, written last (by rename)
    stop.N          the host asks a ``spawn``-ed command to stop (SIGTERM)
    poweroff        the host asks the guest to power off

Every wait is bounded; on a timeout the error carries the guest's console log. Only the
processes this module started are ever signalled, each by its own pid.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .assets import REPO, Assets, find_assets, log

IVSHMEM_ADDR = "0x10"  # fixed slot: the device is 0000:00:10.0 in every guest
IVSHMEM_BDF = "0000:00:10.0"
MODES = ("viommu", "plain", "noiommu")
# Cluster(peer_ram=True): the last guest's RAM is a shared file, and every guest also gets an
# ivshmem-plain function over it at 00:11.0 (the others see the peer's RAM; the last guest
# sees its own, which is how its Python driver reaches guest-physical addresses: BAR2
# offset = file offset = guest-physical address, q35 with RAM <= 2 GiB having no hole below
# it). The last guest's kernel is limited to PEER_RAM_KERNEL_MB, so the RAM above is never
# the kernel's: the driver places its queues and buffers there (PEER_RAM_REGION).
PEER_RAM_ADDR = "0x11"
PEER_RAM_BDF = "0000:00:11.0"
PEER_RAM_KERNEL_MB = 768
PEER_RAM_REGION = (PEER_RAM_KERNEL_MB << 20, 64 << 20)  # (guest-physical start, length)
_POLL = 0.02
_CONSOLE_TAIL = 16000


def _die_with_parent() -> None:
    """preexec_fn: SIGKILL this child when the thread that started it dies (PR_SET_PDEATHSIG),
    so a harness killed without cleanup (SIGKILL, SIGTERM) leaves no QEMU or server behind."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


class GuestError(RuntimeError):
    """A guest failed (QEMU exited, a command failed); the message ends with its console log."""


class GuestTimeout(GuestError):
    """A bounded wait on a guest expired; the message ends with its console log."""


@dataclass
class Result:
    """What a command did inside a guest."""

    guest: str
    command: str
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def check(self) -> Result:
        """Return self if the command exited 0, else raise ``GuestError`` with its output."""
        if self.returncode != 0:
            raise GuestError(
                f"[{self.guest}] {self.command!r} exited {self.returncode} after "
                f"{self.seconds:.1f} s\n--- stdout ---\n{self.stdout[-_CONSOLE_TAIL:]}"
                f"\n--- stderr ---\n{self.stderr[-_CONSOLE_TAIL:]}"
            )
        return self


@dataclass
class Job:
    """A command submitted to a guest; ``wait`` for its ``Result``."""

    guest: Guest
    n: int
    command: str
    started: float = field(default_factory=time.monotonic)
    _result: Result | None = None

    def _path(self, kind: str) -> Path:
        return self.guest.results / f"{kind}.{self.n}"

    def done(self) -> bool:
        return self._result is not None or self._path("rc").exists()

    def output(self) -> tuple[str, str]:
        """stdout and stderr so far."""
        return tuple(  # type: ignore[return-value]
            p.read_text(errors="replace") if p.exists() else ""
            for p in (self._path("out"), self._path("err"))
        )

    def wait(self, timeout: float) -> Result:
        """The result; ``GuestTimeout`` (with output so far and the console) after ``timeout``."""
        if self._result is not None:
            return self._result
        deadline = time.monotonic() + timeout
        rc_path = self._path("rc")
        while not rc_path.exists():
            self.guest.check_alive(f"while running {self.command!r}")
            if time.monotonic() >= deadline:
                out, err = self.output()
                raise GuestTimeout(
                    self.guest.describe_failure(
                        f"command {self.n} {self.command!r} still running after {timeout:g} s"
                        f"\n--- stdout so far ---\n{out[-4000:]}\n--- stderr so far ---\n"
                        f"{err[-4000:]}"
                    )
                )
            time.sleep(_POLL)
        seconds = time.monotonic() - self.started
        out, err = self.output()
        text = rc_path.read_text().strip()
        self._result = Result(self.guest.name, self.command, int(text or -1), out, err, seconds)
        return self._result

    def stop(self) -> None:
        """Ask a ``spawn``-ed command to stop: it gets SIGTERM within about 0.1 s."""
        self._path("stop").write_text("")


class Guest:
    """One QEMU guest (q35, TCG unless a real KVM is usable) that runs commands.

    Args:
        name: short name, also the results directory's name under ``workdir``.
        ivshmem_args: QEMU arguments adding the ivshmem device (see ``Cluster``).
        iommu: ``"viommu"`` (intel-iommu, intel_iommu=on), ``"noiommu"`` (the rebuilt vfio
            modules) or ``"none"``.
        python: the interpreter commands get as ``$PY`` (default: the one running this).
    """

    def __init__(
        self,
        name: str,
        assets: Assets,
        workdir: Path,
        *,
        ivshmem_args: Sequence[str] = (),
        iommu: str = "none",
        memory_mb: int = 1024,
        python: str | None = None,
        machine_options: Sequence[str] = (),
        kernel_args: Sequence[str] = (),
    ) -> None:
        if iommu not in ("viommu", "noiommu", "none"):
            raise ValueError(f"iommu must be viommu, noiommu or none, not {iommu!r}")
        self.name = name
        self.assets = assets
        self.iommu = iommu
        self.results = workdir / name
        if re.search(r"[\s,]", str(self.results)):  # QEMU option and kernel cmdline syntax
            raise ValueError(f"{self.results}: the work directory needs a path without spaces "
                             "or commas")  # fmt: skip
        self.console = workdir / f"{name}.console.log"
        self.qemu_log = workdir / f"{name}.qemu.log"
        self.memory_mb = memory_mb
        self.ivshmem_args = list(ivshmem_args)
        self.machine_options = list(machine_options)
        self.kernel_args = list(kernel_args)
        self.python = python or os.environ.get("IVSHMEM_E2E_PYTHON") or sys.executable
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.boot_seconds: float | None = None
        self.rootfs = ""
        self._n = 0

    # QEMU ----------------------------------------------------------------------------------------

    def qemu_command(self) -> list[str]:
        a = self.assets
        machine = ",".join(["q35", *self.machine_options])
        quiet = [] if os.environ.get("IVSHMEM_E2E_VERBOSE") else ["quiet", "loglevel=4"]
        append = [
            "console=ttyS0", "panic=-1", *quiet, "rdinit=/init",
            "8250.nr_uarts=1", "tsc=reliable", "no_timer_check", "mitigations=off",
            f"e2e_results={self.results}", *self.kernel_args,
        ]  # fmt: skip
        initramfs = a.initramfs
        iommu_dev: list[str] = []
        if self.iommu == "viommu":
            # intremap needs a split irqchip with KVM; TCG has no in-kernel irqchip anyway
            machine += ",kernel-irqchip=split" if a.kvm else ""
            iommu_dev = ["-device", "intel-iommu,intremap=on"]
            append.append("intel_iommu=on")
        elif self.iommu == "noiommu":
            if a.initramfs_noiommu is None:
                raise GuestError(
                    "no-IOMMU mode needs vfio.ko rebuilt with CONFIG_VFIO_NOIOMMU: run "
                    "'python -m tools.qemu_e2e setup --noiommu'"
                )
            initramfs = a.initramfs_noiommu
        accel = ["-accel", "kvm", "-cpu", "host"] if a.kvm else ["-accel", "tcg", "-cpu", "max"]
        return [
            a.qemu, "-nodefaults", "-no-user-config", "-machine", machine, *accel,
            "-smp", "1", "-m", str(self.memory_mb), "-display", "none", "-vga", "none",
            "-monitor", "none", "-serial", f"file:{self.console}", "-no-reboot",
            "-kernel", str(a.kernel), "-initrd", str(initramfs), "-append", " ".join(append),
            *iommu_dev,  # before the PCI devices it translates
            "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,"
            "multidevs=remap",
            "-virtfs", f"local,path={self.results},mount_tag=results,security_model=none,"
            "multidevs=remap",
            *self.ivshmem_args,
        ]  # fmt: skip

    def start(self) -> None:
        """Start QEMU (returns at once; ``wait_ready`` waits for the boot)."""
        shutil.rmtree(self.results, ignore_errors=True)
        self.results.mkdir(parents=True)
        self.console.write_bytes(b"")
        cmd = self.qemu_command()
        self.qemu_log.write_text(shlex.join(cmd) + "\n")
        with open(self.qemu_log, "ab") as err:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err, start_new_session=True,
                preexec_fn=_die_with_parent,
            )  # fmt: skip
        self.started = time.monotonic()

    def console_text(self) -> str:
        try:
            return self.console.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def describe_failure(self, what: str) -> str:
        qemu = self.qemu_log.read_text(errors="replace") if self.qemu_log.exists() else ""
        return (
            f"[{self.name}] {what}\n--- QEMU ({self.qemu_log}) ---\n{qemu[-4000:]}"
            f"\n--- console ({self.console}) ---\n{self.console_text()[-_CONSOLE_TAIL:]}"
        )

    def check_alive(self, doing: str) -> None:
        if self.proc is None:
            raise GuestError(f"[{self.name}] not started")
        code = self.proc.poll()
        if code is not None:
            raise GuestError(self.describe_failure(f"QEMU exited with {code} {doing}"))

    def wait_ready(self, timeout: float = 180.0) -> float:
        """Wait until the init's agent runs; returns the boot time in seconds."""
        ready = self.results / "ready"
        deadline = self.started + timeout
        while not ready.exists():
            self.check_alive("during boot")
            if time.monotonic() >= deadline:
                raise GuestTimeout(self.describe_failure(f"not ready {timeout:g} s after start"))
            time.sleep(_POLL)
        self.boot_seconds = time.monotonic() - self.started
        self.rootfs = ready.read_text().strip()
        return self.boot_seconds

    # Commands ------------------------------------------------------------------------------------

    def _script(self, body: str) -> str:
        pybin = os.path.dirname(self.python)
        env = {
            "PATH": f"{pybin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/root",
            "LANG": "C.UTF-8",
            "PY": self.python,
            "PYTHONPATH": str(REPO),
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1",
            "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
            "E2E_RESULTS": str(self.results),
            "E2E_GUEST": self.name,
        }
        exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())
        return f"{exports}cd {shlex.quote(str(REPO))} || exit 125\n{body}\n"

    def _submit(self, command: str, body: str) -> Job:
        self.check_alive(f"before {command!r}")
        self._n += 1
        job = Job(self, self._n, command)
        tmp = self.results / f".cmd.{self._n}"
        tmp.write_text(self._script(body))
        tmp.rename(self.results / f"cmd.{self._n}")
        return job

    def submit(self, command: str | Sequence[str]) -> Job:
        """Run ``command`` (a shell string, or an argv list) in the guest; returns at once."""
        text = command if isinstance(command, str) else shlex.join(command)
        return self._submit(text, text)

    def spawn(self, command: str | Sequence[str]) -> Job:
        """Like ``submit`` for a long-running simple command that ``Job.stop`` ends (SIGTERM).

        ``command`` must be one simple command (it is started with ``&``, so its pid is the
        program's own, and SIGTERM reaches the program).
        """
        text = command if isinstance(command, str) else shlex.join(command)
        stop = shlex.quote(str(self.results / f"stop.{self._n + 1}"))
        body = (
            f"{text} &\npid=$!\n"
            f"while kill -0 $pid 2>/dev/null; do\n"
            f"    if [ -e {stop} ]; then kill -TERM $pid; break; fi\n"
            f"    sleep 0.1\ndone\nwait $pid\n"
        )
        return self._submit(text, body)

    def run(self, command: str | Sequence[str], timeout: float = 120.0) -> Result:
        """``submit`` and wait: the command's result (not checked: see ``Result.check``)."""
        return self.submit(command).wait(timeout)

    # Shutdown ------------------------------------------------------------------------------------

    def request_poweroff(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(OSError):
                (self.results / "poweroff").write_text("")

    def close(self, timeout: float = 20.0) -> bool:
        """Power off (or kill after ``timeout``) and reap QEMU; True if it powered off itself."""
        if self.proc is None:
            return True
        self.request_poweroff()
        clean = True
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            clean = False
            log(f"{self.name}: no poweroff within {timeout:g} s: killing QEMU pid {self.proc.pid}")
            self.proc.kill()
            self.proc.wait(10)
        return clean


class ServerProcess:
    """The project's own ``ivshmem-bus server``, as a child process (``python -m ivshmem_bus``)."""

    def __init__(
        self, socket_path: Path, *, size: str = "4M", vectors: int = 2, python: str | None = None
    ) -> None:
        self.socket_path = socket_path
        self.log_path = socket_path.with_suffix(".log")
        self.python = python or sys.executable
        self.cmd = [
            self.python, "-m", "ivshmem_bus", "server", "-S", str(socket_path),
            "-l", size, "-n", str(vectors),
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                self.cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=env, cwd=REPO, start_new_session=True, preexec_fn=_die_with_parent,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while "ivshmem server on" not in self.text():
            if self.proc.poll() is not None or time.monotonic() >= deadline:
                raise GuestError(
                    f"{shlex.join(self.cmd)} did not start (exit {self.proc.poll()}):\n"
                    f"{self.text()}"
                )
            time.sleep(_POLL)

    def text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def connected(self) -> list[int]:
        """Peer ids the server logged as connected, in order."""
        return [int(m) for m in re.findall(r"peer (\d+) connected", self.text())]

    def wait_for_peers(self, count: int, timeout: float, guest: Guest | None = None) -> list[int]:
        deadline = time.monotonic() + timeout
        while len(self.connected()) < count:
            if guest is not None:
                guest.check_alive("while connecting to the ivshmem server")
            if self.proc is None or self.proc.poll() is not None:
                raise GuestError(f"the ivshmem server exited:\n{self.text()}")
            if time.monotonic() >= deadline:
                msg = f"{count} peer(s) not connected to the server after {timeout:g} s"
                raise GuestTimeout(guest.describe_failure(msg) if guest else msg)
            time.sleep(_POLL)
        return self.connected()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


class Cluster:
    """The project's server plus guests, each with one ivshmem device at ``IVSHMEM_BDF``.

    Modes:
        ``viommu``   ivshmem-doorbell (vectors) on the server; intel-iommu: a real group, TYPE1;
        ``plain``    ivshmem-plain on a shared memory-backend-file (no doorbells); vIOMMU too;
        ``noiommu``  ivshmem-doorbell on the server; no IOMMU; the rebuilt vfio modules.

    Guests start one after the other, each once the server logged the previous one, so the
    server gives the n-th guest VMID n (doorbell modes). Use as a context manager: leaving
    powers the guests off (or kills them), stops the server and removes the work directory
    (kept with ``IVSHMEM_E2E_KEEP=1``).
    """

    def __init__(
        self,
        mode: str = "viommu",
        names: Sequence[str] = ("a", "b"),
        *,
        assets: Assets | None = None,
        size: str = "4M",
        vectors: int = 2,
        boot_timeout: float = 180.0,
        workdir: Path | None = None,
        memory_mb: int = 1024,
        peer_ram: bool = False,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        if peer_ram and (mode == "plain" or memory_mb > 2048 or memory_mb <= PEER_RAM_KERNEL_MB):
            raise ValueError(
                f"peer_ram needs a doorbell mode and {PEER_RAM_KERNEL_MB} < memory_mb <= 2048 "
                f"(guest-physical = file offset), not {mode!r} with {memory_mb} MiB"
            )
        self.mode = mode
        self.assets = assets or find_assets()
        self.size = size
        self.vectors = vectors
        self.boot_timeout = boot_timeout
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix=f"qemu-e2e-{mode}-"))
        self.socket_path = self.workdir / "ivshmem.sock"
        self.shm_path = self.workdir / "ivshmem.shm"  # plain mode's memory backend
        self.peer_ram = peer_ram
        self.memory_mb = memory_mb
        shm = Path("/dev/shm")  # the RAM file: tmpfs when there is one, as QEMU users do
        self.peer_ram_path = (
            shm if shm.is_dir() and os.access(shm, os.W_OK) else self.workdir
        ) / f"{self.workdir.name}-{names[-1]}.ram"
        self.server: ServerProcess | None = None
        self.guests: dict[str, Guest] = {}
        self.vmids: dict[str, int] = {}
        iommu = "noiommu" if mode == "noiommu" else "viommu"
        for name in names:
            own = peer_ram and name == names[-1]
            self.guests[name] = Guest(
                name, self.assets, self.workdir, ivshmem_args=self._ivshmem_args(own),
                iommu=iommu, memory_mb=memory_mb,
                machine_options=["memory-backend=ram"] if own else [],
                kernel_args=[f"mem={PEER_RAM_KERNEL_MB}M"] if own else [],
            )  # fmt: skip

    def _ivshmem_args(self, own_ram: bool = False) -> list[str]:
        extra: list[str] = []
        if self.peer_ram:
            path, mb = self.peer_ram_path, self.memory_mb
            ram = f"memory-backend-file,share=on,mem-path={path},size={mb}M"
            extra = [
                "-object", f"{ram},id=peerram",
                "-device", f"ivshmem-plain,memdev=peerram,addr={PEER_RAM_ADDR}",
            ]  # fmt: skip
            if own_ram:  # the same file is this guest's RAM too
                extra += ["-object", f"{ram},id=ram"]
        if self.mode == "plain":
            return [
                "-object", f"memory-backend-file,id=ivshmem,share=on,mem-path={self.shm_path},"
                f"size={self.size}",
                "-device", f"ivshmem-plain,memdev=ivshmem,addr={IVSHMEM_ADDR}",
            ]  # fmt: skip
        return [
            "-chardev", f"socket,path={self.socket_path},id=ivshmem",
            "-device", f"ivshmem-doorbell,chardev=ivshmem,vectors={self.vectors},"
            f"addr={IVSHMEM_ADDR}", *extra,
        ]  # fmt: skip

    @property
    def doorbells(self) -> bool:
        return self.mode != "plain"

    def __getitem__(self, name: str) -> Guest:
        return self.guests[name]

    def start(self) -> None:
        t0 = time.monotonic()
        if self.peer_ram:
            with open(self.peer_ram_path, "wb") as f:
                f.truncate(self.memory_mb << 20)
        if self.doorbells:
            self.server = ServerProcess(self.socket_path, size=self.size, vectors=self.vectors)
            self.server.start()
        else:
            with open(self.shm_path, "wb") as f:
                f.truncate(_size_bytes(self.size))
        for i, guest in enumerate(self.guests.values()):
            guest.start()
            if self.server is not None:
                ids = self.server.wait_for_peers(i + 1, 30.0, guest)
                self.vmids[guest.name] = ids[i]
        for guest in self.guests.values():
            guest.wait_ready(self.boot_timeout - (time.monotonic() - t0))
        boots = ", ".join(f"{g.name} {g.boot_seconds:.1f} s" for g in self.guests.values())
        log(
            f"{self.mode}: guests ready in {time.monotonic() - t0:.1f} s ({boots}; "
            f"{self.assets.accel}, root {next(iter(self.guests.values())).rootfs})"
        )

    def run_all(
        self, commands: dict[str, str | Sequence[str]], timeout: float
    ) -> dict[str, Result]:
        """Run one command per guest at the same time; their results by guest name."""
        jobs = {name: self.guests[name].submit(cmd) for name, cmd in commands.items()}
        return {name: job.wait(timeout) for name, job in jobs.items()}

    def close(self) -> None:
        try:
            for guest in self.guests.values():
                guest.request_poweroff()  # all at once: they power off in parallel
            for guest in self.guests.values():
                guest.close()
        finally:
            if self.server is not None:
                self.server.stop()
            if self.peer_ram:
                self.peer_ram_path.unlink(missing_ok=True)
            if self._own_workdir and not os.environ.get("IVSHMEM_E2E_KEEP"):
                shutil.rmtree(self.workdir, ignore_errors=True)
            else:
                log(f"kept {self.workdir} (consoles, QEMU and server logs, results)")

    def __enter__(self) -> Cluster:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def single_guest(assets: Assets | None = None, iommu: str = "none") -> Iterator[Guest]:
    """One guest with no ivshmem device (the smoke test)."""
    assets = assets or find_assets()
    workdir = Path(tempfile.mkdtemp(prefix="qemu-e2e-smoke-"))
    guest = Guest("smoke", assets, workdir, iommu=iommu)
    try:
        guest.start()
        guest.wait_ready()
        yield guest
    finally:
        guest.close()
        if not os.environ.get("IVSHMEM_E2E_KEEP"):
            shutil.rmtree(workdir, ignore_errors=True)


def _size_bytes(text: str) -> int:
    m = re.fullmatch(r"(\d+)([KMG]?)", text.strip().upper())
    if m is None:
        raise ValueError(f"size {text!r}: expected e.g. 4M")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2)]
