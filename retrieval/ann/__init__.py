"""Approximate and exact nearest-neighbour search: index policy, query execution, exact scan."""

from .exact import exact_topk, flat_storage
from .policy import (AUTO, IndexChoice, choose_index, configure, default_memory_budget,
                     enable_lookup, estimated_bytes_per_vector, inner_index, ivf_lists,
                     needs_training, rerank_for, retraining_due, training_minimum,
                     training_sample)
from .search import (index_positions, search_index, search_parameters, widened_ef,
                     widened_nprobe)

__all__ = [
    "AUTO", "IndexChoice", "choose_index", "configure", "default_memory_budget",
    "enable_lookup", "estimated_bytes_per_vector", "exact_topk", "flat_storage",
    "index_positions", "inner_index", "ivf_lists", "needs_training", "rerank_for",
    "retraining_due", "search_index", "search_parameters", "training_minimum",
    "training_sample", "widened_ef", "widened_nprobe",
]
