"""Sampler tests against references computed independently in numpy or by explicit loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scalellm.engine.sampler import Sampler, SamplingRow, make_generator
from scalellm.engine.sampling.penalties import apply_penalties
from scalellm.protocol.types import SamplingParams

VOCAB = 64


def _logits(batch: int, vocab: int = VOCAB, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(size=(batch, vocab)) * scale).float()


def _rows(params: SamplingParams, batch: int, prompt=(1, 2, 3), output=()) -> list[SamplingRow]:
    return [SamplingRow(params, list(prompt), list(output), None) for _ in range(batch)]


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _draw_many(logits_row: torch.Tensor, params: SamplingParams, num_draws: int) -> np.ndarray:
    """num_draws samples from one row, drawn as one batch of identical rows."""
    logits = logits_row[None, :].expand(num_draws, -1).contiguous()
    return np.array(Sampler(seed=1)(logits, _rows(params, num_draws)).token_ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_is_argmax(dtype):
    logits = _logits(7).to(dtype)
    expected = np.argmax(logits.float().numpy(), axis=-1)
    output = Sampler()(logits, _rows(SamplingParams(temperature=0), 7))
    assert output.token_ids == expected.tolist()
    assert output.logprobs == [None] * 7


def _first_max(row: list[float]) -> int:
    """The first index of the row's largest value, or of its first NaN (as torch and numpy reduce)."""
    best = 0
    for i, value in enumerate(row):
        if value != value:
            return i
        if value > row[best]:
            best = i
    return best


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_ties_nan_and_a_strided_view_take_the_first_index(dtype):
    wide = torch.zeros(4, VOCAB + 8)
    wide[0, [5, 9, VOCAB + 2]] = 3.0  # a tie at 5 and 9; the larger value past VOCAB is not in the view
    wide[1, [20, 40]] = float("nan")
    wide[1, 3] = 7.0
    wide[2] = -1.0  # every index ties
    wide[3, VOCAB - 1] = 0.5
    logits = wide.to(dtype)[:, :VOCAB]  # a non-contiguous view, as the logits head gives
    expected = [_first_max(row) for row in logits.float().tolist()]
    assert expected == [5, 20, 0, VOCAB - 1]
    assert Sampler()(logits, _rows(SamplingParams(temperature=0), 4)).token_ids == expected


def test_greedy_rows_in_a_mixed_batch_are_argmax():
    logits = _logits(6)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0)] * 3
    rows = [SamplingRow(p, [1], [], None) for p in params]
    token_ids = Sampler()(logits, rows).token_ids
    expected = np.argmax(logits.numpy(), axis=-1)
    assert [token_ids[i] for i in (0, 2, 4)] == [expected[i] for i in (0, 2, 4)]


def _reference_penalties(logits: np.ndarray, params: SamplingParams, prompt: list[int],
                         output: list[int]) -> np.ndarray:
    out = logits.copy()
    for token in set(prompt) | set(output):
        r = params.repetition_penalty
        out[token] = out[token] / r if out[token] > 0 else out[token] * r
    for token in set(output):
        out[token] -= params.frequency_penalty * output.count(token) + params.presence_penalty
    return out


def test_penalties_match_their_definitions():
    logits = _logits(4)
    params = [SamplingParams(repetition_penalty=1.3),
              SamplingParams(frequency_penalty=0.7, presence_penalty=-0.4),
              SamplingParams(repetition_penalty=0.8, frequency_penalty=-1.5, presence_penalty=2.0),
              SamplingParams()]
    prompts = [[1, 2, 2, 5], [3, 4], [7, 7, 8], [9]]
    outputs = [[5, 6, 6], [4, 4, 4, 10, 11], [8, 12, 12], [9, 9]]
    expected = [_reference_penalties(logits[i].numpy(), params[i], prompts[i], outputs[i])
                for i in range(4)]
    penalized = logits.clone()
    apply_penalties(penalized, [0, 1, 2], params[:3], prompts[:3], outputs[:3])
    np.testing.assert_allclose(penalized[:3].numpy(), np.stack(expected[:3]), rtol=1e-6)
    assert torch.equal(penalized[3], logits[3])


def test_repetition_penalty_steers_greedy_choice():
    params = SamplingParams(temperature=0, repetition_penalty=2.0)
    logits = torch.tensor([[4.0, 3.0, -1.0, -3.5]])
    assert Sampler()(logits, _rows(params, 1, prompt=[0])).token_ids == [1]  # 4 / 2 < 3
    assert Sampler()(logits, _rows(params, 1, prompt=[1], output=[0])).token_ids == [0]  # 2 > 1.5
    negative = torch.tensor([[-1.0, -1.5]])
    assert Sampler()(negative, _rows(params, 1, prompt=[0])).token_ids == [1]  # -1 * 2 < -1.5


def test_sampler_does_not_modify_logits():
    logits = _logits(3)
    before = logits.clone()
    params = SamplingParams(temperature=0.5, top_k=5, top_p=0.8, min_p=0.1, repetition_penalty=1.5,
                            frequency_penalty=1.0, logprobs=2)
    Sampler()(logits, _rows(params, 3, output=[4, 4]))
    assert torch.equal(logits, before)


def _allowed(logits: np.ndarray, params: SamplingParams) -> set[int]:
    """Reference filter by explicit loops over tokens sorted by probability."""
    scaled = logits / params.temperature
    order = sorted(range(len(scaled)), key=lambda t: -scaled[t])
    if params.top_k:
        order = order[:params.top_k]
    probs = _softmax(scaled[order])
    kept, mass = [], 0.0
    for token, p in zip(order, probs):
        if mass >= params.top_p:
            break
        kept.append(token)
        mass += p
    top = scaled[order[0]]
    return {t for t in kept if np.exp(scaled[t] - top) >= params.min_p}


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, top_k=5),
    SamplingParams(temperature=1.5, top_p=0.6),
    SamplingParams(temperature=0.8, min_p=0.2),
    SamplingParams(temperature=1.2, top_k=10, top_p=0.7, min_p=0.05),
])
def test_filters_never_sample_an_excluded_token(params):
    logits = _logits(1, seed=3)[0]
    allowed = _allowed(logits.numpy(), params)
    drawn = set(_draw_many(logits, params, 4000).tolist())
    assert drawn <= allowed
    assert len(drawn) == len(allowed)  # with 4000 draws every allowed token shows up


def test_top_p_falls_back_when_candidates_do_not_reach_it():
    vocab = 2000  # flat: the top 256 candidates hold about 13% of the mass
    logits = torch.zeros(1, vocab)
    logits[0, :1500] = 0.01 * torch.arange(1500, 0, -1) / 1500
    params = SamplingParams(temperature=1.0, top_p=0.5)
    allowed = _allowed(logits[0].numpy(), params)
    drawn = set(_draw_many(logits[0], params, 3000).tolist())
    assert drawn <= allowed and len(allowed) > 256


def test_temperature_sampling_matches_softmax():
    logits = _logits(1, vocab=8, seed=5, scale=1.0)[0]
    temperature, num_draws = 0.7, 40000
    drawn = _draw_many(logits, SamplingParams(temperature=temperature), num_draws)
    expected = _softmax(logits.numpy() / temperature) * num_draws
    observed = np.bincount(drawn, minlength=8)
    chi_square = float(((observed - expected) ** 2 / expected).sum())
    assert chi_square < 24.3  # 99.9% quantile of chi-square with 7 degrees of freedom


def _seeded_tokens(seed: int, position: int, batch: int, others: SamplingParams,
                   num_steps: int = 5) -> list[int]:
    """Tokens of a seeded row at `position` of a batch, over several steps."""
    generator = make_generator(seed, "cpu")
    sampler = Sampler(seed=position + batch)
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=seed)
    tokens = []
    for step in range(num_steps):
        logits = _logits(batch, seed=100 + step)
        logits[position] = _logits(1, seed=step)[0]
        rows = _rows(others, batch)
        if others.seed is not None:
            for row in rows:
                row.generator = make_generator(others.seed, "cpu")
        rows[position] = SamplingRow(params, [1], list(tokens), generator)
        tokens.append(sampler(logits, rows).token_ids[position])
    return tokens


def test_same_seed_same_tokens_whatever_the_batch():
    reference = _seeded_tokens(seed=42, position=0, batch=1, others=SamplingParams())
    assert _seeded_tokens(42, 3, 5, SamplingParams(temperature=0.9)) == reference
    assert _seeded_tokens(42, 1, 4, SamplingParams(temperature=0)) == reference
    assert _seeded_tokens(42, 2, 3, SamplingParams(temperature=1.0, seed=7)) == reference
    assert _seeded_tokens(43, 0, 1, SamplingParams()) != reference


def test_logprobs_equal_log_softmax_of_raw_logits_with_ranks():
    logits = _logits(3)
    params = [SamplingParams(temperature=0.5, top_k=3, repetition_penalty=1.5, logprobs=4),
              SamplingParams(temperature=0), SamplingParams(temperature=0, logprobs=0)]
    rows = [SamplingRow(p, [0, 1, 2], [3], None) for p in params]
    output = Sampler()(logits, rows)
    log_softmax = np.log(_softmax(logits.numpy().astype(np.float64)))
    assert output.logprobs[1] is None
    for i, k in ((0, 4), (2, 0)):
        row, chosen = output.logprobs[i], output.token_ids[i]
        order = list(np.argsort(-log_softmax[i]))
        assert next(iter(row)) == chosen
        assert set(row) == {chosen, *order[:k]}
        for token, logprob in row.items():
            assert logprob.logprob == pytest.approx(log_softmax[i, token], abs=1e-5)
            assert logprob.rank == order.index(token) + 1
            assert logprob.decoded_token is None


def test_rejects_mismatched_rows():
    with pytest.raises(ValueError):
        Sampler()(_logits(2), _rows(SamplingParams(), 3))
