"""How a run ends and the process status each ending gives (documented in `hvmlab --help` and README)."""

from __future__ import annotations

HALTED = 0        # the guest halted with interrupts disabled: it has finished
BAD_INPUT = 2     # missing file, assembly error, malformed guest, bad option
CRASHED = 4       # unhandled fault, triple fault, EPT violation
LIMIT = 6         # --timeout or --max-exits reached
INTERNAL = 8      # a device model or backend failed or never answered

STATUS_HELP = """\
exit statuses:
  0          the guest halted with interrupts disabled (HLT with IF=0): it has finished
  (v<<1)|1   the guest wrote v to the debug-exit port 0xF4 (QEMU isa-debug-exit); 8 bits
  2          bad input: missing file, assembly error, malformed guest, bad option
  4          the guest crashed: unhandled fault, triple fault, EPT violation
  6          a limit was reached: --timeout SECONDS or --max-exits N
  8          internal failure of a device model or backend (it died or never answered)"""


def debug_exit_status(value: int) -> int:
    """QEMU isa-debug-exit: the process exits with (value << 1) | 1, truncated to 8 bits."""
    return ((value << 1) | 1) & 0xFF


def debug_exit(value: int) -> None:
    """The debug-exit port was written: end the run with QEMU's status."""
    raise GuestEnded("debug_exit", debug_exit_status(value),
                     f"guest wrote {value:#x} to the debug-exit port 0xf4")


class GuestEnded(Exception):  # noqa: N818 - an ending, not an error
    """The run is over. Raised on the vCPU thread (also from inside a hook) and caught by the run loop."""

    def __init__(self, ended_by: str, status: int, message: str) -> None:
        super().__init__(message)
        self.ended_by = ended_by
        self.status = status
        self.message = message
