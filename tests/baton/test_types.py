"""The SDK's types and their wire form, the error table, and the committed stubs."""

from __future__ import annotations

import dataclasses
import filecmp
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

import baton
from baton import SamplingParams, _convert
from baton.errors import ERRORS_BY_CODE, BatonError, InvalidArgument, error_from_code
from baton.v1 import baton_pb2 as pb
from engine.sampling_params import SamplingParams as EngineSamplingParams

REPO = Path(__file__).resolve().parents[2]


def test_sampling_fields_match_the_engine_and_the_proto() -> None:
    engine = [f.name for f in dataclasses.fields(EngineSamplingParams)]
    # and n, which the SDK carries in its params as vLLM does (GenerateRequest.n)
    assert [f.name for f in dataclasses.fields(SamplingParams)] == [*engine, "n"]
    assert [f.name for f in pb.SamplingParams.DESCRIPTOR.fields] == engine


def test_only_the_fields_set_go_on_the_wire() -> None:
    params = SamplingParams(temperature=0, max_tokens=5, stop="END", top_k=0)
    assert params.stop == ("END",) and hash(params)
    wire = _convert.sampling_params(params)
    assert wire.HasField("temperature") and wire.temperature == 0.0
    assert not wire.HasField("top_p") and not wire.HasField("seed")
    assert (wire.max_tokens, wire.top_k, list(wire.stop)) == (5, 0, ["END"])


def test_values_protobuf_cannot_hold_are_invalid_arguments_naming_the_field() -> None:
    with pytest.raises(InvalidArgument) as err:
        _convert.sampling_params(SamplingParams(temperature="hot"))  # type: ignore[arg-type]
    assert err.value.field == "temperature"
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(InvalidArgument, match="^prompt: "):
        _convert.generate_request([1, 2**40])
    with pytest.raises(InvalidArgument, match=r"^messages\[1\]: "):
        _convert.generate_request(messages=[{"role": "user", "content": "a"}, {"role": "user"}])


def test_the_three_prompt_forms() -> None:
    assert _convert.generate_request("hi").WhichOneof("input") == "prompt"
    ids = _convert.generate_request([1, 2])
    assert (ids.WhichOneof("input"), list(ids.prompt_token_ids.ids)) == ("prompt_token_ids", [1, 2])
    chat = _convert.generate_request(messages=[{"role": "user", "content": "hi"}], model="m")
    assert (chat.WhichOneof("input"), chat.model) == ("messages", "m")
    # Empty forms still say which form was meant; the server then names the problem.
    assert _convert.generate_request([]).WhichOneof("input") == "prompt_token_ids"
    assert _convert.generate_request(messages=[]).WhichOneof("input") == "messages"


def test_responses_become_sdk_types() -> None:
    lp = pb.Logprobs(
        sampled=pb.TokenLogprob(token_id=5, logprob=-0.5),
        top=[pb.TokenLogprob(token_id=5, logprob=-0.5), pb.TokenLogprob(token_id=6, logprob=-1)],
    )
    out = _convert.completion(
        pb.GenerateResponse(
            request_id="r",
            model="m",
            text="x",
            token_ids=[5],
            finish_reason=pb.FINISH_REASON_LENGTH,
            usage=pb.Usage(prompt_tokens=4, completion_tokens=1, cached_tokens=2),
            logprobs=[lp],
        )
    )
    assert out.finish_reason == "length" and out.usage == baton.Usage(4, 1, 2)
    assert out.logprobs is not None and out.logprobs[0].top[1].token_id == 6
    chunk = _convert.chunk(pb.GenerateStreamResponse(request_id="r", text="x", token_ids=[5]))
    assert (chunk.finish_reason, chunk.usage, chunk.logprobs) == (None, None, None)


def test_one_table_maps_status_codes_to_exceptions() -> None:
    for code, cls in ERRORS_BY_CODE.items():
        err = error_from_code(code, "max_tokens: too many")
        assert type(err) is cls and err.code == code and isinstance(err, BatonError)
        assert err.field == "max_tokens"
        assert cls("x").code == code  # raised by the SDK itself: the table's code
    other = error_from_code(grpc.StatusCode.PERMISSION_DENIED, "no")
    assert type(other) is BatonError and other.field is None
    assert set(ERRORS_BY_CODE.values()) >= {
        getattr(baton.errors, name)
        for name in (
            "InvalidArgument",
            "NotFound",
            "Unauthenticated",
            "ResourceExhausted",
            "Unavailable",
            "DeadlineExceeded",
            "Cancelled",
            "Internal",
        )
    }


def test_the_sdk_imports_no_torch_or_server_code() -> None:
    code = (
        "import sys, baton, baton.aio;"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'engine', 'router', 'cluster', 'ray')];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd=REPO)


def test_committed_stubs_are_fresh(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run(
        ["bash", str(REPO / "scripts" / "gen_protos.sh"), str(tmp_path), "baton"],
        check=True,
        env=env,
        timeout=60,
    )
    generated = sorted(p.name for p in tmp_path.iterdir())
    assert generated == ["baton_pb2.py", "baton_pb2.pyi", "baton_pb2_grpc.py"]
    match, mismatch, errors = filecmp.cmpfiles(
        tmp_path, REPO / "baton" / "v1", generated, shallow=False
    )
    assert (mismatch, errors) == ([], []), "run scripts/gen_protos.sh and commit the stubs"
