"""Approximate and exact nearest-neighbour search: index policy, query execution, exact scan."""

from .exact import exact_topk, flat_storage
from .policy import (AUTO, IndexChoice, add_by_shard, choose_index, configure,
                     default_memory_budget, enable_lookup, estimated_bytes_per_vector,
                     inner_index, ivf_lists, needs_training, remove_by_shard, rerank_for,
                     retraining_due, shard_list, shard_of, sharded, split_trained,
                     training_minimum, training_sample)
from .search import (index_positions, merge_topk, search_index, search_parameters,
                     search_shards, widened_ef, widened_nprobe)

__all__ = [
    "AUTO", "IndexChoice", "choose_index", "configure", "default_memory_budget",
    "enable_lookup", "estimated_bytes_per_vector", "exact_topk", "flat_storage",
    "index_positions", "inner_index", "ivf_lists", "needs_training", "rerank_for",
    "retraining_due", "search_index", "search_parameters", "training_minimum",
    "training_sample", "widened_ef", "widened_nprobe",
    # sharded layout
    "add_by_shard", "merge_topk", "remove_by_shard", "search_shards", "shard_list", "shard_of",
    "sharded", "split_trained",
]
