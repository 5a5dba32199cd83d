"""mtlkit.data.loading: the global batch order shared by R ranks, the two batch sources, user datasets."""

import pytest
import torch
from torch.utils.data import Dataset

from mtlkit.data import Split
from mtlkit.data.loading import (
    DatasetSplit,
    GlobalBatchSampler,
    InMemoryBatches,
    InputsNotInMemoryError,
    LoaderBatches,
    SplitDataset,
    from_datasets,
    iter_inputs,
    make_batch_source,
)
from mtlkit.errors import ConfigError
from mtlkit.evaluation import evaluate, predict
from mtlkit.tasks import Task
from mtlkit.train import task_instance_counts


def _loop_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The training loop's batches (mtlkit.train._fit before the batch sources)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return [perm[b * batch_size : (b + 1) * batch_size].tolist() for b in range(-(-n // batch_size))]


def _epoch(sampler: GlobalBatchSampler, epoch: int, start: int = 0) -> list[list[int]]:
    sampler.set_epoch(epoch)
    sampler.set_start(start)
    return list(sampler)


@pytest.mark.parametrize(("n", "batch_size"), [(23, 5), (20, 5), (7, 16)])
def test_one_rank_yields_the_loops_batches(n, batch_size):
    s = GlobalBatchSampler(n, batch_size, seed=3)
    for epoch in (0, 1, 7):
        assert _epoch(s, epoch) == _loop_batches(n, batch_size, 3, epoch)
    assert s.num_batches == len(s) == -(-n // batch_size)


@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_shares_concatenate_to_the_one_process_batch(world_size):
    n, bs, seed = 29, 6, 1  # last batch: 5 samples, enough for 3 ranks
    for epoch in (0, 4):
        full = _loop_batches(n, bs, seed, epoch)
        ranks = [_epoch(GlobalBatchSampler(n, bs, seed, r, world_size), epoch) for r in range(world_size)]
        for b, batch in enumerate(full):
            shares = [ranks[r][b] for r in range(world_size)]
            assert [i for share in shares for i in share] == batch  # contiguous shares, in rank order
            sizes = [len(s) for s in shares]
            assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1


def test_set_start_skips_exactly_the_first_batches():
    s = GlobalBatchSampler(23, 5, seed=0, rank=1, world_size=2)
    full = _epoch(s, 2)
    for start in (0, 1, 4, 5):
        assert _epoch(s, 2, start) == full[start:]
        assert len(s) == 5 - start
    s.set_start(3)
    s.set_epoch(3)  # a new epoch begins at its first batch
    assert len(s) == 5 and len(list(s)) == 5
    with pytest.raises(ConfigError, match=r"start batch must be an integer in \[0, 5\]"):
        s.set_start(6)


def test_sampler_errors_name_the_problem():
    with pytest.raises(ConfigError, match="batch_size 4 the last global batch has 2 sample") as err:
        GlobalBatchSampler(10, 4, seed=0, rank=0, world_size=3)  # 10 = 2 x 4 + 2: rank 2 would get nothing
    suggested = int(str(err.value).split("use batch_size ")[1].split()[0])
    for r in range(3):  # the suggestion works
        shares = _epoch(GlobalBatchSampler(10, suggested, 0, r, 3), 0)
        assert all(len(s) >= 1 for s in shares)
    with pytest.raises(ConfigError, match="batch_size 2 is smaller than the 3 processes"):
        GlobalBatchSampler(10, 2, seed=0, rank=0, world_size=3)
    with pytest.raises(ConfigError, match=r"rank must be an integer in \[0, 2\)"):
        GlobalBatchSampler(10, 4, seed=0, rank=2, world_size=2)
    with pytest.raises(ConfigError, match="rank"):
        GlobalBatchSampler(10, 4, seed=0, rank=-1, world_size=2)
    with pytest.raises(ConfigError, match="batch_size must be an integer >= 1"):
        GlobalBatchSampler(10, 0, seed=0)
    with pytest.raises(ConfigError, match="n must be an integer >= 1"):
        GlobalBatchSampler(0, 4, seed=0)
    with pytest.raises(ConfigError, match=r"2 sample.* cannot be shared by 3 processes"):
        GlobalBatchSampler(2, 4, seed=0, rank=0, world_size=3)


def _split(n: int = 14, mask: bool = True) -> Split:
    g = torch.Generator().manual_seed(0)
    sp = Split(
        torch.rand(n, 1, 2, 2, generator=g),
        {"a": torch.randint(0, 3, (n,), generator=g), "b": torch.randn(n, 2, generator=g)},
    )
    if mask:  # Split.mask may not be a field yet: an attribute works either way
        sp.mask = {"a": torch.rand(n, generator=g) > 0.3, "b": torch.rand(n, generator=g) > 0.5}
    else:
        sp.mask = None
    return sp


def _collect(src, epoch: int, first: int) -> list:
    return list(src.batches(epoch, first))


def _assert_same_batches(got: list, want: list) -> None:
    assert [b for b, *_ in got] == [b for b, *_ in want]
    for (_, x1, y1, m1), (_, x2, y2, m2) in zip(got, want, strict=True):
        assert x1.dtype == x2.dtype and torch.equal(x1, x2)
        assert y1.keys() == y2.keys() and all(y1[k].dtype == y2[k].dtype and torch.equal(y1[k], y2[k]) for k in y1)
        assert (m1 is None) == (m2 is None)
        if m1 is not None:
            assert m1.keys() == m2.keys() and all(m1[k].dtype == m2[k].dtype and torch.equal(m1[k], m2[k]) for k in m1)


@pytest.mark.parametrize("mask", [True, False])
def test_memory_and_dataloader_batches_are_identical(mask):
    sp = _split(mask=mask)
    mem = InMemoryBatches(sp, 4, seed=5, device="cpu")
    want = _collect(mem, 1, 0)
    # the loop's batches: x[perm chunk], y[perm chunk]
    for (_, x, ys, masks), idx in zip(want, _loop_batches(14, 4, 5, 1), strict=True):
        assert torch.equal(x, sp.x[idx]) and torch.equal(ys["b"], sp.y["b"][idx])
        assert (masks is None) == (not mask) and (masks is None or torch.equal(masks["a"], sp.mask["a"][idx]))
    _assert_same_batches(_collect(LoaderBatches(SplitDataset(sp), 4, 5, "cpu"), 1, 0), want)
    _assert_same_batches(_collect(LoaderBatches(SplitDataset(sp), 4, 5, "cpu", num_workers=2), 1, 2), want[2:])
    for r in range(2):  # one rank's shares, from both sources
        mem_r = _collect(InMemoryBatches(sp, 4, 5, "cpu", rank=r, world_size=2), 1, 1)
        _assert_same_batches(_collect(LoaderBatches(SplitDataset(sp), 4, 5, "cpu", r, 2), 1, 1), mem_r)
        for (_, x, _, _), (_, xf, _, _) in zip(mem_r, want[1:], strict=True):
            assert torch.equal(x, torch.tensor_split(xf, 2)[r])


class Noisy(Dataset):
    """A user dataset with a random augmentation drawn from torch's RNG, and Python-int labels."""

    def __init__(self, n: int = 11, bad_at: int | None = None, bad=None) -> None:
        self.x = torch.arange(n * 3, dtype=torch.float32).reshape(n, 3)
        self.bad_at, self.bad = bad_at, bad

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i):
        if i == self.bad_at:
            return self.bad
        return self.x[i] + torch.rand(3), {"a": i % 3, "b": torch.tensor([float(i), -float(i)])}


def test_augmentation_is_a_function_of_the_item_and_leaves_the_global_rng_alone():
    ds = Noisy()
    state = torch.get_rng_state()
    one = _collect(LoaderBatches(ds, 4, seed=2, device="cpu"), 0, 0)
    assert torch.equal(torch.get_rng_state(), state)  # dropout etc. of the training process draw as before
    _assert_same_batches(_collect(LoaderBatches(ds, 4, 2, "cpu", num_workers=2), 0, 0), one)
    _assert_same_batches(_collect(LoaderBatches(ds, 4, 2, "cpu"), 0, 2), one[2:])  # a mid-epoch resume
    ranks = [_collect(LoaderBatches(ds, 4, 2, "cpu", r, 3), 0, 0) for r in range(3)]
    for b, (_, x, ys, _) in enumerate(one):
        assert torch.equal(torch.cat([ranks[r][b][1] for r in range(3)]), x)
        assert torch.equal(torch.cat([ranks[r][b][2]["a"] for r in range(3)]), ys["a"])
    other = _collect(LoaderBatches(ds, 4, 2, "cpu"), 1, 0)
    assert not torch.equal(one[0][1], other[0][1])  # a new epoch draws new noise
    assert one[0][2]["a"].dtype == torch.int64 and one[0][2]["b"].shape == (4, 2)


def test_from_datasets_collects_labels_and_reads_inputs_in_order():
    tasks = [Task("a", "multiclass", 3), Task("b", "regression", 2)]
    data = from_datasets("mine", tasks, Noisy(11), Noisy(5), Noisy(6), info={"origin": "test"})
    assert (len(data.train), len(data.val), len(data.test)) == (11, 5, 6)
    assert data.input_shape == (3,) and data.info == {"origin": "test"}
    assert data.train.y["a"].tolist() == [i % 3 for i in range(11)]
    assert torch.equal(data.train.y["b"][:, 0], torch.arange(11.0)) and data.train.mask is None
    xs = list(iter_inputs(data.train, 4, "cpu"))
    assert [x.shape[0] for x in xs] == [4, 4, 3]
    noise = torch.cat(xs) - Noisy(11).x
    assert ((noise >= 0) & (noise < 1)).all()  # the items, in order, with their augmentation
    assert torch.equal(torch.cat(list(iter_inputs(data.train, 3, "cpu"))), torch.cat(xs))  # evaluation: repeatable
    with pytest.raises(InputsNotInMemoryError, match=r"not in memory.*batches"):
        _ = data.train.x
    assert isinstance(InputsNotInMemoryError(), AttributeError)


def test_bad_items_are_reported_with_their_index():
    tasks = [Task("a", "multiclass", 3), Task("b", "regression", 2)]
    good = Noisy(4)
    with pytest.raises(
        ConfigError, match=r"train dataset: dataset item 0 must be \(x, \{task: y\}\).*a tuple of 2 \(Tensor, Tensor\)"
    ):
        from_datasets("m", tasks, Noisy(4, bad_at=0, bad=(torch.zeros(3), torch.zeros(2))), good, good)
    with pytest.raises(ConfigError, match=r"val dataset: .*keys \['a'\].*missing: \['b'\]; extra: none"):
        from_datasets("m", tasks, good, Noisy(4, bad_at=0, bad=(torch.zeros(3), {"a": 1})), good)
    with pytest.raises(ConfigError, match=r"test dataset: .*missing: none; extra: \['c'\]"):
        from_datasets("m", tasks, good, good, Noisy(4, bad_at=0, bad=(torch.zeros(3), {"a": 1, "b": 0.0, "c": 2})))
    data = from_datasets("m", tasks, Noisy(9, bad_at=6, bad=torch.zeros(3)), good, good)
    with pytest.raises(ConfigError, match=r"dataset item 6 must be .*got a Tensor"):
        _ = data.train.y  # labels are collected on first use: the bad item is met then
    with pytest.raises(ConfigError, match=r"dataset item 6: .*missing: \['b'\]"):
        list(LoaderBatches(Noisy(9, bad_at=6, bad=(torch.zeros(3), {"a": 0})), 9, 0, "cpu").batches(0, 0))
    with pytest.raises(ConfigError, match="cannot stack the inputs x"):
        list(LoaderBatches(Noisy(9, bad_at=6, bad=(torch.zeros(4), {"a": 0, "b": 1.0})), 9, 0, "cpu").batches(0, 0))


class Heads(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 4))

    def forward(self, x):
        h = self.net(x)
        return {"a": h[:, :2], "b": h[:, 2:]}


def test_predict_on_a_dataset_split_equals_predict_on_the_split():
    sp = _split(n=10, mask=False)
    sp.y["a"] = sp.y["a"] % 2
    tasks = [Task("a", "multiclass", 2), Task("b", "regression", 2)]
    torch.manual_seed(0)
    sp.x = sp.x.double()  # a float64 model: predict still returns float32
    m, ds, dev = Heads().to(torch.float64), DatasetSplit(SplitDataset(sp)), torch.device("cpu")
    want, got = predict(m, sp, 4, dev), predict(m, ds, 4, dev)
    assert want.keys() == got.keys() == {"a", "b"}
    assert all(got[k].dtype == torch.float32 and torch.equal(got[k], want[k]) for k in want)
    assert evaluate(m, ds, tasks, 3) == evaluate(m, sp, tasks, 3)
    assert task_instance_counts(tasks, ds) == task_instance_counts(tasks, sp) == [10, 10]


def test_make_batch_source_picks_and_refuses():
    sp, ds = _split(), DatasetSplit(Noisy(6))
    assert isinstance(make_batch_source(sp, 4, 0, "cpu"), InMemoryBatches)
    assert isinstance(make_batch_source(sp, 4, 0, "cpu", num_workers=1), LoaderBatches)
    assert isinstance(make_batch_source(sp, 4, 0, "cpu", loader="dataloader"), LoaderBatches)
    assert isinstance(make_batch_source(ds, 4, 0, "cpu"), LoaderBatches)
    assert make_batch_source(ds, 4, 0, "cpu", 1, 2).num_batches == 2
    with pytest.raises(ConfigError, match="loader 'memory' needs a Split"):
        make_batch_source(ds, 4, 0, "cpu", loader="memory")
    with pytest.raises(ConfigError, match="num_workers=2 needs the DataLoader"):
        make_batch_source(sp, 4, 0, "cpu", loader="memory", num_workers=2)
    with pytest.raises(ConfigError, match="unknown loader 'fast'; valid loaders are: auto, memory, dataloader"):
        make_batch_source(sp, 4, 0, "cpu", loader="fast")
    with pytest.raises(ConfigError, match="last global batch has 1 sample"):
        make_batch_source(ds, 5, 0, "cpu", 0, 2)  # 6 = 1 x 5 + 1


# -- through the training loop ---------------------------------------------------------------------------------------
def _toy_split(n: int, g: torch.Generator) -> Split:
    x = torch.randn(n, 5, generator=g)
    return Split(x, {"a": (x[:, 0] > 0).long(), "b": x[:, 1] * 2})


class _UserDataset(torch.utils.data.Dataset):
    """A user's own map-style dataset: (x, {task: y}) per item."""

    def __init__(self, split: Split) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        return self.split.x[i], {k: v[i] for k, v in self.split.y.items()}


def _fit(data, tmp_path, name: str, loader: str = "auto"):
    from mtlkit.config import RunConfig
    from mtlkit.train import Trainer

    cfg = RunConfig.from_dict(
        {
            "model": {"name": "hps", "options": {"encoder": "mlp", "hidden": [8], "head_hidden": 8}},
            "method": {"name": "mgda"},
            "train": {"epochs": 2, "batch_size": 7, "log_every": 0, "progress": False, "loader": loader},
            "output": {"tensorboard": False},
        }
    )
    Trainer(cfg, data=data, run_dir=tmp_path / name).fit()
    return torch.load(tmp_path / name / "checkpoint.pt", weights_only=False)["model"]


def test_a_user_dataset_and_the_dataloader_path_train_exactly_as_the_in_memory_path(tmp_path):
    """Trainer(data=from_datasets(...)) on a user's Dataset, and a Split through the DataLoader, reach the weights
    of the in-memory fast path bit for bit (same seeded batches, the caller's random state untouched)."""
    from mtlkit.data import MTLData

    g = torch.Generator().manual_seed(3)
    tasks = [Task("a", "multiclass", 2), Task("b", "regression")]
    train, val, test = _toy_split(30, g), _toy_split(10, g), _toy_split(10, g)
    memory = _fit(MTLData("toy", tasks, train, val, test), tmp_path, "memory")
    through_loader = _fit(MTLData("toy", tasks, train, val, test), tmp_path, "loader", loader="dataloader")
    user = _fit(
        from_datasets("toy", tasks, _UserDataset(train), _UserDataset(val), _UserDataset(test)), tmp_path, "user"
    )
    for k in memory:
        assert torch.equal(memory[k], through_loader[k]), k
        assert torch.equal(memory[k], user[k]), k
