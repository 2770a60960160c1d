import argparse
import json
import pickle

import numpy as np
import pytest
import torch
from t2m_synthetic import TINY, trained_setup, write_synthetic_humanml3d

from genalign.eval.motion import r_precision
from genalign.models.t2m_evaluator import EvaluatorConfig, TextMotionEvaluator, load_evaluator
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


def test_module_layout_matches_the_official_keys_and_shapes():
    evaluator = TextMotionEvaluator()
    for name, expected in official_shapes().items():
        own = {k: tuple(v.shape) for k, v in getattr(evaluator, name).state_dict().items()}
        assert own == expected, name


def fake_official_checkpoint(path):
    """Random state dicts at the published shapes (fan-in scaled, as trained weights are), saved as
    TextMotionMatchTrainer.save does: the three encoders, the two Adam states, epoch and iter."""
    torch.manual_seed(1)

    def draw(key, shape):
        fan_in = shape[1] * (shape[2] if len(shape) == 3 else 1) if len(shape) > 1 else shape[0]
        return torch.randn(shape) / fan_in**0.5 + (1.0 if key.endswith("output_net.1.weight") else 0.0)

    state = {name: {k: draw(k, shape) for k, shape in keys.items()} for name, keys in official_shapes().items()}
    optimizers = {}
    for name in ("text_encoder", "motion_encoder"):
        params = [torch.nn.Parameter(v.clone()) for v in state[name].values()]
        adam = torch.optim.Adam(params, lr=1e-4)
        sum((p**2).sum() for p in params).backward()
        adam.step()
        optimizers[f"opt_{name}"] = adam.state_dict()
    torch.save({**state, **optimizers, "epoch": 12, "iter": 3400}, path)
    return state


def official_gru_last(inputs, weights, length, reverse):
    """The final state of one direction of a 1-layer GRU run over the first ``length`` steps, written from the GRU
    equations (gates r, z, n in PyTorch's row order), starting from ``weights['hidden'][1 if reverse else 0]``."""
    suffix = "_reverse" if reverse else ""
    w_ih, w_hh = weights[f"gru.weight_ih_l0{suffix}"], weights[f"gru.weight_hh_l0{suffix}"]
    b_ih, b_hh = weights[f"gru.bias_ih_l0{suffix}"], weights[f"gru.bias_hh_l0{suffix}"]
    h = weights["hidden"][1 if reverse else 0, 0]
    size = len(h)
    for t in range(length - 1, -1, -1) if reverse else range(length):
        gi, gh = inputs[t] @ w_ih.T + b_ih, h @ w_hh.T + b_hh
        r = torch.sigmoid(gi[:size] + gh[:size])
        z = torch.sigmoid(gi[size : 2 * size] + gh[size : 2 * size])
        n = torch.tanh(gi[2 * size :] + r * gh[2 * size :])
        h = (1 - z) * n + z * h
    return h


def official_head(weights, inputs, length):
    """input_emb -> bidirectional GRU over ``length`` steps -> output_net (Linear, LayerNorm, LeakyReLU, Linear)."""
    F = torch.nn.functional
    x = inputs @ weights["input_emb.weight"].T + weights["input_emb.bias"]
    last = torch.cat([official_gru_last(x, weights, length, False), official_gru_last(x, weights, length, True)])
    y = last @ weights["output_net.0.weight"].T + weights["output_net.0.bias"]
    y = F.leaky_relu(F.layer_norm(y, y.shape, weights["output_net.1.weight"], weights["output_net.1.bias"]), 0.2)
    return y @ weights["output_net.3.weight"].T + weights["output_net.3.bias"]


def official_co_embeddings(state, word_embs, pos_ohot, cap_lens, motions, m_lens, unit_length=4):
    """EvaluatorModelWrapper.get_co_embeddings re-done: rows re-ordered by motion length, longest first (the
    official wrapper returns them in that order), movement encoder on the 196-frame inputs without the foot
    contacts, ``m_lens // unit_length`` tokens into the motion GRU, caption lengths into the text GRU."""
    F = torch.nn.functional
    align = np.argsort(m_lens.tolist())[::-1].copy()
    mov, txt = state["movement_encoder"], state["text_encoder"]
    text_out, motion_out = [], []
    for i in align:
        x = motions[i, :, :-4].T[None]
        x = F.leaky_relu(F.conv1d(x, mov["main.0.weight"], mov["main.0.bias"], 2, 1), 0.2)
        x = F.leaky_relu(F.conv1d(x, mov["main.3.weight"], mov["main.3.bias"], 2, 1), 0.2)
        tokens = x[0].T @ mov["out_net.weight"].T + mov["out_net.bias"]
        motion_out.append(official_head(state["motion_encoder"], tokens, int(m_lens[i]) // unit_length))
        words = word_embs[i] + pos_ohot[i] @ txt["pos_emb.weight"].T + txt["pos_emb.bias"]
        text_out.append(official_head(txt, words, int(cap_lens[i])))
    return align, torch.stack(text_out), torch.stack(motion_out)


def test_official_finest_tar_loads_and_embeds_as_the_official_forward(tmp_path):
    state = fake_official_checkpoint(tmp_path / "finest.tar")
    table = write_glove(tmp_path / "glove", VOCAB, 300)
    evaluator = TextMotionEvaluator.from_official(tmp_path / "finest.tar", glove_dir=tmp_path / "glove")
    for name, tensors in state.items():
        for key, value in getattr(evaluator, name).state_dict().items():
            torch.testing.assert_close(value, tensors[key])
    captions = [["a/DET", "person/NOUN", "walk/VERB", "forward/ADV"], ["the/DET", "man/NOUN", "zebra/NOUN"],
                ["jump/VERB"]]
    # the official inputs, built here from the table: sos + tokens + eos, padded with unk to 22; VIP words take
    # their list's category, an unknown word the unk vector and OTHER
    category = {"DET": 2, "NOUN": 1, "Loc_VIP": 9, "Act_VIP": 12, "OTHER": 14}
    rows = [[("sos", "OTHER"), ("a", "DET"), ("person", "NOUN"), ("walk", "Act_VIP"), ("forward", "Loc_VIP"), ("eos", "OTHER")],
            [("sos", "OTHER"), ("the", "DET"), ("man", "NOUN"), ("unk", "OTHER"), ("eos", "OTHER")],
            [("sos", "OTHER"), ("jump", "Act_VIP"), ("eos", "OTHER")]]  # fmt: skip
    word_embs, pos = torch.zeros(3, 22, 300), torch.zeros(3, 22, 15)
    for i, row in enumerate(rows):
        for j, (word, tag) in enumerate(row + [("unk", "OTHER")] * (22 - len(row))):
            word_embs[i, j] = torch.from_numpy(table[word])
            pos[i, j, category[tag]] = 1
    cap_lens = torch.tensor([6, 5, 3])
    torch.manual_seed(2)
    m_lens = torch.tensor([60, 196, 42])  # 42: the last 2 frames are not a whole movement token
    motions = torch.randn(3, 196, 263) * (torch.arange(196)[None, :, None] < m_lens[:, None, None])  # zero-padded
    align, text_ref, motion_ref = official_co_embeddings(state, word_embs, pos, cap_lens, motions, m_lens)
    with torch.no_grad():
        text, motion = evaluator(captions, motions, m_lens)
    words, pos_ours, lengths = evaluator.vectorizer(captions)
    torch.testing.assert_close(words, word_embs)
    torch.testing.assert_close(pos_ours, pos)
    assert lengths.tolist() == cap_lens.tolist()
    # float32 with different summation orders (BLAS GEMMs vs the step-by-step GRU here) over 1024-wide products and
    # up to 49 recurrent steps: differences of a few 1e-6 on O(1) outputs; 1e-4 leaves room for any x86 BLAS
    torch.testing.assert_close(text[align], text_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(motion[align], motion_ref, rtol=1e-4, atol=1e-4)
    assert text.shape == motion.shape == (3, 512) and motion_ref.abs().mean() > 0.1


def test_official_folder_reads_the_meta_statistics(tmp_path):
    root = tmp_path / "t2m"
    (root / "text_mot_match" / "model").mkdir(parents=True)
    fake_official_checkpoint(root / "text_mot_match" / "model" / "finest.tar")
    write_glove(tmp_path / "glove", VOCAB, 300)
    with pytest.raises(FileNotFoundError, match="no folder with both mean.npy and std.npy"):
        TextMotionEvaluator.from_official_folder(root, glove_dir=tmp_path / "glove")
    meta = root / "Comp_v6_KLD01" / "meta"
    meta.mkdir(parents=True)
    mean, std = np.linspace(-1, 1, 263), np.linspace(0.5, 2, 263)
    np.save(meta / "mean.npy", mean)
    np.save(meta / "std.npy", std)
    evaluator = load_evaluator(root, glove_dir=tmp_path / "glove")
    raw = torch.randn(2, 8, 263)
    torch.testing.assert_close(evaluator.normalize(raw), (raw - torch.tensor(mean).float()) / torch.tensor(std).float())
    with pytest.raises(ValueError, match="pass the folder of its GloVe files"):
        load_evaluator(root)
    with pytest.raises(FileNotFoundError, match="neither a genalign evaluator folder"):
        load_evaluator(tmp_path)


def test_glove_files_of_mismatched_sizes_are_named(tmp_path):
    write_glove(tmp_path, VOCAB, 4)
    np.save(tmp_path / "our_vab_data.npy", np.zeros((len(VOCAB) - 2, 4), np.float32))
    with pytest.raises(ValueError, match=r"disagree on the vocabulary size \(our_vab_data.npy: 9, our_vab_words.pkl: "
                                         r"11, our_vab_idx.pkl: 11\).*same glove/ folder"):
        GloVeVectors(tmp_path)
    write_glove(tmp_path, VOCAB, 4)
    (tmp_path / "our_vab_words.pkl").unlink()
    np.save(tmp_path / "our_vab_words.npy", np.array(VOCAB))  # the word list as .npy is accepted
    assert GloVeVectors(tmp_path).lookup(["walk"])[1].all()
    write_glove(tmp_path / "small", VOCAB, 8)
    with pytest.raises(ValueError, match=r"word vectors from .*small are 8-d, the evaluator expects word_dim=300"):
        TextMotionEvaluator.from_official(tmp_path / "x.tar", glove_dir=tmp_path / "small")


def test_mismatched_checkpoint_lists_every_problem(tmp_path):
    state = fake_official_checkpoint(tmp_path / "finest.tar")
    del state["text_encoder"]["hidden"]
    state["text_encoder"]["gru.weight_ih_l1"] = torch.zeros(3)
    state["motion_encoder"]["input_emb.weight"] = torch.zeros(1024, 256)
    del state["movement_encoder"]
    torch.save(state, tmp_path / "bad.tar")
    write_glove(tmp_path / "glove", VOCAB, 300)
    with pytest.raises(ValueError) as error:
        TextMotionEvaluator.from_official(tmp_path / "bad.tar", glove_dir=tmp_path / "glove")
    message = str(error.value)
    assert "'movement_encoder' state dict absent" in message
    assert "text_encoder missing keys: ['hidden']" in message
    assert "text_encoder unexpected keys: ['gru.weight_ih_l1']" in message
    assert "input_emb.weight: checkpoint (1024, 256) vs model (1024, 512)" in message


def test_checkpoint_with_objects_is_refused(tmp_path):
    torch.save({"movement_encoder": {}, "opt": argparse.Namespace(lr=1e-4)}, tmp_path / "pickled.tar")
    write_glove(tmp_path / "glove", VOCAB, 300)
    with pytest.raises(ValueError, match="holds more than tensors and plain values"):
        TextMotionEvaluator.from_official(tmp_path / "pickled.tar", glove_dir=tmp_path / "glove")


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
