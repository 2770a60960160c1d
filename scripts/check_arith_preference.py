"""Check that offline preference objectives improve the shipped tiny arithmetic LM (CPU, well under a minute each).

Runs ``--steps`` Adam steps of an offline objective (through the adapter, :func:`genalign.steps.build_step` and
:mod:`genalign.objectives`) on train-split pairs and prints held-out greedy accuracy and implicit-reward metrics
before and after, as JSON:

    OMP_NUM_THREADS=1 python scripts/check_arith_preference.py --objective dpo --beta 0.1 --lr 3e-3 --steps 60
"""

from __future__ import annotations

import argparse
import json
import random

import torch

from genalign.adapters.text import TextAdapter
from genalign.data import arithmetic
from genalign.eval.text import ArithmeticEvaluator
from genalign.steps import StepContext, build_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(arithmetic.TINY_LM_PATH))
    parser.add_argument("--objective", default="dpo")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--full", action="store_true", help="full fine-tuning with a frozen copy (default: LoRA)")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--eval-n", type=int, default=None, help="held-out problems to evaluate (default: all 500)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    lora = None if args.full else {"r": args.lora_r, "lora_alpha": 2 * args.lora_r,
                                   "target_modules": ["c_attn", "c_proj", "c_fc"]}
    adapter = TextAdapter.from_pretrained(args.model, reference="copy" if args.full else "lora", lora=lora,
                                          max_length=16, max_prompt_length=8)
    evaluator = ArithmeticEvaluator(n=args.eval_n, beta=args.beta)
    step = build_step(args.objective, beta=args.beta)
    context = StepContext(generator=torch.Generator().manual_seed(args.seed))
    optimizer = torch.optim.Adam(adapter.trainable_parameters(), lr=args.lr)
    rows = arithmetic.pairs("train", seed=args.seed + 1)
    rng = random.Random(args.seed)

    before = evaluator(adapter)
    for _ in range(args.steps):
        loss, _ = step(adapter, rng.sample(rows, args.batch_size), context)
        optimizer.zero_grad()
        loss.mean().backward()
        optimizer.step()
    after = evaluator(adapter)
    print(json.dumps({"args": vars(args), "before": before, "after": after}, indent=2))


if __name__ == "__main__":
    main()
