"""3D tensor-parallel layers and ``auto_parallelize``.

``layout`` defines which slice of each serial tensor a rank holds (``ShardSpec``), ``comm`` the
collectives paired with their adjoints, ``layers`` the parallel ``Linear`` / ``Embedding`` /
``Conv1D``, and ``auto`` the context manager that builds them inside unmodified models, ``chain`` the sharded
layout between consecutive layers, ``flow`` + ``autochain`` which layers get it automatically (at the
first forward), ``vocab_loss`` the cross-entropy on an LM head's vocabulary shards.
"""
from .auto import auto_parallelize, materialize, shard_layers
from .chain import chain
from .layers import Embedding, Linear, ShardedModule, conv1d_class, gather_full, spec_of
from .layout import ShardSpec
from .vocab_loss import vocab_parallel_cross_entropy, vocab_parallel_head

__all__ = ["Embedding", "Linear", "ShardSpec", "ShardedModule", "auto_parallelize", "chain", "conv1d_class",
           "gather_full", "materialize", "shard_layers", "spec_of", "vocab_parallel_cross_entropy", "vocab_parallel_head"]
