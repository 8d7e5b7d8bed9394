"""The control messages rank 0 broadcasts to the worker ranks: one per step, plus scoring and shutdown.

Messages are JSON (orjson) over the control group: plain data, no pickled objects.

    {"kind": "step", "removed": [request ids], "chunks": [[id, start, num_new, new_token_ids, new_block_ids, is_new], ...]}
    {"kind": "score", "token_ids": [...]}
    {"kind": "shutdown"}
"""

from __future__ import annotations

from dataclasses import dataclass, field

import orjson

STEP, SCORE, SHUTDOWN = "step", "score", "shutdown"


@dataclass
class ChunkDiff:
    """One scheduled chunk, with only what the workers do not know yet of its request."""

    request_id: str
    start_position: int
    num_new_tokens: int
    new_token_ids: list[int]
    """Tokens appended to the request since the workers last saw it (all of them when is_new)."""
    new_block_ids: list[int]
    """Blocks appended to its block table since (the whole table when is_new)."""
    is_new: bool
    """The workers do not know the request (first scheduled, or rescheduled after preemption)."""


@dataclass
class StepDiff:
    """What changed since the previous step, in the order of the step's chunks."""

    removed_request_ids: list[str] = field(default_factory=list)
    """Requests to forget before applying the chunks: finished, aborted or preempted."""
    chunks: list[ChunkDiff] = field(default_factory=list)


def encode_step(diff: StepDiff) -> bytes:
    chunks = [[c.request_id, c.start_position, c.num_new_tokens, c.new_token_ids, c.new_block_ids, c.is_new]
              for c in diff.chunks]
    return orjson.dumps({"kind": STEP, "removed": diff.removed_request_ids, "chunks": chunks})


def encode_score(token_ids: list[int]) -> bytes:
    return orjson.dumps({"kind": SCORE, "token_ids": token_ids})


def encode_shutdown() -> bytes:
    return orjson.dumps({"kind": SHUTDOWN})


def decode(data: bytes) -> tuple[str, StepDiff | list[int] | None]:
    """(kind, payload): a StepDiff for steps, token ids for scoring, None for shutdown."""
    message = orjson.loads(data)
    kind = message["kind"]
    if kind == STEP:
        chunks = [ChunkDiff(*fields) for fields in message["chunks"]]
        return kind, StepDiff(message["removed"], chunks)
    if kind == SCORE:
        return kind, message["token_ids"]
    if kind == SHUTDOWN:
        return kind, None
    raise ValueError(f"unknown control message {kind!r}")
