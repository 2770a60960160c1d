"""Benchmark bookkeeping: per-repetition ratios and their quartiles, peak-memory growth of a block, and the
targets table of docs/BENCHMARKS.md."""

from __future__ import annotations

import pytest
import torch

from genalign.bench import measure, report


def test_ratio_is_per_repetition_with_quartiles():
    ours = [measure.StepTimes([1.0, 1.0], 4), measure.StepTimes([0.5], 4), measure.StepTimes([2.0], 4)]
    peer = [measure.StepTimes([2.0], 4), measure.StepTimes([2.0, 2.0], 4), measure.StepTimes([3.0], 4)]
    result = measure.compare(ours, peer)
    # samples/s: ours 4, 8, 2; peer 2, 2, 4/3 -> ratios 2, 4, 1.5
    assert result["ratios"] == pytest.approx([2.0, 4.0, 1.5])
    assert result["ratio_median"] == pytest.approx(2.0)
    assert (result["ratio_q1"], result["ratio_q3"]) == pytest.approx((1.75, 3.0))
    assert result["genalign_samples_per_s"] == pytest.approx(4.0) and result["peer_samples_per_s"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="same positive number"):
        measure.compare(ours, peer[:2])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU (RSS) path")
def test_peak_memory_counts_what_the_block_allocates_not_earlier_peaks():
    earlier = torch.ones(64 * 2**20)  # 256 MiB, freed before the block: must not count
    del earlier
    with measure.PeakMemory() as quiet:
        pass
    assert quiet.growth_mib < 32
    with measure.PeakMemory() as busy:
        block = torch.ones(32 * 2**20)  # 128 MiB touched inside the block
        del block
    assert 120 < busy.growth_mib < 200


def test_targets_table_says_which_targets_are_met():
    comparison = {"ratio_median": 1.4, "ratio_q1": 1.3, "ratio_q3": 1.5}
    side = {"samples_per_s_median": 1.0, "flops_per_step": 1e9, "setup_seconds": 0.0}
    results = {
        "command": "genalign-bench", "date_utc": "2026-01-01 00:00", "device": "cpu", "machine": {}, "settings": {},
        "suites": {
            "text": {"config": {"model": "m", "batch_size": 8, "mixed_precision": "no"},
                     "sides": {"genalign": side, "trl": side}, "comparisons": {"trl": comparison}},
            "image": {"config": {"model": "m", "batch_size": 4, "mixed_precision": "no"},
                      "sides": {"genalign": {**side, "peak_memory_growth_mib": 70.0},
                                "diffusers-loop": {**side, "peak_memory_growth_mib": 100.0}},
                      "comparisons": {"diffusers-loop": comparison}},
            "online": {"cases": [{"case": "dro-paper", "note": "", "step_seconds_median": 1.0,
                                  "sampling_seconds_per_step": 0.6, "sampling_share": 0.6}]},
        },
    }
    text = report.markdown(results)
    assert "| text: genalign >= 1.3x trl samples/s | 1.40x | yes |" in text
    assert "| image: genalign >= 1.5x diffusers-loop samples/s | 1.40x | **no** |" in text
    assert "| image: genalign peak memory <= 0.8x the loop's | 0.70x | yes |" in text
    assert "(paper settings) | 60% | **no** |" in text
