"""Slicing attention heads out of a model and merging the slices back.

Physical pruning (the compute saving): for each block the query/key/value output rows and the output
projection's input columns of the pruned heads are removed, together with their LoRA B rows (q/k/v) and LoRA A
columns (o), and the block's head count is updated. transformers 5 removed `prune_heads`, and `head_mask` is
ignored, so this module does it by hand (Michel et al. 2019 describe the same surgery). A block that keeps no
head contributes only the output projection's bias, exactly as if all its heads were gated to zero.

Grouped-query attention (LLaMA family): the query rows and output columns are cut by kept query heads, the key
and value rows by kept key/value units (a unit survives while any of its query heads does); the attention
module then maps each kept query head to its unit (`fedhead.models.llama_heads`).
"""

from __future__ import annotations

import warnings
from typing import cast

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from fedhead.models.head_map import HeadLayout, HeadMap, UnsupportedModelError, head_index
from fedhead.models.headwise import HeadwiseDown, HeadwiseUp


def slice_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A new Linear (of the same class: a head-wise LoRA factor stays one) keeping `index` of the output rows
    (dim=0) or input columns (dim=1); grads flags kept."""
    index = index.to(linear.weight.device)
    weight = linear.weight.detach().index_select(dim, index).clone()  # (out', in) or (out, in')
    bias = None
    if linear.bias is not None:
        bias = linear.bias.detach().clone() if dim == 1 else linear.bias.detach()[index].clone()
    with warnings.catch_warnings():  # a block that lost every head has a zero-sized projection
        warnings.simplefilter("ignore", UserWarning)
        new = torch.nn.utils.skip_init(
            type(linear), weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
            dtype=weight.dtype,
        )
    if isinstance(linear, HeadwiseUp | HeadwiseDown):
        new.head_dim = linear.head_dim
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    new.weight.requires_grad_(linear.weight.requires_grad)
    if bias is not None:
        new.bias.requires_grad_(linear.bias.requires_grad)
    return new


def _no_head_forward(self: nn.Module, hidden_states: torch.Tensor, *args: object, **kwargs: object):
    return hidden_states.new_zeros(*hidden_states.shape[:-1], 0), None  # (B, T, 0): no head, no context


_HEADLESS: dict[type, type] = {}


def make_headless_(attention: nn.Module) -> None:
    """Turn a self-attention module that lost every head into one that returns a (B, T, 0) context.

    Its projections stay in place (so parameter names do not change), they are just not called.
    """
    cls = type(attention)
    if cls not in _HEADLESS:
        _HEADLESS[cls] = type(f"Headless{cls.__name__}", (cls,), {"forward": _no_head_forward})
    attention.__class__ = _HEADLESS[cls]


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _slice_projection(model: nn.Module, path: str, kept_units: torch.Tensor, head_dim: int, dim: int) -> None:
    """Keep the units `kept_units` (bool [U]) of the projection at `path` along `dim` (0: output rows, 1: input
    columns): its weight and the LoRA factor split by head; a head-wise LoRA's other factor (A's rows of q/k/v,
    B's columns of o) loses the same units' r_h rows or columns."""
    index = head_index(kept_units.nonzero().flatten(), head_dim)
    module = model.get_submodule(path)
    if isinstance(module, LoraLayer):  # the head map's projections are Linears, and so are their LoRA factors
        module.base_layer = slice_linear(cast(nn.Linear, module.base_layer), index, dim)
        by_head, other = (module.lora_B, module.lora_A) if dim == 0 else (module.lora_A, module.lora_B)
        for name in list(by_head.keys()):
            headwise = isinstance(by_head[name], HeadwiseUp | HeadwiseDown)
            sliced = slice_linear(cast(nn.Linear, by_head[name]), index, dim)
            by_head[name] = sliced
            if headwise:
                rank = sliced.in_features if dim == 0 else sliced.out_features  # r_h
                other[name] = slice_linear(cast(nn.Linear, other[name]),
                                           head_index(kept_units.nonzero().flatten(), rank), dim)
        if dim == 0:
            module.out_features = len(index)
        else:
            module.in_features = len(index)
    else:
        _replace(model, path, slice_linear(cast(nn.Linear, module), index, dim))


def prune_heads_(
    model: nn.Module,
    head_map: HeadMap,
    kept_heads: torch.Tensor,
    prefix: str,
    head_means: list[torch.Tensor] | None = None,
) -> None:
    """Remove every head not in `kept_heads` (bool [blocks, heads]) from `model`, in place.

    head_means: per block, the mean context (H * d,) of the heads; when given, the removed heads' mean
    contribution W_o[:, pruned] m[pruned] (LoRA of o included) is added to the output projection's bias, so
    the pruned model equals the full model with those heads mean-ablated instead of zeroed.
    """
    if tuple(kept_heads.shape) != (head_map.num_blocks, head_map.num_heads):
        raise ValueError(f"kept_heads has shape {tuple(kept_heads.shape)}, expected "
                         f"({head_map.num_blocks}, {head_map.num_heads})")
    layout = HeadLayout(head_map.num_blocks, head_map.num_heads, head_map.head_dim)
    for b, block in enumerate(head_map.blocks):
        if bool(kept_heads[b].all()):
            continue
        if head_means is not None:
            _fold_mean_of_pruned(model, prefix + block.projections["output"], layout, kept_heads[b], head_means[b])
        for role, path in block.projections.items():
            group = block.group_of(role)
            kept_units = kept_heads[b].reshape(-1, group).any(-1)  # (H // group,): a unit lives while a head does
            _slice_projection(model, prefix + path, kept_units, block.head_dim, 1 if role == "output" else 0)
        _set_head_count(model, head_map, b, prefix, int(kept_heads[b].sum()), kept_heads[b])


@torch.no_grad()
def _fold_mean_of_pruned(
    model: nn.Module, path: str, layout: HeadLayout, kept: torch.Tensor, mean: torch.Tensor
) -> None:
    """Add o(mean context of the pruned heads) - o(0) to the output projection's (frozen) bias."""
    module = model.get_submodule(path)
    pruned = layout.head_index((~kept).nonzero().flatten())  # (p * head_dim,)
    context = torch.zeros_like(mean)
    context[pruned] = mean[pruned]  # (H * d,): only the pruned heads' mean
    base = cast(nn.Linear, module.base_layer if isinstance(module, LoraLayer) else module)
    context = context.to(base.weight)
    shift = base.weight @ context  # (D,)
    if isinstance(module, LoraLayer):
        for name in module.active_adapters:
            if name in module.lora_A:
                a = cast(nn.Linear, module.lora_A[name])  # modules: head-wise factors are not plain matmuls
                b = cast(nn.Linear, module.lora_B[name])
                shift += b(a(context.to(a.weight.dtype)[None]))[0] * module.scaling[name]
    if base.bias is None:
        base.bias = nn.Parameter(shift.clone(), requires_grad=False)
    else:
        base.bias.add_(shift)


def _set_head_count(model: nn.Module, head_map: HeadMap, b: int, prefix: str, k: int, kept: torch.Tensor) -> None:
    block = head_map.blocks[b]
    attention = model.get_submodule(prefix + block.attention)
    if head_map.architecture == "bert":
        if k == 0:
            make_headless_(attention)
            return
        attention.num_attention_heads = k  # type: ignore[assignment]  # torch: setattr takes any value
        attention.all_head_size = k * block.head_dim  # type: ignore[assignment]  # torch: setattr takes any value
    elif head_map.architecture == "t5":
        from fedhead.models.t5_heads import set_t5_heads

        set_t5_heads(attention, kept)
    elif head_map.architecture == "llama":
        from fedhead.models.llama_heads import set_llama_heads

        set_llama_heads(attention, kept)
    else:  # pragma: no cover - head_map_for rejects other architectures first
        raise NotImplementedError(head_map.architecture)


def gate_heads(model: nn.Module, head_map: HeadMap, gates: torch.Tensor, prefix: str) -> list:
    """Multiply each head's context by `gates[b, h]` before the output projection (an exact head gate).

    Under grouped-query attention `h` is a query head (the output projection's input is split by query heads).

    Returns the hook handles (call `.remove()` on each to undo). The gradient of the loss w.r.t. `gates`
    is the head importance of Michel et al. 2019.
    """
    handles = []
    for b, block in enumerate(head_map.blocks):
        module = model.get_submodule(prefix + block.projections["output"])

        def hook(_mod: nn.Module, args: tuple, b: int = b, h: int = block.num_heads, d: int = block.head_dim):
            x = args[0]  # (B, T, H * d)
            gated = (x.unflatten(-1, (h, d)) * gates[b].view(1, 1, h, 1).to(x)).flatten(-2)
            return (gated, *args[1:])

        handles.append(module.register_forward_pre_hook(hook))
    return handles


def gather_kept(full: dict[str, torch.Tensor], kept_heads: torch.Tensor, layout: HeadLayout) -> dict[str, torch.Tensor]:
    """Cut the kept heads' (or key/value units') slices out of full-shaped tensors; shared tensors pass as is."""
    out = {}
    for name, tensor in full.items():
        if name in layout.sliced:
            _, dim = layout.sliced[name]
            out[name] = tensor.index_select(dim, layout.index_of(name, kept_heads))
        else:
            out[name] = tensor
    return out


def scatter_kept(
    sliced: dict[str, torch.Tensor], kept_heads: torch.Tensor, layout: HeadLayout, base: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Inverse of `gather_kept`: write kept-head slices into copies of the full-shaped `base` tensors."""
    out = {}
    for name, tensor in sliced.items():
        if name in layout.sliced:
            _, dim = layout.sliced[name]
            full = base[name].clone()
            full.index_copy_(dim, layout.index_of(name, kept_heads), tensor.to(full.dtype))
            out[name] = full
        else:
            out[name] = tensor
    return out


def attach_frozen_heads(
    model: nn.Module, side: nn.Module, head_map: HeadMap, computed: torch.Tensor, prefix: str,
    side_heads: torch.Tensor | None = None,
) -> list:
    """Add back to `model` (already pruned to the `computed` heads) the heads it lacks, computed without autograd.

    `side` is an unpruned copy of the model before pruning; it is pruned here to `side_heads` (default: all the
    heads `model` lacks, ~computed; a subset of them leaves the others removed, as mixed mode does) and frozen.
    In every block, the side attention runs on the block's input under `torch.no_grad()` and its projected
    context W_o[:, side] ctx_side (LoRA of o included, the bias not twice) is added to the output projection's
    output. The forward is the whole model's (every head, global weights for the side heads); the
    backward and the tensors saved for it hold only the computed heads: the pruned heads' contribution is a
    constant to autograd, so the gradient reaching earlier blocks ignores the path through them. The side heads
    keep the values they had when attached: a shared LoRA tensor that trains (A of q/k/v, B of o) changes the
    kept heads only, so after the first step the side heads differ from train_sparse's unless `lora.freeze_a`.
    Supported: BERT-family encoders (output projection after the attention module) and LLaMA-family decoders
    (output projection inside it). Returns the hook handles.
    """
    if head_map.architecture not in ("bert", "llama"):
        raise UnsupportedModelError(
            f"heads.mode = 'sparse_backward' supports BERT- and LLaMA-family models, not {head_map.architecture}")
    side_heads = ~computed if side_heads is None else side_heads
    if bool((side_heads & computed).any()):
        raise ValueError("a head cannot be both in the model and in its no-grad side copy")
    side.requires_grad_(False)
    prune_heads_(side, head_map, side_heads, prefix)
    handles = []
    for b, block in enumerate(head_map.blocks):
        if not bool(side_heads[b].any()):
            continue
        side_attention = side.get_submodule(prefix + block.attention)
        side_output = side.get_submodule(prefix + block.projections["output"])
        attention = model.get_submodule(prefix + block.attention)
        output_inside = block.projections["output"].startswith(block.attention + ".")
        stash: list[torch.Tensor] = []

        def run_side(module: nn.Module, args: tuple, kwargs: dict, side_attention=side_attention,
                     side_output=side_output, output_inside=output_inside, stash=stash) -> None:
            side_attention.train(module.training)
            with torch.no_grad():
                out = side_attention(*args, **kwargs)[0]  # (B, T, D) projected, or (B, T, p * d) context
                if not output_inside:
                    base = side_output.base_layer if isinstance(side_output, LoraLayer) else side_output
                    out = side_output(out)
                    if base.bias is not None:
                        out = out - base.bias
            stash.append(out)

        handles.append(attention.register_forward_pre_hook(run_side, with_kwargs=True))
        if output_inside:
            def add_side(_m: nn.Module, _args: tuple, output, stash=stash):
                return (output[0] + stash.pop(), *output[1:])

            handles.append(attention.register_forward_hook(add_side))
        else:
            def add_projected(_m: nn.Module, _args: tuple, output: torch.Tensor, stash=stash) -> torch.Tensor:
                return output + stash.pop()

            o = model.get_submodule(prefix + block.projections["output"])
            handles.append(o.register_forward_hook(add_projected))
    return handles


def scale_kept_context(model: nn.Module, head_map: HeadMap, computed: torch.Tensor, prefix: str) -> list:
    """HeteroFL's scaler (Diao et al. 2021) for a model pruned to the `computed` heads: the context entering
    each block's output projection is multiplied by H / k_b (k_b: heads the block still computes), so the
    projection sees the magnitude the whole block would give. Training only: the handles carry
    `training_only = True` and the caller removes them before the model is evaluated."""
    handles = []
    for b, block in enumerate(head_map.blocks):
        k = int(computed[b].sum())
        if k in (0, block.num_heads):
            continue
        o = model.get_submodule(prefix + block.projections["output"])
        factor = block.num_heads / k

        def scale(_m: nn.Module, args: tuple, factor: float = factor) -> tuple:
            return (args[0] * factor, *args[1:])

        handle = o.register_forward_pre_hook(scale)
        handle.__dict__["training_only"] = True  # a marker RemovableHandle does not declare (read with getattr)
        handles.append(handle)
    return handles
