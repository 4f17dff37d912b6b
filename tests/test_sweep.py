"""`hvmlab sweep` (hvm/sweep.py): parameters, the grid run in worker processes, the CSV and the PNG;
with the fakes of test_compare in the workers, and on real runs when hvm/workloads.py is there."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
from test_compare import (
    FAKE_WORKLOADS,
    FakeWorkloadError,
    fake_load_profile,
    fake_model,
    fake_modules,  # noqa: F401 - a fixture
    fake_run_workload,
)

from hvm import cli
from hvm.compare import COUNTERS, CompareError
from hvm.sweep import SWEEP_COLUMNS, grid, parse_params, sweep

FAKES = {"runner": fake_run_workload, "profile_loader": fake_load_profile, "modeler": fake_model,
         "workloads": FAKE_WORKLOADS}


def test_params_and_grid():
    params = parse_params(["size=512,4K,64KiB", "ios=10,100"])
    assert params == {"size": [512, 4096, 65536], "ios": [10, 100]}
    points = grid(params)
    assert len(points) == 6
    assert points[0] == {"size": 512, "ios": 10} and points[-1] == {"size": 65536, "ios": 100}


@pytest.mark.parametrize("bad", [["speed=1,2"], ["size"], ["size="], ["size=4,x"], ["ios=0"],
                                 ["ios=1", "ios=2"], []])
def test_bad_params_are_refused(bad):
    with pytest.raises(CompareError):
        parse_params(bad)


def test_bad_param_on_the_command_line_is_status_2(fake_modules, capsys):  # noqa: F811
    assert cli.main(["sweep", "disk-read", "--param", "speed=1,2"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "speed" in err


def test_sweep_runs_the_grid_in_two_workers_and_writes_csv_and_png(tmp_path):
    result = sweep("disk-read", {"size": [512, 4096], "ios": [2, 3]}, "kvm-2012", tmp_path,
                   workers=2, **FAKES)
    with open(result.csv_path, newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames or ()) == SWEEP_COLUMNS
        rows = list(reader)
    assert len(rows) == 4 * 3  # grid points x paths
    assert {(int(r["size"]), int(r["ios"]), r["path"]) for r in rows} == {
        (s, n, p) for s in (512, 4096) for n in (2, 3) for p in ("hvm", "hvm-nostring", "pv")}
    for row in rows:  # every point ran with its own parameters
        whole = fake_run_workload("disk-read", row["path"], int(row["ios"]), int(row["size"]))
        assert float(row["vmexits"]) == whole.vmexits / int(row["ios"])
        assert float(row["bytes_copied"]) == whole.bytes_copied / int(row["ios"])
        assert all(row[c] != "" for c in COUNTERS)
    assert result.x_param == "size"
    png = result.png_path.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    assert not any((tmp_path / "runs").iterdir())  # scratch runs are cleaned up


def test_a_point_with_wrong_data_stops_the_sweep(tmp_path):
    with pytest.raises(FakeWorkloadError, match="read back"):
        sweep("bad-data", {"ios": [1, 2]}, "kvm-2012", tmp_path, workers=2, **FAKES)
    assert not (tmp_path / "bad-data-sweep.csv").exists()


def test_real_sweep_from_the_command_line(tmp_path):
    pytest.importorskip("hvm.workloads", reason="hvm/workloads.py is not there yet")
    pytest.importorskip("hvm.costmodel", reason="hvm/costmodel.py is not there yet")
    proc = subprocess.run([sys.executable, "-m", "hvm", "sweep", "disk-read", "--param",
                           "size=512,4096", "--param", "ios=2", "--workers", "2", "-o",
                           str(tmp_path)], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader((tmp_path / "disk-read-sweep.csv").open()))
    by = {(int(r["size"]), r["path"]): float(r["vmexits"]) for r in rows}
    assert by[4096, "hvm-nostring"] > by[512, "hvm-nostring"]  # exits grow with the request
    assert by[4096, "pv"] == by[512, "pv"] == 0
    assert (tmp_path / "disk-read-sweep.png").read_bytes()[:4] == b"\x89PNG"
