"""Data: loading task files or Hub datasets, tokenising, and partitioning across clients."""

from fedhead.data.loading import ClassificationData, DataError, load_classification_data
from fedhead.data.partition import label_histograms, partition_indices

__all__ = [
    "ClassificationData",
    "DataError",
    "label_histograms",
    "load_classification_data",
    "partition_indices",
]
