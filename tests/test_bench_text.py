"""The text benchmark compares like with like: genalign's DPO step and TRL's DPOTrainer, fed the same batches from
the same initial weights, give the same per-batch losses while both train."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("trl", reason="trl is not installed: pip install -e '.[bench]' to run the TRL comparison")

from genalign.bench import text  # noqa: E402

TINY = text.TextConfig(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=96, rows=12, batch_size=4,
                       learning_rate=3e-3, beta=0.5)


def test_genalign_and_trl_dpo_losses_match_step_by_step():
    # the full-softmax lever-off variant must compute the same thing, only slower
    sides = text.build(TINY, ("genalign", "trl", "trl+precompute", "genalign-full-softmax"))
    losses = {name: [side.step() for _ in range(4)] for name, side in sides.items()}
    ours = losses.pop("genalign")
    assert ours[0] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference at step 0
    assert max(abs(x - math.log(2)) for x in ours[1:]) > 1e-3  # the optimizer moved the policy
    for name, theirs in losses.items():
        assert theirs == pytest.approx(ours, abs=1e-5), name
