"""Pure index math behind ``autopar.data``: every order, partition and pairing is a function of
``(seed, epoch)`` and nothing else.

Why pure functions: each rank derives its own indices without talking to the others, and a job
restarted at step k recomputes exactly the state the uninterrupted job had at step k, however
many epochs (and, with local shuffling, partner exchanges) lie behind it. Anything kept between
calls is a cache of these functions, never a source of truth.
"""
from __future__ import annotations

import hashlib

import torch

PARTITIONS = ("contiguous", "random")


def generator(seed: int, *tags: object) -> torch.Generator:
    """A CPU generator seeded by a hash of ``(seed, *tags)``.

    Hashing rather than ``seed + epoch`` arithmetic keeps the streams of different epochs, shards
    and purposes independent and collision-free (seed 1 epoch 0 must not replay seed 0 epoch 1),
    and ``hashlib`` (unlike ``hash``) is the same in every process whatever PYTHONHASHSEED says.
    """
    digest = hashlib.sha256(repr((int(seed), *tags)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def split_sizes(num_samples: int, num_shards: int) -> list[int]:
    """Near-equal partition sizes: the first ``num_samples % num_shards`` shards get one more.
    Exchanges swap equal counts, so these sizes never change after epoch 0."""
    base, extra = divmod(num_samples, num_shards)
    return [base + (s < extra) for s in range(num_shards)]


def offsets(sizes: list[int]) -> list[int]:
    out = [0]
    for size in sizes:
        out.append(out[-1] + size)
    return out


def global_order(num_samples: int, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    """The order in which a global shuffle visits the dataset in ``epoch``."""
    if not shuffle:
        return torch.arange(num_samples)
    return torch.randperm(num_samples, generator=generator(seed, "global-order", epoch))


def initial_slots(num_samples: int, num_shards: int, seed: int, partition: str) -> torch.Tensor:
    """Epoch 0 partitions as one flat tensor: shard s owns ``slots[off[s]:off[s+1]]``.

    ``contiguous`` matches a dataset stored in ``num_shards`` consecutive files, one per reader;
    ``random`` spreads any ordering bias in the stored data (e.g. sorted by length) over shards.
    """
    if partition == "contiguous":
        return torch.arange(num_samples)
    if partition == "random":
        return torch.randperm(num_samples, generator=generator(seed, "initial-partition"))
    raise ValueError(f"partition={partition!r} must be one of {PARTITIONS}")


def pairs(num_shards: int, seed: int, epoch: int) -> list[tuple[int, int]]:
    """This epoch's partners: a seeded random perfect matching of the shards, new every epoch so
    samples diffuse over all shards rather than bouncing between two. With an odd number of
    shards one shard (a different one each epoch, by chance) sits the epoch out."""
    order = torch.randperm(num_shards, generator=generator(seed, "pairs", epoch)).tolist()
    return [(order[i], order[i + 1]) for i in range(0, num_shards - 1, 2)]


def swap_count(size_a: int, size_b: int, fraction: float) -> int:
    """Samples each side of a pair hands over: ``fraction`` of the smaller partition, rounded."""
    return int(round(fraction * min(size_a, size_b)))


def exchange(slots: torch.Tensor, sizes: list[int], seed: int, epoch: int, fraction: float) -> int:
    """Apply the exchange that opens ``epoch`` to ``slots`` in place; returns how many samples
    changed shard (both directions counted).

    Each side picks its ``swap_count`` samples at seeded random positions of its own partition and
    the two sets trade places, so partition sizes stay fixed and no sample is lost or duplicated.
    """
    off = offsets(sizes)
    src: list[torch.Tensor] = []
    dst: list[torch.Tensor] = []
    for a, b in pairs(len(sizes), seed, epoch):
        k = swap_count(sizes[a], sizes[b], fraction)
        if k == 0:
            continue
        pos_a = off[a] + torch.randperm(sizes[a], generator=generator(seed, "give", epoch, a))[:k]
        pos_b = off[b] + torch.randperm(sizes[b], generator=generator(seed, "give", epoch, b))[:k]
        src += [pos_a, pos_b]
        dst += [pos_b, pos_a]
    if not src:
        return 0
    from_pos, to_pos = torch.cat(src), torch.cat(dst)
    slots[to_pos] = slots[from_pos].clone()  # every position is written once: a pure permutation
    return len(from_pos)


class LocalPartitions:
    """The partitions at any epoch, found by replaying the exchanges from epoch 0.

    Replay is O(num_samples) per epoch and needs every shard's partition (a partner's gift depends
    on the partner's own history), but no communication. The latest epoch is cached, so walking
    forward epoch by epoch costs one exchange each; asking for an earlier epoch replays from 0.
    """

    def __init__(self, num_samples: int, num_shards: int, seed: int, fraction: float, partition: str) -> None:
        self.sizes = split_sizes(num_samples, num_shards)
        self.offsets = offsets(self.sizes)
        self._args = (num_samples, num_shards, seed, partition)
        self._seed = seed
        self._fraction = fraction
        self._epoch = 0
        self._slots = initial_slots(*self._args)

    def at(self, epoch: int) -> torch.Tensor:
        """Flat slots of ``epoch`` (shard s owns ``[offsets[s], offsets[s+1])``); read-only."""
        if epoch < self._epoch:
            self._epoch, self._slots = 0, initial_slots(*self._args)
        while self._epoch < epoch:
            self._epoch += 1
            exchange(self._slots, self.sizes, self._seed, self._epoch, self._fraction)
        return self._slots

    def partition(self, epoch: int, shard: int) -> torch.Tensor:
        return self.at(epoch)[self.offsets[shard]:self.offsets[shard + 1]]

    def order(self, epoch: int, shard: int) -> torch.Tensor:
        """The shard's partition in the order it is read in ``epoch``: its own seeded shuffle."""
        part = self.partition(epoch, shard)
        return part[torch.randperm(len(part), generator=generator(self._seed, "local-order", epoch, shard))]
