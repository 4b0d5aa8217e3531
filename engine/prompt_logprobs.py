"""vLLM's ``prompt_logprobs``: the log-probability of every prompt token after the first,
with its rank and the top-N of the model's distribution at that position.

The scheduler marks the chunks of a request that asks (``ScheduledChunk.prompt_logprobs``)
while its prompt is computed the first time, and never reuses cached prefix blocks for it
(a cache hit would skip the positions whose logits are needed; vLLM does the same). The
model runner hands this module the step's hidden states (``compute``); the engine keeps
the rows per request (``Sequence.prompt_logprobs``, ``merge``: a preempted prompt is
recomputed and overwrites its rows) and reports them with the first token.

A row is ``[(prompt token, logprob, rank), *top-N (token, logprob, rank)]``, plain
values, as the token events and the gRPC/HTTP responses carry them. Row ``i`` is about
prompt token ``i + 1`` (the first token has no logprob: OpenAI/vLLM give ``None``).
Logprobs are the raw ``log_softmax`` of the logits in fp32, as transformers gives them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.step import ScheduledChunk

PromptRow = list[tuple[int, float, int]]
# Rows per LM-head call: bounds the [rows, vocab] fp32 buffers of a long chunk.
_SLICE = 256


def wanted(chunks: Sequence[ScheduledChunk]) -> bool:
    return any(c.prompt_logprobs is not None for c in chunks)


def targets(chunk: ScheduledChunk) -> list[int]:
    """The prompt tokens the chunk's rows predict, in row order."""
    nxt = [] if chunk.next_token is None else [chunk.next_token]
    return list(chunk.token_ids[1:]) + nxt


@torch.inference_mode()
def compute(
    model: torch.nn.Module, hidden: torch.Tensor, chunks: Sequence[ScheduledChunk]
) -> dict[str, tuple[int, list[PromptRow]]]:
    """Per request id: its chunk's start position and the rows of the chunk's positions.
    ``chunks`` in the flat batch's order (``hidden`` [T, D] lays them end to end);
    ``model.compute_logits`` maps hidden states to logits."""
    out: dict[str, tuple[int, list[PromptRow]]] = {}
    offset = 0
    for c in chunks:
        if c.prompt_logprobs is not None:
            want = targets(c)
            rows: list[PromptRow] = []
            for s in range(0, len(want), _SLICE):
                part = want[s : s + _SLICE]
                h = hidden[offset + s : offset + s + len(part)]
                logits = model.compute_logits(h).float()  # type: ignore[operator]
                rows.extend(rank_rows(torch.log_softmax(logits, dim=-1), part, c.prompt_logprobs))
            out[c.request_id] = (c.start_pos, rows)
        offset += c.num_tokens
    return out


def rank_rows(logprobs: torch.Tensor, tokens: list[int], top: int) -> list[PromptRow]:
    """``logprobs`` [R, V] (log_softmax), ``tokens`` the R targets: their rows."""
    ids = torch.tensor(tokens, dtype=torch.long, device=logprobs.device)
    chosen = logprobs.gather(1, ids[:, None])  # [R, 1]
    ranks = (logprobs > chosen).sum(dim=1) + 1  # 1 = the most likely token
    lp = chosen.squeeze(1).tolist()
    rk = ranks.tolist()
    if top > 0:
        values, indices = logprobs.topk(top, dim=-1)
        tv, ti = values.tolist(), indices.tolist()
    rows: list[PromptRow] = []
    for r, token in enumerate(tokens):
        row: PromptRow = [(token, float(lp[r]), int(rk[r]))]
        if top > 0:
            row.extend(
                (int(t), float(v), j + 1) for j, (t, v) in enumerate(zip(ti[r], tv[r], strict=True))
            )
        rows.append(row)
    return rows


def merge(acc: list[PromptRow], start_pos: int, rows: list[PromptRow]) -> None:
    """Put a chunk's rows (positions ``start_pos + 1 ..``) into a request's list; a
    recomputed prompt (after preemption) overwrites what it had."""
    del acc[start_pos:]
    acc.extend(rows)
