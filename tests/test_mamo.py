"""MAMO (Tan, Hu & Zhang, ECAI 2024): search space, conflict indicator (Eqs. 9-13, TopK), Alg. 1 in the training
loop (the search callback of model mamo: growth, Q accounting, KKT gradient routing, options, resume bit for bit,
``mtlkit train``), ``mtlkit reproduce mamo``."""

import copy
import itertools
import json

import pytest
import torch
from torch import nn

from mtlkit.callbacks import Callback
from mtlkit.config import RunConfig
from mtlkit.data import build_dataset
from mtlkit.engine.autodiff import backward, per_task_grads
from mtlkit.errors import ConfigError
from mtlkit.evaluation import evaluate
from mtlkit.methods import build_method
from mtlkit.models.hps import HPS
from mtlkit.models.mamo import MAMO, build_mamo, split_layers
from mtlkit.models.mamo_search import (
    ConflictDetector,
    average_indicator,
    conflicts,
    cosine_matrix,
    layer_gradients,
    proxy_indicator,
    topk_indicator,
)
from mtlkit.tasks import Task, stack_losses
from mtlkit.train import RunResult, Trainer


def _tiny(m: int = 3, module: str = "gmk", seed: int = 0) -> MAMO:
    torch.manual_seed(seed)
    layers = [
        nn.Sequential(nn.Linear(5, 6), nn.ReLU()),
        nn.Sequential(nn.Linear(6, 6), nn.Tanh()),
        nn.Sequential(nn.Linear(6, 4), nn.ReLU()),
    ]
    heads = {f"t{k}": nn.Linear(4, 2) for k in range(m)}
    return MAMO(layers, heads, module)


def _perturb(model: MAMO, scale: float = 0.3) -> None:
    """Move every module away from its birth copy so that the streams differ from the shared path."""
    with torch.no_grad():
        for p in model.gmks.parameters():
            p.add_(scale * torch.randn_like(p))
        for b in model.beta:
            b.add_(torch.randn_like(b))


# ---- Eqs. 9-13 ---------------------------------------------------------------------------------------------------
def test_average_indicator_on_hand_made_matrix():
    # Upper triangle counts 6, 2, 0, 3 over 4 tasks; symmetric. Non-zero entries: 6,6,2,2,3,3 -> mean 22/6 = 3.67.
    Q = torch.zeros(4, 4)
    for (i, j), q in {(0, 1): 6, (0, 2): 2, (1, 3): 3, (2, 3): 0}.items():
        Q[i, j] = Q[j, i] = q
    ind = average_indicator(Q)
    expected = torch.zeros(4, 4, dtype=torch.int32)
    expected[0, 1] = expected[1, 0] = 1  # only 6 >= 3.67
    assert torch.equal(ind, expected)
    # Lowering the largest count to 4: the average is (4+2+3)/3 = 3 and the count 3 reaches it (>=, Eq. 13).
    Q[0, 1] = Q[1, 0] = 4
    expected[1, 3] = expected[3, 1] = 1
    assert torch.equal(average_indicator(Q), expected)
    # Equal counts are all activated, while zero counts never are.
    Q2 = torch.tensor([[0.0, 2.0, 2.0], [2.0, 0.0, 0.0], [2.0, 0.0, 0.0]])
    assert average_indicator(Q2).tolist() == [[0, 1, 1], [1, 0, 0], [1, 0, 0]]
    assert not average_indicator(torch.zeros(3, 3)).any()


def test_average_indicator_scopes_and_topk():
    # Two layers, two tasks: per layer every non-zero count is its own average (the degenerate literal reading) ...
    Q = torch.zeros(2, 2, 2, dtype=torch.long)
    Q[0, 0, 1] = Q[0, 1, 0] = 9
    Q[1, 0, 1] = Q[1, 1, 0] = 1
    det = ConflictDetector(2, 2, scope="per_layer")
    det.Q = Q.clone()
    assert det.indicator()[:, 0, 1].tolist() == [1, 1]
    # ... across layers, only the layer with above-average conflicts.
    det = ConflictDetector(2, 2, scope="all_layers")
    det.Q = Q.clone()
    assert det.indicator()[:, 0, 1].tolist() == [1, 0]
    assert conflicts(det.indicator()) == [(0, 0, 1)]
    # TopK over layers: the k largest, never a zero count.
    assert topk_indicator(Q, 2)[:, 0, 1].tolist() == [1, 1]
    assert topk_indicator(Q, 1)[:, 0, 1].tolist() == [1, 0]
    assert not topk_indicator(torch.zeros(3, 3), 2).any()
    with pytest.raises(ConfigError, match="k >= 0"):
        topk_indicator(Q, -1)
    with pytest.raises(ValueError, match="negative"):
        average_indicator(-torch.ones(2, 2))


def test_cosine_proxy_and_accumulation():
    g = torch.tensor([[1.0, 0.0], [-1.0, 0.1], [0.0, 0.0]])
    C = cosine_matrix(g)
    assert C[0, 1] < 0 and C[0, 2] == 0 and C[2, 2] == 0 and C[0, 0] == 1
    assert proxy_indicator(C).tolist() == [[0, 1, 0], [1, 0, 0], [0, 0, 0]]
    det = ConflictDetector(1, 3)
    for _ in range(3):
        det.update([g])
    det.update([g.abs()])
    assert det.Q[0].tolist() == [[0, 3, 0], [3, 0, 0], [0, 0, 0]] and det.batches == 4
    with pytest.raises(ValueError, match="layers"):
        det.update([g, g])


def test_layer_gradients_match_per_task_grads():
    model = _tiny()
    model.grow(1, (0, 2))
    x = torch.randn(7, 5)
    y = {f"t{k}": torch.randint(0, 2, (7,)) for k in range(3)}
    tasks = [Task(f"t{k}", "multiclass", 2) for k in range(3)]
    z = model.encode(x)
    losses = stack_losses(tasks, model.decode(z), y)
    direct = [per_task_grads(losses, model.layer_parameters(layer)) for layer in range(3)]
    info = backward(
        losses, model.shared_parameters(), build_method("mgda").aggregator, representation=z, keep_jacobian=True
    )
    for a, b in zip(layer_gradients(model, info.jacobian), direct, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


# ---- search space --------------------------------------------------------------------------------------------------
def test_gmk_gets_gradients_only_from_its_two_tasks():
    model = _tiny()
    model.grow(0, ("t0", "t1"))
    model.grow(2, ("t0", "t1"))
    model.grow(2, ("t1", "t2"))
    _perturb(model)
    x = torch.randn(6, 5)
    z = model.encode(x)
    out = model.decode(z)
    gmk01 = list(model.gmks["l0__t0__t1"].parameters()) + list(model.gmks["l2__t0__t1"].parameters())
    gmk12 = list(model.gmks["l2__t1__t2"].parameters())
    norms = {}
    for k in range(3):
        g = per_task_grads(out[f"t{k}"].pow(2).mean().reshape(1), gmk01 + gmk12)[0]
        n01 = sum(p.numel() for p in gmk01)
        norms[k] = (float(g[:n01].norm()), float(g[n01:].norm()))
    assert norms[0][0] > 0 and norms[1][0] > 0 and norms[2][0] == 0  # {t0,t1}: tasks 0 and 1 only
    assert norms[1][1] > 0 and norms[2][1] > 0 and norms[0][1] == 0  # {t1,t2}: tasks 1 and 2 only
    # Through the engine with an aggregator: the GMK's update row of task 2 is zero.
    losses = torch.stack([out[f"t{k}"].pow(2).mean() for k in range(3)])
    info = backward(
        losses, model.shared_parameters(), build_method("mgda").aggregator, representation=z, keep_jacobian=True
    )
    start = sum(p.numel() for p in model.all_shared_parameters())
    n01 = sum(p.numel() for p in model.gmks["l0__t0__t1"].parameters())
    assert float(info.jacobian[2, start : start + n01].abs().sum()) == 0.0
    assert float(info.jacobian[0, start : start + n01].abs().sum()) > 0.0


def test_fusion_uses_only_its_tasks_row_and_column():
    model = _tiny(m=4)
    for pair in [(0, 1), (1, 2), (0, 3), (2, 3)]:
        model.grow(2, pair)
    _perturb(model)
    z = model.encode(torch.randn(5, 5))
    groups = model.groups()
    assert groups == [(0, 1), (0, 3), (1, 2), (2, 3)]
    base = model.decode(z)
    for k, g in enumerate(groups):
        z2 = z.clone()
        z2[:, 1 + k] += 10.0  # change one GMK stream only
        out = model.decode(z2)
        for t in range(4):
            changed = not torch.allclose(out[f"t{t}"], base[f"t{t}"])
            assert changed == (t in g), (g, t)
    # β_m is task m's alone: task 1's loss reaches only β_1, and only its entries for the groups {1,0} and {1,2}.
    loss = model.decode(z)["t1"].pow(2).sum()
    grads = torch.autograd.grad(loss, list(model.beta), allow_unused=True)
    assert all(g is None or float(g.abs().sum()) == 0 for t, g in enumerate(grads) if t != 1)
    assert grads[1][0] != 0 and grads[1][2] != 0 and grads[1][1] == 0 and grads[1][3] == 0
    with pytest.raises(ValueError, match="expects z"):
        model.decode(z[:, :2])


def test_model_size_grows_by_exactly_the_activated_modules():
    model = _tiny()
    sizes = [model.module_parameters(layer) for layer in range(3)]
    assert sizes == [36, 42, 28]
    n0 = model.num_parameters()
    assert model.grow(1, (0, 2)) == ["l1__t0__t2"]
    assert model.num_parameters() - n0 == sizes[1]
    assert model.grow(1, (2, 0)) == []  # same unordered pair: nothing new
    model.grow(0, (1, 2))
    assert model.num_parameters() - n0 == sizes[1] + sizes[0]
    excl = _tiny(module="exclusive")
    n0 = excl.num_parameters()
    assert excl.grow(2, (0, 1)) == ["l2__t0", "l2__t1"]  # w/o GMK: one exclusive module per task
    assert excl.num_parameters() - n0 == 2 * sizes[2]
    with pytest.raises(ConfigError, match="itself"):
        model.grow(0, (1, 1))
    with pytest.raises(ConfigError, match="out of range"):
        model.grow(3, (0, 1))
    with pytest.raises(ConfigError, match="unknown task"):
        model.grow(0, ("t0", "nope"))


def test_new_modules_keep_the_function_and_parameter_roles():
    model = _tiny()
    x = torch.randn(4, 5)
    before = {k: v.detach() for k, v in model(x).items()}
    model.grow(0, (0, 1))
    model.grow(2, (1, 2))
    after = model(x)
    assert all(torch.allclose(before[k], after[k], atol=1e-6) for k in before)  # GMKs born as copies
    shared = {id(p) for p in model.all_shared_parameters()}
    by_group = model.group_parameters()
    assert set(by_group) == {("t0", "t1"), ("t1", "t2")}
    mediated = {id(p) for ps in by_group.values() for p in ps}
    exclusive = {id(p) for ps in model.task_exclusive_parameters().values() for p in ps}
    assert not (shared & mediated) and not (shared & exclusive) and not (mediated & exclusive)
    assert shared | mediated | exclusive == {id(p) for p in model.parameters()}
    assert {id(p) for p in model.shared_parameters()} == shared | mediated


@pytest.mark.parametrize("module", ["gmk", "exclusive", "conal"])
def test_a_grown_state_loads_into_a_fresh_model(module):
    """load_state_dict generates the modules a state holds, in their order of creation (mtlkit eval, --reuse)."""
    model = _tiny(module=module)
    model.grow(1, (0, 2))
    model.grow(0, (1, 2))
    _perturb(model)
    fresh = _tiny(module=module)
    fresh.load_state_dict(model.state_dict())
    assert list(fresh.active.items()) == list(model.active.items())
    assert [id(p) for p in fresh.shared_parameters()] != [] and len(fresh.shared_parameters()) == len(
        model.shared_parameters()
    )
    x = torch.randn(4, 5)
    assert all(torch.equal(a, b) for a, b in zip(fresh(x).values(), model(x).values(), strict=True))
    with pytest.raises(RuntimeError, match="Unexpected key"):  # a module of another kind is not made up
        _tiny(module="gmk" if module != "gmk" else "exclusive").load_state_dict(model.state_dict())


def test_split_layers_and_bad_input():
    enc = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 3), nn.ReLU())
    blocks = split_layers(enc)
    assert len(blocks) == 2 and isinstance(blocks[0][0], nn.Conv2d) and isinstance(blocks[1][0], nn.Linear)
    with pytest.raises(ConfigError, match="no Conv/Linear"):
        split_layers(nn.Sequential(nn.ReLU()))
    with pytest.raises(ConfigError, match="two tasks"):
        MAMO([nn.Linear(2, 2)], {"a": nn.Linear(2, 1)})
    with pytest.raises(ConfigError, match="module kind"):
        MAMO([nn.Linear(2, 2)], {"a": nn.Linear(2, 1), "b": nn.Linear(2, 1)}, module="soft")


# ---- Alg. 1 in the training loop (the search callback of model mamo) -------------------------------------------------
_MODEL = {"encoder": "mlp", "hidden": [12, 10], "head_hidden": 6}
_STEPS = 4  # 64 training samples, batch 16


def _mamo_cfg(
    tmp_path, epochs: int = 3, method: str = "mgda", level: str | None = None, checkpoint_minutes: float = 10.0, **model
) -> RunConfig:
    """Model mamo (MLP backbone) on ``_toy`` (64/16/16 samples, batch 16: 4 steps an epoch), Adam lr 0.01, seed 0."""
    return RunConfig.from_dict(
        {
            "dataset": {"name": "_toy", "options": {"n_train": 64, "n_val": 16, "n_test": 16}},
            "model": {"name": "mamo", "options": {**_MODEL, **model}},
            "method": {"name": method, "level": level},
            "train": {
                "epochs": epochs,
                "batch_size": 16,
                "lr": 0.01,
                "seed": 0,
                "progress": False,
                "checkpoint_minutes": checkpoint_minutes,
            },
            "output": {"dir": str(tmp_path / "run"), "tensorboard": False},
        }
    )


def _toy_data(identical: bool = False):
    data = build_dataset("_toy", n_train=64, n_val=16, n_test=16)
    if identical:  # the same labels for both tasks
        for s in (data.train, data.val, data.test):
            s.y["b"] = s.y["a"].clone()
    return data


def _search(tmp_path, data=None, callbacks=(), **kw) -> tuple[Trainer, RunResult, dict]:
    """Train ``_mamo_cfg(tmp_path, **kw)``; returns the trainer, its result and results.json's ``mamo`` entry."""
    t = Trainer(_mamo_cfg(tmp_path, **kw), data=data, callbacks=callbacks)
    res = t.fit()
    return t, res, json.loads((t.run_dir / "results.json").read_text())["mamo"]


def test_no_conflict_mamo_equals_hps(tmp_path):
    data = _toy_data(identical=True)
    t = Trainer(_mamo_cfg(tmp_path, rounds=2, detect_batches=2, selection="last"), data=data)
    model = t.model
    assert isinstance(model, MAMO)
    model.heads["b"].load_state_dict(model.heads["a"].state_dict())  # identical tasks: identical gradients, cos = 1
    hps = HPS(nn.Sequential(*copy.deepcopy(list(model.layers))), copy.deepcopy(dict(model.heads)))
    t.fit()
    rounds = json.loads((t.run_dir / "results.json").read_text())["mamo"]["rounds"]
    assert model.active == {} and [len(r["activated"]) for r in rounds] == [0, 0, 0]
    assert [r["q_batches"] for r in rounds] == [0, 2, 2]
    # Plain HPS through the engine, same batches, same optimiser.
    agg = build_method("mgda").aggregator
    opt = torch.optim.Adam(list(hps.parameters()), lr=0.01)
    n = len(data.train)
    for epoch in range(3):
        hps.train()
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
        for b in range(_STEPS):
            idx = perm[b * 16 : (b + 1) * 16]
            z = hps.encode(data.train.x[idx])
            losses = stack_losses(data.tasks, hps.decode(z), {k: v[idx] for k, v in data.train.y.items()})
            opt.zero_grad(set_to_none=True)
            backward(losses, hps.shared_parameters(), agg, representation=z)
            opt.step()
    hps_params = dict(hps.named_parameters())
    for name, p in model.named_parameters():
        if name.startswith("beta"):
            continue
        ref = hps_params[name.replace("layers.", "encoder.", 1) if name.startswith("layers.") else name]
        assert torch.allclose(p, ref, atol=1e-6), name
    model.eval(), hps.eval()
    x = data.test.x
    assert all(torch.allclose(model(x)[k], hps(x)[k], atol=1e-5) for k in ("a", "b"))
    assert rounds[-1]["parameters"] == sum(p.numel() for p in hps.parameters()) + 2 * 2  # + the β logits


class _AfterGrowth(Callback):
    """Evaluates the model at the start of every epoch (the search grew it at the end of the epoch before)."""

    name = "after_growth"

    def __init__(self):
        self.val: dict[int, dict] = {}

    def on_epoch_start(self, trainer, epoch):
        self.val[epoch] = evaluate(trainer.model, trainer.data.val, trainer.tasks, 1024, trainer.device)
        trainer.model.train()  # evaluate() leaves the model in eval mode; the epoch trains


def test_learning_grows_modules_and_records_rounds(tmp_path):
    spy = _AfterGrowth()
    t, res, found = _search(tmp_path, method="ew", callbacks=[spy], rounds=2, threshold="topk", k=1, detect_batches=4)
    model = t.model
    assert isinstance(model, MAMO)
    rounds = found["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2] and all(r["method"] == "ew" for r in rounds)
    sizes = [r["parameters"] for r in rounds]
    assert sizes == sorted(sizes) and len(model.active) == sum(len(r["activated"]) for r in rounds) > 0
    assert found["architecture"] == [[layer, list(g)] for layer, g in model.architecture()]
    for r0, r1 in itertools.pairwise(rounds):
        assert r1["parameters"] - r0["parameters"] == sum(
            model.module_parameters(layer) for layer, _ in r1["activated"]
        )
    assert rounds[0]["Q"] is None and all(r["Q"] is not None for r in rounds[1:])
    assert [r["q_batches"] for r in rounds] == [0, 4, 4]
    # The Q accounting: each round's modules are the indicator of its Q (TopK, k = 1: at most one a round).
    for r in rounds[1:]:
        det = ConflictDetector(model.num_layers, 2, threshold="topk", k=1)
        det.Q = torch.tensor(r["Q"])
        assert int(det.Q.max()) <= 4 and bool((det.Q == det.Q.transpose(1, 2)).all())
        expect = [[layer, [model.task_names[i], model.task_names[j]]] for layer, i, j in conflicts(det.indicator())]
        assert [a for a in expect if a not in [x for q in rounds[: r["round"]] for x in q["activated"]]] == r[
            "activated"
        ]
    # Rolled back and grown at a phase's end: the next epoch starts from the function of the phase's record.
    for r, epoch in ((0, 1), (1, 2)):
        for k, v in rounds[r]["val"].items():
            assert spy.val[epoch][k] == pytest.approx(v, rel=1e-5, abs=1e-6), (r, k)
    # The final model: the best epoch of the last phase (a phase of one epoch), i.e. the last round's record.
    assert res.best_epoch == 3 and res.val == rounds[-1]["val"] and res.test == rounds[-1]["test"]
    assert set(res.test) >= {"a/accuracy", "b/accuracy"}


def test_search_options_are_checked(tmp_path):
    for bad, match in (
        ({"threshold": "median"}, "threshold"),
        ({"detect_batches": 0}, "detect_batches"),
        ({"epochs_per_round": 0}, "epochs_per_round"),
        ({"conflict_window": "all"}, "conflict window"),
        ({"selection": "worst"}, "selection"),
        ({"pretrain_method": "nope"}, "unknown method"),
        ({"pretrain_method": "stl"}, "one model per task"),
        ({"nope": 1}, "no option"),
    ):
        with pytest.raises(ConfigError, match=match):
            Trainer(_mamo_cfg(tmp_path, **bad))
    with pytest.raises(ConfigError, match=r"pre-training epochs.*train\.epochs >= 5"):  # 4 - 2 x 2 = 0
        Trainer(_mamo_cfg(tmp_path / "a", epochs=4, rounds=2, epochs_per_round=2)).fit()
    _, _, found = _search(tmp_path / "b", epochs=2, rounds=0)  # rounds=0: HPS, never grown
    assert [r["round"] for r in found["rounds"]] == [0] and found["architecture"] == []


def test_task_modules_refuse_representation_level_and_leave_the_representation_path(tmp_path):
    t, _, found = _search(tmp_path / "a", rounds=1, epochs=2, module="conal", threshold="topk", k=1, detect_batches=4)
    model = t.model
    assert isinstance(model, MAMO)
    r0, r1 = found["rounds"]
    assert r1["parameters"] - r0["parameters"] == sum(model.module_parameters(layer) for layer, _ in r1["activated"])
    assert r1["q_batches"] == 4 and r1["activated"] and model.has_task_modules()
    assert not model.representation_is_shared_path()
    with pytest.raises(ConfigError, match="representation-level"):
        Trainer(_mamo_cfg(tmp_path / "b", rounds=1, epochs=2, module="conal", level="representation")).fit()


def test_exclusive_modules_get_only_their_tasks_gradient():
    model = _tiny(module="exclusive")
    model.grow(1, (0, 2))
    _perturb(model)
    out = model(torch.randn(6, 5))
    mod0 = list(model.gmks["l1__t0"].parameters())
    for k, expect in ((0, True), (1, False), (2, False)):
        g = per_task_grads(out[f"t{k}"].pow(2).mean().reshape(1), mod0)[0]
        assert (float(g.norm()) > 0) == expect


def test_reproduction_relative_change_sign():
    from mtlkit.reproduce.mamo import relative

    rel = relative(
        {"a/accuracy": 0.9, "b/mae": 1.0}, {"a/accuracy": 0.8, "b/mae": 2.0}, [("a/accuracy", True), ("b/mae", False)]
    )
    assert rel == pytest.approx({"a/accuracy": 12.5, "b/mae": 50.0})  # + = better than STL for both directions


@pytest.mark.parametrize("m", [3, 4])
@pytest.mark.parametrize("module", ["gmk", "exclusive"])
def test_growing_leaves_every_output_unchanged_with_trained_fusion_weights(m, module):
    """A group's first module must not change any task's output, also when its tasks already fuse trained streams
    (with a fresh logit of 0 the new stream took weight from them: 0.0126 in a 3-task run)."""
    torch.manual_seed(1)
    model = _tiny(m, module).double().eval()
    x = torch.randn(7, 5, dtype=torch.float64)
    pairs = [(0, 1), (1, 2), (0, 2)] + ([(2, 3), (0, 3)] if m == 4 else [])
    for k, pair in enumerate(pairs):
        before = model(x)
        model.grow(k % model.num_layers, pair)
        after = model(x)
        for name in model.task_names:
            # float64: the logit shift re-rounds the softmax (a few eps) and the head amplifies it by its weights'
            # norm; 1e-10 of the output's scale is ~1e6 eps, and 1e8 times below the defect's 0.0126
            scale = 1.0 + float(before[name].detach().abs().max())
            assert torch.allclose(before[name], after[name], rtol=0, atol=1e-10 * scale), (pair, name)
        _perturb(model)  # train the modules and the fusion logits
    assert len(model.groups()) == (len(pairs) if module == "gmk" else m)


# ---- CoNAL-faithful task branches (module="conal") -----------------------------------------------------------------
def _conv_mamo(module: str, m: int = 3, seed: int = 0) -> MAMO:
    """MAMO on the conv backbone (Conv-BN-ReLU-Pool blocks, FC-BN-ReLU) of 12x12 images."""
    from types import SimpleNamespace

    torch.manual_seed(seed)
    data = SimpleNamespace(input_shape=(1, 12, 12), tasks=[Task(f"t{k}", "multiclass", 3) for k in range(m)])
    return build_mamo(data, encoder="conv", width=8, head_hidden=4, module=module)


def _outputs(model: MAMO, x: torch.Tensor) -> dict:
    with torch.no_grad():
        return {k: v.clone() for k, v in model(x).items()}


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_conal_branch_reads_no_shared_output_above_its_branch_point(mode):
    """A task branched at layer s reads o_f^{s-1} and its own copies of layers s..L only: perturbing the shared layers
    s..L leaves its output unchanged (and the other tasks' outputs change); perturbing a shared layer below s changes
    it."""
    model = _conv_mamo("conal")
    assert model.num_layers == 3
    model.grow(1, ("t0", "t2"))  # t0 and t2 branch at layer 1; t1 stays on the shared path
    assert model.branch_points() == {"t0": 1, "t2": 1}
    _perturb(model)
    getattr(model, mode)()
    x = torch.randn(6, 1, 12, 12)
    base = _outputs(model, x)
    for layer, branched_change in ((1, False), (2, False), (0, True)):
        saved = copy.deepcopy(model.layers[layer].state_dict())
        with torch.no_grad():
            for p in model.layers[layer].parameters():
                p.add_(0.5 * torch.randn_like(p))
        out = _outputs(model, x)
        for name in ("t0", "t2"):
            assert torch.allclose(out[name], base[name], atol=0) != branched_change, (layer, name)
        assert not torch.allclose(out["t1"], base["t1"]), layer  # the shared path moved
        model.layers[layer].load_state_dict(saved)
    # Gradients: the branched task's loss sends nothing to the shared layers above its branch point.
    model.train()
    loss = model(x)["t0"].pow(2).mean()
    above = [p for k in (1, 2) for p in model.layer_parameters(k)]
    below = model.layer_parameters(0)
    grads = torch.autograd.grad(loss, above + below, allow_unused=True)
    assert all(g is None or float(g.abs().sum()) == 0 for g in grads[: len(above)])
    assert all(g is not None and float(g.abs().sum()) > 0 for g in grads[len(above) :])


def test_conal_birth_keeps_outputs_and_moves_branch_points_down():
    torch.manual_seed(3)
    model = _conv_mamo("conal", m=3).double()
    x = torch.randn(5, 1, 12, 12, dtype=torch.float64)

    def grow_unchanged(layer, pair):
        for mode in ("train", "eval"):  # batch statistics and running statistics alike
            getattr(model, mode)()
            before = _outputs(model, x)
            state = copy.deepcopy(model.state_dict())
            keys = model.grow(layer, pair)
            after = _outputs(model, x)
            for k in before:
                assert torch.allclose(before[k], after[k], rtol=0, atol=1e-12), (layer, pair, mode, k)
            if mode == "train":  # undo, to grow again in eval mode
                for key in keys:
                    del model.gmks[key]
                    model.active = {lg: kk for lg, kk in model.active.items() if kk != key}
                model.load_state_dict(state)
        return keys

    assert grow_unchanged(2, (0, 1)) == ["l2__t0", "l2__t1"]
    _perturb(model)  # train the branches
    trained = [p.detach().clone() for p in model.gmks["l2__t0"].parameters()]
    # A later conflict of t0 lower down moves its branch point: copies of shared layers 0-1, its layer 2 kept.
    assert grow_unchanged(0, (0, 2)) == ["l0__t0", "l1__t0", "l0__t2", "l1__t2", "l2__t2"]
    assert all(torch.equal(a, b) for a, b in zip(trained, model.gmks["l2__t0"].parameters(), strict=True))
    assert model.branch_points() == {"t0": 0, "t1": 2, "t2": 0}
    # t0 already owns layer 1 (nothing new); t1 moves down from 2 to 1.
    assert model.grow(1, (0, 1)) == ["l1__t1"]
    assert model.branch_points() == {"t0": 0, "t1": 1, "t2": 0}
    # The architecture replays into the same structure.
    fresh = _conv_mamo("conal", m=3)
    for layer, names in model.architecture():
        fresh.grow_group(layer, names)
    assert fresh.active.keys() == model.active.keys() and fresh.num_parameters() == model.num_parameters()


def test_conal_parameter_counts_and_roles():
    from types import SimpleNamespace

    from mtlkit.models.hps import build_hps

    model = _conv_mamo("conal")
    torch.manual_seed(0)
    hps = build_hps(
        SimpleNamespace(input_shape=(1, 12, 12), tasks=[Task(f"t{k}", "multiclass", 3) for k in range(3)]),
        encoder="conv",
        width=8,
        head_hidden=4,
    )
    n_hps = sum(p.numel() for p in hps.parameters())
    assert model.num_parameters() == n_hps  # no fusion logits: an ungrown CoNAL model is HPS
    sizes = [model.module_parameters(layer) for layer in range(3)]
    model.grow(1, (0, 2))
    assert model.num_parameters() == n_hps + 2 * (sizes[1] + sizes[2])  # two branches of layers 1..2
    model.grow(0, (0, 1))
    assert model.num_parameters() == n_hps + (sizes[0] + sizes[1] + sizes[2]) * 2 + sizes[1] + sizes[2]
    shared = {id(p) for p in model.shared_parameters()}
    assert shared == {id(p) for p in model.all_shared_parameters()}  # branches are not shared
    own = {n: {id(p) for p in ps} for n, ps in model.task_exclusive_parameters().items()}
    branch = {n: {id(p) for p in ps} for n, ps in model.task_module_parameters().items()}
    assert sum(len(v) for v in branch.values()) == sum(1 for _ in model.gmks.parameters())
    for n, mine in own.items():
        assert branch[n] <= mine and not (mine & shared)
        assert all(not (mine & theirs) for o, theirs in own.items() if o != n)
    assert shared | set().union(*own.values()) == {id(p) for p in model.parameters()}
    assert model.has_task_modules() and not _tiny().has_task_modules()
    with pytest.raises(ConfigError, match="belongs to 1"):
        model.grow_group(0, ("t0", "t1"))


class _Stop(Exception):
    pass


class _Routing(Callback):
    """At the first step: the per-task gradients before the backward, and the ``.grad`` the engine wrote."""

    name = "routing"

    def on_losses(self, trainer, step):
        model = trainer.model
        self.shared, self.own = model.shared_parameters(), model.task_exclusive_parameters()
        self.J = per_task_grads(step.losses, self.shared, retain_graph=True)
        self.expect_own = {
            n: per_task_grads(step.losses[t].reshape(1), self.own[n], retain_graph=True)[0]
            for t, n in enumerate(model.task_names)
        }

    def on_backward(self, trainer, step):
        def grads(ps):
            return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in ps])

        self.got_shared = grads(self.shared)
        self.got_own = {n: grads(ps) for n, ps in self.own.items()}
        raise _Stop


def _three_tasks():
    data = _toy_data()
    for s in (data.train, data.val, data.test):
        s.y["c"] = (s.y["a"] + s.y["b"]) % 3
    data.tasks = [*data.tasks, Task("c", "multiclass", 3)]
    return data


@pytest.mark.parametrize("module", ["conal", "exclusive"])
@pytest.mark.parametrize("method", ["mgda", "pcgrad"])
def test_task_owned_modules_take_their_tasks_full_gradient(tmp_path, module, method):
    """KKT of Eq. 14, in the training loop: a module one task owns gets that task's gradient (weight 1), not a^t of
    it; the shared parameters get the aggregator's combination of the per-task gradients over the shared parameters
    only (the loop calls the engine without a representation once the model has task-owned modules)."""
    probe = _Routing()
    t = Trainer(
        _mamo_cfg(tmp_path, method=method, module=module, rounds=0, epochs=1), data=_three_tasks(), callbacks=[probe]
    )
    model = t.model
    assert isinstance(model, MAMO) and model.representation_is_shared_path()
    torch.manual_seed(2)
    t.add_parameters([p for k in model.grow(1, (0, 2)) for p in model.gmks[k].parameters()])
    _perturb(model)
    assert not model.representation_is_shared_path()
    with pytest.raises(_Stop):
        t.fit()
    expect_shared = build_method(method).aggregator(probe.J)  # a fresh copy: PCGrad's random order starts the same
    assert torch.allclose(probe.got_shared, expect_shared, atol=1e-6)
    for n, expect in probe.expect_own.items():
        assert torch.allclose(probe.got_own[n], expect, atol=1e-6), n
        assert float(expect.abs().sum()) > 0, n
    if method == "mgda":  # the test means something: the owners' MGDA weights are not 1
        w = build_method("mgda").aggregator.weights(probe.J @ probe.J.T)
        assert float((1 - w[[0, 2]]).abs().min()) > 1e-3


# ---- search-schedule options (conflict window, pre-training method, optimizer rollback) -----------------------------
def _weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_pretrain_method_ew_is_plain_hps(tmp_path):
    runs = {}
    for name, (method, pre) in {"ew": ("ew", None), "mgda<-ew": ("mgda", "ew"), "mgda": ("mgda", None)}.items():
        t, _, found = _search(
            tmp_path / name.replace("<-", "_"), method=method, rounds=0, epochs=2, pretrain_method=pre, selection="last"
        )
        runs[name] = (_weights(t), found["rounds"][0]["method"])
    assert runs["mgda<-ew"][1] == "ew" and runs["mgda"][1] == "mgda"
    assert all(torch.equal(v, runs["ew"][0][k]) for k, v in runs["mgda<-ew"][0].items())  # pre-training = HPS (EW)
    assert any(not torch.equal(v, runs["ew"][0][k]) for k, v in runs["mgda"][0].items())  # default: HPS + MGDA


def test_pretrain_method_hands_over_to_the_runs_method_at_the_first_detection(tmp_path):
    t, _, found = _search(tmp_path, method="mgda", rounds=2, epochs=3, pretrain_method="ew", detect_batches=2)
    assert [r["method"] for r in found["rounds"]] == ["ew", "mgda", "mgda"]
    assert t.method.name == "mgda" and json.loads((t.run_dir / "results.json").read_text())["method"] == "mgda"


def test_conflict_window_counts_the_phase_or_its_last_batches(tmp_path):
    for window, batches in (("last_batches", 3), ("phase", 2 * _STEPS)):
        _, _, found = _search(
            tmp_path / window, method="ew", rounds=1, epochs=3, conflict_window=window, detect_batches=3
        )  # 2 pre-training epochs, then one round
        assert found["rounds"][1]["q_batches"] == batches, window
        assert int(torch.tensor(found["rounds"][1]["Q"]).max()) <= batches


@pytest.mark.parametrize("restore", [False, True])
def test_rollback_restores_the_optimizer_only_when_asked(tmp_path, monkeypatch, restore):
    loaded = []
    orig = torch.optim.Adam.load_state_dict

    def spy(self, state):
        loaded.append(copy.deepcopy(state))
        return orig(self, state)

    monkeypatch.setattr(torch.optim.Adam, "load_state_dict", spy)
    t, _, _ = _search(tmp_path, method="ew", rounds=1, epochs=5, epochs_per_round=2, restore_optimizer=restore)
    assert len(loaded) == (2 if restore else 0)  # one per phase (pre-training, round 1)
    for state in loaded:  # Adam's step count of a selected epoch: a whole number of epochs of 4 steps
        steps = {int(s["step"]) for s in state["state"].values()}
        assert len(steps) <= 2 and all(s % _STEPS == 0 and s > 0 for s in steps)
    assert all(g["lr"] == 0.01 for g in t.optimizer.param_groups)


# ---- checkpoints: a search stopped midway resumes bit for bit --------------------------------------------------------
def _stop_at(monkeypatch, calls: int) -> None:
    """Make the trainer's ``calls``-th training step raise KeyboardInterrupt (a killed run)."""
    real, count = Trainer._step, [0]

    def step(self, *args, **kwargs):
        count[0] += 1
        if count[0] == calls:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_step", step)


_RESUME_CASES = {
    # the 4th step: inside pre-training's conflict window (its last 2 batches), after one batch of Q
    "in the conflict window": (_STEPS, 1e-9, {}, (-1, 3)),
    # inside round 1, after the first growth and the switch from the pre-training method
    "inside a round": (
        _STEPS + 2,
        1e-9,
        {"pretrain_method": "ew", "restore_optimizer": True, "conflict_window": "phase"},
        (0, 1),
    ),
    # no mid-epoch checkpoints: the last one is the end of pre-training, with the growth; the epoch is redone
    "after a growth": (_STEPS + 3, 0.0, {"restore_optimizer": True}, (0, None)),
}


@pytest.mark.parametrize("case", list(_RESUME_CASES))
def test_a_search_stopped_midway_resumes_bit_for_bit(tmp_path, monkeypatch, case):
    stop, minutes, options, (epoch, batch) = _RESUME_CASES[case]
    model = {"rounds": 2, "threshold": "topk", "k": 1, "detect_batches": 2, **options}
    _, full, found = _search(tmp_path / "a", **model)
    assert found["architecture"], "the test needs a search that grows"
    cfg = _mamo_cfg(tmp_path / "b", checkpoint_minutes=minutes, **model)
    _stop_at(monkeypatch, stop)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg).fit()
    monkeypatch.undo()
    ck = torch.load(tmp_path / "b" / "run" / "checkpoint.pt", weights_only=False)
    assert (ck["epoch"], (ck["in_epoch"] or {}).get("batch")) == (epoch, batch)
    state = ck["callbacks"]["mamo"]
    assert len(state["grown"]) == epoch + 1 and len(state["records"]) == epoch + 1
    if case == "in the conflict window":
        assert state["batches"] == 1  # the Q of a partly counted window is in the checkpoint
    with pytest.raises(ConfigError, match="schedule"):
        Trainer(cfg.override(["train.epochs=4"])).fit(resume=True)
    resumed = Trainer(cfg).fit(resume=True)
    assert resumed.test == full.test and resumed.val == full.val and resumed.best_epoch == full.best_epoch
    drop = {"seconds"}
    assert [{k: v for k, v in h.items() if k not in drop} for h in resumed.history] == [
        {k: v for k, v in h.items() if k not in drop} for h in full.history
    ]
    assert json.loads((tmp_path / "b" / "run" / "results.json").read_text())["mamo"] == found
    a, b = (torch.load(tmp_path / d / "run" / "checkpoint.pt", weights_only=False) for d in ("a", "b"))
    assert a["model"].keys() == b["model"].keys()
    for k, v in a["model"].items():  # the last epoch's weights, bit for bit
        torch.testing.assert_close(b["model"][k], v, rtol=0, atol=0)
    for k, v in a["best_state"].items():  # and the selected model
        torch.testing.assert_close(b["best_state"][k], v, rtol=0, atol=0)
    assert len(a["optimizer"]["param_groups"]) == len(b["optimizer"]["param_groups"])
    for i, s in a["optimizer"]["state"].items():
        for k, v in s.items():
            torch.testing.assert_close(b["optimizer"]["state"][i][k], v, rtol=0, atol=0)


# ---- mtlkit train --model mamo -------------------------------------------------------------------------------------
def test_cli_train_runs_the_search(tmp_path, capsys):
    from mtlkit.cli import main

    argv = [
        "train",
        "--dataset",
        "_toy",
        "--model",
        "mamo",
        "--method",
        "mgda",
        "--batch-size",
        "16",
        "--lr",
        "0.01",
        "--no-progress",
        "--set",
        "dataset.options.n_train=64",
        "--set",
        "dataset.options.n_val=16",
        "--set",
        "dataset.options.n_test=16",
        "--set",
        "model.options.encoder=mlp",
        "--set",
        "model.options.hidden=[12,10]",
        "--set",
        "model.options.head_hidden=6",
        "--set",
        "model.options.threshold=topk",
        "--set",
        "model.options.detect_batches=2",
        "--set",
        "output.tensorboard=false",
    ]
    assert main(argv + ["--epochs", "3", "--run-dir", str(tmp_path / "cli")]) == 0
    found = json.loads((tmp_path / "cli" / "results.json").read_text())["mamo"]
    assert [r["round"] for r in found["rounds"]] == [0, 1, 2] and found["pretrain_epochs"] == 1
    assert found["architecture"] and all(r["method"] == "mgda" for r in found["rounds"])
    # The same run as a Trainer (the CLI adds nothing to the search).
    _, _, direct = _search(tmp_path, rounds=2, threshold="topk", detect_batches=2)
    assert direct == found
    # The grown model loads from the run directory (built from its config, then best.pt: mtlkit eval, --reuse).
    from mtlkit.evaluation import load_run

    _, data, model = load_run(tmp_path / "cli")
    assert [[layer, list(g)] for layer, g in model.architecture()] == found["architecture"]
    results = json.loads((tmp_path / "cli" / "results.json").read_text())
    assert evaluate(model, data.test, data.tasks) == results["test"]
    capsys.readouterr()
    assert main(argv + ["--epochs", "2", "--run-dir", str(tmp_path / "short")]) == 2
    assert "pre-training" in capsys.readouterr().err
    assert (
        main(
            argv
            + [
                "--epochs",
                "3",
                "--run-dir",
                str(tmp_path / "rep"),
                "--level",
                "representation",
                "--set",
                "model.options.module=conal",
            ]
        )
        == 2
    )
    assert "representation-level" in capsys.readouterr().err


# ---- mtlkit reproduce mamo ---------------------------------------------------------------------------------------
def test_reproduce_mamo_end_to_end_verdicts_and_reuse(tmp_path, monkeypatch):
    """A tiny run on the synthetic ``_toy`` data with the default rows: verdicts computed from paired per-seed
    numbers, the budget in every table, Fig. 4's round 0 is plain HPS, --reuse retrains nothing."""
    import argparse
    import json

    from mtlkit.reproduce import load_all
    from mtlkit.reproduce.mamo import DATASETS, DEFAULT_ROWS

    monkeypatch.setitem(DATASETS, "toy", ("_toy", {"seed": 0}, ("n_train", "n_val", "n_test")))
    rep = load_all()["mamo"]
    p = argparse.ArgumentParser()
    rep.add_arguments(p)
    argv = [
        "--dataset",
        "toy",
        "--n-train",
        "48",
        "--n-val",
        "16",
        "--n-test",
        "16",
        "--encoder",
        "mlp",
        "--hidden",
        "8",
        "6",
        "--head-hidden",
        "4",
        "--pretrain-epochs",
        "1",
        "--rounds",
        "1",
        "--epochs-per-round",
        "1",
        "--batch-size",
        "16",
        "--threshold",
        "topk",
        "--k",
        "1",
        "--seeds",
        "0",
        "1",
        "--out",
        str(tmp_path),
    ]
    assert rep.run(p.parse_args(argv)) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert set(res["results"]) == set(DEFAULT_ROWS)
    assert [k for k, _ in res["metrics"]] == ["a/accuracy", "a/loss", "b/accuracy", "b/loss"]  # two metrics a task
    claims = {c["claim"]: c for c in res["claims"]}
    for claim in (
        "MAMO has the best Δm of the rows run",
        "MAMO wins on 100 % of the metrics against STL",
        "MAMO beats HPS",
        "MAMO beats STL (Δm > 0)",
        "HPS shows negative transfer (Δm(HPS) < 0)",
        "GMKs beat CoNAL-faithful task branches (MAMO vs w/o GMK)",
    ):
        assert claims[claim]["verdict"].split(" (")[0] in ("supported", "not supported", "mixed"), claim
    r = res["results"]
    mamo_vs_hps = [r["mamo"][s]["delta"] - r["hps"][s]["delta"] for s in ("0", "1")]
    assert claims["MAMO beats HPS"]["paired"]["diffs"] == pytest.approx(mamo_vs_hps)
    assert all(run["rounds"][0]["method"] == "ew" for run in r["mamo"].values())  # round 0 = plain HPS
    md = (tmp_path / "report.md").read_text()
    tables = md.split("\n## ")[1:]
    assert all("_Budget:" in t for t in tables) and "Paired differences MAMO − HPS" in md
    stamp = {q: q.stat().st_mtime_ns for q in tmp_path.glob("runs/*/*.json")}
    assert rep.run(p.parse_args(argv + ["--reuse"])) == 0
    assert {q: q.stat().st_mtime_ns for q in tmp_path.glob("runs/*/*.json")} == stamp
    with pytest.raises(ConfigError, match="another config"):
        rep.run(p.parse_args(argv[:-2] + ["--out", str(tmp_path), "--reuse", "--rows", "mamo", "--k", "2"]))
