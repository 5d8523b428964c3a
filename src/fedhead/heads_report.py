"""`fedhead heads`: score the configured model's heads on a sample of the data and draw a heat map."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fedhead.config import Config


def plot_head_scores(scores: torch.Tensor, path: Path, title: str, block_names: list[str] | None = None) -> None:
    """Save a blocks-by-heads heat map of `scores` to `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks, heads = scores.shape
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * heads, 1.0 + 0.4 * blocks))
    im = ax.imshow(scores.numpy(), cmap="viridis", aspect="auto")
    ax.set_xlabel("head")
    ax.set_ylabel("block")
    ax.set_xticks(range(heads))
    ax.set_yticks(range(blocks), labels=block_names or [str(b) for b in range(blocks)])
    for b in range(blocks):
        for h in range(heads):
            ax.text(h, b, f"{float(scores[b, h]):.2f}", ha="center", va="center", fontsize=6, color="w")
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def score_and_plot(cfg: Config, out: Path, samples: int) -> Path:
    """Score heads with `cfg.heads.importance` on `samples` training examples; write PNG and JSON, return JSON path."""
    from fedhead.data.batching import batches_of
    from fedhead.data.loading import DataError
    from fedhead.data.tasks import load_task_data
    from fedhead.heads.importance import score_heads
    from fedhead.models.loading import load_tokenizer
    from fedhead.trained import build_run_model

    torch.set_num_threads(cfg.threads or torch.get_num_threads())
    tokenizer = load_tokenizer(cfg)
    data = load_task_data(cfg, tokenizer)
    lm = build_run_model(cfg, data.num_labels, tokenizer)
    if data.train is None:
        raise DataError("heads scores the training data: the config names no data.train")
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(data.train), generator=gen)[:samples].tolist()
    batches = batches_of(data.train, order, cfg.federated.eval_batch_size, lm.tokenizer)
    special = lm.tokenizer.all_special_ids if cfg.heads.exclude_special_tokens else []
    scores, loss = score_heads(lm.model, lm.head_map, batches, cfg.heads.importance, special_ids=special,
                               prefix=lm.prefix, generator=gen)
    names = [b.name for b in lm.head_map.blocks]
    plot_head_scores(scores, out, f"{cfg.heads.importance} ({cfg.model.name}, {len(order)} examples)", names)
    json_path = out.with_suffix(".json")
    json_path.write_text(json.dumps({"method": cfg.heads.importance, "blocks": names, "samples": len(order),
                                     "scores": scores.tolist(), "loss": loss}, indent=1))
    return json_path
