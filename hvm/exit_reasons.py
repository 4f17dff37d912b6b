"""Basic VM-exit reasons and their names (Intel SDM Vol. 3D App. C; Linux uapi/asm/vmx.h VMX_EXIT_REASONS)."""

from __future__ import annotations

EXCEPTION_NMI = 0
EXTERNAL_INTERRUPT = 1
TRIPLE_FAULT = 2
INTERRUPT_WINDOW = 7
NMI_WINDOW = 8
CPUID = 10
HLT = 12
INVLPG = 14
RDPMC = 15
RDTSC = 16
VMCALL = 18
CR_ACCESS = 28
DR_ACCESS = 29
IO_INSTRUCTION = 30
MSR_READ = 31
MSR_WRITE = 32
INVALID_STATE = 33
MWAIT_INSTRUCTION = 36
MONITOR_INSTRUCTION = 39
PAUSE_INSTRUCTION = 40
EPT_VIOLATION = 48
EPT_MISCONFIG = 49
RDTSCP = 51
PREEMPTION_TIMER = 52
WBINVD = 54
XSETBV = 55

# The names Linux prints (perf kvm stat, trace events); a reader can grep either tool's output.
NAMES: dict[int, str] = {
    0: "EXCEPTION_NMI",
    1: "EXTERNAL_INTERRUPT",
    2: "TRIPLE_FAULT",
    3: "INIT_SIGNAL",
    4: "SIPI_SIGNAL",
    7: "INTERRUPT_WINDOW",
    8: "NMI_WINDOW",
    9: "TASK_SWITCH",
    10: "CPUID",
    12: "HLT",
    13: "INVD",
    14: "INVLPG",
    15: "RDPMC",
    16: "RDTSC",
    18: "VMCALL",
    19: "VMCLEAR",
    20: "VMLAUNCH",
    21: "VMPTRLD",
    22: "VMPTRST",
    23: "VMREAD",
    24: "VMRESUME",
    25: "VMWRITE",
    26: "VMOFF",
    27: "VMON",
    28: "CR_ACCESS",
    29: "DR_ACCESS",
    30: "IO_INSTRUCTION",
    31: "MSR_READ",
    32: "MSR_WRITE",
    33: "INVALID_STATE",
    34: "MSR_LOAD_FAIL",
    36: "MWAIT_INSTRUCTION",
    37: "MONITOR_TRAP_FLAG",
    39: "MONITOR_INSTRUCTION",
    40: "PAUSE_INSTRUCTION",
    41: "MCE_DURING_VMENTRY",
    43: "TPR_BELOW_THRESHOLD",
    44: "APIC_ACCESS",
    45: "EOI_INDUCED",
    46: "GDTR_IDTR",
    47: "LDTR_TR",
    48: "EPT_VIOLATION",
    49: "EPT_MISCONFIG",
    50: "INVEPT",
    51: "RDTSCP",
    52: "PREEMPTION_TIMER",
    53: "INVVPID",
    54: "WBINVD",
    55: "XSETBV",
    56: "APIC_WRITE",
    57: "RDRAND",
    58: "INVPCID",
    59: "VMFUNC",
    60: "ENCLS",
    61: "RDSEED",
    62: "PML_FULL",
    63: "XSAVES",
    64: "XRSTORS",
    67: "UMWAIT",
    68: "TPAUSE",
    74: "BUS_LOCK",
    75: "NOTIFY",
}


# Records of the PV path share the trace with VM exits; their codes lie above every basic exit
# reason (hvmlab's own numbering, see pv/trace_pv.py): 256 + hypercall number, then events.
PV_HYPERCALL_BASE = 256
PV_RECORD_NAMES = {512: "EVENT_SEND", 513: "UPCALL", 514: "BLOCK", 515: "RING_PUSH",
                   516: "RING_TAKE", 517: "GRANT_OP", 518: "BRIDGE_TX", 519: "BRIDGE_RX",
                   520: "RING_RESPONSE"}


def name(reason: int) -> str:
    """The Linux name of a basic exit reason (bits 15:0 of VM_EXIT_REASON), or the name of a
    PV-path record."""
    if PV_HYPERCALL_BASE <= reason < PV_HYPERCALL_BASE + 256:
        return "HYPERCALL"
    if reason in PV_RECORD_NAMES:
        return PV_RECORD_NAMES[reason]
    return NAMES.get(reason & 0xFFFF, f"UNKNOWN_{reason & 0xFFFF}")


def code(reason_name: str) -> int:
    """The basic exit reason for a Linux name; ValueError if unknown."""
    for number, text in NAMES.items():
        if text == reason_name:
            return number
    raise ValueError(f"unknown exit reason {reason_name!r}")
