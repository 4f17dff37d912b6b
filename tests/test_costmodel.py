"""The cost model: the formula on hand-made counts, the shipped profiles and their sources, bad profile files."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import pytest

from hvm.costmodel import (
    FIGURE_KEYS,
    PathCountsLike,
    ProfileError,
    charged_events,
    dump_profile,
    load_profile,
    model,
    modeled_cycles,
    parse_profile,
    shipped_profiles,
)

try:
    from hvm.workloads import PathCounts
except ImportError:  # helper W's module not there yet: the same fields, by hand
    @dataclass
    class PathCounts:  # type: ignore[no-redef]
        path: str
        ios: int
        size: int
        vmexits: int = 0
        exits_by_reason: dict[str, int] = field(default_factory=dict)
        ioreqs: int = 0
        buffered_ioreqs: int = 0
        hypercalls: int = 0
        evtchn_notifications: int = 0
        domain_switches: int = 0
        interrupts: int = 0
        bytes_copied: int = 0
        grant_ops: int = 0
        page_flips: int = 0
        wall_ns: int = 0
        verified: bool = False
        trace: Path | None = None


# A profile where each figure is a different power of ten: a component's cycles say at a
# glance how many events it was charged.
POWERS = {key: 10 ** i for i, key in enumerate(FIGURE_KEYS)}


def _profile_text(figures: dict[str, str | None] | None = None, head: str | None = None) -> str:
    head = head if head is not None else 'name = "t"\ndescription = "test"\nghz = 2.0\nghz_source = "test"'
    tables: dict[str, str | None] = {
        key: f"cycles = {POWERS[key]}\nsource = \"test figure {key}\"" for key in FIGURE_KEYS}
    tables.update(figures or {})
    body = "\n\n".join(f"[figures.{key}]\n{text}" for key, text in tables.items() if text is not None)
    return f"[profile]\n{head}\n\n{body}\n"


PROFILE = parse_profile(_profile_text(), "test")


def counts(**kw: object) -> PathCounts:
    base: dict[str, object] = {"path": "hvm", "ios": 1, "size": 512}
    base.update(kw)
    return PathCounts(**base)  # type: ignore[arg-type]


def test_hvm_exits_that_became_ioreqs_are_paid_once_by_the_round_trip() -> None:
    c = counts(vmexits=12, exits_by_reason={"IO_INSTRUCTION": 9, "CPUID": 2, "VMCALL": 1},
               ioreqs=5, hypercalls=1, evtchn_notifications=5, domain_switches=10, interrupts=3,
               bytes_copied=512)
    events = charged_events(c)
    assert events == {
        "vmexit_hypervisor": 4,      # 12 exits - 2 CPUID - 1 VMCALL - 5 sent to the device model
        "vmexit_cpuid": 2, "vmcall": 1, "ioreq_round_trip": 5,
        "hypercall": 0,              # the one hypercall is the VMCALL exit
        "evtchn_notify": 0,          # one per ioreq: inside the round trip
        "domain_switch": 0,          # two per ioreq: inside the round trip
        "interrupt_injection": 3, "upcall": 0,
        "grant_op": 0, "page_flip": 0, "copy_per_byte": 512,
    }
    parts = model(c, PROFILE)
    assert parts["vmexit_hypervisor"] == 4 * POWERS["vmexit_hypervisor"]
    assert parts["ioreq_round_trip"] == 5 * POWERS["ioreq_round_trip"]
    assert parts["copy_per_byte"] == 512 * POWERS["copy_per_byte"]
    assert parts["upcall"] == 0 and parts["hypercall"] == 0


def test_pv_interrupts_are_upcalls_and_hypercalls_are_charged() -> None:
    c = counts(path="pv", hypercalls=3, evtchn_notifications=2, domain_switches=2, interrupts=1,
               grant_ops=2, page_flips=1)
    events = charged_events(c)
    assert events["hypercall"] == 3
    assert events["evtchn_notify"] == 2 and events["domain_switch"] == 2
    assert events["upcall"] == 1 and events["interrupt_injection"] == 0
    assert events["grant_op"] == 2 and events["page_flip"] == 1
    assert events["vmexit_hypervisor"] == 0 and events["ioreq_round_trip"] == 0
    flip = counts(path="pv-flip", interrupts=4)
    assert charged_events(flip)["upcall"] == 4
    assert charged_events(counts(path="hvm-nostring", interrupts=4))["interrupt_injection"] == 4


def test_notifications_and_switches_beyond_the_ioreqs_are_charged() -> None:
    # 2 synchronous ioreqs and 6 buffered ones: one notification each, switches only for the 2
    c = counts(vmexits=8, exits_by_reason={"IO_INSTRUCTION": 8}, ioreqs=2, buffered_ioreqs=6,
               evtchn_notifications=8, domain_switches=5)
    events = charged_events(c)
    assert events["evtchn_notify"] == 6
    assert events["domain_switch"] == 1
    assert events["vmexit_hypervisor"] == 6  # the buffered writes' exits


def test_every_component_is_present_and_sums_to_the_total() -> None:
    c = counts(vmexits=3, exits_by_reason={"HLT": 3}, bytes_copied=10)
    parts = model(c, PROFILE)
    assert list(parts) == list(FIGURE_KEYS)
    assert modeled_cycles(c, PROFILE) == sum(parts.values())
    assert modeled_cycles(c, PROFILE) == 3 * POWERS["vmexit_hypervisor"] + 10 * POWERS["copy_per_byte"]


def test_the_model_ignores_wall_time_ios_and_size() -> None:
    a = counts(vmexits=4, ioreqs=1, wall_ns=5, ios=1, size=512)
    b = counts(vmexits=4, ioreqs=1, wall_ns=5_000_000, ios=100, size=65536)
    assert model(a, PROFILE) == model(b, PROFILE)


def test_the_model_reads_only_fields_pathcounts_has() -> None:
    fields = {f.name for f in dataclasses.fields(PathCounts)}
    assert set(PathCountsLike.__annotations__) <= fields


# -- shipped profiles -------------------------------------------------------------------------
@pytest.mark.parametrize("name", shipped_profiles())
def test_shipped_profile_loads_with_every_figure_sourced_or_assumed(name: str) -> None:
    profile = load_profile(name)
    assert profile.name == name
    assert profile.ghz > 0 and profile.ghz_source
    assert set(profile.figures) == set(FIGURE_KEYS)
    for key, fig in profile.figures.items():
        assert fig.cycles > 0, key
        assert fig.source.strip(), key


@pytest.mark.parametrize("name", shipped_profiles())
def test_shipped_files_mark_each_figure_in_the_toml(name: str) -> None:
    """Read the file itself: `source`, or `assumed = true` with a `reason`, never both, never neither."""
    text = resources.files("hvm").joinpath("profiles", f"{name}.toml").read_text()
    data = tomllib.loads(text)
    for key, table in {**data["figures"], **data.get("reference", {})}.items():
        if table.get("assumed"):
            assert table.get("reason", "").strip() and "source" not in table, key
        else:
            assert table.get("source", "").strip() and "reason" not in table, key


@pytest.mark.parametrize("name", shipped_profiles())
def test_figures_no_source_gives_are_assumed(name: str) -> None:
    profile = load_profile(name)
    for key in ("copy_per_byte", "grant_op", "page_flip", "evtchn_notify", "upcall",
                "domain_switch", "interrupt_injection", "hypercall"):
        assert profile.figures[key].assumed, f"{name}: {key} has no source and must be assumed"


def test_kvm_2012_carries_the_kvm_unit_tests_figures() -> None:
    p = load_profile("kvm-2012")
    assert (p.figures["vmcall"].cycles, p.figures["vmexit_hypervisor"].cycles,
            p.figures["ioreq_round_trip"].cycles) == (3898, 4451, 20574)
    assert not any(p.figures[k].assumed for k in ("vmcall", "vmexit_hypervisor", "ioreq_round_trip"))
    assert "outl_to_kernel" in p.figures["vmexit_hypervisor"].source
    assert "inl_from_qemu" in p.figures["ioreq_round_trip"].source
    assert p.figures["vmexit_cpuid"].assumed
    assert (p.reference["inl_from_kernel"].cycles, p.reference["inl_from_pmtimer"].cycles) == (7237, 24615)


def test_kvm_2024_cpuid_exit_is_in_the_lkml_range() -> None:
    p = load_profile("kvm-2024")
    cpuid = p.figures["vmexit_cpuid"]
    assert 1018 <= cpuid.cycles <= 1053 and not cpuid.assumed and "LKML" in cpuid.source
    assert p.figures["vmcall"].cycles == 1529 and not p.figures["vmcall"].assumed


def test_vmware_2001_microseconds_become_cycles_at_733_mhz() -> None:
    p = load_profile("vmware-2001")
    assert p.ghz == pytest.approx(0.733)
    assert p.figures["vmexit_hypervisor"].cycles == pytest.approx(1.36 * 733)
    assert p.figures["ioreq_round_trip"].cycles == pytest.approx(7.45 * 733)
    assert p.us("ioreq_round_trip") == pytest.approx(7.45)
    assert "733 MHz" in p.ghz_source


@pytest.mark.parametrize("name", shipped_profiles())
def test_an_exit_to_the_device_model_costs_more_than_one_handled_in_the_hypervisor(name: str) -> None:
    f = load_profile(name).figures
    assert f["ioreq_round_trip"].cycles > f["vmexit_hypervisor"].cycles


@pytest.mark.parametrize("name", shipped_profiles())
def test_dump_and_parse_give_the_same_profile(name: str) -> None:
    p = load_profile(name)
    back = parse_profile(dump_profile(p, "a header\nof two lines"), "dumped")
    assert (back.name, back.description, back.ghz) == (p.name, p.description, pytest.approx(p.ghz))
    for key, fig in p.figures.items():
        assert back.figures[key].cycles == pytest.approx(fig.cycles, rel=1e-3, abs=0.5)
        assert back.figures[key].assumed == fig.assumed
    assert set(back.reference) == set(p.reference)
    assert back.ghz_source == p.ghz_source


def test_a_profile_file_by_path_and_measured_by_default_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "mine.toml"
    path.write_text(_profile_text())
    assert load_profile(str(path)).figures["vmcall"].cycles == POWERS["vmcall"]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ProfileError, match="hvmlab calibrate"):
        load_profile("measured")
    (tmp_path / "hvmlab-profile.toml").write_text(_profile_text())
    assert load_profile("measured").name == "t"


# -- bad profiles -----------------------------------------------------------------------------
@pytest.mark.parametrize("text, message", [
    ("this is = = not toml", "not valid TOML"),
    (_profile_text({"page_flip": None}), "missing figure.*page_flip"),
    (_profile_text({"vmcall": "cycles = 100"}), "no source"),
    (_profile_text({"vmcall": "cycles = 100\nassumed = true"}), "reason"),
    (_profile_text({"vmcall": "cycles = 100\nassumed = true\nreason = \"x\"\nsource = \"y\""}),
     "not a source"),
    (_profile_text({"vmcall": "cycles = 100\nsource = \"y\"\nreason = \"x\""}), "only for assumed"),
    (_profile_text({"vmcall": "cycles = -1\nsource = \"y\""}), "must be >= 0"),
    (_profile_text({"vmcall": "cycles = \"many\"\nsource = \"y\""}), "must be a number"),
    (_profile_text({"vmcall": "cycles = 1\nus = 1\nsource = \"y\""}), "exactly one of"),
    (_profile_text({"vmcall": "cycles = 1\nsource = \"y\"\ncolour = 3"}), "unknown field"),
    (_profile_text({"hypercal": "cycles = 1\nsource = \"y\""}), "unknown figure.*hypercal"),
    (_profile_text(head='name = "t"\ndescription = "d"\nghz = 2.0'), "ghz_source"),
    (_profile_text(head='name = "t"\ndescription = "d"\nghz = 0\nghz_source = "x"'), "must be > 0"),
    ("[figures.vmcall]\ncycles = 1\nsource = \"x\"\n", r"no \[profile\]"),
])
def test_bad_profiles_fail_with_a_clear_error(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ProfileError, match=message) as info:
        load_profile(str(path))
    assert str(path) in str(info.value)


def test_unknown_profile_name_lists_the_shipped_ones() -> None:
    with pytest.raises(ProfileError, match="kvm-2012"):
        load_profile("kvm-1999")
