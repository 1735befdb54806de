"""The epoch plan: which sample goes to which rank, worker and batch, as a pure function.

Everything here is a function of integers and NumPy arrays: no I/O, no torch, no global RNG.

* :class:`EpochOrder` is the *global* order of an epoch, a function of (chunk sample counts,
  seed, epoch, shuffle). It does not depend on the world size, which is what makes elastic
  resume exact: a resumed run continues the same global order from a sample position.
* :class:`Schedule` cuts the order from a start position into global batches of
  ``batch_size * world_size`` samples; rank ``r`` takes the ``r``-th slice of each global batch,
  and worker ``w`` of ``W`` takes the rank's batches ``w, w + W, ...`` (the round-robin order in
  which ``torch.utils.data.DataLoader`` collects worker outputs). Every rank gets the same number
  of batches: the tail is dropped (``drop_last``) or, with several ranks, padded with samples
  from the start of the epoch order; both counts are reported. One rank gets a short last batch.
* :class:`LoaderState` is the resume cursor: a handful of ints.

Randomness comes from a counter-based hash (splitmix64) of (seed, epoch, stream, index), so
orders are reproducible across NumPy versions and machines.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np

from mmload.config import ShuffleConfig
from mmload.errors import ConfigError

__all__ = [
    "EpochOrder",
    "LoaderState",
    "Schedule",
    "World",
    "hash_u64",
    "hash_uniform",
]

_U64 = np.uint64
_MASK = (1 << 64) - 1

# Stream tags keep independent random draws apart.
STREAM_CHUNKS = 1
STREAM_GROUP = 2


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer over a uint64 array (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = x + _U64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
        return x ^ (x >> _U64(31))


def hash_u64(
    seed: int, epoch: int, stream: int | np.ndarray, index: np.ndarray | int
) -> np.ndarray:
    """Counter-based random uint64 per ``index``, a pure function of all four arguments.

    With an array of ``k`` streams and ``n`` indexes the result is ``[k, n]`` (row ``i`` equals
    the call with ``stream=streams[i]``): many independent draws in one vectorised pass.
    """
    # Each argument goes through the mixer before the next is folded in: (seed, epoch) pairs
    # never collide the way seed ^ epoch would ((0, 1) and (1, 0)).
    base = _splitmix64(np.array([seed & _MASK], dtype=_U64))
    base = _splitmix64(base ^ _U64(epoch & _MASK))
    streams = np.asarray(stream, dtype=np.int64).astype(_U64)
    base = _splitmix64(base ^ streams)
    idx = np.asarray(index, dtype=np.int64).astype(_U64)
    base = base[:, None] if streams.ndim else base[0]
    return _splitmix64(_splitmix64(idx ^ base) + base)


def hash_uniform(
    seed: int, epoch: int, stream: int | np.ndarray, index: np.ndarray | int
) -> np.ndarray:
    """Uniform float64 in [0, 1) per ``index`` (53 random bits), pure like :func:`hash_u64`."""
    return (hash_u64(seed, epoch, stream, index) >> _U64(11)).astype(np.float64) * (2.0**-53)


def _permutation(seed: int, epoch: int, stream: int, n: int) -> np.ndarray:
    keys = hash_u64(seed, epoch, stream, np.arange(n, dtype=np.int64))
    return np.argsort(keys, kind="stable").astype(np.int64)


@dataclass(frozen=True)
class World:
    """Where this process sits: ``rank`` of ``world_size``, data ``worker`` of ``num_workers``."""

    rank: int = 0
    world_size: int = 1
    worker: int = 0
    num_workers: int = 1

    def __post_init__(self) -> None:
        for name in ("rank", "world_size", "worker", "num_workers"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ConfigError(f"World.{name}={v!r}: must be an int")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ConfigError(
                f"World(rank={self.rank}, world_size={self.world_size}): "
                "need 0 <= rank < world_size"
            )
        if self.num_workers < 1 or not 0 <= self.worker < self.num_workers:
            raise ConfigError(
                f"World(worker={self.worker}, num_workers={self.num_workers}): "
                "need 0 <= worker < num_workers"
            )

    def with_worker(self, worker: int, num_workers: int) -> World:
        return World(self.rank, self.world_size, worker, num_workers)


class EpochOrder:
    """The global sample order of one epoch.

    ``chunk_counts[c]`` is the number of samples of chunk ``c``; global sample ids number the
    samples chunk by chunk. ``self[pos]`` maps epoch positions to global sample ids. Groups of
    ``interleave`` chunks are materialised lazily, so the first batch of a 100M-sample data set
    costs one group, not the whole permutation.
    """

    def __init__(
        self,
        chunk_counts: np.ndarray,
        *,
        seed: int,
        epoch: int,
        shuffle: ShuffleConfig | None,
        cache_groups: int = 4,
    ) -> None:
        counts = np.asarray(chunk_counts, dtype=np.int64)
        if counts.ndim != 1 or (counts < 0).any():
            raise ConfigError("chunk_counts must be a 1-d array of non-negative ints")
        self.seed = int(seed)
        self.epoch = int(epoch)
        self.shuffle = shuffle
        self._chunk_start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.num_samples = int(self._chunk_start[-1])
        n_chunks = len(counts)
        if shuffle is None:
            self._chunks = np.arange(n_chunks, dtype=np.int64)
            per_group = max(n_chunks, 1)
        else:
            self._chunks = _permutation(self.seed, self.epoch, STREAM_CHUNKS, n_chunks)
            per_group = shuffle.interleave or max(n_chunks, 1)
        self._group_bounds = np.arange(0, n_chunks + per_group, per_group, dtype=np.int64)
        self._group_bounds[-1] = min(self._group_bounds[-1], n_chunks)
        sizes = (
            np.add.reduceat(counts[self._chunks], self._group_bounds[:-1])
            if n_chunks
            else np.zeros(0, np.int64)
        )
        self._group_start = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_groups = cache_groups

    def __len__(self) -> int:
        return self.num_samples

    def _group(self, g: int) -> np.ndarray:
        hit = self._cache.get(g)
        if hit is not None:
            self._cache.move_to_end(g)
            return hit
        chunks = self._chunks[self._group_bounds[g] : self._group_bounds[g + 1]]
        starts = self._chunk_start[chunks]
        lens = self._chunk_start[chunks + 1] - starts
        total = int(lens.sum())
        # Sample ids of the group's chunks, chunk after chunk, without a Python loop.
        ids = np.repeat(starts - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens)
        ids += np.arange(total, dtype=np.int64)
        if self.shuffle is not None:
            ids = ids[_permutation(self.seed, self.epoch, STREAM_GROUP + 2 * g, total)]
        self._cache[g] = ids
        if len(self._cache) > self._cache_groups:
            self._cache.popitem(last=False)
        return ids

    def __getitem__(self, positions: np.ndarray) -> np.ndarray:
        """Global sample ids at the given epoch positions (int64, ``0 <= pos < len(self)``)."""
        pos = np.asarray(positions, dtype=np.int64)
        if pos.size and (pos.min() < 0 or pos.max() >= self.num_samples):
            raise IndexError(f"epoch positions out of range [0, {self.num_samples})")
        if self.shuffle is None:
            return pos.copy()  # the stored order: nothing to materialise
        groups = np.searchsorted(self._group_start, pos, side="right") - 1
        out = np.empty(pos.shape, dtype=np.int64)
        for g in np.unique(groups):
            sel = groups == g
            out[sel] = self._group(int(g))[pos[sel] - self._group_start[g]]
        return out

    def full(self) -> np.ndarray:
        """The whole order (materialises every group; for tests and small data sets)."""
        return self[np.arange(self.num_samples, dtype=np.int64)]


@dataclass(frozen=True)
class Schedule:
    """Global batches from epoch position ``start`` and their split over ranks and workers.

    With ``drop_last`` the last incomplete global batch is dropped (``dropped`` samples).
    Otherwise, with several ranks, it is filled with samples from the start of the epoch order
    (``padded`` samples), so that every rank gets :attr:`num_batches` batches of exactly
    ``batch_size`` samples; with one rank nothing needs to stay in step, and the last batch is
    short, as in ``torch.utils.data.DataLoader``.
    """

    num_samples: int
    batch_size: int
    world_size: int
    start: int = 0
    drop_last: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size!r}: must be >= 1")
        if self.world_size < 1:
            raise ConfigError(f"world_size={self.world_size!r}: must be >= 1")
        if not 0 <= self.start <= self.num_samples:
            raise ConfigError(
                f"resume position {self.start} is outside the epoch of {self.num_samples} samples"
            )

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def remaining(self) -> int:
        return self.num_samples - self.start

    @property
    def num_batches(self) -> int:
        """Batches per rank from ``start`` to the end of the epoch."""
        if self.num_samples == 0:
            return 0
        if self.drop_last:
            return self.remaining // self.global_batch
        return -(-self.remaining // self.global_batch)

    @property
    def pads(self) -> bool:
        """Whether the last global batch is filled up (several ranks, no ``drop_last``)."""
        return not self.drop_last and self.world_size > 1

    @property
    def padded(self) -> int:
        """Samples repeated from the start of the epoch to fill the last global batch."""
        return self.num_batches * self.global_batch - self.remaining if self.pads else 0

    def padding_in(self, rank: int, k: int) -> int:
        """How many samples of rank ``rank``'s batch ``k`` are padding (repeats)."""
        if not self.pads:
            return 0
        first = self.start + k * self.global_batch + rank * self.batch_size
        return int(min(max(first + self.batch_size - self.num_samples, 0), self.batch_size))

    @property
    def dropped(self) -> int:
        """Samples at the end of the epoch that no rank sees (``drop_last``)."""
        return self.remaining - self.num_batches * self.global_batch if self.drop_last else 0

    def positions(self, rank: int, k: int) -> np.ndarray:
        """Epoch positions of rank ``rank``'s ``k``-th batch (int64 ``[batch_size]``, fewer for
        the last batch of a single rank)."""
        if not 0 <= k < self.num_batches:
            raise IndexError(f"batch {k} outside [0, {self.num_batches})")
        first = self.start + k * self.global_batch + rank * self.batch_size
        if not self.drop_last and not self.pads:  # one rank: the last batch is short
            return np.arange(first, min(first + self.batch_size, self.num_samples), dtype=np.int64)
        pos = np.arange(first, first + self.batch_size, dtype=np.int64)
        return pos % self.num_samples

    def worker_batches(self, world: World) -> range:
        """The rank-local batch numbers that ``world.worker`` produces, in order."""
        return range(world.worker, self.num_batches, world.num_workers)

    def consumed_after(self, k: int) -> int:
        """The global resume position after every rank consumed batches ``0..k-1``; after the
        last batch the whole epoch (the dropped tail included) counts as consumed."""
        if k >= self.num_batches:
            return self.num_samples
        return self.start + k * self.global_batch


@dataclass(frozen=True)
class LoaderState:
    """The resume cursor: JSON-serialisable ints.

    ``samples_consumed`` is the position in the epoch's global order up to which every rank has
    consumed its batches. Resuming with another world size keeps the global order, so the
    remaining samples are exactly those not yet consumed.
    """

    epoch: int = 0
    seed: int = 0
    samples_consumed: int = 0
    num_samples: int = 0
    global_batch_size: int = 0
    shuffle: int = -1  # ShuffleConfig.interleave, -1 without shuffle: the order's fingerprint
    version: int = 1

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> LoaderState:
        known = {f for f in cls.__dataclass_fields__}
        extra = set(d) - known
        if extra:
            raise ConfigError(f"state_dict has unknown fields {sorted(extra)}")
        vals: dict[str, int] = {}
        for name, v in d.items():
            if isinstance(v, bool) or not isinstance(v, int):
                raise ConfigError(f"state_dict[{name!r}]={v!r}: must be an int")
            vals[name] = v
        st = cls(**vals)
        if st.version != 1:
            raise ConfigError(f"state_dict version {st.version} is not supported (expected 1)")
        if st.samples_consumed < 0 or st.epoch < 0:
            raise ConfigError(f"state_dict {d!r}: epoch and samples_consumed must be >= 0")
        return st
