"""Which frozen LoRA A reads the input directions that dense LoRA ends up using? A diagnostic for `lora.freeze_a`.

With A frozen, a projection's update dW = s B A can only read the r input directions spanned by A's rows. A
trained dense run shows which directions its update reads: dW = s B A of its final global model. For each
candidate frozen A this script reports the share of that update's energy inside the candidate's row space,

    captured(A) = ||dW Q||_F^2 / ||dW||_F^2,   Q (in x r) an orthonormal basis of A's rows,

averaged over the LoRA modules (and listed per projection role). Candidates, each of rank r:
- `random`: peft's Kaiming-uniform A drawn with another seed (what `lora.freeze_a` freezes by default);
- `run_init`: the run's own initial A (biased upwards: the trained A started there);
- `principal`: W's top-r right singular vectors (`lora.init_a = "principal"`);
- `activations`: the top-r principal directions of the module's inputs on `--examples` training pairs at the
  initial model (EVA, Paischer et al. 2024);
- `gradient`: the top-r right singular vectors of dL/dW summed over the same pairs at the initial model (B = 0:
  the pretrained model with the fresh task head; LoRA-GA, Wang et al. 2024);
- `input_principal_N`: the same as `activations` on N random token sequences instead of text
  (`lora.init_a = "input_principal"`, data-free).
`activations` and `gradient` read the pooled training data, which no federated server has: they measure what a
client-side sketch could reach, not something fedhead builds.

    .venv/bin/python bench/frozen_a_subspace.py bench/results/frontier/seed0/dense \
        --json docs/results/frozen_a_subspace.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from peft.tuners.lora import LoraLayer

from fedhead.data.batching import collate
from fedhead.data.tasks import load_task_data
from fedhead.models import build_model
from fedhead.models.loading import INPUT_PRINCIPAL_SEQUENCES, input_principal_a_, principal_a_
from fedhead.trained import load_trained


def lora_modules(model: torch.nn.Module) -> dict[str, LoraLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def update_of(module: LoraLayer) -> torch.Tensor:
    """dW = s B A of the module's default adapter (out x in)."""
    return module.scaling["default"] * module.lora_B["default"].weight @ module.lora_A["default"].weight


def captured(dw: torch.Tensor, rows: torch.Tensor) -> float:
    """Share of ||dW||_F^2 inside the row space of `rows` (r x in)."""
    q, _ = torch.linalg.qr(rows.T.double())  # (in, r) orthonormal
    dw = dw.double()
    return float((dw @ q).pow(2).sum() / dw.pow(2).sum())


def data_directions(cfg, lm, examples: int, rank: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Top-`rank` input principal directions and gradient right singular vectors of every LoRA module's W, on
    `examples` training pairs at the model `lm` holds (batches of 32)."""
    model = lm.model.eval()
    modules = lora_modules(model)
    cov = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in modules.items()}
    grads = {n: torch.zeros(m.out_features, m.in_features, dtype=torch.float64) for n, m in modules.items()}
    mask: list[torch.Tensor] = []
    hooks = []
    for name, module in modules.items():
        base = module.get_base_layer()
        base.weight.requires_grad_(True)

        def keep_inputs(_, inputs, __, name=name):
            x = inputs[0].detach().double()[mask[0].bool()]  # (real tokens, in)
            cov[name] += x.T @ x

        hooks.append(base.register_forward_hook(keep_inputs))
    train = load_task_data(cfg, lm.tokenizer).train
    rows = train.shuffle(seed=cfg.seed).select(range(min(examples, len(train))))
    for start in range(0, len(rows), 32):
        batch = collate(rows[start : start + 32], lm.tokenizer)
        mask[:] = [batch["attention_mask"]]
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        for name, module in modules.items():
            grads[name] += module.get_base_layer().weight.grad.double()
    for h in hooks:
        h.remove()
    for module in modules.values():
        module.get_base_layer().weight.requires_grad_(False)
    act = {n: torch.linalg.eigh(c).eigenvectors[:, -rank:].T.float() for n, c in cov.items()}
    grad = {n: torch.linalg.svd(g, full_matrices=False).Vh[:rank].float() for n, g in grads.items()}
    return act, grad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a finished dense run (its final global model is the target)")
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--random-sequences", type=int, nargs="+", default=[INPUT_PRINCIPAL_SEQUENCES],
                        help="random token sequences for the input_principal candidates")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = load_trained(args.run_dir)
    cfg = run.cfg
    if cfg.lora.freeze_a or cfg.lora.head_rank is not None:
        raise SystemExit(f"{args.run_dir}: needs a run whose A was trained (standard LoRA, no lora.freeze_a)")
    trained = lora_modules(run.lm.model)
    labels = len(run.label_names)
    initial = build_model(cfg, labels, run.lm.tokenizer)
    other = build_model(cfg.model_copy(update={"seed": cfg.seed + 1000}), labels, run.lm.tokenizer)
    principal = build_model(cfg, labels, run.lm.tokenizer)
    with torch.no_grad():
        principal_a_(principal.model)
    act, grad = data_directions(cfg, initial, args.examples, cfg.lora.rank)

    def rows_of(lm) -> dict[str, torch.Tensor]:
        return {n: m.lora_A["default"].weight.detach() for n, m in lora_modules(lm.model).items()}

    candidates = {"random": rows_of(other), "run_init": rows_of(initial), "principal": rows_of(principal),
                  "activations": act, "gradient": grad}
    for sequences in args.random_sequences:
        text_free = build_model(cfg, labels, run.lm.tokenizer)
        input_principal_a_(text_free.model, run.lm.tokenizer, cfg.model.task, cfg.model.max_length,
                           cfg.model.max_target_length, cfg.seed, sequences=sequences)
        candidates[f"input_principal_{sequences}"] = rows_of(text_free)
    per_module = {name: {c: captured(update_of(module).detach(), rows[name]) for c, rows in candidates.items()}
                  for name, module in trained.items()}
    roles = sorted({name.rsplit(".", 1)[-1] for name in per_module})
    summary = {c: {"mean": statistics.mean(v[c] for v in per_module.values()),
                   **{role: statistics.mean(v[c] for n, v in per_module.items() if n.endswith("." + role))
                      for role in roles}}
               for c in candidates}
    print(f"share of the trained update dW = s B A inside each candidate's r = {cfg.lora.rank} row space "
          f"({args.run_dir}, round {run.round}, {len(per_module)} modules, {args.examples} pairs):")
    for c, v in summary.items():
        print(f"  {c:12s} mean {v['mean']:.3f}  " + "  ".join(f"{r} {v[r]:.3f}" for r in roles))
    if args.json:
        args.json.write_text(json.dumps({"run": str(args.run_dir), "round": run.round, "rank": cfg.lora.rank,
                                         "examples": args.examples, "summary": summary,
                                         "per_module": per_module}, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
