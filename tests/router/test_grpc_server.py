"""The gRPC API server over the session's router, through the generated stubs and stock
grpc tooling (health, reflection): bad requests are INVALID_ARGUMENT naming the field,
the api key, cancellation freeing every KV block, the admin status, shutdown."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import baton
from baton.errors import InvalidArgument, Unauthenticated
from baton.v1 import baton_pb2 as pb
from baton.v1 import baton_pb2_grpc as pb_grpc
from cluster import Cluster
from router.grpc_server import ServerTLS
from router.service import Router
from tests.router.servers import ServerThread, wait_cluster_idle

GREEDY = pb.SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def server(router: Router) -> Iterator[ServerThread]:
    st = ServerThread(router)
    yield st
    st.stop()


@pytest.fixture(scope="module")
def channel(server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> pb_grpc.BatonStub:
    return pb_grpc.BatonStub(channel)


@pytest.fixture(autouse=True)
def _idle_after(cluster: Cluster) -> Iterator[None]:
    yield
    wait_cluster_idle(cluster)


def test_health_says_serving(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "baton.v1.Baton", "baton.v1.BatonAdmin"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_and_describes_the_api(channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="baton.v1.Baton"),
    ]
    listed, described = list(stub.ServerReflectionInfo(iter(requests), timeout=5))
    names = {s.name for s in listed.list_services_response.service}
    assert {"baton.v1.Baton", "baton.v1.BatonAdmin", "grpc.health.v1.Health"} <= names
    assert described.file_descriptor_response.file_descriptor_proto  # what grpcurl reads


def _request(max_model_len: int, case: str) -> pb.GenerateRequest:
    def params(**kw: object) -> pb.SamplingParams:
        return pb.SamplingParams(temperature=0, **kw)  # type: ignore[arg-type]

    long_ids = pb.TokenIds(ids=[42] * (max_model_len + 1))
    return {
        "no prompt": pb.GenerateRequest(),
        "empty prompt": pb.GenerateRequest(prompt=""),
        "prompt over the context": pb.GenerateRequest(prompt_token_ids=long_ids),
        "max_tokens over the context": pb.GenerateRequest(
            prompt="Hi", params=params(max_tokens=max_model_len)
        ),
        "max_tokens zero": pb.GenerateRequest(prompt="Hi", params=params(max_tokens=0)),
        "negative temperature": pb.GenerateRequest(
            prompt="Hi", params=pb.SamplingParams(temperature=-0.5)
        ),
        "top_p zero": pb.GenerateRequest(prompt="Hi", params=params(top_p=0)),
        "top_p above one": pb.GenerateRequest(prompt="Hi", params=params(top_p=1.5)),
        "too many logprobs": pb.GenerateRequest(prompt="Hi", params=params(logprobs=21)),
        "negative stop token": pb.GenerateRequest(prompt="Hi", params=params(stop_token_ids=[-1])),
        "unknown model": pb.GenerateRequest(model="gpt-9", prompt="Hi"),
        "empty chat": pb.GenerateRequest(messages=pb.Chat()),
        "token id past the vocabulary": pb.GenerateRequest(
            prompt_token_ids=pb.TokenIds(ids=[10**9])
        ),
    }[case]


BAD = {
    "no prompt": "prompt",
    "empty prompt": "prompt",
    "prompt over the context": "prompt",
    "max_tokens over the context": "max_tokens",
    "max_tokens zero": "max_tokens",
    "negative temperature": "temperature",
    "top_p zero": "top_p",
    "top_p above one": "top_p",
    "too many logprobs": "logprobs",
    "negative stop token": "stop_token_ids",
    "unknown model": "model",
    "empty chat": "messages",
    "token id past the vocabulary": "prompt_token_ids",
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests_are_invalid_argument_naming_the_field(
    stub: pb_grpc.BatonStub, cluster: Cluster, case: str
) -> None:
    request = _request(cluster.max_model_len, case)
    calls: list[Callable[[], object]] = [
        lambda: stub.Generate(request, timeout=30),
        lambda: list(stub.GenerateStream(request, timeout=30)),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert err.value.details().startswith(f"{BAD[case]}: "), err.value.details()


def test_the_sdk_raises_invalid_argument_and_the_server_keeps_serving(
    server: ServerThread, stub: pb_grpc.BatonStub
) -> None:
    with baton.Client(server.target) as client:
        with pytest.raises(InvalidArgument) as err:
            client.generate("Hi", baton.SamplingParams(top_p=2.0))
        assert err.value.field == "top_p"
        with pytest.raises(InvalidArgument) as err:
            list(client.stream("Hi", baton.SamplingParams(temperature=-1)))
        assert err.value.field == "temperature"
        with pytest.raises(InvalidArgument) as err:
            client.chat([{"role": "user", "content": "Hi"}], model="nope")
        assert err.value.field == "model"
    reply = stub.Generate(pb.GenerateRequest(prompt="Hello", params=GREEDY), timeout=60)
    assert reply.finish_reason == pb.FINISH_REASON_LENGTH and len(reply.token_ids) == 4


def test_unary_and_stream_answers_agree(stub: pb_grpc.BatonStub) -> None:
    params = pb.SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2)
    request = pb.GenerateRequest(prompt="The sea is", params=params)
    whole = stub.Generate(request, timeout=60)
    parts = list(stub.GenerateStream(request, timeout=60))
    assert "".join(p.text for p in parts) == whole.text
    assert [t for p in parts for t in p.token_ids] == list(whole.token_ids)
    assert [p.finish_reason for p in parts][-1] == pb.FINISH_REASON_LENGTH
    assert not any(p.HasField("usage") for p in parts[:-1])
    assert parts[-1].usage == whole.usage
    assert whole.usage.prompt_tokens > 0 and whole.usage.completion_tokens == 6
    assert [lp.sampled.token_id for lp in whole.logprobs] == list(whole.token_ids)
    assert all(len(lp.top) == 2 and lp.sampled.logprob <= 0 for lp in whole.logprobs)
    assert [lp.sampled.token_id for p in parts for lp in p.logprobs] == list(whole.token_ids)


def test_list_models_and_admin_status(
    channel: grpc.Channel, stub: pb_grpc.BatonStub, router: Router, cluster: Cluster
) -> None:
    (model,) = stub.ListModels(pb.ListModelsRequest(), timeout=10).models
    assert (model.id, model.max_model_len) == (router.model_name, cluster.max_model_len)
    status = pb_grpc.BatonAdminStub(channel).Status(pb.StatusRequest(), timeout=30)
    assert (status.model, status.mode) == (router.model_name, "disaggregated")
    assert [p.role for p in status.pools] == ["prefill", "decode"]
    for pool in status.pools:
        (inst,) = pool.instances
        assert inst.name == f"{pool.role}-0" and inst.health == pb.INSTANCE_HEALTH_SERVING
        assert inst.total_blocks == pool.total_blocks == 1024 and 0 <= inst.kv_usage <= 1


def test_a_cancelled_stream_aborts_the_request(
    server: ServerThread, stub: pb_grpc.BatonStub, cluster: Cluster
) -> None:
    long = pb.SamplingParams(temperature=0, max_tokens=4000, ignore_eos=True)
    call = stub.GenerateStream(pb.GenerateRequest(prompt="Count", params=long), timeout=60)
    next(call), next(call)  # generation is under way
    call.cancel()
    wait_cluster_idle(cluster)
    # The same through the SDK: leaving the loop early cancels the call.
    with baton.Client(server.target) as client:
        sdk_long = baton.SamplingParams(temperature=0, max_tokens=4000, ignore_eos=True)
        for i, _ in enumerate(client.stream("Count", sdk_long)):
            if i == 2:
                break
    wait_cluster_idle(cluster)
    # A deadline that passes mid-generation aborts it too.
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(pb.GenerateRequest(prompt="Count", params=long), timeout=1.0)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_an_api_key_guards_everything_but_health(router: Router) -> None:
    st = ServerThread(router, api_key="s3cret")
    try:
        params = baton.SamplingParams(temperature=0, max_tokens=2)
        for key in (None, "wrong"):
            with baton.Client(st.target, api_key=key) as client:
                with pytest.raises(Unauthenticated):
                    client.generate("Hi", params)
                with pytest.raises(Unauthenticated):
                    list(client.stream("Hi", params))
            with baton.AdminClient(st.target, api_key=key) as admin, pytest.raises(Unauthenticated):
                admin.status()
        with baton.Client(st.target, api_key="s3cret") as client:
            assert client.generate("Hi", params).usage.completion_tokens >= 1
        with grpc.insecure_channel(st.target) as ch:
            check = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            listing = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
            )
            with pytest.raises(grpc.RpcError) as err:
                list(listing)  # a client-streaming method is guarded too
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert check.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        st.stop()


def test_health_turns_not_serving_on_shutdown(router: Router) -> None:
    st = ServerThread(router)
    stopper = threading.Thread(target=st.stop)
    try:
        with grpc.insecure_channel(st.target) as ch:
            watch = health_pb2_grpc.HealthStub(ch).Watch(
                health_pb2.HealthCheckRequest(service="baton.v1.Baton"), timeout=10
            )
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            stopper.start()
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        if stopper.ident is None:  # failed before the stop began
            st.stop()
        else:
            stopper.join(timeout=10)


def test_tls(router: Router, tmp_path: Path) -> None:
    from tests.kv_transfer.test_grpc_backend import ThrowawayCA

    issued = ThrowawayCA(tmp_path).issue("server")
    st = ServerThread(router, tls=ServerTLS(issued.cert_file, issued.key_file))
    try:
        with baton.Client(st.target, tls=issued.ca_file) as client:
            assert client.models()[0].id == router.model_name
    finally:
        st.stop()
