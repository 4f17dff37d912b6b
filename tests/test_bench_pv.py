"""`hvmlab bench pv --json` runs with tiny counts: every figure is there and positive, and batching shows in the notification counts (no assertion on timing values)."""

from __future__ import annotations

import json

from hvm.cli import main
from pv.bench_pv import BATCH

FIGURES = ["floor", "blk_single", "blk_batch", "net_tx_copy", "net_tx_copy_batch", "net_rx_copy",
           "net_rx_copy_batch", "net_rx_flip", "net_rx_flip_batch"]


def test_bench_pv_json_with_tiny_counts(capsys):
    assert main(["bench", "pv", "--json", "--ios", "2"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out)  # exactly one JSON object on stdout
    figures = result["figures"]
    assert sorted(figures) == sorted(FIGURES)
    for key, fig in figures.items():
        assert 0 < fig["min"] <= fig["median"] <= fig["max"], key
        assert fig["unit"] == "us"
    for key in FIGURES[1:]:
        assert result["ratios"][f"{key}_vs_floor"] > 0
    # at most one notification each way per lone request; one push per batch of 32 requests
    # (None: the backend found every batch without one, more than 32 per notification). How
    # many responses share a notification depends on when the frontend wakes (it re-arms
    # rsp_event with the final check), but never more than one per response.
    single = figures["blk_single"]
    assert single["notifications_to_backend_per_item"] <= 1
    assert single["notifications_to_frontend_per_item"] <= 1
    requests = result["batching"]["blk_batch_requests_per_notification_to_backend"]
    assert requests is None or requests >= BATCH
    responses = result["batching"]["blk_batch_responses_per_notification_to_frontend"]
    assert responses is None or responses >= 1
    assert "Python frontends" in result["driven_by"]
