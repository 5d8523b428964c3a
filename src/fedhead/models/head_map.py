"""The attention heads of each architecture: which modules form a block and which slices belong to a head.

A head is the pair (block b, head h). For a projection whose *output* is split by heads (query, key,
value) head h owns output rows h*d:(h+1)*d of the weight, the bias, and LoRA B; for the output projection,
whose *input* is split by heads, head h owns input columns h*d:(h+1)*d of the weight and of LoRA A.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

# LoRA target names of the config -> role of the projection inside an attention block.
ROLES = ("query", "key", "value", "output")


class UnsupportedModelError(ValueError):
    """The model's architecture has no head map."""


@dataclass(frozen=True)
class Block:
    """One attention block: the module paths of its projections (relative to the backbone root)."""

    name: str
    attention: str  # module that computes the attention (holds the head-count attributes)
    projections: dict[str, str]  # role -> module path of the Linear
    num_heads: int
    head_dim: int
    kind: str = "self"  # "self" (encoder/decoder self-attention) or "cross"


@dataclass(frozen=True)
class HeadMap:
    """Every attention block of a backbone, in order; the architecture name says how to slice it."""

    architecture: str
    blocks: tuple[Block, ...]

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_heads(self) -> int:
        return self.blocks[0].num_heads

    @property
    def head_dim(self) -> int:
        return self.blocks[0].head_dim

    def lora_target_regex(self, roles: list[str], prefix: str = "") -> str:
        """A peft `target_modules` regex matching exactly the projections of `roles` in every block."""
        paths = sorted({b.projections[r] for b in self.blocks for r in roles})
        escaped = "|".join(p.replace(".", r"\.") for p in paths)
        return rf"^{re.escape(prefix)}({escaped})$"


def _bert_map(model: nn.Module, cfg) -> HeadMap:
    heads, d = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    blocks = []
    for i in range(cfg.num_hidden_layers):
        base = f"encoder.layer.{i}.attention"
        blocks.append(
            Block(
                name=f"layer{i}",
                attention=f"{base}.self",
                projections={
                    "query": f"{base}.self.query",
                    "key": f"{base}.self.key",
                    "value": f"{base}.self.value",
                    "output": f"{base}.output.dense",
                },
                num_heads=heads,
                head_dim=d,
            )
        )
    return HeadMap("bert", tuple(blocks))


def _t5_map(model: nn.Module, cfg) -> HeadMap:
    heads, d = cfg.num_heads, cfg.d_kv
    blocks = []

    def add(path: str, name: str, kind: str) -> None:
        proj = {"query": f"{path}.q", "key": f"{path}.k", "value": f"{path}.v", "output": f"{path}.o"}
        blocks.append(Block(name=name, attention=path, projections=proj, num_heads=heads, head_dim=d, kind=kind))

    for i in range(cfg.num_layers):
        add(f"encoder.block.{i}.layer.0.SelfAttention", f"enc{i}.self", "self")
    for i in range(cfg.num_decoder_layers):
        add(f"decoder.block.{i}.layer.0.SelfAttention", f"dec{i}.self", "self")
        add(f"decoder.block.{i}.layer.1.EncDecAttention", f"dec{i}.cross", "cross")
    return HeadMap("t5", tuple(blocks))


_MAPS = {"bert": _bert_map, "roberta": _bert_map, "xlm-roberta": _bert_map, "t5": _t5_map}


def head_map_for(backbone: nn.Module) -> HeadMap:
    """The head map of a Hugging Face backbone; unsupported architectures raise UnsupportedModelError."""
    cfg = backbone.config
    builder = _MAPS.get(getattr(cfg, "model_type", ""))
    if builder is None:
        raise UnsupportedModelError(
            f"no head map for model class {type(backbone).__name__} (model_type "
            f"'{getattr(cfg, 'model_type', '?')}'); supported: {', '.join(sorted(_MAPS))}"
        )
    return builder(backbone, cfg)


@dataclass
class HeadLayout:
    """Which trainable tensors are split by heads: parameter name -> (block index, dimension of the split).

    Built from a head map and the trainable parameter names of a LoRA model; every other trainable tensor
    (LoRA A of q/k/v unless frozen, LoRA B of o, the task head) is shared.
    """

    num_blocks: int
    num_heads: int
    head_dim: int
    sliced: dict[str, tuple[int, int]] = field(default_factory=dict)

    @classmethod
    def from_model(cls, head_map: HeadMap, trainable_names: list[str], prefix: str) -> HeadLayout:
        """Match `<prefix><projection>.lora_B.*` (q/k/v) and `.lora_A.*` (o) among `trainable_names`."""
        sliced: dict[str, tuple[int, int]] = {}
        for b, block in enumerate(head_map.blocks):
            for role, path in block.projections.items():
                part, dim = ("lora_A", 1) if role == "output" else ("lora_B", 0)
                wanted = f"{prefix}{path}.{part}."
                for name in trainable_names:
                    if name.startswith(wanted) and name.endswith(".weight"):
                        sliced[name] = (b, dim)
        return cls(head_map.num_blocks, head_map.num_heads, head_map.head_dim, sliced)

    def head_index(self, heads: torch.Tensor) -> torch.Tensor:
        """Row/column indices owned by `heads` (1-D tensor of head ids) along a split dimension."""
        d = self.head_dim
        if heads.numel() == 0:
            return torch.zeros(0, dtype=torch.long)
        return (heads.long()[:, None] * d + torch.arange(d)[None, :]).reshape(-1)

    def kept_index(self, kept_heads: torch.Tensor, block: int) -> torch.Tensor:
        """Indices of the kept heads of `block` along a split dimension (`kept_heads`: bool [blocks, heads])."""
        return self.head_index(kept_heads[block].nonzero().flatten())
