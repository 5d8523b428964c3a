"""fedhead's sequence classifier as a transformers model, for `fedhead export` directories.

This file is copied into an exported model directory and loaded from there by transformers
(`AutoModelForSequenceClassification.from_pretrained(DIR, trust_remote_code=True)`), so it imports only torch and
transformers, never fedhead. It computes what `fedhead.models.loading.SequenceClassifier` computes: an encoder
(BERT, RoBERTa, XLM-R), a pooling of its last hidden states h (B, T, D) and a linear classifier:

    'mean'    : pooled = sum_t mask_t h_t / max(sum_t mask_t, 1)
    'cls_raw' : pooled = h_0                      (the first token's last hidden state)
    'cls'     : pooled = tanh(W_p h_0 + b_p)      (the encoder's pooler)
    logits    = W pooled + b                      (B, num_labels)

No transformers class pools by the attention-masked mean (BertForSequenceClassification and its kind use the
pooler over the first token), hence this file.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput


class PooledClassifierConfig(PretrainedConfig):
    """encoder: the encoder's own config as a dict (with its model_type); pooling: 'mean', 'cls_raw' or 'cls'."""

    model_type = "fedhead_pooled_classifier"

    def __init__(self, encoder: dict | None = None, pooling: str = "mean", classifier_dropout: float = 0.1,
                 **kwargs) -> None:
        self.encoder = dict(encoder or {"model_type": "bert"})
        self.pooling = pooling
        self.classifier_dropout = classifier_dropout
        super().__init__(**kwargs)


class PooledClassifier(PreTrainedModel):
    """Encoder + pooling + linear classifier (see the module docstring)."""

    config_class = PooledClassifierConfig
    base_model_prefix = "encoder"

    def __init__(self, config: PooledClassifierConfig) -> None:
        super().__init__(config)
        encoder_config = AutoConfig.for_model(**config.encoder)
        self.encoder = AutoModel.from_config(encoder_config, add_pooling_layer=config.pooling == "cls")
        if config.num_labels is None:  # PretrainedConfig sets id2label (two labels by default), so never in practice
            raise ValueError("PooledClassifierConfig has no labels (id2label)")
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(encoder_config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: object,
    ) -> SequenceClassifierOutput:
        if input_ids is None:
            raise ValueError("PooledClassifier needs input_ids")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra)
        hidden = out.last_hidden_state  # (B, T, D)
        if self.config.pooling == "cls":
            pooled = out.pooler_output
        elif self.config.pooling == "cls_raw":
            pooled = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        logits = self.classifier(self.dropout(pooled))  # (B, num_labels)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)
