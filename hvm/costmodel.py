"""The cost model: counted events x per-event cycles from a sourced hardware profile (TOML; figures cited in DESIGN.md section 9).

A profile gives, for each event below, what it costs in CPU cycles on some machine, and says
where that figure comes from: every figure has `source = "..."` (the text it was taken from)
or `assumed = true` with a `reason = "..."`. Nothing else is accepted.

    vmexit_hypervisor    an exit handled in the hypervisor/kernel (kvm-unit-tests outl_to_kernel)
    vmexit_cpuid         a CPUID exit
    vmcall               a VMCALL exit (an HVM hypercall)
    ioreq_round_trip     an exit sent to a user-space device model and back, the exit included
                         (kvm-unit-tests inl_from_qemu)
    hypercall            a PV hypercall (int 0x82 / syscall into the hypervisor and back)
    evtchn_notify        one event-channel notification: the pending bit and the kick, not the
                         hypercall that carries it nor the switch it causes
    domain_switch        one hand-off between the guest and Dom0 / the device model
    interrupt_injection  one interrupt injected into an HVM guest at VM entry
    upcall               one event upcall delivered into a PV guest
    grant_op             one grant-table operation (map, unmap, copy or transfer entry), not the
                         hypercall that issues it nor the bytes it copies
    page_flip            one page transfer (the remap), beyond its grant operation
    copy_per_byte        one byte copied (string-I/O buffers, grant copies)

model(counts, profile) charges each counter of a PathCounts (hvm/workloads.py) exactly once,
as cycles per component (the component is named after the figure it uses):

    vmexit_cpuid        = exits_by_reason["CPUID"]                        x vmexit_cpuid
    vmcall              = exits_by_reason["VMCALL"]                       x vmcall
    ioreq_round_trip    = ioreqs                                          x ioreq_round_trip
    vmexit_hypervisor   = max(0, vmexits - CPUID - VMCALL - ioreqs)       x vmexit_hypervisor
        An exit that became an ioreq is paid by ioreq_round_trip (which includes the exit), so
        it is not charged again as an exit. Buffered ioreqs do not block the vCPU: their exit
        is an ordinary exit handled in the hypervisor, nothing more.
    hypercall           = max(0, hypercalls - VMCALL)                     x hypercall
        An HVM hypercall is a VMCALL exit, already charged as vmcall.
    evtchn_notify       = max(0, evtchn_notifications - ioreqs)           x evtchn_notify
    domain_switch       = max(0, domain_switches - 2 x ioreqs)            x domain_switch
        PathCounts counts, per synchronous ioreq, 1 notification (the hypervisor's to the
        device model; the answer is not counted as one) and 2 domain switches (to the device
        model and back). ioreq_round_trip already includes them, so only the events beyond
        those are charged: a buffered ioreq's notification, a PV guest's EVTCHNOP_send (its
        hypercall is charged as hypercall, the notification itself here).
    interrupt_injection = interrupts on an HVM path, 0 on a PV path      x interrupt_injection
    upcall              = interrupts on a PV path, 0 on an HVM path      x upcall
        PathCounts.interrupts counts injections (HVM) or upcalls (PV); a path is PV when its
        name is "pv" or starts with "pv-".
    grant_op            = grant_ops                                       x grant_op
    page_flip           = page_flips                                      x page_flip
        A guest's grant_table_op is a hypercall (charged as hypercall) and its entries grant
        operations; a page transfer is a grant operation and, when it succeeds, a page flip.
    copy_per_byte       = bytes_copied                                    x copy_per_byte

wall_ns, ios and size are not used: the model is counts x costs, and the caller divides by ios.
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

FIGURE_KEYS: tuple[str, ...] = (
    "vmexit_hypervisor", "vmexit_cpuid", "vmcall", "ioreq_round_trip", "hypercall",
    "evtchn_notify", "domain_switch", "interrupt_injection", "upcall", "grant_op", "page_flip",
    "copy_per_byte",
)
# What each figure is the cost of, for tables and the TOML files calibrate writes.
FIGURE_MEANINGS: dict[str, str] = {
    "vmexit_hypervisor": "an exit handled in the hypervisor/kernel",
    "vmexit_cpuid": "a CPUID exit",
    "vmcall": "a VMCALL exit (HVM hypercall)",
    "ioreq_round_trip": "an exit to a user-space device model and back (exit included)",
    "hypercall": "a PV hypercall",
    "evtchn_notify": "one event-channel notification (not its hypercall nor its switch)",
    "domain_switch": "one hand-off between the guest and Dom0 / the device model",
    "interrupt_injection": "one interrupt injected into an HVM guest",
    "upcall": "one event upcall into a PV guest",
    "grant_op": "one grant-table operation (not its hypercall nor its bytes)",
    "page_flip": "one page transfer (the remap)",
    "copy_per_byte": "one byte copied",
}
SHIPPED = ("kvm-2012", "kvm-2024", "vmware-2001")
MEASURED = "measured"
DEFAULT_MEASURED_PATH = Path("hvmlab-profile.toml")  # where `hvmlab calibrate` writes by default


class ProfileError(ValueError):
    """A profile that cannot be used: missing, not TOML, or a figure without its source."""


@dataclass(frozen=True)
class Figure:
    """Cycles for one event, and where the number comes from (for an assumed figure, `source`
    holds the reason it was assumed)."""

    cycles: float
    source: str
    assumed: bool


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    ghz: float
    figures: dict[str, Figure]
    ghz_source: str = ""  # where the clock comes from (prefixed "assumed: " when assumed)
    # Figures measured beside the profile but not used by model(): `hvmlab calibrate` puts the
    # real KVM exit costs of this machine here, next to hvmlab's own costs in `figures`.
    reference: dict[str, Figure] = field(default_factory=dict)

    def us(self, key: str) -> float:
        """A figure in microseconds at this profile's clock."""
        return self.figures[key].cycles / (self.ghz * 1000)


class PathCountsLike(Protocol):
    """The PathCounts fields the model reads (hvm/workloads.py defines PathCounts)."""

    path: str
    vmexits: int
    exits_by_reason: dict[str, int]
    ioreqs: int
    hypercalls: int
    evtchn_notifications: int
    domain_switches: int
    interrupts: int
    bytes_copied: int
    grant_ops: int
    page_flips: int


def is_pv_path(path: str) -> bool:
    return path == "pv" or path.startswith("pv-")


def charged_events(counts: PathCountsLike) -> dict[str, int]:
    """How many events of each figure the run is charged (module docstring: the formula)."""
    cpuid = counts.exits_by_reason.get("CPUID", 0)
    vmcall = counts.exits_by_reason.get("VMCALL", 0)
    pv = is_pv_path(counts.path)
    return {
        "vmexit_hypervisor": max(0, counts.vmexits - cpuid - vmcall - counts.ioreqs),
        "vmexit_cpuid": cpuid,
        "vmcall": vmcall,
        "ioreq_round_trip": counts.ioreqs,
        "hypercall": max(0, counts.hypercalls - vmcall),
        "evtchn_notify": max(0, counts.evtchn_notifications - counts.ioreqs),
        "domain_switch": max(0, counts.domain_switches - 2 * counts.ioreqs),
        "interrupt_injection": 0 if pv else counts.interrupts,
        "upcall": counts.interrupts if pv else 0,
        "grant_op": counts.grant_ops,
        "page_flip": counts.page_flips,
        "copy_per_byte": counts.bytes_copied,
    }


def model(counts: PathCountsLike, profile: Profile) -> dict[str, float]:
    """Cycles per component for the whole run: {figure key: events x cycles}, every key present."""
    events = charged_events(counts)
    return {key: events[key] * profile.figures[key].cycles for key in FIGURE_KEYS}


def modeled_cycles(counts: PathCountsLike, profile: Profile) -> float:
    return sum(model(counts, profile).values())


# -- loading ----------------------------------------------------------------------------------
def shipped_profiles() -> list[str]:
    return list(SHIPPED)


def _shipped_text(name: str) -> tuple[str, str]:
    ref = resources.files("hvm").joinpath("profiles", f"{name}.toml")
    try:
        return ref.read_text(encoding="utf-8"), f"hvm/profiles/{name}.toml"
    except OSError as exc:
        raise ProfileError(f"shipped profile {name!r} is missing from the package: {exc}") from None


def load_profile(name_or_path: str | Path) -> Profile:
    """A shipped profile by name, "measured" (./hvmlab-profile.toml as `hvmlab calibrate`
    writes it), or a TOML file by path."""
    text_name = str(name_or_path)
    if not isinstance(name_or_path, Path) and text_name in SHIPPED:
        text, where = _shipped_text(text_name)
        return parse_profile(text, where)
    path = DEFAULT_MEASURED_PATH if text_name == MEASURED else Path(name_or_path)
    if not path.is_file():
        if text_name == MEASURED:
            raise ProfileError(f"no measured profile: {path} does not exist (run `hvmlab calibrate`, "
                               f"or give the path of the file it wrote)")
        raise ProfileError(f"unknown profile {text_name!r}: not a shipped profile "
                           f"({', '.join(SHIPPED)}, {MEASURED}) and no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{path}: cannot read: {exc}") from None
    return parse_profile(text, str(path))


def _number(value: Any, where: str, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ProfileError(f"{where}: must be a number, not {value!r}")
    if value < 0 or (positive and value == 0):
        raise ProfileError(f"{where}: must be {'> 0' if positive else '>= 0'}, not {value!r}")
    return float(value)


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ProfileError(f"{where}: must be a non-empty string")
    return value.strip()


def _provenance(table: Mapping[str, Any], where: str, prefix: str = "") -> tuple[str, bool]:
    """(source, assumed) from `source = "..."` or `assumed = true` + `reason = "..."`."""
    src, assumed, reason = table.get(prefix + "source"), table.get(prefix + "assumed"), table.get(prefix + "reason")
    if assumed is not None and not isinstance(assumed, bool):
        raise ProfileError(f"{where}: {prefix}assumed must be true or false")
    if assumed:
        if src is not None:
            raise ProfileError(f"{where}: an assumed figure gives a {prefix}reason, not a "
                               f"{prefix}source (name what it is based on in the reason)")
        return _text(reason, f"{where}: {prefix}reason (why it is assumed)"), True
    if reason is not None:
        raise ProfileError(f"{where}: {prefix}reason is only for assumed figures ({prefix}assumed = true)")
    if src is None:
        raise ProfileError(f"{where}: no {prefix}source: give {prefix}source = \"...\" (where the "
                           f"number comes from) or {prefix}assumed = true with a {prefix}reason")
    return _text(src, f"{where}: {prefix}source"), False


FIGURE_FIELDS = {"cycles", "us", "ns", "source", "assumed", "reason"}


def _figure(table: Any, where: str, ghz: float) -> Figure:
    if not isinstance(table, dict):
        raise ProfileError(f"{where}: must be a table with cycles (or us/ns) and a source")
    unknown = set(table) - FIGURE_FIELDS
    if unknown:
        raise ProfileError(f"{where}: unknown field(s) {', '.join(sorted(unknown))} "
                           f"(allowed: {', '.join(sorted(FIGURE_FIELDS))})")
    given = [k for k in ("cycles", "us", "ns") if k in table]
    if len(given) != 1:
        raise ProfileError(f"{where}: give exactly one of cycles, us or ns (got {given or 'none'})")
    unit = given[0]
    value = _number(table[unit], f"{where}.{unit}", positive=False)
    cycles = value if unit == "cycles" else value * ghz * (1000 if unit == "us" else 1)
    source, assumed = _provenance(table, where)
    if unit != "cycles":
        source = f"{source} [{value:g} {unit} at {ghz:g} GHz = {cycles:,.0f} cycles]"
    return Figure(cycles, source, assumed)


def parse_profile(text: str, where: str = "<profile>") -> Profile:
    """A Profile from TOML text: [profile] name, description, ghz with ghz_source (or
    ghz_assumed = true + ghz_reason); [figures.KEY] for every key in FIGURE_KEYS; optional
    [reference.NAME] figures. Anything missing, unknown or unsourced is a ProfileError."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{where}: not valid TOML: {exc}") from None
    unknown = set(data) - {"profile", "figures", "reference"}
    if unknown:
        raise ProfileError(f"{where}: unknown table(s) {', '.join(sorted(unknown))}")
    head = data.get("profile")
    if not isinstance(head, dict):
        raise ProfileError(f"{where}: no [profile] table (name, description, ghz)")
    allowed = {"name", "description", "ghz", "ghz_source", "ghz_assumed", "ghz_reason"}
    if set(head) - allowed:
        raise ProfileError(f"{where}: [profile] has unknown field(s) "
                           f"{', '.join(sorted(set(head) - allowed))}")
    name = _text(head.get("name"), f"{where}: [profile] name")
    description = _text(head.get("description"), f"{where}: [profile] description")
    ghz = _number(head.get("ghz"), f"{where}: [profile] ghz", positive=True)
    ghz_text, ghz_assumed = _provenance(head, f"{where}: [profile] ghz", prefix="ghz_")
    figures_table = data.get("figures")
    if not isinstance(figures_table, dict):
        raise ProfileError(f"{where}: no [figures] tables")
    missing = [k for k in FIGURE_KEYS if k not in figures_table]
    if missing:
        raise ProfileError(f"{where}: missing figure(s) {', '.join(missing)} "
                           f"(every profile gives all of {', '.join(FIGURE_KEYS)})")
    extra = set(figures_table) - set(FIGURE_KEYS)
    if extra:
        raise ProfileError(f"{where}: unknown figure(s) {', '.join(sorted(extra))} "
                           f"(the keys are {', '.join(FIGURE_KEYS)})")
    figures = {k: _figure(figures_table[k], f"{where}: figures.{k}", ghz) for k in FIGURE_KEYS}
    reference_table = data.get("reference", {})
    if not isinstance(reference_table, dict):
        raise ProfileError(f"{where}: [reference] must hold figure tables")
    reference = {k: _figure(v, f"{where}: reference.{k}", ghz) for k, v in reference_table.items()}
    return Profile(name, description, ghz, figures,
                   ("assumed: " if ghz_assumed else "") + ghz_text, reference)


# -- writing (for `hvmlab calibrate`) ---------------------------------------------------------
def _toml_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a JSON string is a valid TOML basic string


def _figure_toml(table: str, key: str, fig: Figure) -> list[str]:
    lines = [f"[{table}.{key}]"]
    meaning = FIGURE_MEANINGS.get(key)
    if meaning:
        lines.insert(0, f"# {meaning}")
    lines.append(f"cycles = {fig.cycles:.6g}" if fig.cycles < 10 else f"cycles = {round(fig.cycles)}")
    if fig.assumed:
        lines += ["assumed = true", f"reason = {_toml_string(fig.source)}"]
    else:
        lines.append(f"source = {_toml_string(fig.source)}")
    return lines + [""]


def dump_profile(profile: Profile, header: str = "") -> str:
    """TOML that parse_profile reads back to the same figures (cycles rounded to whole cycles
    from 10 up, 6 significant digits below)."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    if lines:
        lines.append("")
    lines += ["[profile]", f"name = {_toml_string(profile.name)}",
              f"description = {_toml_string(profile.description)}", f"ghz = {profile.ghz:.6g}"]
    if profile.ghz_source.startswith("assumed: "):
        lines += ["ghz_assumed = true",
                  f"ghz_reason = {_toml_string(profile.ghz_source.removeprefix('assumed: '))}"]
    else:
        lines.append(f"ghz_source = {_toml_string(profile.ghz_source or 'not given')}")
    lines.append("")
    for key in FIGURE_KEYS:
        lines += _figure_toml("figures", key, profile.figures[key])
    for key, fig in profile.reference.items():
        lines += _figure_toml("reference", key, fig)
    return "\n".join(lines)
