"""The deterministic assignment of image ids to shards, and of shards to workers.

Shards: the ids sorted (Python string order, i.e. by code point), cut into consecutive chunks of
``shard_size``: shard k holds ``sorted_ids[k * shard_size:(k + 1) * shard_size]``. It depends only
on the set of ids and the shard size (both recorded in the store's config), never on the file
system's order, the number of workers or earlier interruptions.

Workers: with W workers (torchrun ranks), worker r takes the shards k with ``k % W == r``
(round-robin, so every rank gets a similar share of the id range). Ray hands out one task per
shard instead. Either way each shard is computed by one worker with the same per-image seeds, so
the store equals a single-process run's.
"""

from __future__ import annotations

from collections.abc import Sequence


def make_shards(ids: Sequence[str], shard_size: int) -> list[list[str]]:
    """The sorted ids cut into consecutive shards of ``shard_size`` (the last may be shorter)."""
    if shard_size < 1:
        raise ValueError(f"shard size must be >= 1, got {shard_size}")
    ids = sorted(ids)
    if len(set(ids)) != len(ids):
        raise ValueError("image ids must be unique")
    return [ids[i : i + shard_size] for i in range(0, len(ids), shard_size)]


def shards_of_rank(n_shards: int, rank: int, world_size: int) -> list[int]:
    """The shard numbers worker ``rank`` of ``world_size`` owns: k with k % world_size == rank."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    return list(range(rank, n_shards, world_size))


def shard_name(k: int) -> str:
    return f"shard-{k:06d}.safetensors"


__all__ = ["make_shards", "shard_name", "shards_of_rank"]
