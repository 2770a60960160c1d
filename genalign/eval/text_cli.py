"""``genalign-eval text``: a trained causal LM against its base model.

* ``--prompts`` + ``--reward-model``: both models answer every held-out prompt (greedy by default), a local
  sequence-classification reward model scores each answer, and the win rate against the base counts ties as 1/2
  (:func:`genalign.eval.text.win_rate`); the answers and rewards go to ``samples.jsonl``.
* ``--pairs``: DPO implicit-reward accuracy ``[beta * Delta > 0]`` on held-out preference pairs, with the base as
  the reference (:func:`genalign.eval.text.implicit_reward_accuracy`).

The trained model is a run's ``final/`` folder (:meth:`TextAdapter.save`): a LoRA adapter folder (its base is the
one recorded in ``adapter_config.json`` unless ``--base`` is given) or a full model (needs ``--base``).
``metrics.json`` in ``--out`` holds every metric and the settings used.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from genalign.adapters.text import TRUNCATION_MODES, TextAdapter
from genalign.data.hf_preference import read_preferences
from genalign.data.text import read_prompts
from genalign.eval.text import implicit_reward_accuracy, win_rate


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("text", help="a trained causal LM vs its base: reward-model win rate, "
                                   "implicit-reward accuracy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the trained model: a run's final/ folder (LoRA or full)")
    parser.add_argument("--base", help="the base model folder (the reference); a LoRA folder records its own")
    parser.add_argument("--prompts", help="JSONL of held-out prompts, one {\"prompt\": ...} per line (string or "
                        "chat messages; other fields are ignored, so a preference file works too)")
    parser.add_argument("--pairs", help="held-out preference pairs: a JSONL/parquet file or a dataset snapshot folder in "
                        "any layout data=hf_preference reads (prompt/chosen/rejected, UltraFeedback/TRL "
                        "conversational, Anthropic HH)")
    parser.add_argument("--pairs-split", help="with a snapshot folder: the split's shards to read (e.g. test_prefs)")
    parser.add_argument("--reward-model", help="local AutoModelForSequenceClassification folder (num_labels=1); "
                        "needed with --prompts")
    parser.add_argument("--out", required=True, help="folder for metrics.json and samples.jsonl")
    parser.add_argument("--beta", type=float, default=0.1, help="beta of the implicit reward (the training beta)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 (default): greedy answers; > 0: sampling, seeded by --seed (same seed for both models)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--max-prompt-length", type=int, default=512)
    parser.add_argument("--truncation-mode", choices=TRUNCATION_MODES, default="keep_start")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16, float16 or auto")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.set_defaults(func=main)


def answers(adapter: TextAdapter, prompts: list[Any], *, base: bool, args: argparse.Namespace) -> tuple[list[str], int]:
    """Each prompt's answer from the trained model or the base, and how many hit ``max_new_tokens`` unfinished."""
    generator = torch.Generator().manual_seed(args.seed)  # the same draws for both models
    sampling = {"do_sample": args.temperature > 0}
    if args.temperature > 0:
        sampling["temperature"] = args.temperature
    texts, unfinished = [], 0
    stops = set(adapter._stop_ids())
    for start in range(0, len(prompts), args.batch_size):
        out = adapter.sample(prompts[start : start + args.batch_size], generator=generator, use_reference=base,
                             max_new_tokens=args.max_new_tokens, **sampling)
        texts += out["texts"]
        for ids, mask in zip(out["input_ids"], out["loss_mask"]):
            generated = ids[mask.bool()].tolist()
            unfinished += len(generated) == args.max_new_tokens and generated[-1] not in stops
    return texts, unfinished


def read_pairs(path: str, split: str | None) -> list[dict[str, Any]]:
    """Held-out pairs through :func:`read_preferences`; unpaired (KTO-layout) rows have no implicit-reward margin."""
    rows = read_preferences(path, split=split)
    if rows and "chosen" not in rows[0]:
        raise SystemExit(f"genalign-eval text: {path} holds unpaired rows (prompt/completion/label); --pairs needs "
                         "chosen/rejected pairs")
    return rows


def main(args: argparse.Namespace) -> int:
    if not (args.prompts or args.pairs):
        raise SystemExit("genalign-eval text: give --prompts (with --reward-model) and/or --pairs")
    if args.prompts and not args.reward_model:
        raise SystemExit("genalign-eval text: --prompts needs --reward-model (a local sequence-classification folder)")
    adapter = TextAdapter.from_trained(args.model, base=args.base, dtype=args.dtype, max_length=args.max_length,
                                       max_prompt_length=args.max_prompt_length, truncation_mode=args.truncation_mode)
    adapter.policy.to(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, Any] = {"settings": {k: v for k, v in vars(args).items() if k != "func"}}
    if args.pairs:
        metrics.update(implicit_reward_accuracy(adapter, read_pairs(args.pairs, args.pairs_split), args.beta,
                                                batch_size=args.batch_size))
    if args.prompts:
        from genalign.rewards.sequence_classifier import SequenceClassifierReward

        prompts = read_prompts(args.prompts)
        model_texts, metrics["unfinished_model"] = answers(adapter, prompts, base=False, args=args)
        base_texts, metrics["unfinished_base"] = answers(adapter, prompts, base=True, args=args)
        reward = SequenceClassifierReward(args.reward_model, device=args.device, batch_size=args.batch_size)
        model_rewards, base_rewards = reward(prompts, model_texts), reward(prompts, base_texts)
        metrics.update(win_rate(model_rewards, base_rewards))
        metrics["reward_truncated"] = reward.truncated
        with open(out / "samples.jsonl", "w", encoding="utf-8") as handle:
            for i, prompt in enumerate(prompts):
                handle.write(json.dumps({"row": i, "prompt": prompt, "base": base_texts[i], "model": model_texts[i],
                                         "reward_base": base_rewards[i].item(),
                                         "reward_model": model_rewards[i].item()}) + "\n")
    metrics["truncated_sequences"] = adapter.truncated
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    for key, value in metrics.items():
        if key != "settings":
            print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    return 0
