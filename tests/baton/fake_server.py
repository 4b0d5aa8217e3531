"""A scripted stand-in for a Baton server, to test what the SDK does on its own side
(retries, deadlines, metadata, TLS). It is a fake of the wire peer, not of our server:
the real server is tested in tests/router."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from baton.v1 import baton_pb2 as pb
from baton.v1 import baton_pb2_grpc as pb_grpc

USAGE = pb.Usage(prompt_tokens=3, completion_tokens=2)


class FakeBaton(pb_grpc.BatonServicer):
    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.metadata: list[dict[str, str]] = []
        self.unavailable_first = 0  # fail this many calls of each method with UNAVAILABLE
        self.fail_code = grpc.StatusCode.UNAVAILABLE
        self.fail_mid_stream = False  # UNAVAILABLE after the first chunk
        self.sleep_s = 0.0
        self._lock = threading.Lock()

    def _enter(self, method: str, context: Any) -> None:
        with self._lock:
            self.calls[method] += 1
            n = self.calls[method]
            self.metadata.append(dict(context.invocation_metadata()))
        if n <= self.unavailable_first:
            context.abort(self.fail_code, f"temperature: scripted failure {n}")
        time.sleep(self.sleep_s)

    def Generate(self, request: pb.GenerateRequest, context: Any) -> pb.GenerateResponse:  # noqa: N802
        self._enter("Generate", context)
        return pb.GenerateResponse(
            request_id="r1",
            model="fake",
            text="ok!",
            token_ids=[7, 8],
            finish_reason=pb.FINISH_REASON_STOP,
            usage=USAGE,
        )

    def GenerateStream(  # noqa: N802
        self, request: pb.GenerateRequest, context: Any
    ) -> Iterator[pb.GenerateStreamResponse]:
        self._enter("GenerateStream", context)
        yield pb.GenerateStreamResponse(request_id="r1", text="ok", token_ids=[7])
        if self.fail_mid_stream:
            context.abort(grpc.StatusCode.UNAVAILABLE, "connection lost")
        yield pb.GenerateStreamResponse(
            request_id="r1",
            text="!",
            token_ids=[8],
            finish_reason=pb.FINISH_REASON_STOP,
            usage=USAGE,
        )

    def ListModels(self, request: pb.ListModelsRequest, context: Any) -> pb.ListModelsResponse:  # noqa: N802
        self._enter("ListModels", context)
        return pb.ListModelsResponse(models=[pb.ModelInfo(id="fake", max_model_len=64)])


class FakeServer:
    def __init__(self, credentials: grpc.ServerCredentials | None = None):
        self.servicer = FakeBaton()
        self.server = grpc.server(ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_BatonServicer_to_server(self.servicer, self.server)
        if credentials is None:
            self.port = self.server.add_insecure_port("127.0.0.1:0")
        else:
            self.port = self.server.add_secure_port("127.0.0.1:0", credentials)
        self.server.start()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.stop(grace=None).wait(timeout=5)
