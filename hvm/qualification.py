"""Exit qualifications for I/O instructions and EPT violations (Intel SDM Vol. 3C 28.2.1, Tables 28-5, 28-7)."""

from __future__ import annotations

from dataclasses import dataclass

IO_SIZE_MASK = 0x7        # bits 2:0: size of access - 1 (0, 1 or 3)
IO_DIRECTION_IN = 1 << 3  # bit 3: 1 = IN
IO_STRING = 1 << 4        # bit 4: INS/OUTS
IO_REP = 1 << 5           # bit 5: REP prefixed
IO_IMMEDIATE = 1 << 6     # bit 6: operand encoding, 1 = immediate port number
IO_PORT_SHIFT = 16        # bits 31:16: port number


@dataclass(frozen=True)
class IoQualification:
    port: int
    size: int
    direction_in: bool
    string: bool
    rep: bool
    immediate: bool

    def encode(self) -> int:
        return encode_io(self.port, self.size, self.direction_in, self.string, self.rep, self.immediate)

    @property
    def direction(self) -> str:
        return "in" if self.direction_in else "out"


def encode_io(port: int, size: int, direction_in: bool, string: bool = False, rep: bool = False,
              immediate: bool = False) -> int:
    """The exit qualification of an I/O instruction exactly as the processor writes it."""
    if size not in (1, 2, 4):
        raise ValueError(f"I/O access size must be 1, 2 or 4 bytes, not {size}")
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"I/O port {port:#x} out of range")
    return ((size - 1) | (IO_DIRECTION_IN if direction_in else 0) | (IO_STRING if string else 0)
            | (IO_REP if rep else 0) | (IO_IMMEDIATE if immediate else 0) | (port << IO_PORT_SHIFT))


def decode_io(qualification: int) -> IoQualification:
    return IoQualification(
        port=(qualification >> IO_PORT_SHIFT) & 0xFFFF,
        size=(qualification & IO_SIZE_MASK) + 1,
        direction_in=bool(qualification & IO_DIRECTION_IN),
        string=bool(qualification & IO_STRING),
        rep=bool(qualification & IO_REP),
        immediate=bool(qualification & IO_IMMEDIATE),
    )


# EPT-violation qualification bits (Table 28-7).
EPT_READ = 1 << 0         # the access was a data read
EPT_WRITE = 1 << 1        # the access was a data write
EPT_FETCH = 1 << 2        # the access was an instruction fetch
EPT_GLA_VALID = 1 << 7    # the guest linear-address field is valid
EPT_GLA_TRANSLATED = 1 << 8  # the access was to the translated linear address (not a paging walk)


def encode_ept(read: bool, write: bool, fetch: bool) -> int:
    """Qualification for an access to guest-physical memory that EPT does not map at all
    (bits 5:3, the permissions of the translation, are 0: nothing is mapped there)."""
    return ((EPT_READ if read else 0) | (EPT_WRITE if write else 0) | (EPT_FETCH if fetch else 0)
            | EPT_GLA_VALID | EPT_GLA_TRANSLATED)
