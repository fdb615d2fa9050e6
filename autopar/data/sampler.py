"""``GlobalBatchSampler``: this rank's share of every global batch, as dataset indices.

Why a batch sampler rather than a per-sample one: the engine's contract is about *global*
batches (a step on any grid equals a serial step on the same global batch), so the sampler first
decides the global batch of ``global_batch_size`` indices and then hands this rank exactly the
rows ``autopar.shard_batch`` would cut from it: ``dp*z`` contiguous slices, slice number
``grid.batch_shard_index``. Ranks that differ only in pp, x or y get the same indices; every
pipeline stage gets data, since the last stage needs the labels.

Position is a single global step count. Epoch and step-in-epoch follow from it, and every order is
a pure function of ``(seed, epoch)`` (``order.py``), so ``start_step=k`` resumes exactly where an
uninterrupted run would be at step k, across epoch boundaries and local-shuffle exchanges.
"""
from __future__ import annotations

from typing import Any, Iterator, Sized

import torch
from torch.utils.data import Sampler

from . import order as _order


def _positive_int(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")
    return value


class GlobalBatchSampler(Sampler[list[int]]):
    """Yields, per step, the list of dataset indices this rank trains on.

    Global shuffle (``local_shuffle=None``): each epoch is one seeded permutation of the whole
    dataset, cut into consecutive global batches.

    Local shuffle (``local_shuffle=f`` in [0, 1]): the dataset is split once into ``num_shards``
    partitions, one per batch shard. At the start of every epoch after the first, shards pair up
    with a partner (a new seeded pairing each epoch) and swap ``f`` of their samples; then each
    shard shuffles its own partition and reads its local batches from it. The global batch is the
    concatenation of the shards' local batches: still ``global_batch_size`` samples, each sample
    still seen at most once per epoch (exactly once without dropped remainders). What is lost
    against a global shuffle: a global batch never mixes samples the way a full permutation
    would (shard s's slice always comes from shard s's partition), the mix across shards is only
    as good as the exchanges so far (f=0 never mixes), and the stream depends on ``num_shards``,
    so it changes if the grid's dp*z changes. What is gained: a shard reads only its own partition
    plus the swapped samples, ``moved_samples(epoch)`` ~ f*N per epoch instead of ~(n-1)/n*N.

    Ragged last batch: ``drop_last=True`` (the default) drops the ``N % global_batch_size``
    leftover samples of each epoch (different ones every epoch when shuffling), because every rank
    must get an equal batch that splits evenly into microbatches. ``drop_last=False`` completes
    the last batch by wrapping around to the start of the epoch's order (of each shard's own
    order, with local shuffling), so a few samples are seen twice in that epoch.

    Iteration: ``iter()`` yields from the current step to the end of its epoch and advances the
    step as batches are taken, so ``for epoch ...: for batch in loader`` walks epoch after epoch
    and a resumed sampler first finishes the interrupted epoch. ``len()`` is the steps left in the
    current epoch. With DataLoader workers the sampler runs ahead of training by the prefetched
    batches, so resume from the number of steps actually trained (``start_step=`` or
    ``state_dict(step=...)``).
    """

    def __init__(self, data_source: Sized | int, global_batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = True, local_shuffle: float | None = None, partition: str = "contiguous",
                 start_step: int = 0, shard: int | None = None, num_shards: int | None = None) -> None:
        num_samples = data_source if isinstance(data_source, int) else len(data_source)
        self.num_samples = _positive_int("dataset size", num_samples)
        self.global_batch_size = _positive_int("global_batch_size", global_batch_size)
        self.shard, self.num_shards = self._resolve_shard(shard, num_shards)
        if global_batch_size % self.num_shards:
            raise ValueError(
                f"global_batch_size={global_batch_size} is not divisible by the {self.num_shards} batch shards "
                f"(dp*z); use a multiple of {self.num_shards}")
        if self.num_samples < global_batch_size:
            raise ValueError(f"the dataset has {self.num_samples} samples, fewer than one global batch of "
                             f"{global_batch_size}; use a smaller global_batch_size or more data")
        if local_shuffle is not None:
            if isinstance(local_shuffle, bool) or not isinstance(local_shuffle, (int, float)) \
                    or not 0.0 <= local_shuffle <= 1.0:
                raise ValueError(f"local_shuffle={local_shuffle!r} must be a fraction in [0, 1] "
                                 "(or None for a global shuffle)")
            if not shuffle:
                raise ValueError("local_shuffle needs shuffle=True: it is a way of shuffling")
        if partition not in _order.PARTITIONS:
            raise ValueError(f"partition={partition!r} must be one of {_order.PARTITIONS}")
        if not isinstance(start_step, int) or isinstance(start_step, bool) or start_step < 0:
            raise ValueError(f"start_step={start_step!r} must be a non-negative integer")
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.local_shuffle = None if local_shuffle is None else float(local_shuffle)
        self.partition = partition
        self.local_batch_size = global_batch_size // self.num_shards
        full, rest = divmod(self.num_samples, global_batch_size)
        self.steps_per_epoch = full if drop_last or not rest else full + 1
        self._step = start_step
        self._partitions = None if self.local_shuffle is None else _order.LocalPartitions(
            self.num_samples, self.num_shards, self.seed, self.local_shuffle, partition)
        self._cache_epoch = -1
        self._cache: dict[Any, torch.Tensor] = {}

    @staticmethod
    def _resolve_shard(shard: int | None, num_shards: int | None) -> tuple[int, int]:
        if (shard is None) != (num_shards is None):
            raise ValueError("give both shard= and num_shards=, or neither (then the current grid decides)")
        if shard is None:
            from ..runtime.state import current_grid, is_initialized

            if not is_initialized():
                raise RuntimeError("autopar is not initialised: call autopar.init(...) first, or pass "
                                   "shard= and num_shards= (the batch shard index and dp*z)")
            grid = current_grid()
            return grid.batch_shard_index, grid.batch_shards
        _positive_int("num_shards", num_shards)
        if not isinstance(shard, int) or isinstance(shard, bool) or not 0 <= shard < num_shards:
            raise ValueError(f"shard={shard!r} must be an integer in [0, {num_shards})")
        return shard, num_shards

    # -- position ---------------------------------------------------------------------------------
    @property
    def step(self) -> int:
        """The global step whose batch the sampler yields next."""
        return self._step

    @property
    def epoch(self) -> int:
        return self._step // self.steps_per_epoch

    def set_step(self, step: int) -> None:
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step={step!r} must be a non-negative integer")
        self._step = step

    def __len__(self) -> int:
        return self.steps_per_epoch - self._step % self.steps_per_epoch

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(len(self)):
            batch = self.indices(self._step)
            self._step += 1  # after computing, so a failure leaves the position on the failed step
            yield batch

    # -- index math -------------------------------------------------------------------------------
    def _epoch_cache(self, epoch: int) -> dict[Any, torch.Tensor]:
        """Orders of one epoch, kept until another epoch is asked for (one epoch is O(N) ints)."""
        if epoch != self._cache_epoch:
            self._cache_epoch, self._cache = epoch, {}
        return self._cache

    def _window(self, start: int, length: int, size: int) -> torch.Tensor:
        pos = torch.arange(start, start + length)
        return pos % size if not self.drop_last else pos  # wrap-around only fills a ragged last batch

    def shard_indices(self, step: int, shard: int) -> torch.Tensor:
        """Indices batch shard ``shard`` reads at global step ``step``."""
        epoch, b = divmod(step, self.steps_per_epoch)
        cache = self._epoch_cache(epoch)
        n_local = self.local_batch_size
        if self._partitions is None:
            if "global" not in cache:
                cache["global"] = _order.global_order(self.num_samples, self.seed, epoch, self.shuffle)
            order = cache["global"]
            return order[self._window(b * self.global_batch_size + shard * n_local, n_local, len(order))]
        if shard not in cache:
            cache[shard] = self._partitions.order(epoch, shard)
        order = cache[shard]
        return order[self._window(b * n_local, n_local, len(order))]

    def indices(self, step: int) -> list[int]:
        """This rank's indices at global step ``step``: ``shard_batch`` of ``global_indices(step)``."""
        return self.shard_indices(step, self.shard).tolist()

    def global_indices(self, step: int) -> torch.Tensor:
        """The whole global batch at ``step``: the shards' slices concatenated in shard order."""
        return torch.cat([self.shard_indices(step, s) for s in range(self.num_shards)])

    # -- I/O accounting ---------------------------------------------------------------------------
    def owners(self, epoch: int) -> torch.Tensor:
        """Which batch shard holds each sample in ``epoch`` (-1: nobody reads it this epoch).

        With local shuffling a shard holds its whole partition; with a global shuffle, the samples
        it reads that epoch."""
        owner = torch.full((self.num_samples,), -1, dtype=torch.long)
        if self._partitions is not None:
            slots = self._partitions.at(epoch)
            for s in range(self.num_shards):
                owner[slots[self._partitions.offsets[s]:self._partitions.offsets[s + 1]]] = s
            return owner
        order = _order.global_order(self.num_samples, self.seed, epoch, self.shuffle)
        read = min(self.steps_per_epoch * self.global_batch_size, self.num_samples)  # unique positions
        pos = torch.arange(read)
        owner[order[:read]] = (pos % self.global_batch_size) // self.local_batch_size
        return owner

    def moved_samples(self, epoch: int) -> int:
        """Samples some shard holds in ``epoch`` that it did not hold in ``epoch - 1``: what has to
        be read or sent anew, the I/O cost of the shuffle. A global shuffle moves ~(n-1)/n of the
        dataset per epoch; local shuffling ~``local_shuffle`` of it (less with an odd n)."""
        if epoch < 1:
            raise ValueError(f"epoch={epoch} must be >= 1: moves are counted between consecutive epochs")
        now, before = self.owners(epoch), self.owners(epoch - 1)
        return int(((now >= 0) & (now != before)).sum())

    # -- resuming ---------------------------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        config = {"num_samples": self.num_samples, "global_batch_size": self.global_batch_size, "seed": self.seed,
                  "shuffle": self.shuffle, "drop_last": self.drop_last, "local_shuffle": self.local_shuffle}
        if self.local_shuffle is not None:  # local streams depend on the shard count and partitions
            config.update(num_shards=self.num_shards, partition=self.partition)
        return config

    def state_dict(self, step: int | None = None) -> dict[str, Any]:
        """The position (``step``, default: the next step the sampler yields) and the settings it
        is only meaningful with. A global-shuffle state may be loaded under another grid: the
        global batches stay the same and are resharded."""
        return {"step": self._step if step is None else step, **self._config()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mismatch = {k: (v, state.get(k)) for k, v in self._config().items() if state.get(k) != v}
        if mismatch:
            details = ", ".join(f"{k}: saved {saved!r}, now {now!r}" for k, (now, saved) in mismatch.items())
            raise ValueError(f"sampler state does not match this sampler ({details}); "
                             "resuming would not continue the same stream")
        self.set_step(state["step"])
