"""Data: loading task files or Hub datasets, tokenising, and partitioning across clients."""

from fedhead.data.generation import GenerationData, load_generation_data
from fedhead.data.loading import ClassificationData, DataError, load_classification_data
from fedhead.data.partition import label_histograms, partition_indices

__all__ = [
    "ClassificationData",
    "DataError",
    "GenerationData",
    "label_histograms",
    "load_classification_data",
    "load_generation_data",
    "partition_indices",
]
