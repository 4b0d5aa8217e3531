"""The request fields beyond OpenAI's core that vLLM serves, mapped to ``SamplingParams``.

- vLLM's extra sampling fields by their vLLM names (``min_tokens``, ``logit_bias``,
  ``allowed_token_ids``, ``bad_words``, ``include_stop_str_in_output``; ``top_k`` and the
  like are in ``openai_protocol.SAMPLING_FIELDS``).
- Structured output: OpenAI's ``response_format`` (``text``, ``json_object``,
  ``json_schema``) and vLLM's ``guided_json`` / ``guided_regex`` / ``guided_choice`` /
  ``guided_grammar`` and ``structured_outputs`` ({json, regex, choice, grammar}): at most
  one constraint per request. The instance compiles it when the request arrives, so a
  schema or regex that does not compile is a 400 naming the field the client used.
- Fields vLLM accepts that change nothing here (``spaces_between_special_tokens``, the
  guided-decoding backend, ...) and fields nobody knows: accepted and ignored with a
  warning in the log, as vLLM does.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from engine.sampling_params import StructuredOutput
from router.errors import RouterError

logger = logging.getLogger(__name__)

Body = Mapping[str, Any]
MAX_N = 16  # sequences per request (n); above it: 400 naming n

EXTRA_SAMPLING_FIELDS = (
    "min_tokens", "logit_bias", "allowed_token_ids", "bad_words", "include_stop_str_in_output",
)  # fmt: skip
STRUCTURED_FIELDS = (
    "response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
    "structured_outputs",
)  # fmt: skip
# vLLM accepts these; here they have no effect (documented in the README).
NO_EFFECT_FIELDS = (
    "spaces_between_special_tokens", "guided_decoding_backend", "guided_whitespace_pattern",
    "priority", "return_tokens_as_token_ids", "cache_salt", "kv_transfer_params", "vllm_xargs",
    "add_generation_prompt", "parallel_tool_calls", "length_penalty", "use_beam_search",
)  # fmt: skip


def invalid(name: str, message: str) -> RouterError:
    return RouterError.invalid(f"{name}: {message}", name)


def warn_ignored(body: Body, known: frozenset[str], request_id: str) -> None:
    """Log what the request sent that nothing here reads (vLLM's warning)."""
    ignored = sorted(k for k in body if k not in known or k in NO_EFFECT_FIELDS)
    ignored = [k for k in ignored if body[k] is not None]
    if ignored:
        logger.warning(
            "request %s: the following fields were present in the request but ignored: %s",
            request_id,
            ", ".join(ignored),
        )


def extra_sampling(body: Body) -> dict[str, Any]:
    """vLLM's extra sampling fields, as SamplingParams takes them (it validates them)."""
    return {k: body[k] for k in EXTRA_SAMPLING_FIELDS if body.get(k) is not None}


def _schema_text(name: str, schema: object) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise invalid(name, f"the JSON schema is not valid JSON: {e}") from e
    if not isinstance(schema, (dict, bool)):
        raise invalid(name, "a JSON schema must be an object")
    check_schema(name, schema)
    return json.dumps(schema)


def check_schema(name: str, schema: object) -> None:
    """A 400 naming ``name`` when ``schema`` is not a valid JSON Schema (2020-12)."""
    import jsonschema

    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as e:
        raise invalid(name, f"invalid JSON schema: {e.message}") from e


def _response_format(value: object) -> StructuredOutput | None:
    name = "response_format"
    if not isinstance(value, dict):
        raise invalid(name, "must be an object with a type")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput("json_object")
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise invalid(name, "json_schema: must be an object with name and schema")
        if not isinstance(spec.get("name"), str) or not spec["name"]:
            raise invalid(name, "json_schema.name: must be a non-empty string")
        schema = spec.get("schema", {})  # OpenAI: absent means any JSON
        return StructuredOutput("json", _schema_text(name, schema))
    raise invalid(name, f"type must be text, json_object or json_schema, got {kind!r}")


def _guided(name: str, kind: str, value: object) -> StructuredOutput:
    if kind == "json":
        return StructuredOutput("json", _schema_text(name, value))
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
            raise invalid(name, "must be a non-empty array of strings")
        return StructuredOutput("choice", json.dumps(value))
    if not isinstance(value, str) or not value:
        raise invalid(name, "must be a non-empty string")
    return StructuredOutput(kind, value)


def structured_output(body: Body) -> tuple[StructuredOutput | None, str | None]:
    """The request's one constraint and the field that set it (for error messages)."""
    found: list[tuple[StructuredOutput | None, str]] = []
    if body.get("response_format") is not None:
        found.append((_response_format(body["response_format"]), "response_format"))
    for kind in ("json", "regex", "choice", "grammar"):
        name = f"guided_{kind}"
        if body.get(name) is not None:
            found.append((_guided(name, kind, body[name]), name))
    outputs = body.get("structured_outputs")
    if outputs is not None:
        if not isinstance(outputs, dict):
            raise invalid("structured_outputs", "must be an object")
        for kind in ("json", "regex", "choice", "grammar"):
            if outputs.get(kind) is not None:
                name = "structured_outputs"
                found.append((_guided(name, kind, outputs[kind]), name))
    found = [(s, n) for s, n in found if s is not None]
    if len(found) > 1:
        names = ", ".join(n for _, n in found)
        raise invalid(found[1][1], f"one output constraint per request, got {names}")
    return found[0] if found else (None, None)
