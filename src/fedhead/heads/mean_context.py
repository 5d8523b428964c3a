"""Mean-ablation compensation for removed heads.

Removing a head sets its context (its slice of the output projection's input) to zero, which shifts the
residual stream of every later layer. Replacing it by its mean over the client's tokens instead ("mean
ablation", a far gentler intervention) costs nothing at training time: the constant W_o[:, pruned] m_pruned is
folded into the output projection's bias of the pruned working copy. The means come for free from the scoring
forward passes that the client runs anyway.
"""

from __future__ import annotations

import torch
from torch import nn

from fedhead.models.head_map import HeadMap


class HeadContextMeans:
    """Records, per block, the mean over real tokens of the output projection's input (H * d values).

    Use as a context manager around forward passes of `model`; the attention mask is read from each call's
    keyword arguments (positions without one count as real).
    """

    def __init__(self, model: nn.Module, head_map: HeadMap, prefix: str) -> None:
        self.model, self.head_map, self.prefix = model, head_map, prefix
        self.sums = [torch.zeros(b.num_heads * b.head_dim, dtype=torch.float64) for b in head_map.blocks]
        self.counts = [0.0] * head_map.num_blocks
        self._mask: torch.Tensor | None = None
        self._handles: list = []

    def __enter__(self) -> HeadContextMeans:
        def top(_module, _args, kwargs):
            self._mask = kwargs.get("attention_mask")

        self._handles.append(self.model.register_forward_pre_hook(top, with_kwargs=True))
        for b, block in enumerate(self.head_map.blocks):
            module = self.model.get_submodule(self.prefix + block.projections["output"])

            def hook(_mod, args, b: int = b):
                x = args[0].detach().double()  # (B, T, H * d)
                mask = self._mask
                if mask is not None and mask.shape == x.shape[:2]:
                    w = mask.to(x.dtype).unsqueeze(-1)  # (B, T, 1)
                    self.sums[b] += (x * w).sum(dim=(0, 1)).cpu()
                    self.counts[b] += float(w.sum())
                else:
                    self.sums[b] += x.sum(dim=(0, 1)).cpu()
                    self.counts[b] += x.shape[0] * x.shape[1]

            self._handles.append(module.register_forward_pre_hook(hook))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def means(self) -> list[torch.Tensor]:
        """Per block, the mean context (H * d,) as float32 (zeros for a block never seen)."""
        return [(s / max(c, 1.0)).float() for s, c in zip(self.sums, self.counts, strict=True)]
