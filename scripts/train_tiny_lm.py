"""Train the tiny arithmetic base model shipped in ``assets/tiny-arith-lm`` (CPU, about 5 minutes on one core).

A character-level tokenizer and a 2-layer GPT-2 are fine-tuned (SFT: mean negative log-likelihood of the answer
tokens and EOS) on the *train* problems of :mod:`genalign.data.arithmetic`, with answers re-drawn every step
from :func:`~genalign.data.arithmetic.noisy_answer`: correct 30% of the time, the systematic carry mistake 50%,
another plausible wrong answer 20%. The model learns the mistake as its most likely answer, so its greedy
held-out accuracy is mediocre while the correct answer keeps a large share of its probability: preference
optimisation can bring it back up.

    OMP_NUM_THREADS=1 python scripts/train_tiny_lm.py [--out assets/tiny-arith-lm]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from genalign.adapters.text import TextAdapter
from genalign.data import arithmetic
from genalign.eval.text import ArithmeticEvaluator
from genalign.models.tiny_lm import char_tokenizer, tiny_gpt2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(arithmetic.TINY_LM_PATH))
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--p-correct", type=float, default=0.30)
    parser.add_argument("--p-mistake", type=float, default=0.50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tokenizer = char_tokenizer(arithmetic.CHARACTERS)
    model = tiny_gpt2(tokenizer, n_layer=2, n_head=2, n_embd=64, n_positions=32, seed=args.seed)
    adapter = TextAdapter(model, tokenizer, reference="none", max_length=32, max_prompt_length=16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)
    train = arithmetic.problems("train")

    for step in range(args.steps):
        records = [
            {"prompt": arithmetic.prompt(a, b),
             "response": str(arithmetic.noisy_answer(a, b, rng, p_correct=args.p_correct, p_mistake=args.p_mistake))}
            for a, b in rng.sample(train, args.batch_size)
        ]
        scores = adapter.score(adapter.collate(records), with_reference=False)
        loss = -scores.policy.sum() / scores.lengths.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 250 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  nll/token {loss.item():.3f}", flush=True)

    model.eval()
    summary = {
        "args": vars(args),
        "parameters": sum(p.numel() for p in model.parameters()),
        "heldout_accuracy": ArithmeticEvaluator("heldout").accuracy(adapter),
        "train_accuracy": ArithmeticEvaluator("train", n=500).accuracy(adapter),
    }
    print(json.dumps(summary, indent=2))
    out = Path(args.out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
