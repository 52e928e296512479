"""Life cycle (group ``life``): VM and vCPU creation, memory slots, the cold start
of a whole process, ``python -m pykvm.vmm`` start-up and ``import pykvm`` time.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import re
import resource
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pykvm
from pykvm.fd import ioctl
from pykvm.uapi import ioctls, structs

from .. import guest
from ..core import BenchError, interleave
from .base import SuiteBase, wall


class LifeCases(SuiteBase):
    """The ``life`` cases (mixed into :class:`pykvm.bench.suite.Suite`)."""

    def case_life(self) -> None:
        pc = self.pc
        cfg, kvm = self.cfg, self.kvm
        rounds = cfg.rounds
        kfd = kvm.fileno()
        c = self.c
        has_c = c is not None

        # VM create + close
        n = cfg.life_n
        rng = range(n)

        def vm_typed() -> float:
            create = kvm.create_vm
            t0 = wall()
            for _ in rng:
                create().close()
            return (wall() - t0) / n

        def vm_raw() -> float:
            close, REQ = os.close, ioctls.KVM_CREATE_VM
            t0 = wall()
            for _ in rng:
                close(ioctl(kfd, REQ))
            return (wall() - t0) / n

        r = self.row("life.vm_create", "life", "VM create + close",
                     "pykvm: `kvm.create_vm().close()`; raw: `os.close(ioctl(fd, KVM_CREATE_VM))`")
        v = {"pykvm": vm_typed, "raw": vm_raw}
        if has_c:
            v["c"] = self.c_batch("vm_create", n)
        interleave(rounds, v, r)

        # vCPU create (+ mmap of kvm_run)
        nv = cfg.vcpu_n
        size = kvm.vcpu_mmap_size

        def vcpu_typed() -> float:
            vm = kvm.create_vm()
            try:
                create = vm.create_vcpu
                t0 = wall()
                for i in range(nv):
                    create(i)
                dt = wall() - t0
            finally:
                vm.close()
            return dt / nv

        def vcpu_raw() -> float:
            vmfd = ioctl(kfd, ioctls.KVM_CREATE_VM)
            fds, maps = [], []
            try:
                REQ, mk = ioctls.KVM_CREATE_VCPU, mmap.mmap
                t0 = wall()
                for i in range(nv):
                    fd = ioctl(vmfd, REQ, i)
                    fds.append(fd)
                    maps.append(mk(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE))
                dt = wall() - t0
            finally:
                for mp in maps:
                    mp.close()
                for fd in fds:
                    os.close(fd)
                os.close(vmfd)
            return dt / nv

        r = self.row("life.vcpu_create", "life", "vCPU create (+ mmap kvm_run)",
                     "pykvm: `vm.create_vcpu(i)`; raw: `ioctl(vm, KVM_CREATE_VCPU, i)` + `mmap.mmap(fd, ...)`")
        v = {"pykvm": vcpu_typed, "raw": vcpu_raw}
        if has_c:
            v["c"] = self.c_batch("vcpu_create", nv)
        interleave(rounds, v, r)

        # 1 GiB slot: register / delete of a mapping made beforehand
        size1g = 1 << 30
        nr = cfg.region_n
        rows = {"add": self.row("life.region_add", "life", "KVM_SET_USER_MEMORY_REGION: register 1 GiB",
                                "mapping made beforehand; pykvm: `vm.set_user_memory_region(0, 0, 1 GiB, addr)`"),
                "del": self.row("life.region_del", "life", "KVM_SET_USER_MEMORY_REGION: delete 1 GiB",
                                "pykvm: `vm.set_user_memory_region(0, 0, 0, addr)`")}
        big = mmap.mmap(-1, size1g, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        anchor = ctypes.c_char.from_buffer(big)
        addr = ctypes.addressof(anchor)
        vm = kvm.create_vm()
        vmfd = vm.fileno()

        def region_typed() -> dict[str, float]:
            setr = vm.set_user_memory_region
            add = dele = 0
            for _ in range(nr):
                t0 = wall()
                setr(0, 0, size1g, addr)
                t1 = wall()
                setr(0, 0, 0, addr)
                t2 = wall()
                add += t1 - t0
                dele += t2 - t1
            return {"add": add / nr, "del": dele / nr}

        region = structs.kvm_userspace_memory_region(slot=0, guest_phys_addr=0, memory_size=size1g,
                                               userspace_addr=addr)

        def region_raw() -> dict[str, float]:
            REQ = ioctls.KVM_SET_USER_MEMORY_REGION
            add = dele = 0
            for _ in range(nr):
                t0 = wall()
                region.memory_size = size1g
                ioctl(vmfd, REQ, region)
                t1 = wall()
                region.memory_size = 0
                ioctl(vmfd, REQ, region)
                t2 = wall()
                add += t1 - t0
                dele += t2 - t1
            return {"add": add / nr, "del": dele / nr}

        # the same slot registered again, unchanged: KVM answers at once, so this is the wrapper's cost
        same = kvm.create_vm()
        same.set_user_memory_region(0, 0, size1g, addr)
        r = self.row("life.region_same", "life", "KVM_SET_USER_MEMORY_REGION: same slot again (no-op in KVM)",
                     "KVM returns at once when nothing changes: the ioctl path and the wrapper alone")
        same_region = structs.kvm_userspace_memory_region(slot=0, guest_phys_addr=0, memory_size=size1g,
                                                    userspace_addr=addr)
        ns_ = cfg.ioctl_n // 4 or 1
        rng_ = range(ns_)

        def same_typed() -> float:
            setr = same.set_user_memory_region
            t0 = pc()
            for _ in rng_:
                setr(0, 0, size1g, addr)
            return (pc() - t0) / ns_

        def same_raw() -> float:
            fd, REQ = same.fileno(), ioctls.KVM_SET_USER_MEMORY_REGION
            t0 = pc()
            for _ in rng_:
                ioctl(fd, REQ, same_region)
            return (pc() - t0) / ns_

        v = {"pykvm": same_typed, "raw": same_raw}
        if has_c:
            v["c"] = self.c_batch("region_same", ns_, size1g)
        try:
            interleave(rounds, v, r)
        finally:
            same.close()

        v2: dict[str, Callable[[], dict[str, float]]] = {"pykvm": region_typed, "raw": region_raw}
        if has_c:
            def region_c() -> dict[str, float]:
                a, d = c.bench("region", nr, size1g)
                return {"add": a / nr, "del": d / nr}
            v2["c"] = region_c
        try:
            interleave(rounds, v2, rows)
        finally:
            vm.close()
            del anchor
            big.close()

        # add_memory / remove_memory (mmap + register, delete + munmap)
        rows = {"add": self.row("life.add_memory", "life", "vm.add_memory(1 GiB): mmap + register",
                                "C: mmap + KVM_SET_USER_MEMORY_REGION"),
                "del": self.row("life.remove_memory", "life", "vm.remove_memory(1 GiB): delete + munmap",
                                "C: KVM_SET_USER_MEMORY_REGION(size 0) + munmap")}
        vm = kvm.create_vm()

        def addmem_typed() -> dict[str, float]:
            add = dele = 0
            for _ in range(nr):
                t0 = wall()
                mem = vm.add_memory(0, size1g)
                t1 = wall()
                vm.remove_memory(mem)
                t2 = wall()
                add += t1 - t0
                dele += t2 - t1
            return {"add": add / nr, "del": dele / nr}

        v2 = {"pykvm": addmem_typed}
        if has_c:
            def addmem_c() -> dict[str, float]:
                a, d = c.bench("add_memory", nr, size1g)
                return {"add": a / nr, "del": d / nr}
            v2["c"] = addmem_c
        try:
            interleave(rounds, v2, rows)
        finally:
            vm.close()

        self._cold_start()

    def _cold_start(self) -> None:
        cfg = self.cfg
        root = str(Path(pykvm.__file__).resolve().parent.parent)   # the checkout / site dir holding pykvm
        py = sys.executable
        src = guest.real_mode_cold_source()
        # Byte-code caches on, as for an installed package (pip compiles them): a
        # PYTHONDONTWRITEBYTECODE in the caller's environment would otherwise make
        # every child compile pykvm from source and measure the compiler.  The
        # caches go to a private prefix, never into the package directory.
        env = dict(os.environ)
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(Path(self._tmp.name) / "pycache")

        cpu = self.clock == "cpu"

        def spawn(argv: list[str]) -> float:
            """Wall time of a whole child process (with --clock cpu: its user + system CPU time)."""
            r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = wall()
            p = subprocess.run(argv, cwd=root, env=env, capture_output=True, timeout=60)
            dt = wall() - t0
            r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            if p.returncode != 0:
                raise BenchError(f"{argv[0]} exited {p.returncode}: {p.stderr.decode(errors='replace')[-300:]}")
            if cpu:
                return ((r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)) * 1e9
            return dt

        rows = {"cold": self.row("life.cold_start", "life",
                                 "cold start: process + VM + 2 MiB + vCPU + first exit",
                                 "a whole process started by the suite (wall time; user+system CPU time with "
                                 "--clock cpu), byte-code caches warm as for an installed package: "
                                 "`python -c '<import pykvm; ...; vcpu.run()>'` vs `kvmbench cold`"),
                "startup": self.row("life.python_startup", "life", "bare `python -c pass` (for scale)"),
                "import": self.row("life.python_import", "life", "process `python -c 'import pykvm'`")}
        v: dict[str, Callable[[], dict[str, float]]] = {
            "pykvm": lambda: {"cold": spawn([py, "-c", src])},
            "python#startup": lambda: {"startup": spawn([py, "-c", "pass"])},
            "python#import": lambda: {"import": spawn([py, "-c", "import pykvm"])},
        }
        if self.c_exe is not None:
            exe = str(self.c_exe)
            v["c"] = lambda: {"cold": spawn([exe, "cold", guest.REAL_MODE_COLD.hex()])}
        tiny = vmm_tiny_kernel(Path(self._tmp.name))
        if tiny is not None:
            # issue 9: a whole `python -m pykvm.vmm` run of a kernel that prints one line
            rows["vmm"] = self.row("life.vmm_tiny", "life",
                                   "`python -m pykvm.vmm` tiny multiboot kernel: print a line, exit",
                                   "pykvm/bench/kernels/tiny.S built with as/ld; exit status 1 expected")
            vmm_argv = [py, "-m", "pykvm.vmm", tiny, "--timeout", "20"]

            def vmm_run() -> dict[str, float]:
                r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                t0 = wall()
                p = subprocess.run(vmm_argv, cwd=root, env=env, capture_output=True, timeout=60)
                dt = wall() - t0
                r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                if p.returncode != 1 or b"hello from a multiboot kernel" not in p.stdout:
                    raise BenchError(f"pykvm.vmm exited {p.returncode}: {p.stderr.decode(errors='replace')[-300:]}")
                if cpu:
                    return {"vmm": ((r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)) * 1e9}
                return {"vmm": dt}
            v["pykvm#vmm"] = vmm_run
            qemu = shutil.which("qemu-system-x86_64")
            if qemu is None:
                rows["vmm"].info["qemu"] = "QEMU not installed (no qemu-system-x86_64 on PATH)"
            else:
                # the same kernel, the same devices it uses (COM1, debug-exit port 0xf4)
                qemu_argv = [qemu, "-accel", "kvm", "-M", "microvm", "-m", "32", "-nodefaults",
                             "-no-user-config", "-nographic", "-serial", "stdio", "-monitor", "none",
                             "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-kernel", tiny]

                def qemu_run() -> dict[str, float]:
                    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                    t0 = wall()
                    p = subprocess.run(qemu_argv, cwd=root, env=env, capture_output=True, timeout=60)
                    dt = wall() - t0
                    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                    if p.returncode != 1 or b"hello from a multiboot kernel" not in p.stdout:
                        raise BenchError(f"QEMU exited {p.returncode}: {p.stderr.decode(errors='replace')[-300:]}")
                    if cpu:
                        return {"vmm": ((r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)) * 1e9}
                    return {"vmm": dt}
                v["qemu#vmm"] = qemu_run
        for warm in v.values():  # one untimed pass: fills the byte-code caches (and the page cache)
            try:
                warm()
            except BenchError:
                pass  # interleave() records the error of the timed rounds
        interleave(cfg.cold_rounds, v, rows)
        # "python#x" variants are stored under "python"
        for r in rows.values():
            for k in list(r.samples):
                if "#" in k:
                    r.samples.setdefault(k.split("#")[0], []).extend(r.samples.pop(k))
            for k in list(r.errors):
                if "#" in k:
                    r.errors[k.split("#")[0]] = r.errors.pop(k)

        # import time as -X importtime sees it
        r = self.row("life.import_time", "life", "`import pykvm` (-X importtime, cumulative)",
                     "self time of the slowest modules in the JSON `info`")
        selfs: dict[str, list[int]] = {}

        def importtime() -> float:
            p = subprocess.run([py, "-X", "importtime", "-c", "import pykvm"], cwd=root, env=env,
                               capture_output=True, text=True, timeout=60)
            total = None
            for line in p.stderr.splitlines():
                mt = re.match(r"import time:\s+(\d+)\s+\|\s+(\d+)\s+\|(\s*)(\S+)", line)
                if not mt:
                    continue
                self_us, cum_us, name = int(mt.group(1)), int(mt.group(2)), mt.group(4)
                selfs.setdefault(name, []).append(self_us)
                if name == "pykvm":
                    total = cum_us
            if total is None:
                raise BenchError(f"no pykvm line in -X importtime output: {p.stderr[-300:]}")
            return total * 1000.0

        interleave(cfg.cold_rounds, {"python": importtime}, r)
        med = {k: sorted(v)[len(v) // 2] for k, v in selfs.items()}
        top = sorted(med.items(), key=lambda kv: -kv[1])[:12]
        r.info["slowest_self_us"] = dict(top)


#: the multiboot kernel of the VMM start-up row, shipped as package data
KERNELS = Path(__file__).resolve().parent.parent / "kernels"


def vmm_tiny_kernel(workdir: Path) -> str | None:
    """Build ``kernels/tiny.S`` (``as --32``, ``ld -m elf_i386``) in *workdir*; None if impossible."""
    if not (KERNELS / "tiny.S").exists() or shutil.which("as") is None or shutil.which("ld") is None:
        return None
    obj, elf = workdir / "tiny.o", workdir / "tiny.elf"
    try:
        subprocess.run(["as", "--32", "-I", str(KERNELS), "-o", str(obj), str(KERNELS / "tiny.S")],
                       check=True, capture_output=True, timeout=60)
        subprocess.run(["ld", "-m", "elf_i386", "-T", str(KERNELS / "kernel.ld"), "-o", str(elf), str(obj)],
                       check=True, capture_output=True, timeout=60)
    except (subprocess.SubprocessError, OSError):
        return None
    return str(elf)
