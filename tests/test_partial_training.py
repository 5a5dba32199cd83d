"""Partial labels through the training loop: a task without a labelled sample in a batch sends no gradient and is left
out of the aggregation, for every registered method, without NaN; resume stays exact with label masks."""

from __future__ import annotations

import pytest
import torch

from mtlkit._registry import METHODS
from mtlkit.config import RunConfig
from mtlkit.data import MTLData, Split, drop_labels
from mtlkit.tasks import Task
from mtlkit.train import Trainer


def _data(mask_b: torch.Tensor | None) -> MTLData:
    g = torch.Generator().manual_seed(0)

    def split(n: int, mask: torch.Tensor | None = None) -> Split:
        x = torch.randn(n, 6, generator=g)
        y = {"a": (x[:, 0] > 0).long(), "b": x[:, 1] + x[:, 2], "c": (x[:, 3] > 0).float()}
        return Split(x, y, mask=None if mask is None else {"b": mask})

    tasks = [Task("a", "multiclass", 2), Task("b", "regression"), Task("c", "binary")]
    return MTLData("toy", tasks, split(32, mask_b), split(12), split(12))


def _cfg(method: str, epochs: int = 1, **train) -> RunConfig:
    options = {"seed": 0} if method == "rlw" else {}
    if method == "mtmlan_tdb":
        options = {"grad_at": "last_shared_layer"}
    return RunConfig.from_dict(
        {
            "method": {"name": method, "options": options},
            "model": {"name": "hps", "options": {"encoder": "mlp", "hidden": [8], "head_hidden": 8}},
            "train": {
                "epochs": epochs,
                "batch_size": 8,
                "log_every": 0,
                "progress": False,
                "checkpoint_minutes": 0,
                **train,
            },
            "output": {"tensorboard": False},
        }
    )


#: Methods that by definition need labels of every task: ExcessMTL normalises each task's excess risk by its first
#: estimate, MTMLAN's TDB weighs each task by N/n_j. A task that is never labelled is an error for them, with a
#: message saying so (the pattern).
NEEDS_FIRST_LABELS = {"excess_mtl": "no labelled sample in the first", "mtmlan_tdb": "positive per-task instance"}


@pytest.mark.filterwarnings("ignore:method .dwa. keeps every task weight")
@pytest.mark.parametrize("method", [m for m in METHODS.names() if m not in NEEDS_FIRST_LABELS])
def test_a_task_without_labels_gets_no_gradient_and_the_others_train(method, tmp_path):
    """Task b has no label at all: its head never changes (no gradient, weighted zero), nothing becomes NaN, and
    the shared encoder still moves (a zero row in the aggregation would have stopped MGDA-like methods)."""
    data = _data(torch.zeros(32, dtype=torch.bool))
    tr = Trainer(_cfg(method), data=data, run_dir=tmp_path / "run")
    heads_b = {
        n: p.detach().clone() for n, p in tr.model.named_parameters() if n.startswith("heads.b.") or ".heads.b." in n
    }
    enc = {
        n: p.detach().clone() for n, p in tr.model.named_parameters() if n.startswith("encoder.") or ".encoder." in n
    }
    assert heads_b and enc
    tr.fit()
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["model"]
    assert all(bool(torch.isfinite(v).all()) for v in ck.values() if v.is_floating_point())
    for n, v in heads_b.items():
        torch.testing.assert_close(ck[n], v, rtol=0, atol=0, msg=f"{method}: head b's {n} moved without labels")
    if method != "stl":  # STL's members have no shared encoder: each task's model is its own
        assert any(not torch.equal(ck[n], v) for n, v in enc.items()), f"{method}: the shared encoder did not move"


@pytest.mark.parametrize("method", sorted(NEEDS_FIRST_LABELS))
def test_methods_that_need_first_labels_say_so(method, tmp_path):
    with pytest.raises(ValueError, match=NEEDS_FIRST_LABELS[method]):
        Trainer(_cfg(method), data=_data(torch.zeros(32, dtype=torch.bool)), run_dir=tmp_path / "r").fit()


@pytest.mark.filterwarnings("ignore:method .dwa. keeps every task weight")
@pytest.mark.parametrize("method", ["ew", "mgda", "nash_mtl", "famo", "gradnorm", "dwa", "moco", "excess_mtl"])
def test_some_batches_without_labels_train_finite_and_resume_exactly(method, tmp_path):
    """Half of b's labels removed (some batches of 8 then have none): finite training, and a run stopped after
    epoch 1 resumes to the same weights as one trained 2 epochs straight (the absent-task fill is checkpointed)."""
    base = _data(None)
    base.train = drop_labels(base.train, {"b": 0.75}, seed=1)
    counts = [int(base.train.mask["b"][i : i + 8].sum()) for i in range(0, 32, 8)]  # type: ignore[index]
    straight = Trainer(_cfg(method, 2), data=base, run_dir=tmp_path / "a")
    straight.fit()
    Trainer(_cfg(method, 1), data=base, run_dir=tmp_path / "b").fit()
    Trainer(_cfg(method, 2), data=base, run_dir=tmp_path / "b").fit(resume=True)
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), f"{method}: {k} differs after resume"
        if a[k].is_floating_point():
            assert bool(torch.isfinite(a[k]).all())
    assert sum(counts) == 8  # 24 of 32 labels removed


def test_masked_task_loss_averages_over_its_labelled_samples_only(tmp_path):
    """The loss the loop logs for b is the mean over b's labelled samples: replacing the unlabelled targets by
    huge values changes nothing."""
    mask = torch.arange(32) % 2 == 0
    d1 = _data(mask)
    d2 = _data(mask)
    d2.train.y["b"] = torch.where(mask, d2.train.y["b"], torch.full_like(d2.train.y["b"], 1e6))
    r1 = Trainer(_cfg("ew"), data=d1, run_dir=tmp_path / "1").fit()
    r2 = Trainer(_cfg("ew"), data=d2, run_dir=tmp_path / "2").fit()
    assert r1.history[0]["train/b/loss"] == r2.history[0]["train/b/loss"]
    assert r1.test == r2.test
