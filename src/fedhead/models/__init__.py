"""Models: loading a backbone + tokenizer with LoRA, the head map of each architecture, head slicing."""

from fedhead.models.head_map import Block, HeadLayout, HeadMap, UnsupportedModelError, head_map_for
from fedhead.models.loading import LoadedModel, SequenceClassifier, build_model, resolve_model_path

__all__ = [
    "Block",
    "HeadLayout",
    "HeadMap",
    "LoadedModel",
    "SequenceClassifier",
    "UnsupportedModelError",
    "build_model",
    "head_map_for",
    "resolve_model_path",
]
