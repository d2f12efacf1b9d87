"""Which worker rank owns a stream, and the Redis stream each rank reads: one rule for API and workers.

With ``R`` worker ranks (``learner.distributed``) a stream's state and traces live on one rank only,
so every fixation and every command for a stream must reach that rank. ``rank_of`` picks it from
the stream id alone, the same in every process, Python version and machine: a keyed hash
(BLAKE2b, 64 bits) of the UTF-8 id, not Python's ``hash()``, which is salted per process. The
64-bit key goes through jump consistent hashing (Lamping and Veach, arXiv 1406.2294): going from
R to R + 1 ranks moves only the ~1/(R + 1) of the streams that the new rank takes over, and going
back moves exactly those again; the rest keep their rank, so a re-partition copies few states.

Each rank reads its own input and control streams, named after the single-worker keys
(``shard_key("foveate:fixations", 2)`` is ``foveate:fixations:2``); the results streams stay shared.

>>> rank_of("lab-a/participant-7", 1)
0
>>> shard_key("foveate:fixations", 2)
'foveate:fixations:2'
"""

from __future__ import annotations

import hashlib

_MULTIPLIER = 2862933555777941757  # the 64-bit linear congruential step of jump consistent hashing
_MASK = (1 << 64) - 1


def stream_key(stream_id: str) -> int:
    """A stable 64-bit key of a stream id (BLAKE2b, big-endian)."""
    return int.from_bytes(hashlib.blake2b(stream_id.encode("utf-8"), digest_size=8).digest(), "big")


def jump_hash(key: int, buckets: int) -> int:
    """Jump consistent hash of a 64-bit ``key`` into ``range(buckets)`` (Lamping and Veach, fig. 1)."""
    if buckets < 1:
        raise ValueError(f"buckets must be >= 1, got {buckets}")
    b, j = -1, 0
    while j < buckets:
        b = j
        key = (key * _MULTIPLIER + 1) & _MASK
        j = int((b + 1) * ((1 << 31) / ((key >> 33) + 1)))
    return b


def rank_of(stream_id: str, ranks: int) -> int:
    """The rank, in ``range(ranks)``, that holds ``stream_id``'s state and reads its fixations."""
    return jump_hash(stream_key(stream_id), ranks)


def shard_key(base: str, rank: int) -> str:
    """The Redis key of rank ``rank``'s shard of the stream ``base`` (input or control)."""
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    return f"{base}:{rank}"
