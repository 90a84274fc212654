"""Admission: whether one more generation fits beside those running. Pure functions, state in, a decision out,
so that the HTTP service (api/service.py) and the simulator (simulate/) decide alike.

A generation reserves the KV positions it is sized for (`len(prompt) + max_tokens`, at most the context). The pool
holds as many positions as its tightest stage: each stage keeps its layers' keys and values for every session in
KV_SHARE of the memory it lends (its free memory plus what its caches hold now, as it last said).
"""

from collections.abc import Iterable

KV_SHARE = 0.8  # of the memory a stage lends (free + what its KV caches hold), what sessions may reserve
UNKNOWN_CAPACITY = 1 << 40  # no stage has reported yet: the nodes' own checks still hold


def kv_capacity(stages: Iterable[tuple[int, int]], kv_bytes_per_token: int) -> int:
    """KV positions the route's lent memory holds. `stages`: (lent bytes = free + KV held, layers) per stage;
    `kv_bytes_per_token`: K + V of one layer for one token."""
    per_layer = max(1, kv_bytes_per_token)
    room = [int(lent * KV_SHARE) // (per_layer * max(1, layers)) for lent, layers in stages]
    return min(room) if room else UNKNOWN_CAPACITY


def admits(reserved: int, kv_tokens: int, capacity: int, active: int = 0, max_active: int | None = None) -> bool:
    """Whether a generation reserving `kv_tokens` positions may start beside those reserving `reserved` (`active` of
    them, at most `max_active`). The first one always may: a node refuses a cache its memory lacks by itself."""
    if max_active is not None and active >= max_active:
        return False
    return reserved == 0 or reserved + kv_tokens <= capacity
