"""Named random streams: every random choice of a run is drawn from (seed, round, client, stream), so a client's
randomness does not depend on which clients ran before it, and a resumed run draws what an uninterrupted one did.

The stream numbers are part of a run's identity (changing one changes every result): they stay as they are.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np
import torch


class Stream(IntEnum):
    CLIENT_DATA = 0  # a client's scoring sample, batch order, random head scores
    DROPOUT = 1  # torch's global RNG during a client's local training
    HEAD_SAMPLING = 2  # heads.selection = "sample": the Gumbel draw of kept heads
    DP_NOISE = 3  # the server's Gaussian noise (client -1: the server)
    FAILURES = 7  # robust.dropout_probability: which selected clients fail in a round (simulation only)
    QUANTIZATION = 8  # federated.upload_bits: the stochastic rounding of a client's upload


SERVER = -1  # the client index of the server's own draws


def derived_seed(seed: int, round_: int, client: int, stream: Stream | int = Stream.CLIENT_DATA) -> int:
    """A 63-bit seed for one (round, client, stream), independent of the order clients run in."""
    return int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(
        (seed * 1_000_003 + round_) * 1_000_033 + client * 7 + int(stream))).item())


def failure_draws(seed: int, round_: int, count: int) -> np.ndarray:
    """Uniform [0, 1) draws deciding which of a round's `count` selected clients fail (simulated dropouts)."""
    return np.random.default_rng([seed, round_, int(Stream.FAILURES)]).random(count)
