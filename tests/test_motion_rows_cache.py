"""genalign.data.row_cache.cached_rows (shared by the motion and digits rows builders): rows are built once per
(settings, base weights), loaded back on a rerun, and rebuilt when a setting or the base model changes."""

from types import SimpleNamespace

import torch

from genalign.data.row_cache import cached_rows, weights_digest


def _adapter(seed: int):
    """Anything with ``unwrapped_policy`` is enough for the cache: a small linear layer with seeded weights."""
    torch.manual_seed(seed)
    return SimpleNamespace(unwrapped_policy=torch.nn.Linear(3, 2))


def test_rows_are_built_once_and_rebuilt_when_settings_or_weights_change(tmp_path):
    calls = []

    def build():
        calls.append(1)
        return [{"prompt": "a person walks", "response": torch.full((2, 3), float(len(calls))), "row": 0}]

    cache, base = tmp_path / "rows.pt", _adapter(0)
    first = cached_rows(cache, {"k": 4}, base, build)
    again = cached_rows(cache, {"k": 4}, _adapter(0), build)  # same weights, same settings: loaded
    assert len(calls) == 1 and torch.equal(again[0]["response"], first[0]["response"])

    cached_rows(cache, {"k": 8}, base, build)  # another setting: sampled again
    assert len(calls) == 2
    rebuilt = cached_rows(cache, {"k": 8}, _adapter(1), build)  # another base model: sampled again
    assert len(calls) == 3 and rebuilt[0]["response"].max().item() == 3.0
    assert cached_rows(None, {"k": 8}, base, build) and len(calls) == 4  # no cache file: always built


def test_weights_digest_tracks_values_not_identity():
    assert weights_digest(_adapter(0)) == weights_digest(_adapter(0))
    changed = _adapter(0)
    with torch.no_grad():
        changed.unwrapped_policy.bias[0] += 1e-3
    assert weights_digest(changed) != weights_digest(_adapter(0))
