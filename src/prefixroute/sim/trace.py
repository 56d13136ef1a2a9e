"""Replay of Mooncake-format request traces (JSONL, optionally gzip-compressed).

The format is the one released with the Mooncake paper (FAST 2025,
kvcache-ai/Mooncake `FAST25-release/traces/`): one JSON object per line with
`timestamp` (ms since the trace start), `input_length` and `output_length`
(tokens) and `hash_ids`, the ids of the prompt's 512-token blocks, where equal
leading ids mean a shared prefix. Other keys are ignored.

A trace carries no text, so each request is token-only: block `i` of the
prompt is `synthetic_tokens(hash_ids[i], block_tokens)`, computed for all
blocks of a request in one numpy expression (`synthetic_blocks`); the last
block is cut so the prompt has exactly `input_length` tokens, and when
`input_length` exceeds `block_tokens * len(hash_ids)` the rest is filled with
tokens unique to the request (`synthetic_tokens(2**31 + record index)`;
`hash_ids` must therefore be below 2**31). Requests with equal leading hash ids
thus share exactly those token blocks, as in the serving system that recorded
the trace.

The file is read and checked whole at construction (a bad line raises
`ScenarioError` naming `file:line`; an unreadable, truncated or corrupt file
`ScenarioError` naming the file; nothing else escapes; lengths are at most
`MAX_LENGTH` tokens), into compact arrays (about 20 bytes per
block id); the token arrays are made lazily, one request per `next`.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt

from prefixroute.request import Request
from prefixroute.sim.schema import ScenarioError
from prefixroute.sim.source import SimRequest
from prefixroute.sim.tokenizer import synthetic_blocks, synthetic_tokens

__all__ = ["MAX_LENGTH", "PAD_KEY_BASE", "TraceSource"]

PAD_KEY_BASE = 1 << 31
"""Record `i` pads with `synthetic_tokens(PAD_KEY_BASE + i, ...)`; hash ids stay below."""

MAX_LENGTH = 1 << 24
"""Largest `input_length` or `output_length` accepted (16 Mi tokens): far beyond any
context, and small enough that one request's tokens always fit in memory."""


def _open(path: Path) -> IO[str]:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open(encoding="utf-8")


def _int(record: dict[str, Any], key: str, minimum: int, where: str) -> int:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ScenarioError(where, f"{key} must be an integer, got {value!r}")
    if value < minimum:
        raise ScenarioError(where, f"{key} must be >= {minimum}, got {value}")
    if value > MAX_LENGTH:
        digits = str(value)
        shown = digits if len(digits) <= 24 else f"{digits[:20]}... ({len(digits)} digits)"
        raise ScenarioError(where, f"{key} must be <= {MAX_LENGTH} (2**24), got {shown}")
    return value


class TraceSource:
    """A `Source` replaying a Mooncake-format trace, open loop (no follow-ups).

    `arrival_s = timestamp / 1000 * time_scale` (records are replayed in
    timestamp order; ties keep file order); replay stops before `duration_s`
    when given. Each request has `output_tokens = max(1, output_length)`,
    kind "trace", tenant "default", no text. Construction is O(file size);
    each request costs O(input_length) numpy work and no per-block Python.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        time_scale: float = 1.0,
        model: str,
        block_tokens: int = 512,
        duration_s: float | None = None,
    ) -> None:
        if not (time_scale > 0 and math.isfinite(time_scale)):
            raise ValueError(f"time_scale must be finite and > 0, got {time_scale!r}")
        if block_tokens < 1:
            raise ValueError(f"block_tokens must be >= 1, got {block_tokens!r}")
        self.path = Path(path)
        self.time_scale = time_scale
        self.model = model
        self.block_tokens = block_tokens
        self.duration_s = duration_s
        stamps: list[float] = []
        inputs: list[int] = []
        outputs: list[int] = []
        offsets: list[int] = [0]
        flat: list[int] = []
        try:
            with _open(self.path) as lines:
                for lineno, line in enumerate(lines, start=1):
                    if not line.strip():
                        continue
                    where = f"{self.path}:{lineno}"
                    stamp, n_in, n_out, ids = self._parse(line, where)
                    stamps.append(stamp)
                    inputs.append(n_in)
                    outputs.append(n_out)
                    flat.extend(ids)
                    offsets.append(len(flat))
        except (OSError, EOFError, zlib.error) as exc:  # missing file, bad or truncated gzip
            raise ScenarioError(str(self.path), f"cannot read trace: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise ScenarioError(str(self.path), f"not UTF-8 text: {exc.reason}") from exc
        self._stamps = np.asarray(stamps, dtype=np.float64)
        self._inputs = np.asarray(inputs, dtype=np.int64)
        self._outputs = np.asarray(outputs, dtype=np.int64)
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._ids = np.asarray(flat, dtype=np.uint32)
        self._order: npt.NDArray[np.intp] = np.argsort(self._stamps, kind="stable")

    @staticmethod
    def _parse(line: str, where: str) -> tuple[float, int, int, list[int]]:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ScenarioError(where, f"invalid JSON: {exc.msg}") from exc
        except (ValueError, RecursionError) as exc:  # a number of > 4300 digits, deep nesting
            raise ScenarioError(where, f"invalid JSON: {type(exc).__name__}") from exc
        if not isinstance(record, dict):
            raise ScenarioError(where, f"must be a JSON object, got {type(record).__name__}")
        stamp = record.get("timestamp")
        if isinstance(stamp, bool) or not isinstance(stamp, int | float):
            raise ScenarioError(where, f"timestamp must be a number, got {stamp!r}")
        if isinstance(stamp, int) and stamp.bit_length() > 64:  # math.isfinite would overflow
            raise ScenarioError(
                where, f"timestamp must be below 2**64, got {stamp.bit_length()} bits"
            )
        if not (math.isfinite(stamp) and stamp >= 0):
            raise ScenarioError(where, f"timestamp must be finite and >= 0, got {stamp!r}")
        n_in = _int(record, "input_length", 1, where)
        n_out = _int(record, "output_length", 0, where)
        ids = record.get("hash_ids")
        if not isinstance(ids, list):
            raise ScenarioError(where, f"hash_ids must be a list of integers, got {ids!r}")
        for h in ids:
            if isinstance(h, bool) or not isinstance(h, int) or not 0 <= h < PAD_KEY_BASE:
                raise ScenarioError(where, f"hash_ids must be integers in [0, 2**31), got {h!r}")
        return float(stamp), n_in, n_out, ids

    def __len__(self) -> int:
        """Number of records in the trace (before `duration_s` cuts it)."""
        return len(self._stamps)

    def tokens(self, index: int) -> npt.NDArray[np.uint32]:
        """The prompt token ids of record `index` (file order, from 0). O(input_length)."""
        n = int(self._inputs[index])
        block = self.block_tokens
        ids = self._ids[self._offsets[index] : self._offsets[index + 1]]
        needed = -(-n // block)
        tokens = synthetic_blocks(ids[:needed], block).reshape(-1)
        if len(tokens) >= n:
            return tokens[:n]
        pad = synthetic_tokens(PAD_KEY_BASE + index, n - len(tokens))
        return np.concatenate((tokens, pad))

    def arrivals(self) -> Iterator[SimRequest]:
        """Every record in timestamp order, lazily, until `duration_s`."""
        scale = self.time_scale / 1000.0
        end = self.duration_s
        for index in self._order.tolist():
            at = float(self._stamps[index]) * scale
            if end is not None and at >= end:
                return
            output = max(1, int(self._outputs[index]))
            request = Request(
                model=self.model, token_ids=self.tokens(index), tenant="default", max_tokens=output
            )
            yield SimRequest(at, request, output, "trace")

    def follow_up(self, done: SimRequest, finished_s: float, ok: bool) -> SimRequest | None:
        """Nothing: a trace is open loop."""
        return None
