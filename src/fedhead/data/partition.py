"""Partitioning a training set across clients with flwr-datasets' partitioners (IID, Dirichlet label skew)."""

from __future__ import annotations

import datasets
import numpy as np
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

from fedhead.config import ConfigError, PartitionSection


def partition_indices(labels: list[int], cfg: PartitionSection, seed: int) -> list[np.ndarray]:
    """Indices into the training set held by each client, `num_clients` arrays (seeded).

    IID shuffles with the seed and cuts equal contiguous shards; Dirichlet draws each client's label mix
    from Dir(alpha) (Hsu et al. 2019) and redraws until every client holds `min_partition_size` examples.
    """
    n = len(labels)
    if cfg.num_clients > n:
        raise ValueError(f"partition.num_clients ({cfg.num_clients}) exceeds the {n} training examples")
    table = datasets.Dataset.from_dict({"label": list(labels), "row": list(range(n))})
    if cfg.method == "iid":
        table = table.shuffle(seed=seed)
        partitioner = IidPartitioner(num_partitions=cfg.num_clients)
    else:
        partitioner = DirichletPartitioner(
            num_partitions=cfg.num_clients,
            partition_by="label",
            alpha=cfg.alpha,
            min_partition_size=cfg.min_partition_size,
            self_balancing=False,
            seed=seed,
        )
    partitioner.dataset = table
    try:
        return [np.asarray(partitioner.load_partition(i)["row"], dtype=np.int64) for i in range(cfg.num_clients)]
    except ValueError as err:
        if cfg.method != "dirichlet" or "attempts" not in str(err):
            raise
        raise ConfigError(
            f"partition: Dirichlet(partition.alpha = {cfg.alpha:g}) draws could not give each of the "
            f"{cfg.num_clients} clients partition.min_partition_size = {cfg.min_partition_size} of the {n} training "
            "examples: raise partition.alpha, lower partition.min_partition_size or partition.num_clients, or "
            "train on more examples (data.train_size)") from None


def label_histograms(labels: list[int], parts: list[np.ndarray], num_labels: int) -> list[list[int]]:
    """Per-client label counts, `[num_clients][num_labels]`."""
    arr = np.asarray(labels)
    return [np.bincount(arr[p], minlength=num_labels).tolist() for p in parts]
