"""One way to turn a run's seed and a position (stream, step, sample id, ...) into a seed.

Every random draw in training is made from a generator seeded by `mix(seed, ...)` of its coordinates,
never from a generator's running state, so any draw can be recomputed (a resumed run, a test) from the
coordinates alone.
"""

from __future__ import annotations

import torch

_MULTIPLIER = 1_000_003  # a prime: consecutive coordinates land far apart
_MODULUS = 2**63  # torch.Generator.manual_seed takes 64-bit seeds


def mix(*parts: int) -> int:
    """A seed from integers, order-sensitive: mix(s, a, b) = ((s * M + a) * M + b) mod 2**63 with M = 1_000_003."""
    value = 0
    for part in parts:
        value = (value * _MULTIPLIER + int(part)) % _MODULUS
    return value


def generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded by `mix(*parts)` (CPU, so a seeded run draws the same numbers on any device)."""
    return torch.Generator().manual_seed(mix(*parts))
