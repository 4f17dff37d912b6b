"""The VMCS: its six areas and fields addressed by their encodings (Intel SDM Vol. 3C ch. 25, App. B)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum


class Area(Enum):
    GUEST_STATE = "guest-state area"
    HOST_STATE = "host-state area"
    EXECUTION_CONTROLS = "VM-execution control fields"
    EXIT_CONTROLS = "VM-exit control fields"
    ENTRY_CONTROLS = "VM-entry control fields"
    EXIT_INFORMATION = "VM-exit information fields"


# Encoding bits 14:13: width; 11:10: type; 9:1: index; 0: access type (1 = high half of a 64-bit field).
WIDTH_16, WIDTH_64, WIDTH_32, WIDTH_NATURAL = 0, 1, 2, 3
TYPE_CONTROL, TYPE_EXIT_INFO, TYPE_GUEST, TYPE_HOST = 0, 1, 2, 3
WIDTH_BITS = {WIDTH_16: 16, WIDTH_64: 64, WIDTH_32: 32, WIDTH_NATURAL: 64}


def width_of(encoding: int) -> int:
    """Width in bits of the field an encoding names (natural width is 64 on an x86-64 host)."""
    if encoding & 1:
        return 32  # the high half of a 64-bit field
    return WIDTH_BITS[(encoding >> 13) & 3]


def type_of(encoding: int) -> int:
    return (encoding >> 10) & 3


# --- the fields hvmlab keeps, by SDM encoding (names as Linux's enum vmcs_field) ---------------
# 16-bit
VIRTUAL_PROCESSOR_ID = 0x0000
GUEST_ES_SELECTOR, GUEST_CS_SELECTOR, GUEST_SS_SELECTOR = 0x0800, 0x0802, 0x0804
GUEST_DS_SELECTOR, GUEST_FS_SELECTOR, GUEST_GS_SELECTOR = 0x0806, 0x0808, 0x080A
GUEST_LDTR_SELECTOR, GUEST_TR_SELECTOR = 0x080C, 0x080E
HOST_ES_SELECTOR, HOST_CS_SELECTOR, HOST_SS_SELECTOR = 0x0C00, 0x0C02, 0x0C04
HOST_DS_SELECTOR, HOST_FS_SELECTOR, HOST_GS_SELECTOR, HOST_TR_SELECTOR = 0x0C06, 0x0C08, 0x0C0A, 0x0C0C
# 64-bit
IO_BITMAP_A, IO_BITMAP_B, MSR_BITMAP = 0x2000, 0x2002, 0x2004
VM_EXIT_MSR_STORE_ADDR, VM_EXIT_MSR_LOAD_ADDR, VM_ENTRY_MSR_LOAD_ADDR = 0x2006, 0x2008, 0x200A
TSC_OFFSET = 0x2010
EPT_POINTER = 0x201A
GUEST_PHYSICAL_ADDRESS = 0x2400
VMCS_LINK_POINTER = 0x2800
GUEST_IA32_DEBUGCTL, GUEST_IA32_PAT, GUEST_IA32_EFER = 0x2802, 0x2804, 0x2806
HOST_IA32_PAT, HOST_IA32_EFER = 0x2C00, 0x2C02
# 32-bit
PIN_BASED_VM_EXEC_CONTROL = 0x4000
CPU_BASED_VM_EXEC_CONTROL = 0x4002
EXCEPTION_BITMAP = 0x4004
PAGE_FAULT_ERROR_CODE_MASK, PAGE_FAULT_ERROR_CODE_MATCH = 0x4006, 0x4008
CR3_TARGET_COUNT = 0x400A
VM_EXIT_CONTROLS = 0x400C
VM_EXIT_MSR_STORE_COUNT, VM_EXIT_MSR_LOAD_COUNT = 0x400E, 0x4010
VM_ENTRY_CONTROLS = 0x4012
VM_ENTRY_MSR_LOAD_COUNT = 0x4014
VM_ENTRY_INTR_INFO_FIELD = 0x4016
VM_ENTRY_EXCEPTION_ERROR_CODE = 0x4018
VM_ENTRY_INSTRUCTION_LEN = 0x401A
TPR_THRESHOLD = 0x401C
SECONDARY_VM_EXEC_CONTROL = 0x401E
VM_INSTRUCTION_ERROR = 0x4400
VM_EXIT_REASON = 0x4402
VM_EXIT_INTR_INFO = 0x4404
VM_EXIT_INTR_ERROR_CODE = 0x4406
IDT_VECTORING_INFO_FIELD = 0x4408
IDT_VECTORING_ERROR_CODE = 0x440A
VM_EXIT_INSTRUCTION_LEN = 0x440C
VMX_INSTRUCTION_INFO = 0x440E
GUEST_ES_LIMIT, GUEST_CS_LIMIT, GUEST_SS_LIMIT = 0x4800, 0x4802, 0x4804
GUEST_DS_LIMIT, GUEST_FS_LIMIT, GUEST_GS_LIMIT = 0x4806, 0x4808, 0x480A
GUEST_LDTR_LIMIT, GUEST_TR_LIMIT, GUEST_GDTR_LIMIT, GUEST_IDTR_LIMIT = 0x480C, 0x480E, 0x4810, 0x4812
GUEST_ES_AR_BYTES, GUEST_CS_AR_BYTES, GUEST_SS_AR_BYTES = 0x4814, 0x4816, 0x4818
GUEST_DS_AR_BYTES, GUEST_FS_AR_BYTES, GUEST_GS_AR_BYTES = 0x481A, 0x481C, 0x481E
GUEST_LDTR_AR_BYTES, GUEST_TR_AR_BYTES = 0x4820, 0x4822
GUEST_INTERRUPTIBILITY_INFO = 0x4824
GUEST_ACTIVITY_STATE = 0x4826
GUEST_SYSENTER_CS = 0x482A
HOST_IA32_SYSENTER_CS = 0x4C00
# natural width
CR0_GUEST_HOST_MASK, CR4_GUEST_HOST_MASK = 0x6000, 0x6002
CR0_READ_SHADOW, CR4_READ_SHADOW = 0x6004, 0x6006
EXIT_QUALIFICATION = 0x6400
GUEST_LINEAR_ADDRESS = 0x640A
GUEST_CR0, GUEST_CR3, GUEST_CR4 = 0x6800, 0x6802, 0x6804
GUEST_ES_BASE, GUEST_CS_BASE, GUEST_SS_BASE = 0x6806, 0x6808, 0x680A
GUEST_DS_BASE, GUEST_FS_BASE, GUEST_GS_BASE = 0x680C, 0x680E, 0x6810
GUEST_LDTR_BASE, GUEST_TR_BASE, GUEST_GDTR_BASE, GUEST_IDTR_BASE = 0x6812, 0x6814, 0x6816, 0x6818
GUEST_DR7 = 0x681A
GUEST_RSP, GUEST_RIP, GUEST_RFLAGS = 0x681C, 0x681E, 0x6820
GUEST_PENDING_DBG_EXCEPTIONS = 0x6822
GUEST_SYSENTER_ESP, GUEST_SYSENTER_EIP = 0x6824, 0x6826
HOST_CR0, HOST_CR3, HOST_CR4 = 0x6C00, 0x6C02, 0x6C04
HOST_FS_BASE, HOST_GS_BASE, HOST_TR_BASE = 0x6C06, 0x6C08, 0x6C0A
HOST_GDTR_BASE, HOST_IDTR_BASE = 0x6C0C, 0x6C0E
HOST_IA32_SYSENTER_ESP, HOST_IA32_SYSENTER_EIP = 0x6C10, 0x6C12
HOST_RSP, HOST_RIP = 0x6C14, 0x6C16

_EXIT_CONTROL_FIELDS = {VM_EXIT_CONTROLS, VM_EXIT_MSR_STORE_COUNT, VM_EXIT_MSR_LOAD_COUNT,
                        VM_EXIT_MSR_STORE_ADDR, VM_EXIT_MSR_LOAD_ADDR}
_ENTRY_CONTROL_FIELDS = {VM_ENTRY_CONTROLS, VM_ENTRY_MSR_LOAD_COUNT, VM_ENTRY_INTR_INFO_FIELD,
                         VM_ENTRY_EXCEPTION_ERROR_CODE, VM_ENTRY_INSTRUCTION_LEN,
                         VM_ENTRY_MSR_LOAD_ADDR}


def area_of(encoding: int) -> Area:
    """Which of the six VMCS areas a field belongs to (the type bits, then the control's role)."""
    kind = type_of(encoding)
    if kind == TYPE_GUEST:
        return Area.GUEST_STATE
    if kind == TYPE_HOST:
        return Area.HOST_STATE
    if kind == TYPE_EXIT_INFO:
        return Area.EXIT_INFORMATION
    base = encoding & ~1
    if base in _EXIT_CONTROL_FIELDS:
        return Area.EXIT_CONTROLS
    if base in _ENTRY_CONTROL_FIELDS:
        return Area.ENTRY_CONTROLS
    return Area.EXECUTION_CONTROLS


# Every field constant defined above, by encoding (the control-bit constants come after this).
FIELD_NAMES: dict[int, str] = {
    value: key for key, value in dict(globals()).items()
    if key.isupper() and isinstance(value, int) and not key.startswith(("WIDTH_", "TYPE_"))
}

# Primary processor-based VM-execution controls (SDM Table 25-6).
CPU_INTR_WINDOW_EXITING = 1 << 2
CPU_USE_TSC_OFFSETTING = 1 << 3
CPU_HLT_EXITING = 1 << 7
CPU_INVLPG_EXITING = 1 << 9
CPU_MWAIT_EXITING = 1 << 10
CPU_RDPMC_EXITING = 1 << 11
CPU_RDTSC_EXITING = 1 << 12
CPU_UNCOND_IO_EXITING = 1 << 24
CPU_USE_IO_BITMAPS = 1 << 25
CPU_USE_MSR_BITMAPS = 1 << 28
CPU_ACTIVATE_SECONDARY_CONTROLS = 1 << 31
# Pin-based controls (SDM Table 25-5).
PIN_EXTERNAL_INTERRUPT_EXITING = 1 << 0
PIN_NMI_EXITING = 1 << 3
# Secondary controls (SDM Table 25-7).
SECONDARY_ENABLE_EPT = 1 << 1
SECONDARY_UNRESTRICTED_GUEST = 1 << 7
# VM-exit and VM-entry controls.
EXIT_HOST_ADDR_SPACE_SIZE = 1 << 9
EXIT_ACK_INTR_ON_EXIT = 1 << 15
ENTRY_IA32E_MODE = 1 << 9

# Interruption-information format (VM-exit and VM-entry; SDM 25.8.3, 25.9.2).
INTR_INFO_VALID = 1 << 31
INTR_INFO_DELIVER_CODE = 1 << 11
INTR_TYPE_EXTERNAL = 0
INTR_TYPE_NMI = 2
INTR_TYPE_HARD_EXCEPTION = 3
INTR_TYPE_SOFT_INTR = 4
INTR_TYPE_SOFT_EXCEPTION = 6


def intr_info(vector: int, kind: int, error_code: bool = False) -> int:
    """An interruption-information word: vector 7:0, type 10:8, error code 11, valid 31."""
    return INTR_INFO_VALID | (vector & 0xFF) | ((kind & 7) << 8) | (INTR_INFO_DELIVER_CODE if error_code else 0)


class VmcsError(Exception):
    """VMREAD/VMWRITE failure as the instruction would report it (VM-instruction error number)."""

    def __init__(self, number: int, message: str) -> None:
        super().__init__(f"VM-instruction error {number}: {message}")
        self.number = number


# VM-instruction error numbers (SDM 31.4).
VMERR_UNSUPPORTED_COMPONENT = 12
VMERR_READ_ONLY_COMPONENT = 13


@dataclass(frozen=True)
class FieldView:
    encoding: int
    name: str
    area: Area
    width: int
    value: int


GuestStateSource = Callable[[int], "int | None"]


class Vmcs:
    """One vCPU's VMCS. The hypervisor uses vmread/vmwrite; the processor side records exits.

    Guest-state fields are loaded lazily from the vCPU on first read after an exit, the way KVM
    caches guest registers (regs_avail): reading a register costs ~1 us through Unicorn, and
    most exits need only RIP.
    """

    def __init__(self, guest_source: GuestStateSource | None = None) -> None:
        self._fields: dict[int, int] = dict.fromkeys(FIELD_NAMES, 0)
        self._fields[VMCS_LINK_POINTER] = 0xFFFF_FFFF_FFFF_FFFF
        self._guest_source = guest_source
        self._available: set[int] = set()

    # -- the instructions ---------------------------------------------------------------------
    def vmread(self, encoding: int) -> int:
        base = encoding & ~1 if (encoding >> 13) & 3 == WIDTH_64 else encoding
        if base not in self._fields:
            raise VmcsError(VMERR_UNSUPPORTED_COMPONENT, f"VMREAD of unsupported field {encoding:#06x}")
        value = self._guest_value(base)
        if encoding != base:  # high access of a 64-bit field
            return value >> 32
        return value

    def vmwrite(self, encoding: int, value: int) -> None:
        base = encoding & ~1 if (encoding >> 13) & 3 == WIDTH_64 else encoding
        if base not in self._fields:
            raise VmcsError(VMERR_UNSUPPORTED_COMPONENT, f"VMWRITE of unsupported field {encoding:#06x}")
        if type_of(encoding) == TYPE_EXIT_INFO:
            raise VmcsError(VMERR_READ_ONLY_COMPONENT,
                            f"VMWRITE to read-only field {FIELD_NAMES[base]} ({encoding:#06x})")
        bits = width_of(encoding)
        if value < 0 or value >> bits:
            raise VmcsError(VMERR_UNSUPPORTED_COMPONENT,
                            f"value {value:#x} does not fit the {bits}-bit field {FIELD_NAMES[base]}")
        if encoding != base:
            value = (self._fields[base] & 0xFFFF_FFFF) | (value << 32)
        self._fields[base] = value
        self._available.add(base)

    # -- the processor's side ----------------------------------------------------------------
    def record_exit(self, reason: int, qualification: int = 0, instruction_len: int = 0,
                    intr_info: int = 0, linear_address: int = 0, guest_physical: int = 0) -> None:
        """Save the VM-exit information area as the processor does at a VM exit."""
        f = self._fields
        f[VM_EXIT_REASON] = reason
        f[EXIT_QUALIFICATION] = qualification
        f[VM_EXIT_INSTRUCTION_LEN] = instruction_len
        f[VM_EXIT_INTR_INFO] = intr_info
        f[GUEST_LINEAR_ADDRESS] = linear_address
        f[GUEST_PHYSICAL_ADDRESS] = guest_physical
        if self._available:
            self._available.clear()

    def guest_stale(self) -> None:
        """The guest ran: cached guest-state fields no longer hold."""
        self._available.clear()

    def sync_guest(self) -> None:
        """Load every guest-state field now (a snapshot for --dump-vmcs)."""
        for encoding in self._fields:
            if type_of(encoding) == TYPE_GUEST:
                self._guest_value(encoding)

    def _guest_value(self, encoding: int) -> int:
        if (self._guest_source is not None and type_of(encoding) == TYPE_GUEST
                and encoding not in self._available):
            value = self._guest_source(encoding)
            if value is not None:
                self._fields[encoding] = value
            self._available.add(encoding)
        return self._fields[encoding]

    def set_guest(self, encoding: int, value: int) -> None:
        """The hypervisor's write-back to a guest register field (applied at VM entry)."""
        self.vmwrite(encoding, value)

    # -- reading it ------------------------------------------------------------------------------
    def fields(self) -> list[FieldView]:
        """Every field, by area then encoding (a snapshot: guest state is loaded first)."""
        self.sync_guest()
        order = list(Area)
        views = [FieldView(enc, FIELD_NAMES[enc], area_of(enc), width_of(enc), self._fields[enc])
                 for enc in self._fields]
        views.sort(key=lambda v: (order.index(v.area), v.encoding))
        return views

    def snapshot(self) -> dict[str, dict[str, int]]:
        """{area: {field name: value}} for --json and --dump-vmcs."""
        out: dict[str, dict[str, int]] = {area.value: {} for area in Area}
        for view in self.fields():
            out[view.area.value][view.name] = view.value
        return out
