"""Head-wise LoRA: every attention head its own low-rank adapter, so that both of its factors are split by head.

Standard LoRA adds dW = (alpha / r) B A to a projection. For query, key and value the rows of W (and of B) belong
to heads, but A (r x in) is shared by every head of the block; for the output projection the columns of W (and of
A) belong to heads, and B is shared. A client that trains a few heads must therefore either upload the shared
factor whole or freeze it (`lora.freeze_a`), and a shared factor trained by one head changes every head.

Head-wise LoRA with per-head rank r_h (`lora.head_rank`) gives head h its own pair. With U units along the split
dimension (heads; key/value heads under grouped-query attention) and d = head_dim:

    query/key/value:  dW[h*d:(h+1)*d, :] = s * B_h A_h,   A_h (r_h x in), B_h (d x r_h)
    output:           dW[:, h*d:(h+1)*d] = s * B_h A_h,   A_h (r_h x d),  B_h (out x r_h)
    s = alpha / r_h

It is a standard peft LoRA of rank R = U * r_h whose head-split factor is block-diagonal. Only the blocks are
stored: for q/k/v, lora_A stays peft's Linear (rows h*r_h:(h+1)*r_h are A_h) and lora_B becomes `HeadwiseUp`
(weight (U*d, r_h), rows h*d:(h+1)*d are B_h); for o, lora_A becomes `HeadwiseDown` (weight (r_h, U*d), columns
h*d:(h+1)*d are A_h) and lora_B stays peft's Linear (columns h*r_h:(h+1)*r_h are B_h). Both are nn.Linear
subclasses with nn.Linear's weight shape, so parameter names, state dicts and slicing by rows or columns are
those of standard LoRA; only their forward differs. peft computes `lora_B(lora_A(dropout(x))) * scaling`, which
is exact here; peft's merge (`get_delta_weight`) is not, so `standard_lora_` first replaces each compact factor
by its block-diagonal Linear (exports and saved adapters are plain peft LoRA of rank R, alpha alpha * U).

Each output element of a head sums r_h terms scaled by alpha / r_h, as standard LoRA sums r terms scaled by
alpha / r, so one Adam step moves a head's output by the same amount at the same alpha.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from fedhead.models.head_map import HeadMap


class HeadwiseUp(nn.Linear):
    """The compact B of a q/k/v head-wise adapter: weight (U*d, r_h); maps (..., U*r_h) to (..., U*d) by
    y[u*d:(u+1)*d] = B_u a[u*r_h:(u+1)*r_h] (a block-diagonal B)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None, dtype=None,
                 head_dim: int = 1) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.head_dim = head_dim

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        units, rank = self.out_features // self.head_dim, self.in_features
        blocks = self.weight.view(units, self.head_dim, rank)  # (U, d, r_h)
        out = torch.einsum("...ur,udr->...ud", a.unflatten(-1, (units, rank)), blocks)  # (..., U, d)
        return out.flatten(-2)  # (..., U*d)

    def block_diagonal(self) -> torch.Tensor:
        """The equivalent standard B, (U*d, U*r_h): block u on rows u*d:(u+1)*d, columns u*r_h:(u+1)*r_h."""
        units = self.out_features // self.head_dim
        return torch.block_diag(*self.weight.view(units, self.head_dim, self.in_features))


class HeadwiseDown(nn.Linear):
    """The compact A of an output-projection head-wise adapter: weight (r_h, U*d); maps (..., U*d) to
    (..., U*r_h) by a[u*r_h:(u+1)*r_h] = A_u x[u*d:(u+1)*d] (a block-diagonal A)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None, dtype=None,
                 head_dim: int = 1) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.head_dim = head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        units, rank = self.in_features // self.head_dim, self.out_features
        blocks = self.weight.view(rank, units, self.head_dim)  # (r_h, U, d)
        out = torch.einsum("...ud,rud->...ur", x.unflatten(-1, (units, self.head_dim)), blocks)  # (..., U, r_h)
        return out.flatten(-2)  # (..., U*r_h)

    def block_diagonal(self) -> torch.Tensor:
        """The equivalent standard A, (U*r_h, U*d): block u on rows u*r_h:(u+1)*r_h, columns u*d:(u+1)*d."""
        units = self.in_features // self.head_dim
        return torch.block_diag(*self.weight.view(self.out_features, units, self.head_dim).transpose(0, 1))


def headwise_patterns(head_map: HeadMap, roles: Sequence[str], head_rank: int, alpha: float,
                      prefix: str) -> tuple[dict[str, int], dict[str, float]]:
    """peft `rank_pattern` and `alpha_pattern` giving each head-wise projection rank U * r_h and alpha
    alpha * U (so peft's scaling alpha / r is the head-wise alpha / r_h)."""
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for block in head_map.blocks:
        for role, path in block.projections.items():
            if role in roles:
                units = block.num_heads // block.group_of(role)
                key = (prefix + path).replace(".", r"\.")
                ranks[key], alphas[key] = units * head_rank, alpha * units
    return ranks, alphas


def make_headwise_(model: nn.Module, head_map: HeadMap, roles: Sequence[str], head_rank: int, prefix: str) -> None:
    """Turn the standard LoRA of rank U * r_h that peft put on each projection of `roles` into head-wise LoRA, in
    place: the head-split factor becomes its compact module (B of q/k/v zero, as peft initialises B; A of o drawn
    per head like peft's A, uniform with bound 1 / sqrt(d), from the torch generator)."""
    for block in head_map.blocks:
        d = block.head_dim
        for role, path in block.projections.items():
            if role not in roles:
                continue
            module = model.get_submodule(prefix + path)
            if not isinstance(module, LoraLayer):
                raise TypeError(f"{prefix + path} has no LoRA adapter to make head-wise")
            for name in list(module.lora_A.keys()):
                old_a = cast(nn.Linear, module.lora_A[name])  # peft's LoRA of a Linear: both factors are Linears
                old_b = cast(nn.Linear, module.lora_B[name])
                dev, dtype = old_a.weight.device, old_a.weight.dtype
                if role == "output":
                    down = HeadwiseDown(old_a.in_features, head_rank, device=dev, dtype=dtype, head_dim=d)
                    nn.init.uniform_(down.weight, -d ** -0.5, d ** -0.5)
                    down.weight.requires_grad_(old_a.weight.requires_grad)
                    module.lora_A[name] = down
                else:
                    up = HeadwiseUp(head_rank, old_b.out_features, device=dev, dtype=dtype, head_dim=d)
                    nn.init.zeros_(up.weight)
                    up.weight.requires_grad_(old_b.weight.requires_grad)
                    module.lora_B[name] = up


@torch.no_grad()
def standard_lora_(model: nn.Module) -> None:
    """Replace every compact head-wise factor in `model` by the plain Linear holding its block-diagonal weight,
    in place: the forward is unchanged, and peft's merge and `save_pretrained` then see standard LoRA."""
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for factors in (module.lora_A, module.lora_B):
            for name in list(factors.keys()):
                compact = factors[name]
                if isinstance(compact, HeadwiseUp | HeadwiseDown):
                    weight = compact.block_diagonal()
                    plain = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device,
                                      dtype=weight.dtype)
                    plain.weight.copy_(weight)
                    plain.weight.requires_grad_(compact.weight.requires_grad)
                    factors[name] = plain


def is_headwise(model: nn.Module) -> bool:
    """Whether `model` holds a head-wise LoRA factor."""
    return any(isinstance(m, HeadwiseUp | HeadwiseDown) for m in model.modules())
