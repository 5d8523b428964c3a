"""The attention heads of each architecture: which modules form a block and which slices belong to a head.

A head is the pair (block b, head h). For a projection whose *output* is split by heads (query, key,
value) head h owns output rows h*d:(h+1)*d of the weight, the bias, and LoRA B; for the output projection,
whose *input* is split by heads, head h owns input columns h*d:(h+1)*d of the weight and of LoRA A.

Grouped-query attention (LLaMA family): a block has H query heads but only G key/value heads, each shared by
group = H // G consecutive query heads. The key and value projections are split by *units* of `group` query
heads: unit u owns rows u*d:(u+1)*d and is kept when any of its query heads u*group..(u+1)*group-1 is kept
(it is pruned only when all of them are). With group 1 (BERT, T5, multi-head LLaMA) a unit is a head.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
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
    num_kv_heads: int | None = None  # key/value heads (grouped-query attention); None: one per query head

    @property
    def kv_group(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return self.num_heads // (self.num_kv_heads or self.num_heads)

    def group_of(self, role: str) -> int:
        """Query heads per unit along the split dimension of the projection `role`."""
        return self.kv_group if role in ("key", "value") else 1


@dataclass(frozen=True)
class HeadMap:
    """Every attention block of a backbone, in order; the architecture name says how to slice it."""

    architecture: str
    blocks: tuple[Block, ...]
    feed_forward: tuple[str, ...] = ()  # paths of the feed-forward Linears (not split by heads; shared)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_heads(self) -> int:
        return self.blocks[0].num_heads

    @property
    def head_dim(self) -> int:
        return self.blocks[0].head_dim

    def layer_of(self, path: str) -> str:
        """The transformer layer a module path belongs to: the path up to its first numeric part
        ('encoder.layer.3.attention.self' -> 'encoder.layer.3.'; T5's decoder self- and cross-attention blocks and
        feed-forward of one layer share 'decoder.block.i.')."""
        parts = path.split(".")
        index = next((i for i, p in enumerate(parts) if p.isdigit()), len(parts) - 1)
        return ".".join(parts[: index + 1]) + "."

    def check_blocks(self, blocks: list[int]) -> None:
        """Raise UnsupportedModelError naming lora.layers when a block index is not one of this model's."""
        missing = [b for b in blocks if not 0 <= b < self.num_blocks]
        if missing:
            raise UnsupportedModelError(f"lora.layers: block {missing[0]} does not exist; this model has "
                                        f"{self.num_blocks} attention blocks (0-{self.num_blocks - 1})")

    def lora_target_regex(self, roles: Sequence[str], prefix: str = "", blocks: list[int] | None = None) -> str:
        """A peft `target_modules` regex matching exactly the projections of `roles` in every block, or in
        `blocks` (indices into `self.blocks`) only ('feed_forward': the feed-forward Linears of those blocks'
        layers too)."""
        chosen = [self.blocks[b] for b in blocks] if blocks is not None else list(self.blocks)
        paths = sorted({b.projections[r] for b in chosen for r in roles if r in ROLES})
        if "feed_forward" in roles:
            layers = {self.layer_of(b.attention) for b in chosen}
            paths += sorted(p for p in self.feed_forward if blocks is None or self.layer_of(p) in layers)
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
    ffn = tuple(f"encoder.layer.{i}.{m}.dense" for i in range(cfg.num_hidden_layers)
                for m in ("intermediate", "output"))
    return HeadMap("bert", tuple(blocks), ffn)


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
    ffn = [f"encoder.block.{i}.layer.1.DenseReluDense" for i in range(cfg.num_layers)]
    ffn += [f"decoder.block.{i}.layer.2.DenseReluDense" for i in range(cfg.num_decoder_layers)]
    linears = ("wi_0", "wi_1", "wo") if getattr(cfg, "is_gated_act", False) else ("wi", "wo")
    return HeadMap("t5", tuple(blocks), tuple(f"{p}.{m}" for p in ffn for m in linears))


def _llama_map(model: nn.Module, cfg) -> HeadMap:
    """LLaMA-style decoders (LLaMA, Mistral, Qwen2): `[model.]layers.{i}.self_attn.{q,k,v,o}_proj`, with GQA.

    Paths are relative to a causal-LM (or classification) wrapper whose decoder is `.model`, or to a bare decoder.
    """
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} key/value heads")
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    root = "model." if isinstance(getattr(model, "model", None), nn.Module) and hasattr(model.model, "layers") else ""
    if not root and not hasattr(model, "layers"):
        raise UnsupportedModelError(f"{type(model).__name__} has neither `model.layers` nor `layers`")
    blocks = []
    for i in range(cfg.num_hidden_layers):
        base = f"{root}layers.{i}.self_attn"
        proj = {role: f"{base}.{short}_proj" for role, short in zip(ROLES, "qkvo", strict=True)}
        blocks.append(Block(name=f"layer{i}", attention=base, projections=proj, num_heads=heads, head_dim=d,
                            num_kv_heads=kv_heads))
    ffn = tuple(f"{root}layers.{i}.mlp.{m}_proj" for i in range(cfg.num_hidden_layers) for m in ("gate", "up", "down"))
    return HeadMap("llama", tuple(blocks), ffn)


_MAPS = {
    "bert": _bert_map,
    "roberta": _bert_map,
    "xlm-roberta": _bert_map,
    "t5": _t5_map,
    "llama": _llama_map,
    "mistral": _llama_map,
    "qwen2": _llama_map,
}


def supported_model_types() -> set[str]:
    """The Hugging Face `model_type` values fedhead has a head map for."""
    return set(_MAPS)


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


def unit_index(kept: torch.Tensor, group: int, head_dim: int) -> torch.Tensor:
    """Indices along a split dimension of the units kept under `kept` (bool [H]): unit u groups query heads
    u*group..(u+1)*group-1, owns indices u*d:(u+1)*d, and is kept when any of its heads is."""
    units = kept.reshape(-1, group).any(-1) if group > 1 else kept  # (H // group,)
    return head_index(units.nonzero().flatten(), head_dim)


def head_index(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row/column indices owned by `heads` (1-D tensor of head or unit ids) along a split dimension."""
    if heads.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    return (heads.long()[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)  # (n * d,)


@dataclass
class HeadLayout:
    """Which trainable tensors are split by heads: parameter name -> (block index, dimension of the split).

    Built from a head map and the trainable parameter names of a LoRA model; every other trainable tensor
    (LoRA A of q/k/v unless frozen, LoRA B of o, the task head) is shared. `groups` gives, per sliced tensor,
    the query heads of one unit along its split dimension (> 1 only for key/value under grouped-query
    attention; a name missing from it has 1). `units` gives, per sliced tensor, the indices one unit owns along
    its split dimension (head_dim, or the per-head rank r_h for the head-wise LoRA factors A of q/k/v and B of o,
    `fedhead.models.headwise`; a name missing from it has head_dim). Use `index_of` and `row_weights`, which know
    both.
    """

    num_blocks: int
    num_heads: int
    head_dim: int
    sliced: dict[str, tuple[int, int]] = field(default_factory=dict)
    groups: dict[str, int] = field(default_factory=dict)
    units: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_model(cls, head_map: HeadMap, trainable_names: list[str], prefix: str,
                   head_rank: int | None = None) -> HeadLayout:
        """Match `<prefix><projection>.lora_B.*` (q/k/v) and `.lora_A.*` (o) among `trainable_names`; with
        head-wise LoRA of rank `head_rank` also `.lora_A.*` (q/k/v, rows of r_h) and `.lora_B.*` (o, columns)."""
        sliced: dict[str, tuple[int, int]] = {}
        groups: dict[str, int] = {}
        units: dict[str, int] = {}
        for b, block in enumerate(head_map.blocks):
            for role, path in block.projections.items():
                # q/k/v split their output rows by head (B's rows; head-wise: also A's rows), o its input columns
                # (A's columns; head-wise: also B's columns); the head-wise factor's unit is r_h, not head_dim
                dim = 1 if role == "output" else 0
                wanted = [("lora_A" if role == "output" else "lora_B", block.head_dim)]
                if head_rank is not None:
                    wanted.append(("lora_B" if role == "output" else "lora_A", head_rank))
                for part, unit in wanted:
                    start = f"{prefix}{path}.{part}."
                    for name in trainable_names:
                        if name.startswith(start) and name.endswith(".weight"):
                            sliced[name] = (b, dim)
                            if unit != head_map.head_dim:
                                units[name] = unit
                            if block.group_of(role) > 1:
                                groups[name] = block.group_of(role)
        return cls(head_map.num_blocks, head_map.num_heads, head_map.head_dim, sliced, groups, units)

    def group_of(self, name: str) -> int:
        """Query heads per unit along the split dimension of the sliced tensor `name`."""
        return self.groups.get(name, 1)

    def unit_of(self, name: str) -> int:
        """Indices one unit owns along the split dimension of the sliced tensor `name`."""
        return self.units.get(name, self.head_dim)

    def index_of(self, name: str, kept_heads: torch.Tensor) -> torch.Tensor:
        """Indices kept along the split dimension of the sliced tensor `name` (`kept_heads`: bool [blocks, H])."""
        block, _ = self.sliced[name]
        return unit_index(kept_heads[block], self.group_of(name), self.unit_of(name))

    def row_weights(self, name: str, head_weights: torch.Tensor) -> torch.Tensor:
        """Per-head weights (..., H) -> weights (..., units * unit size) along the split dimension of `name`.

        A unit of g query heads gets the mean of its heads' weights (heads the caller zeroed count as 0).
        """
        group = self.group_of(name)
        w = head_weights if group == 1 else head_weights.unflatten(-1, (-1, group)).mean(-1)  # (..., H // g)
        return w.repeat_interleave(self.unit_of(name), dim=-1)  # (..., H // g * unit)

    def head_index(self, heads: torch.Tensor) -> torch.Tensor:
        """Row/column indices owned by `heads` (1-D tensor of head ids) along a split dimension of head_dim units."""
        return head_index(heads, self.head_dim)

    def kept_index(self, kept_heads: torch.Tensor, block: int) -> torch.Tensor:
        """Indices of the kept *query* heads of `block` (`kept_heads`: bool [blocks, heads]); for a named tensor
        use `index_of`, which also handles key/value units under grouped-query attention."""
        return self.head_index(kept_heads[block].nonzero().flatten())
