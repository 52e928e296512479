"""The x86-64 register file as gdb sees it: the target description and ``g``/``p`` layout.

:data:`TARGET_XML` is what the stub serves for ``qXfer:features:read:target.xml``;
:data:`REGISTERS` is the ``g`` packet order (= gdb regnum) with each
register's size.  :class:`RegisterFile` reads and writes them on a vCPU
through its public API (``get_regs``/``get_sregs``/``get_xsave2`` ...).

x87/SSE state goes through the 512-byte FXSAVE image at the start of the
XSAVE area: ``KVM_GET_FPU``/``KVM_SET_FPU`` leave MXCSR out (the kernel never
copies it), so they serve only hosts without ``KVM_CAP_XSAVE``.
"""

from __future__ import annotations

import errno
import struct

from ..uapi import structs
from ..uapi.enums import Cap
from ..vcpu import Vcpu

_FxContext = structs.kvm_fpu | structs.kvm_xsave

__all__ = ["REGISTERS", "REGISTER_BYTES", "TARGET_XML", "RegisterFile", "TargetError"]


class TargetError(Exception):
    """A request the stub answers with ``E<errno>`` (e.g. an unmapped address: EFAULT)."""

    def __init__(self, code: int = errno.EINVAL, text: str = "") -> None:
        super().__init__(text or errno.errorcode.get(code, str(code)))
        self.code = code


def _xml_regs(names: list[str], bits: int, typ: str, group: str = "") -> str:
    g = f' group="{group}"' if group else ""
    return "".join(f'<reg name="{n}" bitsize="{bits}" type="{typ}"{g}/>' for n in names)


_EFLAGS = ["CF", "", "PF", None, "AF", None, "ZF", "SF", "TF", "IF", "DF", "OF", None, None, "NT",
           None, "RF", "VM", "AC", "VIF", "VIP", "ID"]
_MXCSR = ["IE", "DE", "ZE", "OE", "UE", "PE", "DAZ", "IM", "DM", "ZM", "OM", "UM", "PM", None, None, "FZ"]


def _flags(ident: str, names: list[str | None]) -> str:
    fields = "".join(f'<field name="{n}" start="{i}" end="{i}"/>' for i, n in enumerate(names)
                     if n is not None)
    return f'<flags id="{ident}" size="4">{fields}</flags>'


_GPRS = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
         "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"]
_SEGS = ["cs", "ss", "ds", "es", "fs", "gs"]
_X87 = ["fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop"]
_CRS = ["cr0", "cr2", "cr3", "cr4", "cr8", "efer"]

#: The target description served for ``qXfer:features:read:target.xml``.
TARGET_XML = (
    '<?xml version="1.0"?><!DOCTYPE target SYSTEM "gdb-target.dtd">'
    '<target version="1.0"><architecture>i386:x86-64</architecture>'
    '<feature name="org.gnu.gdb.i386.core">' + _flags("i386_eflags", _EFLAGS)
    + _xml_regs(_GPRS[:6], 64, "int64") + _xml_regs(["rbp", "rsp"], 64, "data_ptr")
    + _xml_regs(_GPRS[8:], 64, "int64") + _xml_regs(["rip"], 64, "code_ptr")
    + _xml_regs(["eflags"], 32, "i386_eflags") + _xml_regs(_SEGS, 32, "int32")
    + _xml_regs([f"st{i}" for i in range(8)], 80, "i387_ext")
    + _xml_regs(_X87, 32, "int", "float") + '</feature>'
    '<feature name="org.gnu.gdb.i386.sse">'
    '<vector id="v4f" type="ieee_single" count="4"/><vector id="v2d" type="ieee_double" count="2"/>'
    '<vector id="v16i8" type="int8" count="16"/><vector id="v8i16" type="int16" count="8"/>'
    '<vector id="v4i32" type="int32" count="4"/><vector id="v2i64" type="int64" count="2"/>'
    '<union id="vec128"><field name="v4_float" type="v4f"/><field name="v2_double" type="v2d"/>'
    '<field name="v16_int8" type="v16i8"/><field name="v8_int16" type="v8i16"/>'
    '<field name="v4_int32" type="v4i32"/><field name="v2_int64" type="v2i64"/>'
    '<field name="uint128" type="uint128"/></union>' + _flags("i386_mxcsr", _MXCSR)
    + _xml_regs([f"xmm{i}" for i in range(16)], 128, "vec128")
    + _xml_regs(["mxcsr"], 32, "i386_mxcsr", "vector") + '</feature>'
    '<feature name="org.gnu.gdb.i386.segments">' + _xml_regs(["fs_base", "gs_base"], 64, "int")
    + '</feature><feature name="org.pykvm.x86.system">'
    + _xml_regs(_CRS, 64, "int", "system") + '</feature></target>')

#: Register order of the ``g`` packet (= regnum): (name, size in bytes).
REGISTERS: list[tuple[str, int]] = (
    [(n, 8) for n in _GPRS] + [("rip", 8), ("eflags", 4)] + [(n, 4) for n in _SEGS]
    + [(f"st{i}", 10) for i in range(8)] + [(n, 4) for n in _X87]
    + [(f"xmm{i}", 16) for i in range(16)] + [("mxcsr", 4), ("fs_base", 8), ("gs_base", 8)]
    + [(n, 8) for n in _CRS])
_REGNUM = {name: i for i, (name, _) in enumerate(REGISTERS)}

#: Bytes of one ``g`` reply (before hex encoding).
REGISTER_BYTES = sum(size for _, size in REGISTERS)


class RegisterFile:
    """gdb's registers of one vCPU (:data:`REGISTERS` order), read and written through KVM."""

    def __init__(self, vcpu: Vcpu) -> None:
        self.vcpu = vcpu
        self._xsave: bool | None = None

    def _get_fx(self) -> tuple[bytearray, _FxContext]:
        v = self.vcpu
        if self._xsave is None:
            self._xsave = bool(v.vm.check_extension(Cap.XSAVE))
        if self._xsave:
            xs = v.get_xsave2() if v.vm.check_extension(Cap.XSAVE2) else v.get_xsave()
            return bytearray(memoryview(xs).cast("B")[:512]), xs
        f = v.get_fpu()
        fx = bytearray(512)
        struct.pack_into("<HHBxHQQ", fx, 0, f.fcw, f.fsw, f.ftwx, f.last_opcode, f.last_ip, f.last_dp)
        for i in range(8):
            fx[32 + 16 * i:48 + 16 * i] = bytes(f.fpr[i])
        for i in range(16):
            fx[160 + 16 * i:176 + 16 * i] = bytes(f.xmm[i])
        return fx, f

    def _set_fx(self, fx: bytearray, ctx: _FxContext) -> None:
        v = self.vcpu
        if isinstance(ctx, structs.kvm_fpu):
            f = ctx
            f.fcw, f.fsw, f.ftwx, f.last_opcode, f.last_ip, f.last_dp = struct.unpack_from(
                "<HHBxHQQ", fx, 0)
            for i in range(8):
                f.fpr[i][:] = list(fx[32 + 16 * i:48 + 16 * i])
            for i in range(16):
                f.xmm[i][:] = list(fx[160 + 16 * i:176 + 16 * i])
            v.set_fpu(f)
            return
        raw = memoryview(ctx).cast("B")
        raw[:512] = fx
        # XSTATE_BV: mark x87 and SSE as in use, else XRSTOR would load their init state.
        (bv,) = struct.unpack_from("<Q", raw, 512)
        struct.pack_into("<Q", raw, 512, bv | 3)
        raw.release()
        v.set_xsave(ctx)

    def read_all(self) -> list[bytes]:
        """Every register's little-endian bytes, in :data:`REGISTERS` order."""
        v = self.vcpu
        r, s = v.get_regs(), v.get_sregs()
        fx, _ = self._get_fx()
        out = [getattr(r, n).to_bytes(8, "little") for n in _GPRS]
        out.append(r.rip.to_bytes(8, "little"))
        out.append((r.rflags & 0xFFFFFFFF).to_bytes(4, "little"))
        out += [getattr(s, n).selector.to_bytes(4, "little") for n in _SEGS]
        st = [bytes(fx[32 + 16 * i:42 + 16 * i]) for i in range(8)]
        out += st
        fcw, fsw, ftw, fop, ip, dp, mxcsr = struct.unpack_from("<HHBxHQQI", fx, 0)
        top = (fsw >> 11) & 7
        x87 = [fcw, fsw, _full_tag(ftw, st, top), (ip >> 32) & 0xFFFF, ip & 0xFFFFFFFF,
               (dp >> 32) & 0xFFFF, dp & 0xFFFFFFFF, fop]
        out += [x.to_bytes(4, "little") for x in x87]
        out += [bytes(fx[160 + 16 * i:176 + 16 * i]) for i in range(16)]
        out.append(mxcsr.to_bytes(4, "little"))
        out += [s.fs.base.to_bytes(8, "little"), s.gs.base.to_bytes(8, "little")]
        out += [getattr(s, n).to_bytes(8, "little") for n in _CRS]
        return out

    def write_all(self, blob: bytes) -> None:
        """Write a whole ``G`` blob (exactly :data:`REGISTER_BYTES`), only the registers that changed."""
        if len(blob) != REGISTER_BYTES:
            raise TargetError(errno.EINVAL, f"G carries {len(blob)} bytes, not {REGISTER_BYTES}")
        current = self.read_all()
        pos = 0
        for n, (_, size) in enumerate(REGISTERS):
            value = blob[pos:pos + size]
            pos += size
            if value != current[n]:
                self.write(n, value)

    def write(self, n: int, value: bytes) -> None:
        """Write register number *n* (``P``); selectors are read-only (EPERM)."""
        if not 0 <= n < len(REGISTERS) or len(value) != REGISTERS[n][1]:
            raise TargetError(errno.EINVAL)
        name = REGISTERS[n][0]
        x = int.from_bytes(value, "little")
        v = self.vcpu
        if name in _GPRS or name in ("rip", "eflags"):
            r = v.get_regs()
            if name == "eflags":
                r.rflags = (r.rflags & ~0xFFFFFFFF) | x | 2
            else:
                setattr(r, name, x)
            v.set_regs(r)
        elif name in _SEGS:
            if x != getattr(v.get_sregs(), name).selector:
                raise TargetError(errno.EPERM, "segment selectors are read-only")
        elif name in ("fs_base", "gs_base") or name in _CRS:
            s = v.get_sregs()
            if name in _CRS:
                setattr(s, name, x)
            else:
                getattr(s, name[:2]).base = x
            v.set_sregs(s)
        else:
            fx, ctx = self._get_fx()
            if name.startswith("st"):
                i = int(name[2:])
                fx[32 + 16 * i:42 + 16 * i] = value
            elif name.startswith("xmm"):
                i = int(name[3:])
                fx[160 + 16 * i:176 + 16 * i] = value
            elif name == "mxcsr":
                struct.pack_into("<I", fx, 24, x)
            elif name == "fctrl":
                struct.pack_into("<H", fx, 0, x & 0xFFFF)
            elif name == "fstat":
                struct.pack_into("<H", fx, 2, x & 0xFFFF)
            elif name == "ftag":                           # full tag word -> abridged
                fx[4] = sum(1 << i for i in range(8) if (x >> (2 * i)) & 3 != 3)
            elif name == "fop":
                struct.pack_into("<H", fx, 6, x & 0x7FF)
            else:                                          # fioff/fiseg/fooff/foseg
                pos = 8 if name in ("fioff", "fiseg") else 16
                (cur,) = struct.unpack_from("<Q", fx, pos)
                cur = ((cur & ~0xFFFFFFFF) | x if name.endswith("off")
                       else (cur & 0xFFFFFFFF) | (x & 0xFFFF) << 32)
                struct.pack_into("<Q", fx, pos, cur)
            self._set_fx(fx, ctx)


def _full_tag(abridged: int, st: list[bytes], top: int) -> int:
    """gdb's 16-bit x87 tag word from FXSAVE's abridged one (2 bits per physical register).

    *st* holds ST(0)..ST(7) (10 bytes each); physical register p is ST((p - top) mod 8).
    """
    tag = 0
    for phys in range(8):
        if not abridged >> phys & 1:
            t = 3                                          # empty
        else:
            raw = st[(phys - top) & 7]
            exp = int.from_bytes(raw[8:10], "little") & 0x7FFF
            mant = int.from_bytes(raw[:8], "little")
            if exp == 0x7FFF:
                t = 2                                      # special
            elif exp == 0:
                t = 1 if mant == 0 else 2                  # zero / denormal
            else:
                t = 0 if mant >> 63 else 2                 # valid / unnormal
        tag |= t << (2 * phys)
    return tag
