"""n > 1 sequence groups through a decode kill (issue 16 with issue 12's migration), on
a real 1 prefill + 1 decode cluster on a local Ray (conftest's ``one_each``: this module's
own, as it is module-scoped; the killed decode instance is restarted by the health
monitor, and the sequences migrate to it). About a minute."""

from __future__ import annotations

import asyncio
import os
import signal

from cluster import Cluster
from cluster.groups import child_params
from engine import LLM
from engine.outputs import RequestOutput
from tests.cluster.test_chaos import _load, _pids, _wait_serving
from tests.cluster.test_cluster import wait_all_blocks_free


def test_n_groups_survive_a_decode_kill(one_each: Cluster, offline: LLM) -> None:
    """n = 3 sequence groups (issue 16: one prefill, one hand-off, the sequences sharing
    the prompt's blocks on one decode instance) through a decode kill -9: each sequence
    migrates on its own and ends exactly as the offline engine's single request with
    its params (seed + i), each token once, and every block comes back."""
    _wait_serving(one_each)
    ids, params = _load(offline, 8)
    n = 3
    per_child = [child_params(p, n) for p in params]
    expected = offline.generate(
        prompt_token_ids=[i for i in ids for _ in range(n)],
        params=[p for ps in per_child for p in ps],
    )
    assert one_each.migrator is not None
    before = dict(one_each.migrator.counters)
    armed = asyncio.Event()
    total = 0
    streamed: list[list[int]] = [[] for _ in expected]

    async def group(g: int) -> list[RequestOutput]:
        sources = await one_each.stream_n(None, params[g], n, prompt_token_ids=ids[g])

        async def one(i: int) -> RequestOutput:
            nonlocal total
            last = None
            async for out in sources[i]:
                streamed[g * n + i].extend(out.new_token_ids)
                total += len(out.new_token_ids)
                if total >= 60:
                    armed.set()
                last = out
            assert last is not None
            return last

        return list(await asyncio.gather(*(one(i) for i in range(n))))

    async def run() -> list[RequestOutput]:
        tasks = [asyncio.create_task(group(g)) for g in range(len(ids))]
        await armed.wait()
        name, pid = sorted(_pids(one_each, "decode").items())[0]
        os.kill(pid, signal.SIGKILL)
        return [out for outs in await asyncio.gather(*tasks) for out in outs]

    outs = asyncio.run(run())
    assert [o.token_ids for o in outs] == [e.token_ids for e in expected]
    assert [o.text for o in outs] == [e.text for e in expected]
    assert streamed == [e.token_ids for e in expected]
    moved = sum(v - before[k] for k, v in one_each.migrator.counters.items())
    assert moved > 0
    assert one_each.migrator.counters["migration_failures"] == before["migration_failures"]
    _wait_serving(one_each)
    wait_all_blocks_free(one_each)
