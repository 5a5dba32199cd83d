"""MAMO (Tan, Hu & Zhang, ECAI 2024): search space, conflict indicator (Eqs. 9-13, TopK), Alg. 1 driver."""
import copy

import pytest
import torch
from torch import nn

from mtlkit.autodiff import backward, per_task_grads
from mtlkit.data import build_dataset
from mtlkit.errors import ConfigError
from mtlkit.mamo import (ConflictDetector, MAMOConfig, average_indicator, conflicts, cosine_matrix, layer_gradients,
                         learn_mamo, proxy_indicator, topk_indicator)
from mtlkit.methods import build_method
from mtlkit.models.hps import HPS
from mtlkit.models.mamo import MAMO, build_mamo, split_layers
from mtlkit.tasks import Task, stack_losses


def _tiny(m: int = 3, module: str = "gmk", seed: int = 0) -> MAMO:
    torch.manual_seed(seed)
    layers = [nn.Sequential(nn.Linear(5, 6), nn.ReLU()), nn.Sequential(nn.Linear(6, 6), nn.Tanh()),
              nn.Sequential(nn.Linear(6, 4), nn.ReLU())]
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
    I = average_indicator(Q)
    expected = torch.zeros(4, 4, dtype=torch.int32)
    expected[0, 1] = expected[1, 0] = 1  # only 6 >= 3.67
    assert torch.equal(I, expected)
    # Lowering the largest count to 4: the average is (4+2+3)/3 = 3 and the count 3 reaches it (>=, Eq. 13).
    Q[0, 1] = Q[1, 0] = 4
    expected[1, 3] = expected[3, 1] = 1
    assert torch.equal(average_indicator(Q), expected)
    # Equal counts are all activated, while zero counts never are.
    Q2 = torch.tensor([[0., 2., 2.], [2., 0., 0.], [2., 0., 0.]])
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
    direct = [per_task_grads(losses, model.layer_parameters(l)) for l in range(3)]
    info = backward(losses, model.shared_parameters(), build_method("mgda").aggregator, representation=z,
                    keep_jacobian=True)
    for a, b in zip(layer_gradients(model, info.jacobian), direct):
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
    info = backward(losses, model.shared_parameters(), build_method("mgda").aggregator, representation=z,
                    keep_jacobian=True)
    start = sum(p.numel() for p in model.all_shared_parameters())
    n01 = sum(p.numel() for p in model.gmks["l0__t0__t1"].parameters())
    assert float(info.jacobian[2, start:start + n01].abs().sum()) == 0.0
    assert float(info.jacobian[0, start:start + n01].abs().sum()) > 0.0


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
    sizes = [model.module_parameters(l) for l in range(3)]
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


# ---- Alg. 1 ----------------------------------------------------------------------------------------------------------
def _toy_data(identical: bool = False):
    data = build_dataset("_toy", n_train=64, n_val=16, n_test=16)
    if identical:  # the same labels for both tasks
        for s in (data.train, data.val, data.test):
            s.y["b"] = s.y["a"].clone()
    return data


def _toy_model(data, identical_heads: bool = False) -> MAMO:
    torch.manual_seed(0)
    m = build_mamo(data, encoder="mlp", hidden=(12, 10), head_hidden=6)
    if identical_heads:
        m.heads["b"].load_state_dict(m.heads["a"].state_dict())
    return m


def test_no_conflict_mamo_equals_hps():
    data = _toy_data(identical=True)
    model = _toy_model(data, identical_heads=True)  # identical tasks: identical task gradients, cos = 1
    hps = HPS(nn.Sequential(*copy.deepcopy(list(model.layers))), copy.deepcopy(dict(model.heads)))
    cfg = MAMOConfig(method="mgda", rounds=2, pretrain_epochs=1, epochs_per_round=1, detect_batches=2,
                     batch_size=16, lr=0.01, selection="last")
    res = learn_mamo(model, data, cfg)
    assert model.active == {} and [len(r.activated) for r in res.rounds] == [0, 0, 0]
    # Plain HPS through the engine, same batches, same optimiser.
    agg = build_method("mgda").aggregator
    opt = torch.optim.Adam(list(hps.parameters()) + [torch.nn.Parameter(torch.zeros(2)) for _ in range(2)], lr=0.01)
    n = len(data.train)
    for epoch in range(3):
        hps.train()
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
        for b in range(4):
            idx = perm[b * 16:(b + 1) * 16]
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
    assert res.rounds[-1].parameters == sum(p.numel() for p in hps.parameters()) + 2 * 2  # + the β logits


def test_learning_grows_modules_and_records_rounds():
    data = _toy_data()
    model = _toy_model(data)
    cfg = MAMOConfig(method="ew", rounds=2, pretrain_epochs=1, epochs_per_round=1, threshold="topk", k=1,
                     detect_batches=4, batch_size=16, lr=0.01)
    res = learn_mamo(model, data, cfg)
    grown = [r for r in res.rounds[1:] if r.activated]
    sizes = [r.parameters for r in res.rounds]
    assert sizes == sorted(sizes) and len(model.active) == sum(len(r.activated) for r in res.rounds)
    for r0, r1 in zip(res.rounds, res.rounds[1:]):
        assert r1.parameters - r0.parameters == sum(model.module_parameters(l) for l, _ in r1.activated)
    assert res.rounds[0].Q is None and all(r.Q is not None for r in res.rounds[1:])
    # TopK with k = 1 activates at most one new module per round (when any conflict was counted).
    assert all(len(r.activated) <= 1 for r in grown)
    assert set(res.test) >= {"a/accuracy", "b/accuracy"}


def test_learn_mamo_rejects_bad_config():
    data = _toy_data()
    with pytest.raises(ConfigError, match="threshold"):
        learn_mamo(_toy_model(data), data, MAMOConfig(threshold="median"))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unknown method"):
        learn_mamo(_toy_model(data), data, MAMOConfig(method="nope", rounds=0, pretrain_epochs=0))
    with pytest.raises(ConfigError, match="detect_batches"):
        learn_mamo(_toy_model(data), data, MAMOConfig(detect_batches=0))


def test_detection_without_training_changes_nothing_but_the_architecture():
    data = _toy_data()
    model = _toy_model(data)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    res = learn_mamo(model, data, MAMOConfig(method="ew", rounds=1, pretrain_epochs=0, epochs_per_round=0,
                                             threshold="topk", k=1, detect_batches=3, batch_size=16))
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)  # BatchNorm statistics included
    Q = torch.tensor(res.rounds[1].Q)
    assert Q.shape == (model.num_layers, 2, 2) and int(Q.max()) <= 3
    assert len(model.active) == (1 if int(Q.sum()) > 0 else 0)


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

    rel = relative({"a/accuracy": 0.9, "b/mae": 1.0}, {"a/accuracy": 0.8, "b/mae": 2.0},
                   [("a/accuracy", True), ("b/mae", False)])
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
        _perturb(model)                                                   # train the modules and the fusion logits
    assert len(model.groups()) == (len(pairs) if module == "gmk" else m)
