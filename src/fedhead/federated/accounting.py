"""Counting what a round costs: FLOPs with torch's own counter, and a wall clock per phase."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from torch.utils.flop_counter import FlopCounterMode


@contextmanager
def count_flops(enabled: bool = True) -> Iterator[list[int]]:
    """Count the FLOPs of the enclosed PyTorch ops (torch.utils.flop_counter); the total lands in box[0].

    Attention-score FLOPs are counted only under eager attention (the counter misses CPU sdpa kernels).
    """
    box = [0]
    if not enabled:
        yield box
        return
    mode = FlopCounterMode(display=False)
    with mode:
        yield box
    box[0] = int(mode.get_total_flops())


class PhaseTimer:
    """Accumulates wall-clock seconds per named phase."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
