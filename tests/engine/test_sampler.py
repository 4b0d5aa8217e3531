from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import pytest
import torch

import engine.sampler as sampler_module
from engine.sampler import (
    Sampler,
    SamplingRequest,
    apply_penalties,
    make_generator,
)
from engine.sampling_params import SamplingParams

V = 64


def row(
    params: SamplingParams,
    prompt: Sequence[int] = (1, 2),
    output: Sequence[int] = (),
) -> SamplingRequest:
    return SamplingRequest(params, list(prompt), list(output), make_generator(params))


def logits_of(probs: Sequence[float], n: int = 1) -> torch.Tensor:
    """[n, len(probs)] logits whose softmax is probs."""
    return torch.tensor(probs).log().expand(n, -1).contiguous()


def vllm_kept(logits: torch.Tensor, top_k: int, top_p: float) -> set[int]:
    """Reference: the tokens vLLM's _apply_top_k_top_p keeps in one row (full sort)."""
    sorted_logits, sorted_idx = logits.sort()  # ascending
    if top_k > 0:
        kth = sorted_logits[-top_k]
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    probs = sorted_logits.softmax(-1)
    masked = probs.cumsum(-1) <= 1 - top_p
    masked[-1] = False
    return set(sorted_idx[~masked & (probs > 0)].tolist())


def test_greedy_fast_path_is_argmax_and_leaves_logits_alone() -> None:
    torch.manual_seed(0)
    logits = torch.randn(8, V)
    before = logits.clone()
    out = Sampler()(logits, [row(SamplingParams(temperature=0)) for _ in range(8)])
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 8
    assert torch.equal(logits, before)


def test_bf16_logits_sample_as_their_fp32_copy() -> None:
    # A bf16 model hands its logits over as they are: the greedy fast path takes their
    # argmax directly, every other row samples from the fp32 copy.
    torch.manual_seed(2)
    logits = torch.randn(6, V).bfloat16()
    greedy = Sampler()(logits, [row(SamplingParams(temperature=0)) for _ in range(6)])
    assert greedy.token_ids == logits.float().argmax(-1).tolist()
    params = [SamplingParams(temperature=0, repetition_penalty=1.3),
              SamplingParams(temperature=0.8, seed=5, logprobs=2)] * 3
    got = Sampler()(logits, [row(p, output=[1, 2]) for p in params])
    want = Sampler()(logits.float(), [row(p, output=[1, 2]) for p in params])
    assert got.token_ids == want.token_ids and got.logprobs == want.logprobs


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="logits: expected shape"):
        Sampler()(torch.zeros(2, V), [row(SamplingParams())])


def test_mixed_batch_greedy_rows_take_argmax() -> None:
    torch.manual_seed(1)
    logits = torch.randn(6, V)
    before = logits.clone()
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.3, top_p=0.9)] * 3
    out = Sampler()(logits, [row(p) for p in params])
    argmax = logits.argmax(-1).tolist()
    assert [out.token_ids[i] for i in (0, 2, 4)] == [argmax[i] for i in (0, 2, 4)]
    assert torch.equal(logits, before)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, top_k=1),
        SamplingParams(temperature=1.0, top_p=1e-6),
        SamplingParams(temperature=2.0, top_p=1e-6, seed=3),
        SamplingParams(temperature=1e-7),
        SamplingParams(temperature=0.7, min_p=1.0),
    ],
)
def test_degenerate_sampling_equals_greedy(params: SamplingParams) -> None:
    torch.manual_seed(2)
    for _ in range(5):
        logits = torch.randn(4, V) * 3
        out = Sampler()(logits, [row(params) for _ in range(4)])
        assert out.token_ids == logits.argmax(-1).tolist()


def _frequencies(logits: torch.Tensor, params: SamplingParams, draws: int) -> dict[int, float]:
    batch = logits.expand(draws, -1).contiguous()
    out = Sampler()(batch, [row(params) for _ in range(draws)])
    return {t: c / draws for t, c in Counter(out.token_ids).items()}


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        # plain path: the model's distribution
        (SamplingParams(), [0.5, 0.3, 0.15, 0.05]),
        # temperature 2 flattens: p ** (1/2), renormalised
        (SamplingParams(temperature=2.0), [0.3790, 0.2936, 0.2076, 0.1198]),
        # temperature on the candidate path: top-3 of p ** (1/2), renormalised
        (SamplingParams(temperature=2.0, top_k=3), [0.4306, 0.3335, 0.2359, 0.0]),
        # candidate path with top_k covering the vocab must not change it
        (SamplingParams(top_k=3, top_p=0.999), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0]),
        # top-p 0.7: tokens 0 and 1 (mass ranked above token 2 is 0.8 >= 0.7)
        (SamplingParams(top_p=0.7), [0.625, 0.375, 0.0, 0.0]),
        (SamplingParams(top_k=4, top_p=0.7), [0.625, 0.375, 0.0, 0.0]),
        # top-p 0.9 keeps 0, 1, 2; min-p 0.4 (threshold 0.2) then drops 2
        (SamplingParams(top_p=0.9, min_p=0.4), [0.625, 0.375, 0.0, 0.0]),
        # min-p 0.2: threshold 0.1 drops token 3
        (SamplingParams(min_p=0.2), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0]),
        # top-k 2 then min-p 0.7 (of 0.625): threshold 0.4375 drops token 1
        (SamplingParams(top_k=2, min_p=0.7), [1.0, 0.0, 0.0, 0.0]),
    ],
)
def test_distribution(params: SamplingParams, expected: list[float]) -> None:
    torch.manual_seed(3)
    freq = _frequencies(logits_of([0.5, 0.3, 0.15, 0.05]), params, draws=6000)
    for token, p in enumerate(expected):
        if p == 0.0:
            assert token not in freq
        else:
            assert abs(freq.get(token, 0.0) - p) < 0.03, (token, freq)


@pytest.mark.parametrize(("top_k", "top_p"), [(5, 1.0), (0, 0.9), (20, 0.8), (-1, 0.5)])
def test_support_matches_vllm_top_k_top_p(top_k: int, top_p: float) -> None:
    torch.manual_seed(4)
    logits = torch.randn(V) * 2
    kept = vllm_kept(logits, top_k, top_p)
    freq = _frequencies(logits.unsqueeze(0), SamplingParams(top_k=top_k, top_p=top_p), 4000)
    assert set(freq) <= kept
    assert len(set(freq)) >= min(len(kept), 3)


@pytest.mark.parametrize("max_draws", [16, 0])
def test_top_p_large_nucleus(monkeypatch: pytest.MonkeyPatch, max_draws: int) -> None:
    # Nearly flat over 1000 tokens: the 0.5 nucleus holds ~500. max_draws=0 sends every
    # row straight to the full-sort fallback, which must agree.
    monkeypatch.setattr(sampler_module, "_MAX_TOP_P_DRAWS", max_draws)
    vocab = 1000
    logits = -torch.arange(vocab, dtype=torch.float32) * 1e-4
    probs = logits.softmax(-1)
    exclusive = probs.cumsum(-1) - probs
    nucleus = int((exclusive < 0.5).sum())
    torch.manual_seed(5)
    freq = _frequencies(logits.unsqueeze(0), SamplingParams(top_p=0.5), draws=3000)
    assert max(freq) < nucleus
    assert len(freq) > 400
    assert abs(sum(f for t, f in freq.items() if t < nucleus // 2) - 0.5) < 0.04


@pytest.mark.parametrize("vocab", [8, 1000, 4096])  # direct and two-level (4096) cumsum
def test_inverse_cdf_never_picks_zero_weight(vocab: int) -> None:
    weights = torch.zeros(4, vocab)
    positive = [1, vocab // 2 + 1, vocab - 2]
    weights[:, positive] = torch.tensor([0.25, 0.5, 0.25])
    u = torch.tensor([0.0, 0.3, 0.7, 1.0 - 2**-24])
    picks = sampler_module._inverse_cdf(weights, u).tolist()
    assert picks == [positive[0], positive[1], positive[1], positive[2]]


def test_two_level_draw_matches_the_distribution() -> None:
    vocab = 4096
    probs = torch.zeros(vocab)
    probs[[5, 70, 2000, 4095]] = torch.tensor([0.1, 0.2, 0.3, 0.4])
    torch.manual_seed(11)
    draws = 8000
    picks = sampler_module._inverse_cdf(probs.expand(draws, -1), torch.rand(draws)).tolist()
    counts = Counter(picks)
    assert set(counts) == {5, 70, 2000, 4095}
    for token, p in ((5, 0.1), (70, 0.2), (2000, 0.3), (4095, 0.4)):
        assert abs(counts[token] / draws - p) < 0.02


def test_penalties_exact_values() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 0.75]])
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    r = SamplingRequest(params, prompt_token_ids=[0, 1], output_token_ids=[3, 3, 2], generator=None)
    out = apply_penalties(logits, [r])
    # seen = {0, 1, 2, 3}: positive / 2, negative * 2; then output counts {3: 2, 2: 1}:
    # token 3: 1.5 - 0.5 * 2 - 0.25 = 0.25 ; token 2: 0.25 - 0.5 * 1 - 0.25 = -0.5
    assert out.tolist() == [[1.0, -2.0, -0.5, 0.25, -2.0, 0.75]]
    assert logits.tolist() == [[2.0, -1.0, 0.5, 3.0, -2.0, 0.75]]


def test_penalties_per_row_in_a_batch() -> None:
    logits = torch.tensor([[1.0, 2.0, -1.0, 0.0]] * 3)
    rows = [
        SamplingRequest(SamplingParams(presence_penalty=1.0), [1], [1, 1], None),
        SamplingRequest(SamplingParams(frequency_penalty=1.0), [], [1, 1, 2], None),
        SamplingRequest(SamplingParams(repetition_penalty=0.5), [2], [], None),
    ]
    assert apply_penalties(logits, rows).tolist() == [
        [1.0, 1.0, -1.0, 0.0],  # presence counts the output only, once
        [1.0, 0.0, -2.0, 0.0],  # frequency: count 2 and 1
        [1.0, 2.0, -0.5, 0.0],  # repetition < 1 boosts a prompt token
    ]


def dense_penalties(x: torch.Tensor, rows: list[SamplingRequest]) -> torch.Tensor:
    """Reference: vLLM's dense apply_penalties, row by row."""
    out = x.clone()
    for i, r in enumerate(rows):
        counts = torch.bincount(torch.tensor(r.output_token_ids, dtype=torch.long), minlength=V)
        seen = counts > 0
        seen[list(r.prompt_token_ids)] = True
        p = r.params
        rep = torch.where(out[i] > 0, out[i] / p.repetition_penalty, out[i] * p.repetition_penalty)
        out[i] = torch.where(seen, rep, out[i])
        out[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
    return out


def test_penalties_match_dense_reference() -> None:
    torch.manual_seed(12)
    logits = torch.randn(5, V) * 3
    gen = torch.Generator().manual_seed(0)

    def ids(n: int) -> list[int]:
        return torch.randint(0, V // 4, (n,), generator=gen).tolist()  # plenty of repeats

    rows = [
        SamplingRequest(SamplingParams(repetition_penalty=1.3), ids(30), ids(20), None),
        SamplingRequest(SamplingParams(frequency_penalty=0.7), ids(5), ids(40), None),
        SamplingRequest(SamplingParams(presence_penalty=-1.0), [], ids(9), None),
        SamplingRequest(SamplingParams(repetition_penalty=0.8, presence_penalty=0.5), [], [], None),
        SamplingRequest(
            SamplingParams(repetition_penalty=2.0, frequency_penalty=-0.4, presence_penalty=1.5),
            ids(50),
            ids(3),
            None,
        ),
    ]
    expected = dense_penalties(logits, rows)
    assert torch.allclose(apply_penalties(logits, rows), expected, atol=1e-5)


def test_greedy_with_penalties_changes_the_pick() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 0.75]] * 2)
    params = SamplingParams(
        temperature=0, repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25
    )
    rows = [
        SamplingRequest(params, [0, 1], [3, 3, 2], None),
        SamplingRequest(SamplingParams(temperature=0), [0, 1], [3, 3, 2], None),
    ]
    before = logits.clone()
    assert Sampler()(logits, rows).token_ids == [0, 3]
    assert torch.equal(logits, before)  # penalties work on a copy


def test_logprobs_are_of_the_raw_distribution() -> None:
    torch.manual_seed(6)
    logits = torch.randn(3, V)
    params = [
        SamplingParams(temperature=0.5, logprobs=3, repetition_penalty=1.5),
        SamplingParams(temperature=0),
        SamplingParams(temperature=0, logprobs=0),
    ]
    out = Sampler()(logits, [row(p, output=[5, 6]) for p in params])
    raw = torch.log_softmax(logits, dim=-1)
    first = out.logprobs[0]
    assert first is not None and len(first) == 4
    assert first[0][0] == out.token_ids[0]
    assert math.isclose(first[0][1], raw[0, out.token_ids[0]].item(), abs_tol=1e-6)
    values, ids = raw[0].topk(3)
    assert [t for t, _ in first[1:]] == ids.tolist()
    for (_, lp), ref in zip(first[1:], values.tolist(), strict=True):
        assert math.isclose(lp, ref, abs_tol=1e-6)
    assert out.logprobs[1] is None
    third = out.logprobs[2]
    assert third is not None and len(third) == 1
    assert third[0] == (logits[2].argmax().item(), pytest.approx(raw[2].max().item(), abs=1e-6))


SEEDED = [
    SamplingParams(seed=1234, temperature=0.9),
    SamplingParams(seed=1234, temperature=0.8, top_k=20),
    SamplingParams(seed=1234, temperature=1.1, top_p=0.9),
    SamplingParams(seed=1234, temperature=1.0, top_k=30, top_p=0.8, min_p=0.05),
    SamplingParams(seed=1234, temperature=1.0, min_p=0.1, frequency_penalty=0.3),
]
COMPANIONS = [
    SamplingParams(temperature=0),
    SamplingParams(temperature=1.0, top_k=50),
    SamplingParams(temperature=0.7, top_p=0.5, seed=99),
    SamplingParams(temperature=1.5, repetition_penalty=1.2, logprobs=2),
    SamplingParams(temperature=1.0, min_p=0.3),
    SamplingParams(temperature=1.0, top_k=200, top_p=0.95),  # widens the candidate cap
]


def _run_seeded(params: SamplingParams, companions: int, position: int, steps: int) -> list[int]:
    """Tokens of a seeded row over ``steps`` steps, surrounded by other rows."""
    vocab = 512
    data = torch.Generator().manual_seed(7)  # the target row's logits, fixed across runs
    noise = torch.Generator().manual_seed(100 + companions + position)
    target = row(params)
    others = [row(COMPANIONS[i % len(COMPANIONS)]) for i in range(companions)]
    tokens: list[int] = []
    for _ in range(steps):
        own = torch.randn(1, vocab, generator=data) * 3
        rest = torch.randn(companions, vocab, generator=noise) * 3
        logits = torch.cat([rest[:position], own, rest[position:]])
        rows = others[:position] + [target] + others[position:]
        token = Sampler()(logits, rows).token_ids[position]
        target.output_token_ids = [*target.output_token_ids, token]
        tokens.append(token)
    return tokens


@pytest.mark.parametrize("params", SEEDED)
def test_seed_gives_same_tokens_whatever_the_batch(params: SamplingParams) -> None:
    torch.manual_seed(8)
    alone = _run_seeded(params, companions=0, position=0, steps=30)
    assert len(set(alone)) > 5  # really sampling
    assert _run_seeded(params, companions=5, position=3, steps=30) == alone
    torch.manual_seed(9)  # the global RNG must not matter either
    assert _run_seeded(params, companions=9, position=9, steps=30) == alone


def test_different_seeds_differ() -> None:
    logits = torch.randn(1, V).expand(2, -1).contiguous()
    rows = [row(SamplingParams(seed=1)), row(SamplingParams(seed=2))]
    picks = [Sampler()(logits, rows).token_ids for _ in range(30)]
    assert any(a != b for a, b in picks)


def test_unseeded_rows_use_the_global_rng() -> None:
    logits = torch.randn(4, V)
    rows = [row(SamplingParams(top_p=0.95)) for _ in range(4)]
    torch.manual_seed(10)
    first = [Sampler()(logits, rows).token_ids for _ in range(5)]
    torch.manual_seed(10)
    assert [Sampler()(logits, rows).token_ids for _ in range(5)] == first


def test_seeded_draws_depend_on_seed_and_position_only() -> None:
    """A replay (a migrated request recomputed elsewhere) draws the same token for the
    same position, whatever the generator drew before; another position draws anew."""
    logits = torch.zeros(1, 50)  # uniform: the draw alone picks the token
    params = SamplingParams(seed=42, temperature=1.0)

    def draw(output: list[int], used: int) -> int:
        r = row(params, output=output)
        assert r.generator is not None
        for _ in range(used):  # a generator that already drew `used` numbers elsewhere
            torch.rand(1, generator=r.generator)
        return Sampler()(logits, [r]).token_ids[0]

    at5 = [draw([1] * 5, used) for used in (0, 3, 17)]
    assert len(set(at5)) == 1
    by_position = [draw([1] * n, 0) for n in range(12)]
    assert len(set(by_position)) > 3  # positions are not one stream repeated
    other = SamplingParams(seed=43, temperature=1.0)
    by_other_seed = [
        Sampler()(logits, [row(other, output=[1] * n)]).token_ids[0] for n in range(12)
    ]
    assert by_other_seed != by_position
