"""Final saves write a gathered state dict (what FSDP / ZeRO-3 hand back from ``Accelerator.get_state_dict``):
``Adapter.holding`` puts its tensors into the policy while the adapter's own save runs, then restores the live ones;
the trainer's final save goes through it. Also: the public ``Trainer.step`` is the loop ``train`` runs, and
``train.compile`` trains the same losses as eager."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_train import make_trainer, pair_rows
from tiny_pixel import pixel_adapter
from transformers import AutoModelForCausalLM

from genalign.adapters.tabular import TabularAdapter
from genalign.adapters.text import TextAdapter
from genalign.models.tiny_lm import char_tokenizer, tiny_gpt2
from genalign.steps import build_step
from genalign.train import Trainer, TrainConfig

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn"]}


def shifted(state_dict: dict[str, torch.Tensor], match: str, by: float) -> dict[str, torch.Tensor]:
    """A copy of ``state_dict`` with ``by`` added to every tensor whose name contains ``match``."""
    return {k: v.detach().clone() + (by if match in k else 0) for k, v in state_dict.items()}


def live_copy(adapter) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in adapter.unwrapped_policy.state_dict().items()}


def test_tabular_save_writes_the_held_state_dict_and_restores_the_live_one(tmp_path):
    adapter = TabularAdapter(3, 4)
    before = live_copy(adapter)
    gathered = shifted(before, "logits", 1.5)
    with adapter.holding(gathered):
        adapter.save(str(tmp_path))
    saved = load_file(tmp_path / "tabular.safetensors")
    torch.testing.assert_close(saved["policy_logits"], before["logits"] + 1.5, atol=0, rtol=0)
    torch.testing.assert_close(saved["reference_logits"], adapter.reference.logits.detach(), atol=0, rtol=0)
    torch.testing.assert_close(adapter.unwrapped_policy.logits.detach(), before["logits"], atol=0, rtol=0)
    assert adapter.policy.logits is adapter.trainable_parameters()[0]  # the optimizer's parameter is back


def test_text_lora_save_writes_held_adapter_and_merged_weights_with_ties_kept(tmp_path):
    tokenizer = char_tokenizer("abcdefgh ")
    adapter = TextAdapter(tiny_gpt2(tokenizer, n_positions=64, seed=0), tokenizer, reference="lora", lora=LORA)
    before = live_copy(adapter)
    gathered = shifted(before, "lora_B", 0.25)  # B = 0 at init: the shift alone makes the LoRA update non-zero
    with adapter.holding(gathered) as model:
        assert model.get_input_embeddings().weight is model.get_output_embeddings().weight  # the tie survives
        adapter.save(str(tmp_path))
    saved = load_file(tmp_path / "adapter_model.safetensors")
    b_names = [k for k in saved if "lora_B" in k]
    assert b_names and all(torch.all(saved[k] == 0.25) for k in b_names)
    # merged W = W0 + (alpha / r) B A for the held B (c_attn is GPT-2's Conv1D: the update is (B A)^T)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", local_files_only=True)
    prefix = "base_model.model.transformer.h.0.attn.c_attn"
    a, b = gathered[f"{prefix}.lora_A.default.weight"], gathered[f"{prefix}.lora_B.default.weight"]
    expected = gathered[f"{prefix}.base_layer.weight"] + (LORA["lora_alpha"] / LORA["r"]) * (b @ a).T
    torch.testing.assert_close(merged.transformer.h[0].attn.c_attn.weight, expected, atol=1e-6, rtol=1e-6)
    for name, value in adapter.unwrapped_policy.state_dict().items():
        torch.testing.assert_close(value, before[name], atol=0, rtol=0, msg=name)


def test_image_save_writes_the_held_unet_weights(tmp_path):
    adapter = pixel_adapter()
    before = live_copy(adapter)
    gathered = shifted(before, "conv_out.weight", 0.5)
    with adapter.holding(gathered):
        adapter.save(str(tmp_path))
    saved = load_file(tmp_path / "unet" / "diffusion_pytorch_model.safetensors")
    torch.testing.assert_close(saved["conv_out.weight"], before["conv_out.weight"] + 0.5, atol=0, rtol=0)
    torch.testing.assert_close(adapter.unwrapped_policy.conv_out.weight.detach(), before["conv_out.weight"])


def test_holding_names_missing_and_unexpected_keys_and_restores_after_errors():
    adapter = TabularAdapter(3, 4)
    with pytest.raises(ValueError, match=r"missing \['logits'\], unexpected \['module.logits'\]"):
        with adapter.holding({"module.logits": torch.zeros(3, 4)}):
            pass
    original = adapter.unwrapped_policy.logits
    with pytest.raises(RuntimeError, match="inside"):
        with adapter.holding({"logits": torch.ones(3, 4)}):
            raise RuntimeError("inside")
    assert adapter.unwrapped_policy.logits is original


def test_trainer_final_save_writes_what_the_accelerator_gathered(tmp_path, monkeypatch):
    """The trainer asks accelerate for the (gathered) state dict and saves exactly that."""
    trainer = make_trainer(tmp_path, max_steps=2)
    gathered = {"logits": torch.full((3, 4), 7.0)}
    asked, checkpoint_state = [], trainer.accelerator.get_state_dict

    def get_state_dict(model, unwrap=True):  # save_state (checkpoints) asks with unwrap=False: left alone
        if not unwrap:
            return checkpoint_state(model, unwrap=False)
        asked.append(model)
        return gathered

    monkeypatch.setattr(trainer.accelerator, "get_state_dict", get_state_dict)
    trainer.train()
    assert asked == [trainer.model]
    saved = load_file(tmp_path / "run" / "final" / "tabular.safetensors")
    torch.testing.assert_close(saved["policy_logits"], gathered["logits"], atol=0, rtol=0)
    assert not torch.equal(trainer.adapter.unwrapped_policy.logits.detach(), gathered["logits"])


def test_public_step_is_the_training_loop(tmp_path):
    """``train`` and a loop of ``step`` calls give the same losses and weights (it is the loop train runs)."""
    trained = make_trainer(tmp_path, max_steps=4, name="train")
    history = trained.train()["history"]
    stepped = make_trainer(tmp_path, max_steps=4, name="step")
    logs = [stepped.step() for _ in range(4)]
    assert stepped.global_step == 4
    assert [log["loss"] for log in logs] == pytest.approx([h["loss"] for h in history], abs=1e-12)
    torch.testing.assert_close(stepped.adapter.unwrapped_policy.logits, trained.adapter.unwrapped_policy.logits)


def test_compiled_training_matches_eager(tmp_path):
    """``TrainConfig(compile=True)`` (``train.compile``): the same losses and final weights as eager to 1e-5."""
    runs = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        cfg = TrainConfig(output_dir=str(tmp_path / f"compile-{compiled}"), max_steps=3, batch_size=4,
                          learning_rate=0.05, log_every=1, seed=3, compile=compiled)
        trainer = Trainer(TabularAdapter(3, 4), build_step("dpo", beta=0.5), pair_rows(), cfg)
        assert isinstance(trainer.adapter.policy, torch._dynamo.eval_frame.OptimizedModule) == compiled
        runs[compiled] = (trainer.train()["history"], load_file(tmp_path / f"compile-{compiled}" / "final" /
                                                                 "tabular.safetensors"))
    (eager, eager_saved), (compiled, compiled_saved) = runs[False], runs[True]
    assert [h["loss"] for h in compiled] == pytest.approx([h["loss"] for h in eager], abs=1e-5)
    assert eager[-1]["loss"] < eager[0]["loss"] - 1e-3  # it trained: the equality is not trivial
    torch.testing.assert_close(compiled_saved["policy_logits"], eager_saved["policy_logits"], atol=1e-5, rtol=0)


def test_compile_is_in_the_trainer_config_block():
    from omegaconf import OmegaConf

    train = OmegaConf.load("configs/config.yaml").train
    assert train.compile is False and set(train) <= set(TrainConfig.__dataclass_fields__)
