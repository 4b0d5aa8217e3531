"""What a structured-output constraint costs per decode step (a benchmark, not a test).

Runs the sampler's logits-processing hook alone (``apply_logits_processors``: sync each
row's llguidance matcher with its output, compute its bitmask, mask the row) over a
nested JSON schema, at batch 1 and 32, with the default model's tokenizer and vocabulary
(49152). Each row follows a valid document token by token, so every step's mask is a real
mid-document mask. Reported: milliseconds per step for the whole batch, and per row.

    python -m bench.structured_mask [--steps 60] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from engine.loader.default import default_model_path
from engine.loader.gguf import load_gguf_tokenizer
from engine.logits_processors import apply_logits_processors, build_processor
from engine.sampling_params import SamplingParams, StructuredOutput
from engine.structured_output import Grammars

SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "user": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "emails": {"type": "array", "items": {"type": "string"}},
                "address": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"],
                },
            },
            "required": ["name", "emails", "address"],
        },
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["id", "user", "tags"],
}
DOCUMENT = {
    "id": 12345,
    "user": {
        "name": "Ada Lovelace",
        "emails": ["ada@example.com", "countess@example.org"],
        "address": {"city": "London", "zip": "W1J 7NT"},
    },
    "tags": ["math", "engines", "poetry", "analysis"],
}


def run(batch: int, steps: int) -> dict[str, float]:
    tok = load_gguf_tokenizer(default_model_path())
    vocab = tok.vocab_size
    grammars = Grammars(tok, vocab)
    params = SamplingParams(structured_output=StructuredOutput("json", json.dumps(SCHEMA)))
    doc = tok.encode(json.dumps(DOCUMENT, separators=(",", ":")), add_special_tokens=False)
    steps = min(steps, len(doc))
    rows = [build_processor(params, tok, grammars) for _ in range(batch)]
    logits = torch.randn(batch, vocab)
    times = []
    for step in range(steps):
        out = doc[:step]
        t0 = time.perf_counter()
        apply_logits_processors(logits, [(p, out) for p in rows])
        times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1e3
    return {"batch": batch, "steps": steps, "median_ms_per_step": ms, "ms_per_row": ms / batch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (an instance's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for batch in (1, 32):
        print(json.dumps(run(batch, args.steps)))


if __name__ == "__main__":
    main()
