"""Per-item seeds: every random draw for an item comes from (run seed, item id), so a result
never depends on batching, ordering, sharding or which other items ran beside it."""

from __future__ import annotations

import hashlib


def derive_seed(run_seed: int, item_id: str) -> int:
    """A 63-bit seed from (run seed, item id): sha256 of ``"<run_seed>:<item_id>"``."""
    digest = hashlib.sha256(f"{int(run_seed)}:{item_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


__all__ = ["derive_seed"]
