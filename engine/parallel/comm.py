"""An instance's process groups, and the control messages rank 0 broadcasts each step.

Whoever launches the ranks (``torch.multiprocessing`` in tests, Ray actors later) calls
``init_process_group`` and passes the resulting group in; nothing here picks addresses.
``build_groups`` then derives, collectively on every rank:

- ``world``: every rank of the instance, on the launcher's backend (gloo on CPU, NCCL
  on CUDA); pipeline activations go rank to rank over it.
- ``control``: the same ranks over gloo, for the step messages: they are CPU bytes, and
  a separate group keeps them from ever interleaving with device traffic.
- ``tp``: this rank's stage's TP ranks, for the all-reduces and the logits gather.

A control message is msgpack bytes, never pickle: ``[kind, body]``, where a STEP's body
is the ``StepPlan`` as plain lists. It travels in one broadcast of a fixed-size frame
(length prefix + payload), plus a second broadcast only for a plan larger than the frame.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

import msgpack
import torch
import torch.distributed as dist

from engine.config import ParallelConfig
from engine.parallel.layout import coords, rank_of
from engine.step import ScheduledChunk, StepPlan

STEP, KEEPALIVE, STOP = 0, 1, 2
# A decode step of a few dozen requests fits, so most steps cost one broadcast.
FRAME_BYTES = 8192
_LEN_BYTES = 8


@dataclass(frozen=True)
class ParallelGroups:
    """The process groups one rank of an instance uses; see the module docstring."""

    parallel: ParallelConfig
    rank: int  # this rank in the instance, stage-major
    world: dist.ProcessGroup
    control: dist.ProcessGroup
    tp: dist.ProcessGroup | None  # None when tp == 1
    global_ranks: tuple[int, ...]  # instance rank -> rank in the default group (send/recv)

    @property
    def stage(self) -> int:
        return coords(self.parallel, self.rank)[0]

    @property
    def tp_rank(self) -> int:
        return coords(self.parallel, self.rank)[1]

    @property
    def is_first_stage(self) -> bool:
        return self.stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.parallel.pp - 1

    def peer(self, stage: int) -> int:
        """Global rank of this rank's TP position in pipeline stage ``stage``."""
        return self.global_ranks[rank_of(self.parallel, stage, self.tp_rank)]


def build_groups(
    parallel: ParallelConfig,
    world: dist.ProcessGroup | None = None,
    timeout: datetime.timedelta | None = None,
) -> ParallelGroups:
    """Every rank of the default group calls this, together: making a group is collective.

    ``world`` is the instance's group (default: the default group, as when each instance
    initialises its own); its size must be ``tp * pp``. ``timeout`` bounds every wait on
    the groups made here. Groups are named by torch's running count, so an instance can
    be rebuilt on the same store without meeting a previous build's addresses.
    """
    world = world if world is not None else dist.group.WORLD
    if world is None:
        raise ValueError("world: torch.distributed is not initialised")
    size = dist.get_world_size(world)
    if size != parallel.world_size:
        raise ValueError(
            f"parallel: tp={parallel.tp} x pp={parallel.pp} needs {parallel.world_size} "
            f"ranks, the process group has {size}"
        )
    ranks = tuple(dist.get_global_rank(world, r) for r in range(size))
    rank = dist.get_rank(world)
    kwargs: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
    control = dist.new_group(list(ranks), backend="gloo", **kwargs)
    tp_group = None
    if parallel.tp > 1:
        for stage in range(parallel.pp):  # every rank makes every stage's group, in order
            members = [ranks[rank_of(parallel, stage, t)] for t in range(parallel.tp)]
            group = dist.new_group(members, **kwargs)
            if ranks[rank] in members:
                tp_group = group
    return ParallelGroups(parallel, rank, world, control, tp_group, ranks)


def destroy_groups(groups: ParallelGroups) -> None:
    """Release the groups ``build_groups`` made (not the launcher's ``world``)."""
    for group in (groups.tp, groups.control):
        if group is not None:
            dist.destroy_process_group(group)


def encode_plan(plan: StepPlan) -> bytes:
    chunks = [
        [c.request_id, c.token_ids, c.start_pos, c.block_table, c.sample] for c in plan.chunks
    ]
    return encode(STEP, [chunks, plan.preempted])


def decode_plan(body: Any) -> StepPlan:
    chunks, preempted = body
    return StepPlan(
        chunks=[ScheduledChunk(r, list(t), int(p), list(b), bool(s)) for r, t, p, b, s in chunks],
        preempted=list(preempted),
    )


def encode(kind: int, body: Any = None) -> bytes:
    return msgpack.packb([kind, body], use_bin_type=True)


def decode(payload: bytes) -> tuple[int, Any]:
    kind, body = msgpack.unpackb(payload, raw=False)
    return int(kind), body


def broadcast_message(payload: bytes, groups: ParallelGroups) -> None:
    """Rank 0: send ``payload`` to every other rank of the instance."""
    frame = torch.zeros(FRAME_BYTES, dtype=torch.uint8)
    head = len(payload).to_bytes(_LEN_BYTES, "little") + payload[: FRAME_BYTES - _LEN_BYTES]
    frame[: len(head)] = torch.frombuffer(bytearray(head), dtype=torch.uint8)
    src = groups.global_ranks[0]
    dist.broadcast(frame, src=src, group=groups.control)
    rest = payload[FRAME_BYTES - _LEN_BYTES :]
    if rest:
        dist.broadcast(torch.frombuffer(bytearray(rest), dtype=torch.uint8), src, groups.control)


def receive_message(groups: ParallelGroups) -> bytes:
    """Any other rank: wait for rank 0's next message (bounded by the group's timeout)."""
    frame = torch.empty(FRAME_BYTES, dtype=torch.uint8)
    src = groups.global_ranks[0]
    dist.broadcast(frame, src=src, group=groups.control)
    data = frame.numpy().tobytes()
    length = int.from_bytes(data[:_LEN_BYTES], "little")
    payload = data[_LEN_BYTES : _LEN_BYTES + length]
    missing = length - len(payload)
    if missing > 0:
        rest = torch.empty(missing, dtype=torch.uint8)
        dist.broadcast(rest, src=src, group=groups.control)
        payload += rest.numpy().tobytes()
    return payload
