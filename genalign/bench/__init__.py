"""``genalign-bench``: genalign against its peers on the same model, data, batch and precision.

Suites: ``text`` (DPO vs TRL's DPOTrainer), ``image`` (Diffusion-DPO vs a diffusers-research-style loop,
``scripts/diffusers_dpo_loop.py``), ``online`` (Diffusion-DRO and SoPo: share of step time spent sampling).
:mod:`genalign.bench.cli` runs them and writes ``docs/BENCHMARKS.md`` and ``docs/benchmarks.json``.
"""
