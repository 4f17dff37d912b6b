"""`hvmlab calibrate` with tiny counts: the profile it writes loads back whole, every figure sourced or marked assumed."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from hvm import bench, calibrate, kvm
from hvm.costmodel import FIGURE_KEYS, Figure, load_profile


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("calibrate") / "profile.toml"
    saved = bench.REPEATS
    bench.REPEATS = 1  # one difference per figure: these counts test the plumbing, not the machine
    try:
        profile = calibrate.calibrate(out, exits=100, ios=20)
    finally:
        bench.REPEATS = saved
    return out, profile


def test_the_written_profile_loads_back_with_every_key(written: tuple[Path, object]) -> None:
    out, returned = written
    loaded = load_profile(str(out))
    assert loaded == returned
    assert loaded.name == "measured"
    assert set(loaded.figures) == set(FIGURE_KEYS)
    assert loaded.ghz > 0 and "/proc/cpuinfo" in loaded.ghz_source


def test_every_figure_is_measured_or_marked_assumed_in_the_file(written: tuple[Path, object]) -> None:
    out, _ = written
    data = tomllib.loads(out.read_text())
    for key in FIGURE_KEYS:
        table = data["figures"][key]
        assert table["cycles"] > 0, key
        if table.get("assumed"):
            assert table["reason"].strip(), key
        else:
            assert table["source"].startswith("measured by hvmlab calibrate"), key
    # calibrate has no guest for these three: they are the base profile's, and say so
    for key in ("interrupt_injection", "upcall", "page_flip"):
        assert data["figures"][key]["assumed"] is True
        assert calibrate.BASE_PROFILE in data["figures"][key]["reason"]


def test_the_file_says_what_it_is(written: tuple[Path, object]) -> None:
    out, _ = written
    text = out.read_text()
    assert text.startswith("# Written by `hvmlab calibrate`")
    assert "[reference]" in text  # the header explains the reference figures


def test_real_kvm_figures_are_there_exactly_when_kvm_is_usable(written: tuple[Path, object]) -> None:
    _, profile = written
    reason = kvm.probe()
    if reason is not None:
        assert profile.reference == {}  # type: ignore[attr-defined]
        assert reason in profile.description  # type: ignore[attr-defined]
        return
    reference = profile.reference  # type: ignore[attr-defined]
    assert set(reference) <= {"kvm_ioreq_round_trip", "kvm_vmexit_cpuid", "kvm_vmexit_hypervisor",
                              "kvm_vmcall"}
    for key, fig in reference.items():
        assert fig.cycles > 0 and not fig.assumed, key
        assert "real KVM on this machine" in fig.source, key
    assert kvm.backend() in profile.description  # type: ignore[attr-defined]


def test_a_measurement_lost_in_noise_falls_back_to_the_base_profile_marked_assumed() -> None:
    base = Figure(1234.0, "base source", True)
    fig = calibrate._checked(Figure(-50.0, "measured by hvmlab calibrate: x", False), base, "kvm-2024")
    assert fig.assumed and fig.cycles == 1234.0
    assert "not positive" in fig.source and "kvm-2024" in fig.source
    good = Figure(10.0, "measured", False)
    assert calibrate._checked(good, base, "kvm-2024") is good


def test_the_grant_copy_guest_checks_its_copies(monkeypatch: pytest.MonkeyPatch) -> None:
    assert calibrate._pv(calibrate.GRANT_BATCH)(2) > 0  # copies between the guest's own frames
    monkeypatch.setattr(calibrate, "COPY_DST_PFN", 0xFFFFF)  # a frame the guest does not have
    with pytest.raises(RuntimeError, match="shutdown_crash"):
        calibrate._pv(calibrate.GRANT_BATCH)(2)
