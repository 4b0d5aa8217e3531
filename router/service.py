"""The router's core, shared by the gRPC and HTTP front ends.

It owns no sockets: a front end turns its wire request into a :class:`GenerateInput`
(building ``SamplingParams``, whose ValueError names the field), and iterates
:meth:`Router.stream`, which checks the model name, sends the request into the cluster
(where the prefill instance tokenizes and validates it), yields the engine's
``RequestOutput`` snapshots as tokens arrive, and records the request's latencies for
the metrics. Leaving the iteration early (a client that disconnects or cancels) aborts
the request on every instance it touched. Every failure is a :class:`RouterError`.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from engine.outputs import InstanceStats, RequestOutput
from engine.sampling_params import SamplingParams
from router.errors import ErrorKind, RouterError

if TYPE_CHECKING:
    from cluster.cluster import Cluster


@dataclass(frozen=True)
class GenerateInput:
    """One request, whatever API it came in on: exactly one of the three prompt forms."""

    model: str | None = None
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    messages: list[dict[str, str]] | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str | None = None


@dataclass(frozen=True)
class ModelInfo:
    id: str
    max_model_len: int
    created: int  # unix seconds, when the router started serving it


@dataclass
class RequestRecord:
    """What the metrics keep of one finished request (seconds)."""

    model: str
    prompt_tokens: int
    output_tokens: int
    finish_reason: str
    e2e_s: float
    ttft_s: float | None = None
    tpot_s: float | None = None  # (e2e - ttft) / (output tokens - 1)
    itl_s: list[float] = field(default_factory=list)  # between consecutive outputs
    kv_transfer_s: float | None = None
    recomputed: bool = False
    # How the request ended (router.slo.OUTCOMES): ok, error, aborted, rejected.
    outcome: str = "ok"
    request_id: str = ""
    prefill_instance: str | None = None
    decode_instance: str | None = None
    kv_backend: str = ""  # the cluster's KV transport (torch, grpc)
    # Durations the instances measured: queue, prefill, first_decode_step, decode...
    timings: dict[str, float] = field(default_factory=dict)


class MetricsSink(Protocol):
    def request_finished(self, record: RequestRecord) -> None: ...


@dataclass(frozen=True)
class ClusterStatus:
    model: str
    mode: str
    transport: str
    instances: list[InstanceStats]
    health: dict[str, str]
    # Operations (cluster.control): per instance its state and pid; the router's counters.
    states: dict[str, str] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)


def served_model_name(model: str | None) -> str:
    """The id clients use: a path's file or directory name without the GGUF suffix."""
    if model is None:
        return "SmolLM2-135M-Instruct"
    name = os.path.basename(os.path.normpath(model))
    if name.endswith(".gguf"):
        name = name[: -len(".gguf")].split(".")[0]  # drop quantisation tags: .Q4_1
    return name


class Router:
    def __init__(
        self, cluster: Cluster, model_name: str | None = None, metrics: MetricsSink | None = None
    ):
        self.cluster = cluster
        self.model_name = model_name or served_model_name(cluster.model)
        self.metrics = metrics
        self._created = int(time.time())
        # Set at the start of a graceful shutdown: both front doors refuse new requests
        # and report not-ready; the ones in flight go on.
        self.shutting_down = False

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(self.model_name, self.cluster.max_model_len, self._created)]

    def _check_model(self, model: str | None) -> None:
        if model not in (None, "", self.model_name):
            raise RouterError.invalid(
                f"model: unknown model {model!r} (this server serves {self.model_name!r})",
                "model",
            )

    async def stream(
        self, request: GenerateInput, source: AsyncIterator[RequestOutput] | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Yield output snapshots until the request finishes; RouterError on failure.
        ``source``: one sequence of :meth:`open_group`, instead of sending ``request``.

        The request is recorded exactly once, on every way out (the ``finally``): a
        consumer that stops at the finished output (the HTTP stream) still records it,
        a disconnect before the end records an abort, a refusal records a rejection."""
        start = time.monotonic()
        times: list[float] = []
        last: RequestOutput | None = None
        outcome = "rejected"  # an unknown model
        try:
            if self.shutting_down:
                raise RouterError(ErrorKind.UNAVAILABLE, "server: shutting down; retry elsewhere")
            self._check_model(request.model)
            outcome = "aborted"  # until the finished output: leaving now is an abort
            if source is None:
                source = self.cluster.stream(
                    request.prompt,
                    request.params,
                    prompt_token_ids=request.prompt_token_ids,
                    messages=request.messages,
                    request_id=request.request_id,
                )
            async for out in source:
                last = out
                if out.finish_reason == "error":
                    outcome = "error"
                    raise RouterError(ErrorKind.INTERNAL, "the request failed on an instance")
                if out.new_token_ids:
                    times.append(time.monotonic())
                if out.finished:
                    outcome = "aborted" if out.finish_reason == "abort" else "ok"
                yield out
        except ValueError as e:  # the instance refused the request, or a bug after it ran
            outcome = "rejected" if last is None else "error"
            raise RouterError.invalid(str(e)) from e
        except RuntimeError as e:  # no instance serving
            outcome = "rejected" if last is None else "error"
            raise RouterError(ErrorKind.UNAVAILABLE, str(e)) from e
        except (GeneratorExit, asyncio.CancelledError, RouterError):
            raise
        except BaseException:
            outcome = "error"
            raise
        finally:
            if source is not None:
                await source.aclose()  # type: ignore[attr-defined]  # aborts it if running
            if self.metrics is not None:
                self.metrics.request_finished(self._record(last, start, times, outcome))

    async def open_group(
        self, request: GenerateInput, n: int
    ) -> list[AsyncIterator[RequestOutput]]:
        """``n`` sequences for one prompt, its KV computed once and shared
        (``cluster.groups``); once accepted, one :meth:`stream` per sequence, index i
        the request ``<id>-i``. RouterError (nothing left running) when refused."""
        try:
            if self.shutting_down:
                raise RouterError(ErrorKind.UNAVAILABLE, "server: shutting down; retry elsewhere")
            self._check_model(request.model)
            sources = await self.cluster.stream_n(
                request.prompt,
                request.params,
                n,
                prompt_token_ids=request.prompt_token_ids,
                messages=request.messages,
                request_id=request.request_id,
            )
        except ValueError as e:
            self.rejected()
            raise RouterError.invalid(str(e)) from e
        except RuntimeError as e:
            self.rejected()
            raise RouterError(ErrorKind.UNAVAILABLE, str(e)) from e
        except RouterError:
            self.rejected()
            raise
        return [self.stream(request, source) for source in sources]

    def rejected(self) -> None:
        """Count a request a front end refused before :meth:`stream` (a malformed body,
        a bad sampling value), so that every request is one outcome."""
        if self.metrics is not None:
            record = RequestRecord(self.model_name, 0, 0, "abort", 0.0, outcome="rejected")
            self.metrics.request_finished(record)

    async def generate(self, request: GenerateInput) -> RequestOutput:
        last: RequestOutput | None = None
        async for out in self.stream(request):
            last = out
        if last is None:
            raise RouterError(ErrorKind.INTERNAL, "the request produced no output")
        return last

    def _record(
        self, out: RequestOutput | None, start: float, times: Sequence[float], outcome: str
    ) -> RequestRecord:
        end = time.monotonic()
        if out is None:
            return RequestRecord(self.model_name, 0, 0, "abort", end - start, outcome=outcome)
        n = len(out.token_ids)
        ttft = times[0] - start if times else None
        # Durations the instances measured (the KV pull, a recompute), next to the
        # router's own clock for everything the client sees.
        metrics = out.metrics
        timings = dict(metrics.timings) if metrics else {}
        return RequestRecord(
            model=self.model_name,
            prompt_tokens=len(out.prompt_token_ids),
            output_tokens=n,
            finish_reason=out.finish_reason or "abort",
            e2e_s=end - start,
            ttft_s=ttft,
            tpot_s=(end - times[0]) / (n - 1) if ttft is not None and n > 1 else None,
            itl_s=[b - a for a, b in zip(times, times[1:], strict=False)],
            kv_transfer_s=timings.get("kv_transfer"),
            recomputed=bool(timings.get("recomputed")),
            outcome=outcome,
            request_id=out.request_id,
            prefill_instance=metrics.prefill_instance if metrics else None,
            decode_instance=metrics.decode_instance if metrics else None,
            kv_backend=self.cluster.transport,
            timings=timings,
        )

    async def status(self) -> ClusterStatus:
        instances = await asyncio.to_thread(self.cluster.stats)
        return ClusterStatus(
            model=self.model_name,
            mode=self.cluster.mode,
            transport=self.cluster.transport,
            instances=instances,
            health=self.cluster.health(),
            states=self.cluster.states(),
            pids=self.cluster.pids(),
            counters=self.cluster.counters(),
            dtypes=self.cluster.dtypes(),
        )
