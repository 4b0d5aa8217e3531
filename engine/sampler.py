"""Batched token selection from the last-position logits of every sampling request.

The model runner calls ``Sampler()(logits, rows)`` once per step with the model's logits
``[B, V]`` (fp32, or bf16 from a bf16 model: converted to fp32 unless every row takes the
fast path) and one ``SamplingRequest`` per row. Work is spent only on rows that ask:

  every row greedy, no penalties, no logprobs  -> one argmax for the batch
  rows with penalties   -> repetition (prompt + output), frequency/presence (output)
  greedy rows           -> argmax of their penalised logits (top_k == 1 is greedy too)
  sampling rows         -> temperature, then either
      rows with top_k: one ``topk`` gives the sorted candidates; top-p and min-p
          masks and the draw happen on those [rows, max k] candidates
      rows without: softmax and min-p over the vocab, a draw, and for top_p < 1 a
          rejection test that redraws picks outside the nucleus (exact, no sort)
  rows with logprobs    -> log_softmax of the raw logits (before any processing)

A greedy argmax over CPU logits runs in a native kernel (``engine.native``, same indices
as ``torch.argmax``): torch's took 4 ms of a 45 ms decode step at 64 x 49152, and a bf16
model's [64, 49152] fp32 copy for it 2 ms more.

The vocabulary is never fully sorted: a sort is ~100 ms at 64 x 49152 on CPU.

Draws use the inverse CDF: one uniform per draw, from the row's own
``torch.Generator`` when seeded, else one batched draw from the global RNG. A
seeded row's token depends only on its seed, its logits and its own params, never
on its position or companions in the batch. The exponential race (argmax p / q)
is equally exact but draws V exponentials per row (~60 ms at 64 x 49152 on CPU);
a uniform and a two-level cumsum cost well under 1 ms.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from engine import native
from engine.logits_processors import LogitsProcessor, apply_logits_processors
from engine.sampling_params import SamplingParams

# Below this temperature logits / t overflows to inf; such rows are treated as greedy (as vLLM).
_SAMPLING_EPS = 1e-5
# Tokens per block in the two-level inverse CDF.
_CDF_BLOCK = 64
_JUST_BELOW_ONE = float(torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)))
# Top-p rejection rounds before a row falls back to a full sort (almost never reached).
_MAX_TOP_P_DRAWS = 16


@dataclass
class SamplingRequest:
    """One row of the batch."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    # Owned by the request so its random stream survives across steps; None -> global RNG.
    generator: torch.Generator | None = None
    # min_tokens, logit_bias, allowed ids, bad words, grammar; None -> nothing to do.
    processor: LogitsProcessor | None = None
    # A sequence group's row (n > 1): one draw per child row from this row's logits,
    # reported in SamplerOutput.fanout; this row's own token is the first child's.
    fanout: list[SamplingRequest] | None = None


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # Per row: [(sampled token, logprob), *top-N (token, logprob)], or None when not asked.
    logprobs: list[list[tuple[int, float]] | None]
    # Row index -> the draws of its fanout rows, one per child, in order.
    fanout: dict[int, SamplerOutput] = field(default_factory=dict)
    # Set by the model runner: request id -> (chunk start, rows) of prompt_logprobs
    # (engine/prompt_logprobs.py, plain values); None when no chunk asked.
    prompt_logprobs: dict[str, tuple[int, list[list[tuple[int, float, int]]]]] | None = None


def make_generator(
    params: SamplingParams, device: torch.device | str = "cpu"
) -> torch.Generator | None:
    """The generator a request should own: seeded from ``params.seed``, None when unseeded.

    It must live on the logits' device (a CPU generator cannot draw on CUDA).
    """
    if params.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(params.seed)


_MASK64 = (1 << 64) - 1


def position_seed(seed: int, position: int) -> int:
    """The seed of a request's draws for its output token number ``position`` (0-based):
    splitmix64 of (seed, position), so a replay of the request on another instance (a
    migration, a recompute) draws the same numbers for the same token whatever came
    before on either instance."""
    z = (seed * 0x9E3779B97F4A7C15 + position + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def _positioned(r: SamplingRequest) -> SamplingRequest:
    """A seeded row with a generator for this token's position (see position_seed)."""
    if r.generator is None or r.params.seed is None:
        return r
    g = torch.Generator(device=r.generator.device)
    g.manual_seed(position_seed(r.params.seed, len(r.output_token_ids)))
    return replace(r, generator=g)


def _is_greedy(p: SamplingParams) -> bool:
    return p.temperature < _SAMPLING_EPS or p.top_k == 1


def _effective_top_k(p: SamplingParams, vocab_size: int) -> int:
    """0 when top-k keeps everything."""
    return p.top_k if 0 < p.top_k < vocab_size else 0


def _plain_greedy(r: SamplingRequest) -> bool:
    """A row whose token is its raw logits' argmax: greedy, nothing to apply first, no
    logprobs, no children."""
    p = r.params
    return (_is_greedy(p) and r.processor is None and r.fanout is None
            and p.logprobs is None and not p.has_penalties)


def _argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(dim=-1)`` of [B, V] logits, in the native kernel where it applies."""
    if x.device.type == "cpu" and native.supports(x.dtype) and x.shape[-1] > 0:
        lib = native.load()
        if lib is not None:
            return native.argmax_rows(lib, x)
    return x.argmax(dim=-1)


def _select(x: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """Rows ``idx`` of x; x itself when idx is every row, to skip a copy."""
    if len(idx) == x.shape[0] and idx == list(range(len(idx))):
        return x
    return x[idx]


class Sampler:
    """Stateless: everything a row needs comes with its SamplingRequest."""

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRequest]) -> SamplerOutput:
        # logits: [B, V] fp32 or bf16
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits: expected shape [{len(rows)}, V], got {list(logits.shape)}")
        if all(_plain_greedy(r) for r in rows):  # the argmax of bf16 is its fp32 copy's
            return SamplerOutput(_argmax(logits).tolist(), [None] * len(rows))
        logits = logits.float()
        if any(r.fanout for r in rows):
            return self._fan_out(logits, rows)
        raw = logits  # logprobs report the model's own distribution, as vLLM's default
        logits = apply_logits_processors(logits, [(r.processor, r.output_token_ids) for r in rows])
        params = [r.params for r in rows]
        greedy = [_is_greedy(p) for p in params]
        wants_logprobs = any(p.logprobs is not None for p in params)

        tokens = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        greedy_idx = [i for i, g in enumerate(greedy) if g]
        sample_idx = [i for i, g in enumerate(greedy) if not g]
        if greedy_idx:
            x = _penalised(logits, rows, greedy_idx)
            tokens[greedy_idx] = _argmax(x)
        if sample_idx:
            # Seeded rows draw from (seed, position): the same numbers on any instance.
            rows = [_positioned(r) if not greedy[i] else r for i, r in enumerate(rows)]
            tokens[sample_idx] = _sample(logits, rows, sample_idx)
        token_ids: list[int] = tokens.tolist()
        logprobs: list[list[tuple[int, float]] | None] = [None] * len(rows)
        if wants_logprobs:
            logprobs = _logprobs(raw, rows, token_ids)
        return SamplerOutput(token_ids, logprobs)

    def _fan_out(self, logits: torch.Tensor, rows: Sequence[SamplingRequest]) -> SamplerOutput:
        """Expand each group row into its children's rows (the same logits repeated),
        sample them all as one batch, and fold the draws back per group row."""
        flat: list[SamplingRequest] = []
        source: list[int] = []
        for i, r in enumerate(rows):
            for child in r.fanout or [r]:
                flat.append(child)
                source.append(i)
        index = torch.tensor(source, dtype=torch.long, device=logits.device)
        drawn = self(logits.index_select(0, index), flat)
        out = SamplerOutput([], [])
        k = 0
        for i, r in enumerate(rows):
            width = len(r.fanout) if r.fanout else 1
            out.token_ids.append(drawn.token_ids[k])
            out.logprobs.append(drawn.logprobs[k])
            if r.fanout:
                out.fanout[i] = SamplerOutput(
                    drawn.token_ids[k : k + width], drawn.logprobs[k : k + width]
                )
            k += width
        return out


def _padded(lists: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    """[n, L] long ids (L >= 1), each row padded with its own first id (0 when empty).

    Repeating an id of the row is harmless to gather/scatter, which touch only the
    tokens a row has seen instead of all V.
    """
    width = max(1, max(len(ids) for ids in lists))
    rows = [list(ids) + [ids[0] if ids else 0] * (width - len(ids)) for ids in lists]
    return torch.tensor(rows, dtype=torch.long, device=device)


def apply_penalties(x: torch.Tensor, rows: Sequence[SamplingRequest]) -> torch.Tensor:
    """Penalised copy of logits x [n, V], one SamplingRequest per row (vLLM semantics).

    repetition p: tokens seen in prompt or output get logit / p when > 0, else logit * p;
    then frequency f and presence r: logit - f * count_in_output - r * (count_in_output > 0).
    """
    return _apply_penalties_(x.clone(), rows)


def _apply_penalties_(x: torch.Tensor, rows: Sequence[SamplingRequest]) -> torch.Tensor:
    """apply_penalties in place. Sparse: cost grows with the tokens seen, not with V."""
    dev = x.device
    rep = [r.params.repetition_penalty for r in rows]
    if any(v != 1.0 for v in rep):
        seen = [[*r.prompt_token_ids, *r.output_token_ids] for r in rows]
        ids = _padded(seen, dev)  # [n, L]
        vals = x.gather(1, ids)
        # A row that has seen nothing writes back its token 0 unchanged.
        penalty = torch.tensor(
            [v if s else 1.0 for v, s in zip(rep, seen, strict=True)], device=dev
        )
        penalty = penalty.to(x.dtype).unsqueeze(1)
        # Duplicate ids write the same value, so scatter_ is deterministic here.
        x.scatter_(1, ids, torch.where(vals > 0, vals / penalty, vals * penalty))
    if any(r.params.frequency_penalty or r.params.presence_penalty for r in rows):
        # One -f per occurrence in the output and one -r per distinct output token.
        ids_rows: list[list[int]] = []
        delta_rows: list[list[float]] = []
        for r in rows:
            distinct = set(r.output_token_ids)
            ids_rows.append([*r.output_token_ids, *distinct])
            f, pres = r.params.frequency_penalty, r.params.presence_penalty
            delta_rows.append([-f] * len(r.output_token_ids) + [-pres] * len(distinct))
        width = max(1, max(len(d) for d in delta_rows))
        deltas = [d + [0.0] * (width - len(d)) for d in delta_rows]
        ids = _padded(ids_rows, dev)
        x.scatter_add_(1, ids, torch.tensor(deltas, dtype=x.dtype, device=dev))
    return x


def _penalised(
    logits: torch.Tensor, rows: Sequence[SamplingRequest], idx: list[int]
) -> torch.Tensor:
    """Rows idx of logits with penalties applied where asked: [len(idx), V].

    May return ``logits`` itself (no penalties, every row): callers must not write to it.
    """
    x = _select(logits, idx)
    pen = [j for j, i in enumerate(idx) if rows[i].params.has_penalties]
    if not pen:
        return x
    if x is logits:
        x = x.clone()
    if len(pen) == len(idx):
        return _apply_penalties_(x, [rows[i] for i in idx])
    x[pen] = _apply_penalties_(x[pen], [rows[idx[j]] for j in pen])
    return x


def _uniforms(rows: Sequence[SamplingRequest], device: torch.device) -> torch.Tensor:
    """One U[0, 1) per row: [n]. Seeded rows draw from their own generator."""
    u = torch.empty(len(rows), device=device)
    unseeded = [j for j, r in enumerate(rows) if r.generator is None]
    if unseeded:
        u[unseeded] = torch.rand(len(unseeded), device=device)
    for j, r in enumerate(rows):
        if r.generator is not None:
            u[j] = torch.rand(1, generator=r.generator, device=device)[0]
    return u


def _search(cdf: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """First index [n] whose cdf [n, C] exceeds target [n, 1].

    The target is kept strictly below the total, so the index found has positive weight.
    """
    total = cdf[:, -1:]
    target = torch.minimum(target, torch.nextafter(total, torch.zeros_like(total)))
    idx = torch.searchsorted(cdf, target, right=True).squeeze(1)
    return idx.clamp_(max=cdf.shape[1] - 1)


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index drawn with probability proportional to weights [n, C] >= 0, using u [n].

    A cumsum over C is sequential (~3 ms at 64 x 49152), so long rows go in two
    levels: vectorised block sums find the block, a cumsum inside it the token.
    """
    n, c = weights.shape
    if c % _CDF_BLOCK or c <= 4 * _CDF_BLOCK:
        cdf = weights.cumsum(dim=-1)  # CPU cumsum accumulates in double
        return _search(cdf, u.unsqueeze(1) * cdf[:, -1:])
    blocks = weights.reshape(n, c // _CDF_BLOCK, _CDF_BLOCK)
    block_cdf = blocks.sum(dim=-1).cumsum(dim=-1)  # [n, C / block]
    target = u.unsqueeze(1) * block_cdf[:, -1:]  # [n, 1]
    block = _search(block_cdf, target)  # [n], a block with positive weight
    prev = block_cdf.gather(1, (block - 1).clamp(min=0).unsqueeze(1))
    below = torch.where(block.unsqueeze(1) > 0, prev, torch.zeros_like(prev))  # [n, 1]
    local_cdf = blocks[torch.arange(n, device=weights.device), block].cumsum(dim=-1)
    return block * _CDF_BLOCK + _search(local_cdf, target - below)


def _sample(logits: torch.Tensor, rows: Sequence[SamplingRequest], idx: list[int]) -> torch.Tensor:
    """Sampled token ids [len(idx)] for the non-greedy rows idx."""
    reqs = [rows[i] for i in idx]
    x = _penalised(logits, rows, idx)  # may be the caller's logits: read only
    vocab = x.shape[1]
    ks = [_effective_top_k(r.params, vocab) for r in reqs]
    # The path depends on the row's own params only, so a seeded row draws the same
    # token whatever shares its batch.
    with_k = [j for j, k in enumerate(ks) if k]
    without_k = [j for j, k in enumerate(ks) if not k]
    out = torch.empty(len(reqs), dtype=torch.long, device=x.device)
    if without_k:
        out[without_k] = _sample_vocab(_select(x, without_k), [reqs[j] for j in without_k])
    if with_k:
        out[with_k] = _sample_top_k(
            _select(x, with_k), [reqs[j] for j in with_k], [ks[j] for j in with_k]
        )
    return out


def _column(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype).to(like.device).unsqueeze(1)  # [n, 1]


def _sample_top_k(x: torch.Tensor, reqs: list[SamplingRequest], ks: list[int]) -> torch.Tensor:
    """Rows with top-k (then top-p and min-p), drawn among the sorted top-k candidates.

    x: [n, V] logits. Temperature does not change the order, so it is applied to the
    candidates only. Weights are exp((logit - row max) / T), unnormalised, so each
    depends on its own rank only and not on how many candidates the batch asked for.
    """
    dev = x.device
    vals, cand = x.topk(max(ks), dim=-1)  # [n, K], sorted descending
    temps = _column([r.params.temperature for r in reqs], vals)
    w = ((vals - vals[:, :1]) / temps).exp_()  # w[:, 0] == 1
    ranks = torch.arange(vals.shape[1], device=dev)
    w.masked_fill_(ranks >= torch.tensor(ks, device=dev).unsqueeze(1), 0.0)
    top_p = [r.params.top_p for r in reqs]
    if any(p < 1 for p in top_p):
        cum = w.cumsum(dim=-1)
        cut = _column([p if p < 1 else float("inf") for p in top_p], w)
        # vLLM's rule from the top: keep a token while the mass ranked above it is < top_p.
        w.masked_fill_(cum - w >= cut * cum[:, -1:], 0.0)
    min_p = [r.params.min_p for r in reqs]
    if any(min_p):
        w.masked_fill_(w < _column(min_p, w), 0.0)  # relative to the max weight, 1
    picks = _inverse_cdf(w, _uniforms(reqs, dev))
    return cand.gather(1, picks.unsqueeze(1)).squeeze(1)


def _sample_vocab(x: torch.Tensor, reqs: list[SamplingRequest]) -> torch.Tensor:
    """Rows without top-k: min-p, then top-p by rejection, over the whole vocab. x: [n, V]."""
    w = torch.softmax(x / _column([r.params.temperature for r in reqs], x), dim=-1)
    totals = w.sum(dim=-1)  # ~1; taken before min-p, which top-p must not see
    with_min_p = [j for j, r in enumerate(reqs) if r.params.min_p > 0]
    if with_min_p:
        sub = _select(w, with_min_p)
        scale = _column([reqs[j].params.min_p for j in with_min_p], w)
        _zero_below(sub, sub.amax(dim=-1, keepdim=True) * scale)
        if sub is not w:
            w[with_min_p] = sub
    picks = _inverse_cdf(w, _uniforms(reqs, x.device))
    nucleus = [j for j, r in enumerate(reqs) if r.params.top_p < 1]
    if nucleus:
        totals = totals[nucleus]
        mass = _column([reqs[j].params.top_p for j in nucleus], w).squeeze(1) * totals
        picks[nucleus] = _top_p_rejection(
            _select(w, nucleus), [reqs[j] for j in nucleus], picks[nucleus], totals, mass
        )
    return picks


# Both helpers below use flat in-place passes: a batched masked op first builds a
# [n, V] mask (~3x slower on CPU), and a row-by-row loop of small ops can stall for
# hundreds of ms in OpenMP barriers when the cores are shared.


def _zero_below(w: torch.Tensor, cut: torch.Tensor) -> torch.Tensor:
    """w [n, V] >= 0 with entries below cut [n, 1] set to 0, in place.

    Exact up to a rounding of w / cut, fine for min-p's cut. Cuts under 1e-30 act as
    1e-30 so that w / cut stays finite.
    """
    cut = cut.clamp(min=1e-30)
    w.div_(cut)
    F.threshold(w, _JUST_BELOW_ONE, 0.0, inplace=True)  # zero w / cut < 1
    return w.mul_(cut)


def _mass_above(w: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per row, the sum of w [n, V] over entries > q [n, 1]: [n]."""
    d = w - q
    excess = d.clamp_(min=0).sum(dim=-1)  # sum of (w - q) over w > q
    count = d.sign_().sum(dim=-1)  # how many w > q
    return excess + q.squeeze(1) * count


def _top_p_rejection(
    w: torch.Tensor,
    reqs: list[SamplingRequest],
    picks: torch.Tensor,
    totals: torch.Tensor,
    mass: torch.Tensor,
) -> torch.Tensor:
    """Exact top-p without sorting the vocab: redraw the picks that fall outside the nucleus.

    w [n, V] weights (min-p applied), picks [n] drawn from them, totals [n] each row's
    total weight before min-p and mass [n] top_p times that. A token is in the nucleus
    when the weight strictly above its own is < mass. A rejected pick of weight q
    proves every token at or below q is outside too, so the redraw is restricted to
    weights above q. Accepted picks follow the renormalised nucleus exactly. A pick is
    rejected with the tail's probability (~1 - top_p), so most rows need one check:
    none when the pick outweighs the whole tail, else one pass over V.
    """
    picks = picks.clone()
    todo = list(range(len(reqs)))
    for _ in range(_MAX_TOP_P_DRAWS):
        sure = (w[todo, picks[todo]] > totals[todo] - mass[todo]).tolist()
        todo = [j for j, ok in zip(todo, sure, strict=True) if not ok]
        if not todo:
            return picks
        sub = _select(w, todo)
        q = sub.gather(1, picks[todo].unsqueeze(1))  # [t, 1]
        accepted = (_mass_above(sub, q) < mass[todo]).tolist()
        rejected = [j for j, ok in zip(todo, accepted, strict=True) if not ok]
        if not rejected:
            return picks
        weights = w[rejected]  # few rows: ~1 - top_p of them
        q_rejected = q[torch.tensor(accepted, device=q.device).logical_not()]
        weights.masked_fill_(weights <= q_rejected, 0.0)
        picks[rejected] = _inverse_cdf(weights, _uniforms([reqs[j] for j in rejected], w.device))
        todo = rejected
    # Rare: many tails in a row. Finish those rows exactly with a full sort.
    vals, order = w[todo].sort(dim=-1, descending=True)
    vals.masked_fill_(vals.cumsum(dim=-1) - vals >= mass[todo].unsqueeze(1), 0.0)
    drawn = _inverse_cdf(vals, _uniforms([reqs[j] for j in todo], w.device))
    picks[todo] = order.gather(1, drawn.unsqueeze(1)).squeeze(1)
    return picks


def _logprobs(
    logits: torch.Tensor, rows: Sequence[SamplingRequest], token_ids: list[int]
) -> list[list[tuple[int, float]] | None]:
    """Sampled token's logprob, then the top-N, of the raw model distribution."""
    out: list[list[tuple[int, float]] | None] = [None] * len(rows)
    idx = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    lp = torch.log_softmax(_select(logits, idx), dim=-1)  # [n, V]
    sampled = torch.tensor([token_ids[i] for i in idx], device=logits.device)
    chosen: list[float] = lp.gather(1, sampled.unsqueeze(1)).squeeze(1).tolist()
    counts = [rows[i].params.logprobs or 0 for i in idx]
    top_vals: list[list[float]] = [[] for _ in idx]
    top_ids: list[list[int]] = [[] for _ in idx]
    if max(counts) > 0:
        values, ids = lp.topk(max(counts), dim=-1)
        top_vals, top_ids = values.tolist(), ids.tolist()
    for j, i in enumerate(idx):
        n = counts[j]
        top = list(zip(top_ids[j][:n], top_vals[j][:n], strict=True))
        out[i] = [(token_ids[i], chosen[j]), *top]
    return out
