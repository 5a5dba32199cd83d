"""Training batches through :mod:`torch.utils.data`: one global batch order for any number of processes.

The training loop draws one permutation per epoch, ``torch.randperm(n, generator=Generator().manual_seed(seed *
1_000_003 + epoch))`` (:func:`epoch_order`), and trains on its consecutive chunks of ``batch_size``. With R
data-parallel processes, :class:`GlobalBatchSampler` gives rank r the r-th contiguous share of each of those global
batches, so R processes together train on exactly the batches one process would.

A :class:`BatchSource` yields ``(b, x, ys, masks)`` for the batches ``b = first .. num_batches - 1`` of an epoch, on
the training device: :class:`InMemoryBatches` indexes a :class:`~mtlkit.data.Split`'s tensors (the fast path) and
:class:`LoaderBatches` runs a :class:`~torch.utils.data.DataLoader` (worker processes) over any map-style
:class:`~torch.utils.data.Dataset` whose items are ``(x, {task: y})`` or ``(x, {task: y}, {task: mask})``; both yield
the same tensors, bit for bit. :func:`make_batch_source` picks one.

:func:`from_datasets` makes an :class:`~mtlkit.data.MTLData` of a user's own datasets (:class:`DatasetSplit`), for
``Trainer(cfg, data=from_datasets(...))`` without registering anything.

Example:
    >>> import torch
    >>> from mtlkit.data import Split
    >>> split = Split(torch.arange(10.0).reshape(10, 1), {"t": torch.arange(10)})
    >>> src = make_batch_source(split, batch_size=4, seed=0, device="cpu")
    >>> [(b, x.shape[0]) for b, x, ys, masks in src.batches(epoch=0, first=1)]
    [(1, 4), (2, 2)]
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence, Sized
from functools import cached_property
from typing import Any, Protocol, cast

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, default_collate

from mtlkit.data import MTLData, Split
from mtlkit.errors import ConfigError
from mtlkit.tasks import Task

#: ``loader`` values of :func:`make_batch_source`.
LOADERS = ("auto", "memory", "dataloader")
#: Batches of ``(b, x, ys, masks)``: what :meth:`BatchSource.batches` yields.
Batch = tuple[int, Tensor, dict[str, Tensor], dict[str, Tensor] | None]

_M64 = (1 << 64) - 1
_EVAL_STREAM = (0, -1)  # (seed, epoch) of the item seeds of evaluation and label passes: never a training epoch's


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    """The training loop's sample order of ``epoch``: a function of ``(seed, epoch)`` only, so a resume redraws it.

    Example:
        >>> epoch_order(5, seed=0, epoch=0).sort().values.tolist()
        [0, 1, 2, 3, 4]
    """
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def _share_sizes(n: int, batch_size: int) -> tuple[int, int]:
    """(number of global batches, size of the last one)."""
    nb = -(-n // batch_size)
    return nb, n - (nb - 1) * batch_size


def _working_batch_size(n: int, batch_size: int, world_size: int) -> int:
    """The batch size nearest ``batch_size`` (larger first) whose every global batch has >= world_size samples."""
    for d in range(n):
        for b in (batch_size + d, batch_size - d):
            if world_size <= b <= n and _share_sizes(n, b)[1] >= world_size:
                return b
    return n  # unreachable when n >= world_size: one batch of n samples always works


class GlobalBatchSampler(Sampler[list[int]]):
    """This rank's contiguous share of each global batch of the loop's epoch order.

    Global batch ``b`` of an epoch is ``perm[b * batch_size : (b + 1) * batch_size]`` with ``perm =``
    :func:`epoch_order` ``(n, seed, epoch)``, exactly the batch one process trains on; rank ``r`` of ``world_size``
    gets ``torch.tensor_split(global_batch, world_size)[r]``. So ``world_size=1`` yields the one-process batches
    and the R ranks' shares of batch ``b``, concatenated in rank order, are that batch, in order.

    Why not :class:`torch.utils.data.DistributedSampler`: it shards the *dataset* once per epoch and each rank then
    batches its own shard, so the union of the ranks' k-th batches is not the one-process k-th batch at the same
    seed (and changes with the number of processes). Sharding each *global batch* keeps the run a function of the
    seed alone: R processes train on exactly the batches one process would (with the gradients averaged over the
    global batch, the same steps up to floating-point reduction order).

    Call :meth:`set_epoch` then :meth:`set_start` (``set_epoch`` resets the start to batch 0).

    Raises:
        ConfigError: ``n``, ``batch_size`` or ``world_size`` < 1, ``rank`` outside ``[0, world_size)``, or a global
            batch (the last, smaller one) with fewer samples than processes, which would leave a rank with none.

    Example:
        >>> s = GlobalBatchSampler(10, batch_size=4, seed=0, rank=1, world_size=2)
        >>> s.set_epoch(3)
        >>> s.set_start(1)
        >>> len(s), s.num_batches, [len(share) for share in s]
        (2, 3, [2, 1])
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        super().__init__()
        self.n = _check_int("the number of samples n", n, 1)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.world_size = _check_int("world_size", world_size, 1)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ConfigError(f"rank must be an integer in [0, {world_size}) for world_size {world_size}, got {rank!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"seed must be an integer, got {seed!r}")
        self.rank, self.seed = rank, seed
        if n < world_size:
            raise ConfigError(
                f"{n} sample(s) cannot be shared by {world_size} processes: every process needs at least one sample "
                f"of each batch; use at most {n} processes"
            )
        nb, last = _share_sizes(n, batch_size)
        if min(batch_size, last) < world_size:
            good = _working_batch_size(n, batch_size, world_size)
            why = (
                f"batch_size {batch_size} is smaller than the {world_size} processes"
                if batch_size < world_size
                else f"with batch_size {batch_size} the last global batch has {last} sample(s) ({n} = {nb - 1} x "
                f"{batch_size} + {last}), fewer than the {world_size} processes"
            )
            raise ConfigError(
                f"{why}: some rank would get no sample; use batch_size {good} (its last global batch has "
                f"{_share_sizes(n, good)[1]} samples) or at most {min(batch_size, last)} process(es)"
            )
        self._num_batches = nb
        self.epoch, self.start = 0, 0

    @property
    def num_batches(self) -> int:
        """Global batches per epoch: ``ceil(n / batch_size)`` (the loop's steps per epoch)."""
        return self._num_batches

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch``'s order from now on, from its first batch."""
        self.epoch = _check_int("epoch", epoch, 0)
        self.start = 0

    def set_start(self, batch: int) -> None:
        """Begin the epoch at global batch ``batch`` (resuming inside an epoch; ``num_batches``: nothing left)."""
        if isinstance(batch, bool) or not isinstance(batch, int) or not 0 <= batch <= self._num_batches:
            raise ConfigError(f"start batch must be an integer in [0, {self._num_batches}], got {batch!r}")
        self.start = batch

    def shares(self) -> Iterator[tuple[int, Tensor]]:
        """``(b, this rank's indices of global batch b)`` as int64 tensors, for ``b = start .. num_batches - 1``."""
        # drawn now, not at the first next(): a later set_epoch does not change an iteration already begun
        perm, start, bs = epoch_order(self.n, self.seed, self.epoch), self.start, self.batch_size
        return (
            (b, torch.tensor_split(perm[b * bs : (b + 1) * bs], self.world_size)[self.rank])
            for b in range(start, self._num_batches)
        )

    def __iter__(self) -> Iterator[list[int]]:
        return (share.tolist() for _, share in self.shares())

    def __len__(self) -> int:
        """Batches still to yield this epoch."""
        return self._num_batches - self.start


# --- items of map-style datasets ----------------------------------------------------------------------------------


class SplitDataset(Dataset[tuple[Any, ...]]):
    """A :class:`~mtlkit.data.Split` as a map-style dataset: item ``i`` is ``(x[i], {task: y[i]})``, and
    ``{task: mask[i]}`` third when the split has label masks (``split.mask``).

    Example:
        >>> import torch
        >>> from mtlkit.data import Split
        >>> ds = SplitDataset(Split(torch.zeros(3, 2), {"t": torch.tensor([4, 5, 6])}))
        >>> len(ds), ds[1][1]["t"].item()
        (3, 5)
    """

    def __init__(self, split: Split) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        sp = self.split
        ys = {k: v[i] for k, v in sp.y.items()}
        mask = getattr(sp, "mask", None)  # Split.mask: optional per-task label masks (absent on older Splits)
        return (sp.x[i], ys) if mask is None else (sp.x[i], ys, {k: m[i] for k, m in mask.items()})


def _describe(obj: Any) -> str:
    if isinstance(obj, tuple | list):
        return f"a {type(obj).__name__} of {len(obj)} ({', '.join(type(o).__name__ for o in obj)})"
    return f"a {type(obj).__name__}"


def _check_keys(got: Mapping[str, Any], expected: Sequence[str], what: str, index: int) -> None:
    if set(got) != set(expected):
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        raise ConfigError(
            f"dataset item {index}: its {what} dict has keys {sorted(got)}, expected {sorted(expected)} "
            f"(missing: {missing or 'none'}; extra: {extra or 'none'})"
        )


def _check_item(item: Any, index: int, keys: Sequence[str] | None, mask_keys: Sequence[str] | None) -> tuple[Any, ...]:
    """``item`` if it is ``(x, {task: y})`` or ``(x, {task: y}, {task: mask})`` (with these keys when given)."""
    if (
        not isinstance(item, tuple | list)
        or len(item) not in (2, 3)
        or not all(isinstance(d, Mapping) for d in item[1:])
    ):
        raise ConfigError(
            f"dataset item {index} must be (x, {{task: y}}) or (x, {{task: y}}, {{task: mask}}), got {_describe(item)}"
        )
    if keys is not None:
        _check_keys(item[1], keys, "label", index)
    if mask_keys is not None:
        if len(item) != 3:
            raise ConfigError(f"dataset item {index} has no mask dict, but item 0 has one: every item needs one")
        _check_keys(item[2], mask_keys, "mask", index)
    elif len(item) == 3 and keys is not None:
        raise ConfigError(f"dataset item {index} has a mask dict, but item 0 has none: all items or none need one")
    return tuple(item)


def _mix64(z: int) -> int:
    """splitmix64's finaliser: nearby (seed, epoch, index) give unrelated item seeds."""
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


class _Items(Dataset[tuple[Any, ...]]):
    """A user's dataset, its items checked, each read with torch's CPU RNG seeded from ``(seed, epoch, index)``.

    Per-item seeds make a random augmentation drawn from torch's RNG a function of the sample alone: the same
    whichever worker, rank or resume point reads it. The caller's CPU RNG state is given back after each batch (with
    ``num_workers=0`` the items are read in the training process, whose RNG drives e.g. dropout); only the CPU
    generator is seeded, never CUDA's.
    """

    def __init__(
        self,
        dataset: Dataset[Any],
        seed: int,
        epoch: int,
        keys: Sequence[str] | None,
        mask_keys: Sequence[str] | None,
        seeded: bool = True,
    ) -> None:
        self.dataset, self.keys, self.mask_keys, self.seeded = dataset, keys, mask_keys, seeded
        self.base = _mix64((seed * 1_000_003 + epoch) & _M64)

    def __len__(self) -> int:
        return len(cast(Sized, self.dataset))

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Any, ...]]:
        if not self.seeded:
            return [_check_item(self.dataset[i], i, self.keys, self.mask_keys) for i in indices]
        gen = torch.default_generator
        state = gen.get_state()
        try:
            out = []
            for i in indices:
                gen.manual_seed(_mix64((self.base + i) & _M64))
                out.append(_check_item(self.dataset[i], i, self.keys, self.mask_keys))
            return out
        finally:
            gen.set_state(state)


def _stack(values: list[Any], what: str) -> Any:
    try:
        return default_collate(values)
    except (TypeError, RuntimeError) as err:
        raise ConfigError(f"cannot stack the {what} of a batch into one tensor: {err}") from None


def _collate(items: list[tuple[Any, ...]]) -> tuple[Any, dict[str, Tensor], dict[str, Tensor] | None]:
    """Stack a batch of checked items: ``(x, {task: y}, {task: mask} or None)`` (``default_collate`` per part)."""
    x = _stack([it[0] for it in items], "inputs x")
    ys = {k: _stack([it[1][k] for it in items], f"labels of task {k!r}") for k in items[0][1]}
    if len(items[0]) == 2:
        return x, ys, None
    return x, ys, {k: _stack([it[2][k] for it in items], f"masks of task {k!r}") for k in items[0][2]}


def _seed_numpy(worker_id: int) -> None:
    """NumPy's global RNG of a worker, from the worker's torch seed (DataLoader: the loader's generator + worker id):
    otherwise every forked worker starts from the same NumPy state."""
    np.random.seed(torch.initial_seed() % 2**32)  # noqa: NPY002


def _map_style(dataset: Any) -> int:
    """len(dataset), or a ConfigError when it is not a map-style dataset with at least one item."""
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__getitem__"):
        raise ConfigError(
            f"need a map-style dataset (__getitem__ and __len__), got {type(dataset).__name__}: an IterableDataset "
            f"has no index to shard global batches by"
        )
    try:
        n = len(dataset)
    except TypeError:
        raise ConfigError(f"dataset {type(dataset).__name__} has no __len__: a map-style dataset needs one") from None
    if n < 1:
        raise ConfigError(f"dataset {type(dataset).__name__} is empty")
    return n


def _probe(dataset: Dataset[Any]) -> tuple[list[str], list[str] | None]:
    """Label keys and mask keys (None: no masks) of item 0, read as the loader reads it (checked, RNG untouched)."""
    item = _Items(dataset, *_EVAL_STREAM, None, None).__getitems__([0])[0]
    return list(item[1]), (list(item[2]) if len(item) == 3 else None)


def _to(t: Any, device: torch.device) -> Any:
    if isinstance(t, Tensor):
        return t.to(device, non_blocking=device.type == "cuda" and t.is_pinned())
    return t.to(device)  # e.g. qm9.GraphInputs: collates itself on .to


# --- batch sources ------------------------------------------------------------------------------------------------


class BatchSource(Protocol):
    """What the training loop draws an epoch's batches from (:class:`InMemoryBatches`, :class:`LoaderBatches`)."""

    #: Global batches per epoch (the loop's steps per epoch).
    num_batches: int

    def batches(self, epoch: int, first: int) -> Iterator[Batch]:
        """(global batch index b, x, ys, masks or None) on `device`, for b = first .. num_batches-1."""
        ...


class InMemoryBatches:
    """Batches of a :class:`~mtlkit.data.Split`'s tensors, indexed with :class:`GlobalBatchSampler`'s shares.

    One ``index_select`` per tensor per batch, as the loop has always done. Tensors already on the device are
    indexed there. With a CUDA device and pinned split tensors (``split.x.pin_memory()``), each batch is gathered
    into pinned memory and copied with ``non_blocking=True``.

    Example:
        >>> import torch
        >>> from mtlkit.data import Split
        >>> src = InMemoryBatches(Split(torch.zeros(5, 2), {"t": torch.arange(5)}), 2, seed=0, device="cpu")
        >>> src.num_batches, [ys["t"].tolist() for _, _, ys, _ in src.batches(0, 0)]
        (3, [[4, 0], [1, 3], [2]])
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        seed: int,
        device: torch.device | str,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.split, self.device = split, torch.device(device)
        self.sampler = GlobalBatchSampler(len(split), batch_size, seed, rank, world_size)
        self.num_batches = self.sampler.num_batches

    def _take(self, t: Any, idx: Tensor) -> Any:
        if not isinstance(t, Tensor):
            return t[idx].to(self.device)
        idx = idx.to(t.device)
        if self.device.type == "cuda" and t.is_pinned():
            out = torch.empty((idx.shape[0], *t.shape[1:]), dtype=t.dtype, pin_memory=True)
            return torch.index_select(t, 0, idx, out=out).to(self.device, non_blocking=True)
        return t.index_select(0, idx).to(self.device)

    def batches(self, epoch: int, first: int) -> Iterator[Batch]:
        """``(b, x, ys, masks or None)`` on the device for ``b = first .. num_batches - 1`` of ``epoch``."""
        sampler = GlobalBatchSampler(
            self.sampler.n, self.sampler.batch_size, self.sampler.seed, self.sampler.rank, self.sampler.world_size
        )
        sampler.set_epoch(epoch)
        sampler.set_start(first)
        sp = self.split
        for b, idx in sampler.shares():
            mask = getattr(sp, "mask", None)
            yield (
                b,
                self._take(sp.x, idx),
                {k: self._take(v, idx) for k, v in sp.y.items()},
                None if mask is None else {k: self._take(m, idx) for k, m in mask.items()},
            )


class LoaderBatches:
    """Batches of a map-style dataset through a :class:`~torch.utils.data.DataLoader` (worker processes).

    Items are ``(x, {task: y})`` or ``(x, {task: y}, {task: mask})`` (the same keys in every item, checked: a
    ConfigError names the index and what it returned); each part is stacked with
    :func:`torch.utils.data.default_collate` (tensors stacked, Python ints to int64 and floats to float64 tensors).
    The batch sampler is :class:`GlobalBatchSampler`, so the batches are those of :class:`InMemoryBatches`, bit for
    bit, for any ``num_workers``.

    Reproducibility (bit-exact resume): the DataLoader's generator is seeded from ``(seed, epoch)``, so its worker
    seeds never come from, nor change, the global RNG; and torch's CPU RNG is seeded for each item from ``(seed,
    epoch, index)`` while ``dataset[index]`` runs. A random augmentation in ``__getitem__`` is reproducible only if
    it draws from torch's RNG (``torch.rand``, ``torch.randint``, torchvision's v2 transforms, ...): it is then the
    same whichever worker, rank or mid-epoch resume reads the item. Python's ``random`` and NumPy's global RNG are
    seeded per worker from the generator (DataLoader seeds ``random``, this class NumPy), which repeats only for the
    same ``num_workers`` and an epoch read from its start; with ``num_workers=0`` they are the training process's.

    Example:
        >>> import torch
        >>> from mtlkit.data import Split
        >>> split = Split(torch.zeros(5, 2), {"t": torch.arange(5)})
        >>> src = LoaderBatches(SplitDataset(split), 2, seed=0, device="cpu")
        >>> [ys["t"].tolist() for _, _, ys, _ in src.batches(0, 0)]
        [[4, 0], [1, 3], [2]]
    """

    def __init__(
        self,
        dataset: Dataset[Any],
        batch_size: int,
        seed: int,
        device: torch.device | str,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        pin_memory: bool | None = None,
    ) -> None:
        n = _map_style(dataset)
        self.dataset, self.device = dataset, torch.device(device)
        self.num_workers = _check_int("num_workers", num_workers, 0)
        self.pin_memory = self.device.type == "cuda" if pin_memory is None else bool(pin_memory)
        self.sampler = GlobalBatchSampler(n, batch_size, seed, rank, world_size)
        self.num_batches = self.sampler.num_batches
        self.keys, self.mask_keys = _probe(dataset)  # fail here, at once, on a malformed item 0

    def loader(self, epoch: int, first: int) -> DataLoader[Any]:
        """The DataLoader of ``epoch`` from global batch ``first``: its batches are ``(x, ys, masks or None)`` on the
        CPU (pinned when ``pin_memory``)."""
        s = self.sampler
        sampler = GlobalBatchSampler(s.n, s.batch_size, s.seed, s.rank, s.world_size)
        sampler.set_epoch(epoch)
        sampler.set_start(first)
        items = _Items(
            self.dataset, s.seed, epoch, self.keys, self.mask_keys, seeded=not isinstance(self.dataset, SplitDataset)
        )
        return DataLoader(
            items,
            batch_sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=_collate,
            pin_memory=self.pin_memory,
            persistent_workers=False,
            worker_init_fn=_seed_numpy if self.num_workers > 0 else None,
            # without a generator, DataLoader draws its base seed from the global RNG: the training run would change
            generator=torch.Generator().manual_seed(s.seed * 1_000_003 + epoch),
        )

    def batches(self, epoch: int, first: int) -> Iterator[Batch]:
        """``(b, x, ys, masks or None)`` on the device for ``b = first .. num_batches - 1`` of ``epoch``."""
        loader = self.loader(epoch, first)
        for b, (x, ys, masks) in zip(range(first, self.num_batches), loader, strict=True):
            yield (
                b,
                _to(x, self.device),
                {k: _to(v, self.device) for k, v in ys.items()},
                None if masks is None else {k: _to(m, self.device) for k, m in masks.items()},
            )


def make_batch_source(
    data_split: Split | DatasetSplit | Dataset[Any],
    batch_size: int,
    seed: int,
    device: torch.device | str,
    rank: int = 0,
    world_size: int = 1,
    loader: str = "auto",
    num_workers: int = 0,
) -> BatchSource:
    """The batch source of a training split.

    ``loader``: ``"memory"`` (:class:`InMemoryBatches`; a :class:`~mtlkit.data.Split` only), ``"dataloader"``
    (:class:`LoaderBatches`; a Split is read through :class:`SplitDataset`) or ``"auto"``: memory for a Split with
    ``num_workers == 0``, else the DataLoader. ``data_split`` may also be a :class:`DatasetSplit` or any map-style
    dataset.

    Example:
        >>> import torch
        >>> from mtlkit.data import Split
        >>> split = Split(torch.zeros(4, 1), {"t": torch.arange(4)})
        >>> type(make_batch_source(split, 2, 0, "cpu")).__name__, type(make_batch_source(split, 2, 0, "cpu",
        ...     loader="dataloader")).__name__
        ('InMemoryBatches', 'LoaderBatches')
    """
    if loader not in LOADERS:
        raise ConfigError(f"unknown loader {loader!r}; valid loaders are: {', '.join(LOADERS)}")
    _check_int("num_workers", num_workers, 0)
    if isinstance(data_split, Split):
        if loader == "memory" and num_workers > 0:
            raise ConfigError(
                f"num_workers={num_workers} needs the DataLoader: use loader 'dataloader' or 'auto' (or num_workers 0)"
            )
        if loader == "memory" or (loader == "auto" and num_workers == 0):
            return InMemoryBatches(data_split, batch_size, seed, device, rank, world_size)
        if not isinstance(data_split.x, Tensor):
            raise ConfigError(
                f"the inputs of this split ({type(data_split.x).__name__}) batch themselves by indexing and cannot "
                f"go through a DataLoader: use loader 'memory' with num_workers 0"
            )
        dataset: Dataset[Any] = SplitDataset(data_split)
    else:
        if loader == "memory":
            raise ConfigError(
                f"loader 'memory' needs a Split of in-memory tensors, got {type(data_split).__name__}: use loader "
                f"'dataloader' or 'auto'"
            )
        dataset = data_split.dataset if isinstance(data_split, DatasetSplit) else data_split
    return LoaderBatches(dataset, batch_size, seed, device, rank, world_size, num_workers)


# --- user datasets ------------------------------------------------------------------------------------------------


class InputsNotInMemoryError(AttributeError):
    """``DatasetSplit.x``: a user dataset's inputs are read item by item, never held as one tensor."""


class DatasetSplit:
    """A split backed by a user's map-style dataset whose items are ``(x, {task: y})`` (or with a mask dict third).

    ``len(split)``, ``split.y`` (every item's labels, stacked; collected once by reading the dataset, on first use,
    then cached) and ``split.mask`` (None when the items have no mask dict) behave as a
    :class:`~mtlkit.data.Split`'s; the inputs are not in memory: ``split.x`` raises :class:`InputsNotInMemoryError`
    and :meth:`batches` (or :func:`iter_inputs`) yields them. ``keys``: the label keys every item must have.

    Example:
        >>> import torch
        >>> items = [(torch.full((2,), float(i)), {"t": i % 2}) for i in range(5)]
        >>> split = DatasetSplit(items)
        >>> len(split), split.y["t"].tolist(), [x.shape[0] for x in split.batches(2, "cpu")]
        (5, [0, 1, 0, 1, 0], [2, 2, 1])
    """

    def __init__(self, dataset: Dataset[Any] | Sequence[Any], keys: Sequence[str] | None = None) -> None:
        self._n = _map_style(dataset)
        self.dataset: Dataset[Any] = cast(Dataset[Any], dataset)
        got, self._mask_keys = _probe(self.dataset)
        if keys is not None:
            _check_keys(dict.fromkeys(got), list(keys), "label", 0)
        self.keys = list(keys) if keys is not None else got

    def __len__(self) -> int:
        return self._n

    @property
    def x(self) -> Tensor:
        raise InputsNotInMemoryError(
            f"the inputs of a DatasetSplit ({type(self.dataset).__name__}) are not in memory: iterate them with "
            f"split.batches(batch_size, device) or mtlkit.data.loading.iter_inputs, or train with "
            f"mtlkit.data.loading.make_batch_source"
        )

    @cached_property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one input, as the model sees it (item 0's ``x``, collated)."""
        x = _Items(self.dataset, *_EVAL_STREAM, None, None).__getitems__([0])[0][0]
        return tuple(_stack([x], "inputs x").shape[1:])

    @cached_property
    def _labels(self) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
        ys: dict[str, list[Tensor]] = {k: [] for k in self.keys}
        ms: dict[str, list[Tensor]] | None = None if self._mask_keys is None else {k: [] for k in self._mask_keys}
        for _, y, m in _loader(self, 1024, "cpu", 0):
            for k, v in y.items():
                ys[k].append(v)
            if ms is not None and m is not None:
                for k, v in m.items():
                    ms[k].append(v)
        masks = None if ms is None else {k: torch.cat(v) for k, v in ms.items()}
        return {k: torch.cat(v) for k, v in ys.items()}, masks

    @property
    def y(self) -> dict[str, Tensor]:
        """``{task: every item's label}`` (read from the dataset once, then cached)."""
        return self._labels[0]

    @property
    def mask(self) -> dict[str, Tensor] | None:
        """``{task: every item's label mask}``, or None when the items carry no mask dict."""
        return self._labels[1]

    def batches(self, batch_size: int, device: torch.device | str) -> Iterator[Tensor]:
        """The inputs in order, ``batch_size`` at a time, on ``device`` (:func:`iter_inputs`)."""
        return iter_inputs(self, batch_size, device)


def _loader(split: DatasetSplit, batch_size: int, device: torch.device | str, num_workers: int) -> DataLoader[Any]:
    """The dataset in order, through a DataLoader (sequential sampler), items seeded from a stream of their own."""
    dev = torch.device(device)
    return DataLoader(
        _Items(split.dataset, *_EVAL_STREAM, split.keys, split._mask_keys),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=dev.type == "cuda",
        worker_init_fn=_seed_numpy if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(0),  # not the global RNG's base seed
    )


def iter_inputs(
    split: Split | DatasetSplit, batch_size: int, device: torch.device | str, num_workers: int = 0
) -> Iterator[Tensor]:
    """The inputs of ``split`` in order, ``batch_size`` at a time, on ``device`` (evaluation): a Split's ``x`` is
    sliced, a :class:`DatasetSplit` is read through a DataLoader with a sequential sampler.

    Example:
        >>> import torch
        >>> from mtlkit.data import Split
        >>> [x.tolist() for x in iter_inputs(Split(torch.arange(3.0), {}), 2, "cpu")]
        [[0.0, 1.0], [2.0]]
    """
    _check_int("batch_size", batch_size, 1)
    dev = torch.device(device)
    if isinstance(split, DatasetSplit):
        return (_to(x, dev) for x, _, _ in _loader(split, batch_size, dev, num_workers))
    return (_to(split.x[s : s + batch_size], dev) for s in range(0, len(split), batch_size))


class DatasetData(MTLData):
    """The :class:`~mtlkit.data.MTLData` of :func:`from_datasets`: its input shape is read from an item."""

    @property
    def input_shape(self) -> tuple[int, ...]:
        train: Any = self.train
        return tuple(train.input_shape) if isinstance(train, DatasetSplit) else tuple(train.x.shape[1:])


def from_datasets(
    name: str,
    tasks: list[Task],
    train: Dataset[Any],
    val: Dataset[Any],
    test: Dataset[Any],
    info: dict[str, Any] | None = None,
) -> MTLData:
    """An :class:`~mtlkit.data.MTLData` of a user's own map-style datasets, whose items are ``(x, {task: y})`` (or
    ``(x, {task: y}, {task: mask})``), keyed by each task's :attr:`~mtlkit.tasks.Task.target_key`: train with
    ``Trainer(cfg, data=from_datasets(...))``, nothing registered.

    Raises:
        ConfigError: no tasks, an empty or non-map-style dataset, or a first item that is not of that form or whose
            label keys are not the tasks' (the message lists the missing and extra keys).

    Example:
        >>> import torch
        >>> from mtlkit.tasks import Task
        >>> items = [(torch.rand(3), {"a": i % 2, "b": float(i)}) for i in range(8)]
        >>> data = from_datasets("mine", [Task("a", "multiclass", 2), Task("b", "regression")], items, items, items)
        >>> len(data.train), data.input_shape, data.train.y["a"][:4].tolist()
        (8, (3,), [0, 1, 0, 1])
    """
    if not tasks:
        raise ConfigError("from_datasets needs at least one task")
    keys = list(dict.fromkeys(t.target_key for t in tasks))
    splits = []
    for split_name, ds in (("train", train), ("val", val), ("test", test)):
        try:
            splits.append(DatasetSplit(ds, keys))
        except ConfigError as err:
            raise ConfigError(f"{name} {split_name} dataset: {err}") from None
    # MTLData types its splits as Split: a DatasetSplit has what the loop and the evaluation read of one (len, y,
    # batches of x through make_batch_source / iter_inputs); its x raises a clear error
    tr, va, te = (cast(Split, s) for s in splits)
    return DatasetData(name, tasks, tr, va, te, dict(info or {}))


__all__ = [
    "LOADERS",
    "Batch",
    "BatchSource",
    "DatasetData",
    "DatasetSplit",
    "GlobalBatchSampler",
    "InMemoryBatches",
    "InputsNotInMemoryError",
    "LoaderBatches",
    "SplitDataset",
    "epoch_order",
    "from_datasets",
    "iter_inputs",
    "make_batch_source",
]
