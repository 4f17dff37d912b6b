"""The exit being handled, decoded from the VMCS exit-information area for handlers (Intel SDM Vol. 3C 28.2)."""

from __future__ import annotations


class ExitInfo:
    """The exit being handled: what the VMCS exit-information area says, decoded for handlers.

    One object per vCPU, reused for every exit (no allocation on the hot path)."""

    __slots__ = ("seq", "reason", "qualification", "length", "rip", "t_ns", "port", "size",
                 "direction_in", "string", "rep", "count", "data", "linear", "df", "handled_by",
                 "vector", "gpa", "write", "fetch", "insn_json", "extra")

    def __init__(self) -> None:
        self.seq = self.reason = self.qualification = self.length = self.rip = self.t_ns = 0
        self.port = self.size = self.count = self.linear = self.vector = self.gpa = 0
        self.direction_in = self.string = self.rep = self.df = self.write = self.fetch = False
        self.data: int | None = None
        self.handled_by = ""
        self.insn_json = '""'
        self.extra: dict | None = None
