"""Token sampling with one stream per sequence (genalign.adapters.token_sampling): the Gumbel-max draw has the
softmax's (warped) distribution, a row's draws do not depend on the batch, and ``TextAdapter.sample`` equals an
independent token-by-token loop over each sequence's own stream.

Frequencies are checked over 40,000 rows against the exact probabilities within 5 binomial standard deviations
(a false failure has probability ~1e-6 per cell).
"""

from __future__ import annotations

import pytest
import torch

from genalign.adapters.text import TextAdapter
from genalign.adapters.token_sampling import RowStreamGumbel, draw_seeds, warpers
from genalign.models.tiny_lm import char_tokenizer, tiny_gpt2

LOGITS = torch.tensor([1.5, 0.2, -0.7, 0.9, -3.0])
ROWS = 40_000


def frequencies(processors, rows: int = ROWS) -> torch.Tensor:
    """Greedy choice after ``processors`` on LOGITS repeated over ``rows`` sequences with seeds 0..rows-1."""
    scores = LOGITS.expand(rows, -1).clone()
    ids = torch.zeros(rows, 1, dtype=torch.long)
    for processor in processors:
        scores = processor(ids, scores)
    return torch.bincount(scores.argmax(-1), minlength=len(LOGITS)).double() / rows


def assert_distribution(freq: torch.Tensor, probs: torch.Tensor) -> None:
    probs = probs.double()
    sigma = (probs * (1 - probs) / ROWS).sqrt()
    assert bool(((freq - probs).abs() <= 5 * sigma + 1e-12).all()), (freq.tolist(), probs.tolist())


def test_gumbel_max_over_row_streams_draws_the_softmax():
    assert_distribution(frequencies([RowStreamGumbel(range(ROWS), torch.device("cpu"))]), torch.softmax(LOGITS, -1))


def kept_softmax(logits: torch.Tensor, keep) -> torch.Tensor:
    """softmax over the ``keep`` tokens, zero elsewhere."""
    probs = torch.zeros_like(logits)
    probs[keep] = torch.softmax(logits[keep], -1)
    return probs


def nucleus(logits: torch.Tensor, mass: float) -> torch.Tensor:
    """The smallest set of most likely tokens holding ``mass`` of the probability, renormalised."""
    order = torch.softmax(logits, -1).argsort(descending=True)
    return kept_softmax(logits, order[: int((torch.softmax(logits, -1)[order].cumsum(0) < mass).sum()) + 1])


@pytest.mark.parametrize("temperature, options, expected", [
    (2.0, {}, lambda: torch.softmax(LOGITS / 2, -1)),
    (1.0, {"top_k": 2}, lambda: kept_softmax(LOGITS, [0, 3])),
    (0.5, {"top_p": 0.8}, lambda: nucleus(LOGITS / 0.5, 0.8)),
])
def test_warpers_then_gumbel_draw_the_warped_distribution(temperature, options, expected):
    processors = [*warpers(temperature, dict(options)), RowStreamGumbel(range(ROWS), torch.device("cpu"))]
    assert_distribution(frequencies(processors), expected())


def test_warpers_leave_neutral_values_out_and_consume_their_keywords():
    options = {"top_k": 0, "top_p": 1.0, "min_p": None, "max_new_tokens": 3}
    assert warpers(1.0, options) == [] and options == {"max_new_tokens": 3}
    with pytest.raises(ValueError, match="temperature must be positive"):
        warpers(0.0, {})


def test_a_rows_noise_depends_only_on_its_seed():
    scores = torch.zeros(3, 7)
    ids = torch.zeros(3, 1, dtype=torch.long)
    together = RowStreamGumbel([11, 12, 13], torch.device("cpu"))
    alone = RowStreamGumbel([12], torch.device("cpu"))
    for _ in range(3):  # the t-th step's noise too
        torch.testing.assert_close(together(ids, scores)[1:2], alone(ids[:1], scores[:1]), atol=0, rtol=0)
    with pytest.raises(ValueError, match="3 sequences are being generated for 1 streams"):
        alone(ids, scores)


def test_seeds_are_one_row_leading_draw():
    generator = torch.Generator().manual_seed(4)
    expected = torch.randint(2**62, (3, 2), generator=torch.Generator().manual_seed(4)).reshape(-1).tolist()
    assert draw_seeds(3, 2, generator) == expected


def test_text_sample_equals_a_token_loop_over_each_sequences_stream():
    """Independent re-computation: per sequence, unpadded forwards, logits / T, its own uniforms, argmax."""
    tokenizer = char_tokenizer("0123456789+= abcdefghijklmnopqrstuvwxyz")
    model = tiny_gpt2(tokenizer, n_positions=64, seed=3)
    adapter = TextAdapter(model, tokenizer, reference="none", max_length=40, max_prompt_length=20)
    prompts, k, temperature, new = ["12+", "hello there", "7"], 2, 1.7, 6
    out = adapter.sample(prompts, k, generator=torch.Generator().manual_seed(9), temperature=temperature,
                         max_new_tokens=new)
    seeds = torch.randint(2**62, (len(prompts), k), generator=torch.Generator().manual_seed(9)).reshape(-1)
    for j, seed in enumerate(seeds.tolist()):
        ids = tokenizer(prompts[j // k])["input_ids"]
        stream = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _ in range(new):
                logits = model(torch.tensor([ids])).logits[0, -1] / temperature
                uniform = torch.rand(logits.shape[0], generator=stream)
                ids.append(int((logits - torch.log(-torch.log(uniform))).argmax()))
                if ids[-1] == tokenizer.eos_token_id:
                    break
        assert out["input_ids"][j][out["attention_mask"][j].bool()].tolist() == ids, j
    assert len(set(out["texts"])) > 1  # the draws are not all the same
