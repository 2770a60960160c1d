import argparse
import json
import pickle

import numpy as np
import pytest
import torch
from t2m_synthetic import TINY, trained_setup, write_synthetic_humanml3d

from genalign.eval.motion import r_precision
from genalign.models.t2m_evaluator import EvaluatorConfig, TextMotionEvaluator
from genalign.data.humanml3d import HumanML3DDataset
from genalign.models.t2m_training import contrastive_loss, train_evaluator
from genalign.models.word_vectors import POS_CATEGORIES, GloVeVectors, WordVectorizer, caption_tokens


def official_shapes(motion_dim=263, word=300, pos=15, movement=512, latent=512, motion=1024, text=512, embed=512):
    """Key -> shape of the official text_mot_match state dicts, written out from the module description."""

    def gru(h):
        parts = {"weight_ih": (3 * h, h), "weight_hh": (3 * h, h), "bias_ih": (3 * h,), "bias_hh": (3 * h,)}
        return {f"gru.{name}_l0{side}": shape for side in ("", "_reverse") for name, shape in parts.items()}

    def head(h):
        return {
            "output_net.0.weight": (h, 2 * h), "output_net.0.bias": (h,),
            "output_net.1.weight": (h,), "output_net.1.bias": (h,),
            "output_net.3.weight": (embed, h), "output_net.3.bias": (embed,),
            "hidden": (2, 1, h),
        }  # fmt: skip

    return {
        "movement_encoder": {
            "main.0.weight": (movement, motion_dim - 4, 4), "main.0.bias": (movement,),
            "main.3.weight": (latent, movement, 4), "main.3.bias": (latent,),
            "out_net.weight": (latent, latent), "out_net.bias": (latent,),
        },
        "text_encoder": {
            "pos_emb.weight": (word, pos), "pos_emb.bias": (word,),
            "input_emb.weight": (text, word), "input_emb.bias": (text,), **gru(text), **head(text),
        },
        "motion_encoder": {
            "input_emb.weight": (motion, latent), "input_emb.bias": (motion,), **gru(motion), **head(motion),
        },
    }  # fmt: skip


def write_glove(folder, words, dim, seed=0):
    """A tiny vocabulary in the official GloVe file format; returns word -> vector."""
    folder.mkdir(parents=True, exist_ok=True)
    vectors = np.random.default_rng(seed).normal(size=(len(words), dim)).astype(np.float32)
    np.save(folder / "our_vab_data.npy", vectors)
    (folder / "our_vab_words.pkl").write_bytes(pickle.dumps(list(words)))
    (folder / "our_vab_idx.pkl").write_bytes(pickle.dumps({w: i for i, w in enumerate(words)}))
    return dict(zip(words, vectors))


VOCAB = ["unk", "sos", "eos", "a", "person", "walk", "quickly", "forward", "jump", "the", "man"]


def fake_official_checkpoint(path):
    torch.manual_seed(1)
    state = {name: {k: torch.randn(shape) for k, shape in keys.items()} for name, keys in official_shapes().items()}
    torch.save({**state, "epoch": 12, "iter": 3400}, path)
    return state


def test_module_layout_matches_the_official_keys_and_shapes():
    evaluator = TextMotionEvaluator()
    for name, expected in official_shapes().items():
        own = {k: tuple(v.shape) for k, v in getattr(evaluator, name).state_dict().items()}
        assert own == expected, name


def test_official_checkpoint_loads_and_encodes_with_glove(tmp_path):
    state = fake_official_checkpoint(tmp_path / "finest.tar")
    write_glove(tmp_path / "glove", VOCAB, 300)
    evaluator = TextMotionEvaluator.from_official(tmp_path / "finest.tar", glove_dir=tmp_path / "glove")
    for name, tensors in state.items():
        for key, value in getattr(evaluator, name).state_dict().items():
            torch.testing.assert_close(value, tensors[key])
    text = evaluator.encode_text([["a/DET", "person/NOUN", "walk/VERB"], "the man jumps quickly"])
    motion = evaluator.encode_motion(torch.randn(2, 196, 263), [196, 60])
    assert text.shape == motion.shape == (2, 512) and torch.isfinite(text).all() and torch.isfinite(motion).all()


def test_mismatched_checkpoint_lists_every_problem(tmp_path):
    state = fake_official_checkpoint(tmp_path / "finest.tar")
    del state["text_encoder"]["hidden"]
    state["text_encoder"]["gru.weight_ih_l1"] = torch.zeros(3)
    state["motion_encoder"]["input_emb.weight"] = torch.zeros(1024, 256)
    del state["movement_encoder"]
    torch.save(state, tmp_path / "bad.tar")
    with pytest.raises(ValueError) as error:
        TextMotionEvaluator.from_official(tmp_path / "bad.tar", glove_dir=tmp_path)
    message = str(error.value)
    assert "'movement_encoder' state dict absent" in message
    assert "text_encoder missing keys: ['hidden']" in message
    assert "text_encoder unexpected keys: ['gru.weight_ih_l1']" in message
    assert "input_emb.weight: checkpoint (1024, 256) vs model (1024, 512)" in message


def test_checkpoint_with_objects_is_refused(tmp_path):
    torch.save({"movement_encoder": {}, "opt": argparse.Namespace(lr=1e-4)}, tmp_path / "pickled.tar")
    with pytest.raises(ValueError, match="holds more than tensors and plain values"):
        TextMotionEvaluator.from_official(tmp_path / "pickled.tar", glove_dir=tmp_path)


def test_word_inputs_follow_the_t2m_rules(tmp_path):
    table = write_glove(tmp_path, VOCAB, 6)
    words, pos, lengths = WordVectorizer(GloVeVectors(tmp_path), max_text_len=5)(
        [["a/DET", "person/NOUN", "walk/VERB", "quickly/ADV", "zebra/NOUN", "forward/ADV", "jump/VERB"], "The man"]
    )
    assert words.shape == (2, 7, 6) and pos.shape == (2, 7, 15)
    assert lengths.tolist() == [7, 4]  # sos + 5 kept tokens + eos; sos + 2 + eos
    expected_words = ["sos", "a", "person", "walk", "quickly", "unk", "forward", "eos"]
    expected_pos = ["OTHER", "DET", "NOUN", "Act_VIP", "Desc_VIP", "OTHER", "Loc_VIP", "OTHER"]
    keep = [0, 1, 2, 3, 4, 5, 7]  # 'forward' is the 6th token: cut by max_text_len=5
    for j, k in enumerate(keep):
        np.testing.assert_array_equal(words[0, j].numpy(), table[expected_words[k]])
        assert POS_CATEGORIES[pos[0, j].argmax()] == expected_pos[k] and pos[0, j].sum() == 1
    np.testing.assert_array_equal(words[1, 4].numpy(), table["unk"])  # padding after eos
    assert caption_tokens("The man walks 2 steps") == ["the/DET", "man/OTHER", "walks/OTHER", "2/NUM", "steps/OTHER"]
    with pytest.raises(ValueError, match="'walk' is not 'word/POS'"):
        WordVectorizer(GloVeVectors(tmp_path))([["walk"]])


def test_glove_pickles_with_objects_are_refused(tmp_path):
    write_glove(tmp_path, VOCAB, 4)
    (tmp_path / "our_vab_idx.pkl").write_bytes(pickle.dumps({"unk": np.int64(0)}))
    with pytest.raises(ValueError, match="our_vab_idx.pkl: refusing to import"):
        GloVeVectors(tmp_path)


@pytest.fixture
def tiny_evaluator(tmp_path):
    write_glove(tmp_path, VOCAB, 8)
    torch.manual_seed(0)
    config = EvaluatorConfig(**TINY, word_dim=8, max_motion_length=40)
    return TextMotionEvaluator(config, word_vectors=GloVeVectors(tmp_path)).eval()


def test_motion_packing_ignores_padding_and_batch(tiny_evaluator):
    ev = tiny_evaluator
    torch.manual_seed(3)
    motions, lengths = torch.randn(3, 40, 263), [40, 17, 8]
    batched = ev.encode_motion(motions, lengths)
    garbage = motions.clone()
    garbage[1, 17:], garbage[2, 8:] = 100.0, -7.0
    torch.testing.assert_close(ev.encode_motion(garbage, lengths), batched)
    for i, length in enumerate(lengths):
        alone = ev.encode_motion(motions[i : i + 1, :length], [length])  # no padding at all
        torch.testing.assert_close(alone[0], batched[i])
        # independent: unpacked GRU over exactly the valid movement tokens
        features = torch.zeros(1, 40, 259)
        features[0, :length] = motions[i, :length, :-4]
        tokens = ev.movement_encoder(features)[:, : length // 4]
        enc = ev.motion_encoder
        _, last = enc.gru(enc.input_emb(tokens), enc.hidden)
        torch.testing.assert_close(enc.output_net(torch.cat([last[0], last[1]], -1))[0], batched[i])
    changed = motions.clone()
    changed[1, 16] += 1.0  # inside the length: the embedding must see it
    assert not torch.allclose(ev.encode_motion(changed, lengths)[1], batched[1])
    for bad in ([40, 17, 0], [40, 17, 41]):
        with pytest.raises(ValueError, match="one length in"):
            ev.encode_motion(motions, bad)


def test_text_packing_matches_unpacked_gru(tiny_evaluator):
    ev = tiny_evaluator
    captions = [["a/DET", "person/NOUN", "walk/VERB", "quickly/ADV", "forward/ADV"], ["jump/VERB"]]
    batched = ev.encode_text(captions)
    for i, caption in enumerate(captions):
        torch.testing.assert_close(ev.encode_text([caption])[0], batched[i])
        words, pos, lengths = ev.vectorizer([caption])
        enc = ev.text_encoder
        inputs = enc.input_emb(words + enc.pos_emb(pos))[:, : lengths[0]]
        _, last = enc.gru(inputs, enc.hidden)
        torch.testing.assert_close(enc.output_net(torch.cat([last[0], last[1]], -1))[0], batched[i])


def test_contrastive_loss_formula():
    torch.manual_seed(0)
    text, motion = torch.randn(4, 3) * 4, torch.randn(4, 3) * 4
    expected = sum(float(torch.dist(text[i], motion[i])) ** 2 for i in range(4)) / 4
    expected += sum(max(0.0, 10 - float(torch.dist(text[i], motion[(i + 2) % 4]))) ** 2 for i in range(4)) / 4
    assert contrastive_loss(text, motion, margin=10, shift=2).item() == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ValueError, match="shift must be in"):
        contrastive_loss(text, motion, shift=0)


def held_out(evaluator):
    test = trained_setup().test
    with torch.no_grad():
        return evaluator(test["tokens"], test["motion"], test["length"])


def test_training_lowers_the_loss_and_beats_chance_retrieval():
    setup = trained_setup()
    assert np.mean(setup.history["movement"][-5:]) < setup.history["movement"][0]
    assert np.mean(setup.history["matching"][-20:]) < 0.75 * np.mean(setup.history["matching"][:20])
    scores = {}
    for name, evaluator in (("before", setup.untrained), ("after", setup.evaluator)):
        text, motion = held_out(evaluator)
        # held-out rows come in runs of 4 of a class: shifts >= 4 pair every text with another class's motion
        loss = np.mean([contrastive_loss(text, motion, shift=s).item() for s in (5, 11, 29)])
        scores[name] = loss, r_precision(text, motion, generator=0)
    (loss_before, top_before), (loss_after, top_after) = scores["before"], scores["after"]
    assert loss_after < 0.4 * loss_before
    assert top_after[0] > 0.15 > top_before[0]  # chance is 1/32
    assert top_after[2] > 0.4


def test_train_evaluator_records_statistics_and_checks_the_data(tmp_path):
    root = write_synthetic_humanml3d(tmp_path / "data", {"train": 1}, max_frames=64)
    dataset = HumanML3DDataset(root, "train", max_frames=64, max_length=60)
    vectors = trained_setup().evaluator.vectorizer.vectors
    evaluator = TextMotionEvaluator(EvaluatorConfig(**TINY, max_motion_length=60), word_vectors=vectors)
    history = train_evaluator(evaluator, dataset, steps=2, movement_steps=1, batch_size=8, progress=False)
    assert len(history["movement"]) == 1 and len(history["matching"]) == 2 and not evaluator.training
    np.testing.assert_array_equal(evaluator.mean.numpy(), dataset.mean)
    with pytest.raises(ValueError, match="fewer than batch_size=32"):
        train_evaluator(evaluator, dataset, steps=1, movement_steps=0, batch_size=32, progress=False)
    kit = TextMotionEvaluator(EvaluatorConfig(**TINY, motion_dim=251), word_vectors=vectors)
    with pytest.raises(ValueError, match="the dataset has 263-d motions, the evaluator expects motion_dim=251"):
        train_evaluator(kit, dataset, steps=1, progress=False)


def test_save_and_load_round_trip(tmp_path):
    setup = trained_setup()
    setup.evaluator.save(tmp_path / "ev", training={"steps": 150})
    loaded = TextMotionEvaluator.load(tmp_path / "ev", word_vectors=setup.evaluator.vectorizer.vectors)
    for a, b in zip(held_out(loaded), held_out(setup.evaluator)):
        torch.testing.assert_close(a, b)
    np.testing.assert_allclose(loaded.mean.numpy(), setup.mean)
    raw = torch.randn(2, 5, 263)
    torch.testing.assert_close(loaded.normalize(raw), (raw - torch.as_tensor(setup.mean)) / torch.as_tensor(setup.std))
    stored = json.loads((tmp_path / "ev" / "config.json").read_text())
    assert stored["training"] == {"steps": 150} and stored["config"]["embed_dim"] == 16


def test_minilm_word_vectors_are_the_documented_projection():
    from transformers import AutoModel, AutoTokenizer

    from genalign.data.text_encoder import default_model_path

    vectors = trained_setup().evaluator.vectorizer.vectors
    words = ["walk", "stroll", "banana"]
    got, known = vectors.lookup(words)
    assert got.shape == (3, 300) and known.all()
    np.testing.assert_array_equal(vectors.lookup(words)[0], got)
    tokenizer = AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True)
    model = AutoModel.from_pretrained(default_model_path(), local_files_only=True).eval()
    batch = tokenizer(words, padding=True, return_tensors="pt")
    with torch.no_grad():
        states = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    pooled = torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=-1)
    gaussian = torch.randn(384, 300, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    projected = pooled @ torch.linalg.qr(gaussian).Q.float()
    expected = projected / projected.norm(dim=-1, keepdim=True) * 300**0.5
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-4)
    cos = torch.nn.functional.cosine_similarity
    walk, stroll, banana = torch.from_numpy(got)
    assert cos(walk, stroll, dim=0) > cos(walk, banana, dim=0)
