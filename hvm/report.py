"""Human-readable views of a run: the VMCS at one exit as a table by area (SDM Vol. 3C ch. 25 layout)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from . import exit_reasons as R
from . import vmcs as V
from .qualification import decode_io


def explain_field(view: V.FieldView) -> str:
    """A short reading of the fields people look at first."""
    if view.encoding == V.VM_EXIT_REASON:
        return R.name(view.value)
    if view.encoding == V.VM_EXIT_INTR_INFO and view.value & V.INTR_INFO_VALID:
        return f"vector {view.value & 0xFF}, type {(view.value >> 8) & 7}, valid"
    if view.encoding == V.CPU_BASED_VM_EXEC_CONTROL:
        names = [name for bit, name in ((2, "interrupt-window"), (7, "HLT"), (12, "RDTSC"),
                                        (24, "unconditional I/O"), (25, "use I/O bitmaps"),
                                        (28, "use MSR bitmaps"), (31, "secondary controls"))
                 if view.value >> bit & 1]
        return ", ".join(names)
    return ""


def print_vmcs(dump: dict, console: Console | None = None, all_fields: bool = False) -> None:
    console = console or Console()
    console.width = max(console.width, 120)
    views: list[V.FieldView] = dump["vmcs"]
    reason = next((v.value for v in views if v.encoding == V.VM_EXIT_REASON), 0)
    qual = next((v.value for v in views if v.encoding == V.EXIT_QUALIFICATION), 0)
    table = Table(title=f"VMCS at exit {dump['exit']} ({dump['reason']})", show_lines=False)
    for col, justify in (("area", "left"), ("field", "left"), ("encoding", "right"), ("width", "right"),
                         ("value", "right"), ("meaning", "left")):
        table.add_column(col, justify=justify, no_wrap=col != "meaning")  # type: ignore[arg-type]
    hidden = 0
    last_area = None
    for view in views:
        if not all_fields and view.value == 0 and view.area != V.Area.EXIT_INFORMATION:
            hidden += 1
            continue
        meaning = explain_field(view)
        if view.encoding == V.EXIT_QUALIFICATION and reason == R.IO_INSTRUCTION:
            q = decode_io(qual)
            meaning = (f"port {q.port:#x}, {q.size} byte{'s' if q.size > 1 else ''}, {q.direction}"
                       f"{', string' if q.string else ''}{', rep' if q.rep else ''}"
                       f"{', immediate' if q.immediate else ', dx'}")
        area = view.area.value if view.area != last_area else ""
        last_area = view.area
        table.add_row(area, view.name, f"{view.encoding:#06x}", str(view.width),
                      f"{view.value:#x}", meaning)
    console.print(table)
    if hidden:
        console.print(f"({hidden} fields that are 0 outside the exit-information area not shown)")
