"""The frontier's tables and figures (bench/frontier.py table): the Markdown table of every row, the figure of
drop against FLOPs and upload, and the copies in docs/head_pruning.md, all from the records."""

from __future__ import annotations

import math
from collections.abc import Collection
from pathlib import Path

from common import ROOT
from frontier_protocol import COSTS, PROTOCOL_ROWS, RESULTS
from frontier_stats import contrasts, convergence, frontier_rows


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def table(results: Path, costs: Path = COSTS, tail_column: bool = False,
          only: Collection[str] | None = None) -> str:
    """The frontier table in Markdown; `tail_column` adds the row's mean-of-last-rounds model where its runs
    recorded one (screens: dense's 30-round screen has none, so the paired drop stays on the last round); `only`
    keeps just those rows (docs/head_pruning.md's copy: PROTOCOL_ROWS)."""
    tail_header = "| mean of last 5 rounds' models (unpaired) " if tail_column else ""
    lines = ["| row | options | heads pruned | seeds | model scored | accuracy (9,815 pairs) " + tail_header +
             "| drop vs dense, paired (pt) "
             "| 95% interval | training FLOPs saved | upload saved | download saved | client round time saved "
             "| local step time saved | peak training memory saved |",
             "|" + "---|" * (15 if tail_column else 14)]
    for r in frontier_rows(results, costs):
        if only is not None and r["row"] not in only:
            continue
        opts = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in r["overrides"].items()) or "-"
        interval = "-" if math.isnan(r["drop_low"]) else f"[{r['drop_low']:+.1f}, {r['drop_high']:+.1f}]"
        sd = "" if math.isnan(r["drop_sd"]) else f" ± {r['drop_sd']:.1f}"
        tail = ("-" if r["tail_accuracy"] is None else f"{r['tail_accuracy']:.4f}") + " | " if tail_column else ""
        lines.append(f"| {r['row']} | {opts} | {r['heads_pruned']:.0%} | {len(r['seeds'])} | {r['model']} | "
                     f"{r['accuracy']:.4f} | {tail}"
                     f"{r['drop']:+.1f}{sd} | {interval} | {_x(r['flops_saved'])} | {_x(r['upload_saved'])} | "
                     f"{_x(r['download_saved'])} | {_x(r['round_time_saved'])} | {_x(r['step_time_saved'])} | "
                     f"{_x(r['memory_saved'])} |")
    return "\n".join(lines)


def figure(results: Path, out: Path, title: str) -> Path:
    """Accuracy drop (with its 95% interval when a row has several seeds) against the training FLOPs and the
    upload bytes each row needs, as fractions of dense's (dense at (1, 0)); one point per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = frontier_rows(results)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, key, label in ((axes[0], "flops_saved", "training FLOPs (fraction of dense)"),
                           (axes[1], "upload_saved", "upload bytes (fraction of dense)")):
        for r in rows:
            if r[key] is None:
                continue
            x = 1 / r[key]
            err = None if math.isnan(r["drop_low"]) else [[r["drop"] - r["drop_low"]], [r["drop_high"] - r["drop"]]]
            ax.errorbar([x], [r["drop"]], yerr=err, fmt="o", capsize=3)
            ax.annotate(r["row"], (x, r["drop"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.axhline(2.0, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy drop vs dense, points (paired)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _update_readme(name: str, text: str, page: Path = ROOT / "docs" / "head_pruning.md") -> None:
    """Rewrite a page's copy of a table (docs/head_pruning.md: the frontier's), between `<!-- NAME:start -->` and
    `<!-- NAME:end -->`."""
    readme = page
    content = readme.read_text()
    start, end = f"<!-- {name}:start -->\n", f"\n<!-- {name}:end -->"
    if start in content and end in content:
        head, rest = content.split(start, 1)
        readme.write_text(head + start + text + end + rest.split(end, 1)[1])


# (records folder name, figure title): the protocol's table and the 30-round screens'
TABLES = (("frontier", "Frontier: 60 rounds, mean of the last 5 rounds' global models on 9,815 pairs, 95% interval "
           "over seeds"),
          ("screen30", "Screening: 30 rounds, one seed, last-round model on 9,815 pairs"))


def write_tables(results: Path = RESULTS) -> dict[str, str]:
    """`frontier.py table`: docs/results/frontier.md (every row, dense's convergence, the contrasts) and
    screen30.md from the records in `results` and its sibling screen30/, their figures docs/<name>.png and the
    copies in docs/head_pruning.md (the frontier's: PROTOCOL_ROWS only). Returns each page's text by name."""
    written = {}
    for name, title in TABLES:
        records = results if name == "frontier" else results.parent / name
        text = (table(records, tail_column=name == "screen30") if records.exists()
                else "No run has finished the full protocol yet.")
        short = text
        if name == "frontier" and records.exists():
            text += "\n\n" + convergence(records) + "\n\n" + contrasts(records)
            short = (table(records, only=PROTOCOL_ROWS) + "\n\nThe decomposition rows (A frozen on dense, and "
                     "the like) are in [results/frontier.md](results/frontier.md). " + convergence(records))
        (results.parent / f"{name}.md").write_text(text + "\n")
        if records.exists():
            figure(records, ROOT / "docs" / f"{name}.png", title)
            _update_readme(name, short)
        written[name] = text
    return written
