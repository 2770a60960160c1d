"""Judges for online preference methods: ``judge(prompts, responses_a, responses_b) -> [N]``, the probability
that response a is preferred to response b (a hard label is the probability 0 or 1; 0.5 is a tie).

* :class:`RewardJudge` — a reward model or scorer ``reward_fn(prompts, responses) -> [N]`` (any scorer of
  ``genalign.rewards``, a classifier's probability of the right class, a verifier's 0/1): a ≻ b when r(a) > r(b), or
  the Bradley–Terry probability σ((r(a) − r(b))/T) with ``temperature`` T > 0. Rewards outside the declared
  ``reward_range`` raise, naming the prompt.
* :class:`LLMJudge` — a language model prompted with both responses (through a :class:`TextAdapter`'s model):
  P(a ≻ b) = softmax over the next-token logits of the two choice tokens ("A", "B"), averaged over both orders
  to cancel the position bias (OAIF, Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback").
* :class:`PreferenceMatrixJudge` — a known preference table P[c, a, b] for the tabular adapter (theory checks).

:func:`judge_pairs` runs a judge and applies the rules every online step shares: the output must be one finite
probability per pair in [0, 1] (a wrong shape or a value outside [0, 1] raises); NaN verdicts and ties carry no
preference and are masked out and counted; a response that hit the length limit without an end token is penalised
as configured (``"lose"``: it loses against a finished one, two unfinished ones tie; ``"drop"``: the pair is masked
out) and counted — never silently kept.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import torch

from genalign.adapters.text import TextAdapter, eval_mode
from genalign.data.arithmetic import parse_prompt

Judge = Callable[[list[Any], list[Any], list[Any]], Any]
TRUNCATION_RULES = ("lose", "drop")
DEFAULT_TEMPLATE = "Question: {prompt}\nAnswer A: {a}\nAnswer B: {b}\nThe better answer is"


class Verdict(NamedTuple):
    """``prob [N]``: P(a ≻ b) after the rules (NaN where invalid); ``valid [N]``: a usable preference;
    ``counts``: pairs judged, ties, NaN verdicts and unfinished responses, for the step's metrics."""

    prob: torch.Tensor
    valid: torch.Tensor
    counts: dict[str, float]


def judge_pairs(
    judge: Judge,
    prompts: Sequence[Any],
    responses_a: Sequence[Any],
    responses_b: Sequence[Any],
    *,
    ended_a: torch.Tensor | None = None,
    ended_b: torch.Tensor | None = None,
    truncated: str = "lose",
    ties_valid: bool = False,
) -> Verdict:
    """Judge N pairs and apply the shared rules (module docstring). ``ended_*`` ``[N]`` bool mark responses that
    finished with an end token; ``ties_valid`` keeps ties (methods that use P itself, such as Nash-MD)."""
    if truncated not in TRUNCATION_RULES:
        raise ValueError(f"truncated must be one of {TRUNCATION_RULES}, got {truncated!r}")
    n = len(prompts)
    if not (len(responses_a) == len(responses_b) == n):
        raise ValueError(f"judge_pairs needs one response a and b per prompt, got {n} prompts, "
                         f"{len(responses_a)} a and {len(responses_b)} b")
    raw = judge(list(prompts), list(responses_a), list(responses_b))
    prob = torch.as_tensor(raw.detach() if isinstance(raw, torch.Tensor) else raw).cpu().to(torch.float64)
    if prob.shape != (n,):
        raise ValueError(f"the judge {type(judge).__name__} returned shape {tuple(prob.shape)} for {n} pairs; it must "
                         f"return one preference probability (or 0/1 label) per pair, shape [{n}]")
    nan = prob.isnan()
    outside = ~nan & ((prob < 0) | (prob > 1))
    if outside.any():
        i = int(outside.nonzero()[0])
        raise ValueError(f"the judge {type(judge).__name__} returned {prob[i].item()} for prompt {prompts[i]!r}; "
                         "preferences must be probabilities in [0, 1] (or 0/1 labels)")
    ended_a = torch.ones(n, dtype=torch.bool) if ended_a is None else ended_a.cpu().bool()
    ended_b = torch.ones(n, dtype=torch.bool) if ended_b is None else ended_b.cpu().bool()
    unfinished = ~ended_a | ~ended_b
    valid = ~nan
    if truncated == "drop":
        valid &= ~unfinished
    else:
        prob = torch.where(ended_a & ~ended_b, 1.0, torch.where(~ended_a & ended_b, 0.0, prob))
        prob = torch.where(~ended_a & ~ended_b, 0.5, prob)
    tie = valid & (prob == 0.5)
    if not ties_valid:
        valid &= ~tie
    counts = {"judge/pairs": float(n), "judge/ties": float(tie.sum()), "judge/nan": float(nan.sum()),
              "judge/unfinished": float((~ended_a).sum() + (~ended_b).sum()), "judge/valid": float(valid.sum())}
    return Verdict(torch.where(valid, prob, torch.nan).float(), valid, counts)


class RewardJudge:
    """Preference from a scalar reward ``reward_fn(prompts, responses) -> [N]`` (higher is better).

    ``temperature`` 0: hard labels (1, 0, or 0.5 on equal rewards); T > 0: σ((r_a − r_b)/T). ``reward_range``
    (low, high): rewards outside it raise, naming the prompt (a NaN reward gives a NaN verdict, counted by
    :func:`judge_pairs`).
    """

    def __init__(self, reward_fn: Callable[[list[Any], list[Any]], Any], *, temperature: float = 0.0,
                 reward_range: Sequence[float] | None = None):
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = hard labels), got {temperature}")
        if reward_range is not None and (len(reward_range) != 2 or not reward_range[0] < reward_range[1]):
            raise ValueError(f"reward_range must be (low, high) with low < high, got {reward_range}")
        self.reward_fn, self.temperature = reward_fn, float(temperature)
        self.reward_range = None if reward_range is None else tuple(float(v) for v in reward_range)

    def rewards(self, prompts: list[Any], responses: list[Any]) -> torch.Tensor:
        values = self.reward_fn(prompts, responses)
        values = torch.as_tensor(values.detach() if isinstance(values, torch.Tensor) else values).cpu().double()
        if values.shape != (len(prompts),):
            raise ValueError(f"reward_fn must return one reward per response ([{len(prompts)}]), got shape "
                             f"{tuple(values.shape)}")
        if self.reward_range is not None:
            low, high = self.reward_range
            outside = ~values.isnan() & ((values < low) | (values > high))
            if outside.any():
                i = int(outside.nonzero()[0])
                raise ValueError(f"reward {values[i].item()} for prompt {prompts[i]!r} lies outside the declared "
                                 f"reward_range [{low}, {high}]; fix the reward model or widen reward_range")
        return values

    def __call__(self, prompts: list[Any], responses_a: list[Any], responses_b: list[Any]) -> torch.Tensor:
        r = self.rewards(prompts + prompts, list(responses_a) + list(responses_b))
        gap = r[: len(prompts)] - r[len(prompts) :]
        if self.temperature > 0:
            return torch.sigmoid(gap / self.temperature)
        return torch.where(gap.isnan(), torch.nan, (gap > 0).double() + 0.5 * (gap == 0).double())


def arithmetic_correctness(prompts: list[str], responses: list[str]) -> torch.Tensor:
    """Verifier of the arithmetic default: 1 when the response is exactly the sum asked by ``"a+b="``, else 0."""
    correct = []
    for prompt, response in zip(prompts, responses):
        a, b = parse_prompt(prompt)
        correct.append(float(response.strip() == str(a + b)))
    return torch.tensor(correct)


def digit_classifier_reward(classifier_path: str | None = None) -> Callable[[list[str], list[Any]], torch.Tensor]:
    """The digits default's classifier as a reward in [0, 1]: p_cls(prompted digit | image)."""
    from genalign.data.digits_rows import classifier_reward

    return classifier_reward(classifier_path)


class PreferenceMatrixJudge:
    """A known preference model for the tabular adapter: ``P[c, a, b]`` = P(a ≻ b | c), with P[c, a, b] +
    P[c, b, a] = 1 (prompts are context indices, responses action indices)."""

    def __init__(self, matrix: Any):
        p = torch.as_tensor(matrix, dtype=torch.float64)
        p = p[None] if p.ndim == 2 else p
        if p.ndim != 3 or p.shape[1] != p.shape[2]:
            raise ValueError(f"the preference matrix must be [A, A] or [C, A, A], got shape {tuple(p.shape)}")
        if ((p < 0) | (p > 1)).any() or not torch.allclose(p + p.transpose(1, 2), torch.ones_like(p)):
            raise ValueError("the preference matrix must hold probabilities with P[a, b] + P[b, a] = 1")
        self.matrix = p

    def __call__(self, prompts: list[int], responses_a: list[int], responses_b: list[int]) -> torch.Tensor:
        c = torch.as_tensor(prompts) if self.matrix.shape[0] > 1 else torch.zeros(len(prompts), dtype=torch.long)
        return self.matrix[c, torch.as_tensor(responses_a), torch.as_tensor(responses_b)]


class LLMJudge:
    """A causal LM as pairwise judge: P(a ≻ b) from its next-token logits of ``choices`` after ``template``.

    ``adapter``: a :class:`TextAdapter` (or the path of a local model folder); ``None`` judges with the model being
    trained (the step binds it, :func:`bind`). ``use_reference``: judge with the adapter's reference model (frozen)
    instead of the policy. ``swap``: average P_A(a, b) and 1 − P_A(b, a) to cancel the position bias.
    """

    def __init__(self, adapter: TextAdapter | str | None = None, *, template: str = DEFAULT_TEMPLATE,
                 choices: Sequence[str] = ("A", "B"), use_reference: bool = True, swap: bool = True):
        if isinstance(adapter, str):
            adapter = TextAdapter.from_pretrained(adapter, reference="none")
            use_reference = False
        for key in ("{prompt}", "{a}", "{b}"):
            if key not in template:
                raise ValueError(f"the judge template must contain {key}, got {template!r}")
        if len(choices) != 2 or choices[0] == choices[1]:
            raise ValueError(f"choices must be two different strings, got {choices!r}")
        self.adapter, self.template, self.choices = adapter, template, tuple(choices)
        self.use_reference, self.swap = use_reference, swap

    def __call__(self, prompts: list[Any], responses_a: list[Any], responses_b: list[Any]) -> torch.Tensor:
        if self.adapter is None:
            raise ValueError("this LLMJudge has no model: pass adapter= or let the training step bind its adapter")
        first = self.prob_first(prompts, responses_a, responses_b)
        if not self.swap:
            return first
        return 0.5 * (first + 1 - self.prob_first(prompts, responses_b, responses_a))

    @torch.no_grad()
    def prob_first(self, prompts: list[Any], responses_a: list[Any], responses_b: list[Any]) -> torch.Tensor:
        """softmax([logit(choices[0]), logit(choices[1])])[0] after the filled-in template, per pair."""
        adapter = self.adapter
        ids = [adapter._prompt_ids(self.template.format(prompt=p, a=a, b=b), i)
               for i, (p, a, b) in enumerate(zip(prompts, responses_a, responses_b))]
        width = max(len(x) for x in ids)
        device = adapter._device()
        input_ids = torch.tensor([[adapter.pad_id] * (width - len(x)) + x for x in ids], device=device)
        attention = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        with adapter._generation_model(self.use_reference) as model, eval_mode(model):
            logits = model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                           use_cache=False).logits[:, -1].float()
        pair = logits[:, [self._token(c) for c in self.choices]]
        return torch.softmax(pair, -1)[:, 0].cpu()

    def _token(self, choice: str) -> int:
        ids = self.adapter.tokenizer(choice, add_special_tokens=False)["input_ids"]
        if len(ids) != 1 or ids[0] == self.adapter.tokenizer.unk_token_id:
            raise ValueError(f"judge choice {choice!r} is not a single known token of the judge's tokenizer "
                             f"(ids {ids}); pick choices that are")
        return ids[0]


def bind(judge: Judge, adapter: Any) -> Judge:
    """Give an :class:`LLMJudge` without a model the adapter being trained; other judges are returned as is."""
    if isinstance(judge, LLMJudge) and judge.adapter is None:
        if not isinstance(adapter, TextAdapter):
            raise TypeError(f"an LLMJudge needs a TextAdapter to judge with, got {type(adapter).__name__}")
        judge.adapter = adapter
    return judge


def build_judge(spec: Any) -> Judge:
    """A judge from a callable or a hydra spec (a dict with ``_target_``, as objective configs give it)."""
    if callable(spec):
        return spec
    if isinstance(spec, dict) and "_target_" in spec:
        from hydra.utils import instantiate

        return instantiate(spec)
    raise ValueError(f"judge must be a callable (prompts, responses_a, responses_b) -> [N] or a config dict with "
                     f"_target_, got {spec!r}")
