"""Re-draw the digits evaluation: prompt accuracy, reward and FID of the shipped base and of trained UNets over several
evaluation seeds and image counts (how precise the 200-image, one-seed protocol of configs/evaluator/digits.yaml is).

    python scripts/eval_digits_protocol.py --seeds 0 1 2 3 4 --per-digit 20 outputs/digits_dro/final/unet
"""

import argparse
import itertools

import torch
from diffusers import UNet2DConditionModel
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from genalign.cli import CONFIG_DIR
from genalign.eval.digits import DigitsEvaluator
from genalign.eval.digits_training import DigitsTrainingEvaluator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("unets", nargs="*", help="trained UNet folders (a run's final/unet); the base is always scored")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--per-digit", type=int, default=20, help="images per digit (the protocol uses 20)")
    parser.add_argument("--guidance", type=float, nargs="+", default=None,
                        help="classifier-free guidance scales (default: the evaluator config's)")
    parser.add_argument("--skip-base", action="store_true", help="score only the given UNets")
    args = parser.parse_args()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["experiment=digits_dro"])
    adapter = instantiate(cfg.adapter, ema_decay=None, ema_power=None)  # score the loaded weights themselves
    for name in ([] if args.skip_base else ["base"]) + args.unets:
        if name != "base":
            adapter.unwrapped_policy.load_state_dict(UNet2DConditionModel.from_pretrained(name).state_dict())
        for guidance, seed in itertools.product(args.guidance or [cfg.evaluator.guidance_scale], args.seeds):
            evaluator = DigitsTrainingEvaluator(DigitsEvaluator(args.per_digit, seed=seed),
                                                num_inference_steps=cfg.evaluator.num_inference_steps,
                                                guidance_scale=guidance, scheduler=cfg.evaluator.scheduler)
            metrics = evaluator(adapter)
            print(f"{name}  guidance {guidance:g}  seed {seed}  {10 * args.per_digit} images  " +
                  "  ".join(f"{k} {v:.3f}" for k, v in metrics.items()), flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
