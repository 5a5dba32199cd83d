"""The engine's per-task gradients and update writing agree with separate backward passes."""

import pytest
import torch
from torch import nn

from mtlkit.aggregation import Aggregator, Mean, Sum
from mtlkit.engine.autodiff import backward, per_task_grads, split_flat


class _Net(nn.Module):
    def __init__(self, T: int = 3):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6))
        self.heads = nn.ModuleList(nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 1)) for _ in range(T))

    def losses(self, x, return_z=False):
        z = self.enc(x)
        out = torch.stack([((h(z).squeeze(-1) - float(t)) ** 2).mean() for t, h in enumerate(self.heads)])
        return (out, z) if return_z else out


def _reference(net, x):
    """T separate backward passes: per-task grads of shared params, and summed head grads."""
    shared = list(net.enc.parameters())
    rows, head = [], None
    for t in range(len(net.heads)):
        net.zero_grad()
        net.losses(x)[t].backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in shared]))
    net.zero_grad()
    net.losses(x).sum().backward()
    head = [p.grad.clone() for p in net.heads.parameters()]
    net.zero_grad()
    return torch.stack(rows), head


class _First(Aggregator):
    """Keeps task 0's gradient only: makes a wrong row order visible."""

    def aggregate(self, J):
        return J[0]


@pytest.mark.parametrize("use_rep", [False, True])
@pytest.mark.parametrize("mode", ["loop", "batched"])
def test_per_task_gradients_match_separate_backward(use_rep, mode):
    torch.manual_seed(0)
    net = _Net().double()
    x = torch.randn(7, 5, dtype=torch.float64)
    J_ref, head_ref = _reference(net, x)
    losses, z = net.losses(x, return_z=True)
    info = backward(losses, net.enc.parameters(), _First(), representation=z if use_rep else None, mode=mode)
    torch.testing.assert_close(info.jacobian, J_ref, atol=1e-6, rtol=1e-6)
    got = torch.cat([p.grad.reshape(-1) for p in net.enc.parameters()])
    torch.testing.assert_close(got, J_ref[0], atol=1e-6, rtol=1e-6)
    for p, g in zip(net.heads.parameters(), head_ref, strict=True):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-6)


def test_sum_equals_plain_backward_and_accumulates():
    torch.manual_seed(1)
    net = _Net().double()
    x = torch.randn(4, 5, dtype=torch.float64)
    J, head_ref = _reference(net, x)
    backward(net.losses(x), net.enc.parameters(), Sum())
    backward(net.losses(x), net.enc.parameters(), Mean())
    # Sum then Mean accumulate like two .backward() calls: shared = J.sum + J.mean, heads = 2 x their own gradient.
    got = torch.cat([p.grad.reshape(-1) for p in net.enc.parameters()])
    torch.testing.assert_close(got, J.sum(0) + J.mean(0))
    for p, g in zip(net.heads.parameters(), head_ref, strict=True):
        torch.testing.assert_close(p.grad, 2 * g)


def test_representation_level_uses_gradients_wrt_z():
    torch.manual_seed(2)
    net = _Net(T=2).double()
    x = torch.randn(6, 5, dtype=torch.float64)
    losses, z = net.losses(x, return_z=True)
    info = backward(losses, net.enc.parameters(), _First(), representation=z, level="representation")
    assert info.jacobian.shape == (2, z.numel())
    net.zero_grad()
    losses, z = net.losses(x, return_z=True)
    losses[0].backward()
    ref = [p.grad.clone() for p in net.enc.parameters()]
    # _First keeps task 0's z-gradient; back-propagating it gives exactly task 0's encoder gradient.
    net.zero_grad()
    losses, z = net.losses(x, return_z=True)
    backward(losses, net.enc.parameters(), _First(), representation=z, level="representation")
    for p, r in zip(net.enc.parameters(), ref, strict=True):
        torch.testing.assert_close(p.grad, r)


def test_reduce_hook_sees_the_matrix():
    net = _Net(T=2)
    seen = {}

    def reduce(J):
        seen["shape"] = tuple(J.shape)
        return J * 2

    losses = net.losses(torch.randn(3, 5))
    info = backward(losses, net.enc.parameters(), Sum(), reduce=reduce)
    P = sum(p.numel() for p in net.enc.parameters())
    assert seen["shape"] == (2, P)
    torch.testing.assert_close(info.update, info.jacobian.sum(0))


def test_bad_inputs_are_named():
    net = _Net(T=2)
    losses = net.losses(torch.randn(3, 5))
    with pytest.raises(FloatingPointError, match="depth"):
        backward(torch.stack([losses[0], losses[1] * float("nan")]), net.enc.parameters(), task_names=["seg", "depth"])
    with pytest.raises(ValueError, match="1-D"):
        backward(losses.sum(), net.enc.parameters())
    with pytest.raises(ValueError, match="representation"):
        backward(losses, net.enc.parameters(), Sum(), level="representation")
    with pytest.raises(ValueError, match="empty"):
        backward(losses, [], Sum())


def test_per_task_grads_and_split_flat():
    w = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    J = per_task_grads(torch.stack([w.sum(), (w**2).sum()]), [w])
    torch.testing.assert_close(J, torch.tensor([[1.0, 1.0, 1.0], [2.0, 4.0, 6.0]]))
    parts = split_flat(J, [torch.zeros(1), torch.zeros(2)])
    assert parts[0].shape == (2, 1) and parts[1].shape == (2, 2)
    with pytest.raises(ValueError, match="entries"):
        split_flat(J, [torch.zeros(1)])


def _matmuls_in(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm"))


def test_stack_keeps_each_task_backward_inside_its_own_head():
    from mtlkit.engine.autodiff import stack

    torch.manual_seed(3)
    net = _Net(T=6)
    z = net.enc(torch.randn(5, 5))
    outs = [((h(z).squeeze(-1) - float(t)) ** 2).mean() for t, h in enumerate(net.heads)]
    ours, ref = stack(outs), torch.stack(outs)
    torch.testing.assert_close(ours, ref)
    run = lambda v: [torch.autograd.grad(v[t], z, retain_graph=True) for t in range(6)]  # noqa: E731
    # Each head has 2 linear layers: a per-task backward through its own head only costs a few matmuls; through
    # every head (torch.stack hands the others zero gradients) it costs T times as many.
    n_ours, n_ref = _matmuls_in(lambda: run(ours)), _matmuls_in(lambda: run(ref))
    assert n_ref >= 5 * n_ours > 0
    grads = run(ours)
    for t in range(6):
        torch.testing.assert_close(grads[t][0], torch.autograd.grad(outs[t], z, retain_graph=True)[0])
    with pytest.raises(ValueError, match="scalar"):
        stack([torch.zeros(2)])


def _rep_reference(losses_fn, z_fn, T):
    """∂L_t/∂z for each task by T separate graphs (nothing shared between the passes)."""
    rows = []
    for t in range(T):
        z = z_fn()
        (g,) = torch.autograd.grad(losses_fn(z)[t], z, allow_unused=True)
        rows.append(g if g is not None else torch.zeros_like(z))
    return torch.stack(rows)


@pytest.mark.parametrize("case", ["heads", "shared_layer_after_z", "mixing_weighting", "task_without_z"])
def test_head_phase_matches_separate_passes_and_falls_back_when_it_must(case):
    from mtlkit.engine.autodiff import _head_phase, stack

    torch.manual_seed(4)
    net = _Net(T=3).double()
    post = nn.Linear(6, 6).double()
    x = torch.randn(5, 5, dtype=torch.float64)
    extra = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)

    def losses_fn(z):
        u = post(z) if case == "shared_layer_after_z" else z
        raw = [((h(u).squeeze(-1) - float(t)) ** 2).mean() for t, h in enumerate(net.heads)]
        if case == "task_without_z":
            raw[1] = extra * extra
        L = stack(raw)
        if case == "mixing_weighting":  # task t's weight depends on another task's loss: not a per-task weighting
            return L * (1.0 + L.flip(0))
        return L * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)

    ref = _rep_reference(losses_fn, lambda: net.enc(x), 3)
    z = net.enc(x)
    leaves = list(net.heads.parameters()) + list(post.parameters()) + [extra]
    dzs, _ = _head_phase(losses_fn(z), z, leaves)
    torch.testing.assert_close(torch.stack(dzs), ref, atol=1e-10, rtol=1e-10)


def test_head_phase_runs_each_head_once():
    from mtlkit.engine.autodiff import _head_phase, stack

    torch.manual_seed(5)
    net = _Net(T=6)
    x = torch.randn(5, 5)
    z = net.enc(x)
    losses = stack([((h(z).squeeze(-1) - float(t)) ** 2).mean() for t, h in enumerate(net.heads)])
    leaves = list(net.heads.parameters())
    ew = _matmuls_in(lambda: torch.autograd.grad(losses.sum(), [z] + leaves, retain_graph=True))
    ours = _matmuls_in(lambda: _head_phase(losses, z, leaves))
    # One pass of the summed loss through the heads: the same matrix products as EW's backward of the heads.
    assert ours == ew > 0


def test_gradients_written_by_the_engine_never_alias_each_other():
    # Both biases receive the very same gradient tensor from autograd (AddBackward passes it through): handing it to
    # both as .grad would make a later accumulation into one change the other.
    torch.manual_seed(6)
    enc = nn.Linear(3, 4)
    b1, b2 = nn.Parameter(torch.zeros(5, 4)), nn.Parameter(torch.zeros(5, 4))
    z = enc(torch.randn(5, 3))
    losses = torch.stack([(z + b1 + b2).pow(2).mean(), z.sum()])
    backward(losses, enc.parameters(), Mean(), representation=z, level="representation")
    assert b1.grad.data_ptr() != b2.grad.data_ptr()
    before = b2.grad.clone()
    b1.grad.add_(1.0)
    torch.testing.assert_close(b2.grad, before)


# -- a representation the losses were not computed from is an error, never a silent zero gradient ----------------------

# Every path through the engine that uses ``representation``: (aggregator, level, mode, keep_jacobian). Mean at
# parameter level forms J row by row (loop) or vectorised (batched); MGDA takes the Gramian path unless
# keep_jacobian; at representation level MGDA gets G from the rows of ∂L/∂z, or J with keep_jacobian.
_REP_PATHS = [
    ("mean", "parameter", "loop", False),
    ("mean", "parameter", "batched", False),
    ("mgda", "parameter", "loop", False),
    ("mgda", "parameter", "batched", False),
    ("mgda", "parameter", "loop", True),
    ("mgda", "parameter", "batched", True),
    ("mgda", "representation", "loop", False),
    ("mgda", "representation", "loop", True),
]


def _agg(name):
    from mtlkit.aggregation import MGDA

    return Mean() if name == "mean" else MGDA()


def _rep_case(case, net, x, skip=None, post=None):
    """(losses, representation, shared params) for one way of passing the wrong representation.

    ``skip``: a layer from the input (5 features) to one output; ``post``: a layer on z (6 features)."""
    from mtlkit.engine.autodiff import stack

    z = net.enc(x)
    rep, shared, outs = z, list(net.enc.parameters()), [h(z) for h in net.heads]
    if case == "encoder_called_twice":
        rep = net.enc(x)  # the heads read the first call's output
    elif case == "leaf":
        rep = z.detach().requires_grad_()
    elif case == "detached":
        rep = z.detach()
    elif case == "not_from_shared":  # a non-leaf z computed from a detached tensor: the heads do read it
        rep = z.detach().requires_grad_() * 2.0
        outs = [h(rep) for h in net.heads]
    elif case == "task_reads_another_call":
        outs[1] = net.heads[1](net.enc(x))
    elif case == "skip_connection":  # a shared layer from the input straight to every head, around z
        shared += list(skip.parameters())
        outs = [o + skip(x) for o in outs]
    elif case == "shared_layer_after_z":  # a layer every head reads, passed as shared, after z
        shared += list(post.parameters())
        outs = [h(torch.tanh(post(z))) for h in net.heads]
    losses = stack([((o.squeeze(-1) - float(t)) ** 2).mean() for t, o in enumerate(outs)])
    return losses, rep, shared


_REP_ERRORS = {
    "encoder_called_twice": "representation is not an input of the losses' graph: pass the tensor the task heads "
    "read (was the encoder called twice?)",
    "leaf": "representation is a leaf tensor",
    "detached": "representation does not require grad",
    "not_from_shared": "representation does not depend on any of shared_params",
    "task_reads_another_call": "of shared_params .* reach the losses without going through representation",
    "skip_connection": "2 of shared_params .* reach the losses without going through representation",
    "shared_layer_after_z": "2 of shared_params .* reach the losses without going through representation",
}


@pytest.mark.parametrize("path", _REP_PATHS, ids=lambda p: "-".join(map(str, p)))
@pytest.mark.parametrize("case", list(_REP_ERRORS))
def test_wrong_representation_is_a_config_error_before_any_grad_is_written(case, path):
    import re

    from mtlkit.errors import ConfigError

    agg, level, mode, keep = path
    torch.manual_seed(7)
    net, skip, post = _Net(T=3).double(), nn.Linear(5, 1).double(), nn.Linear(6, 6).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    losses, rep, shared = _rep_case(case, net, x, skip, post)
    extra = sum(p.pow(2).sum() for p in net.enc.parameters())
    with pytest.raises(
        ConfigError, match=re.escape(_REP_ERRORS[case]) if case == "encoder_called_twice" else _REP_ERRORS[case]
    ) as err:
        backward(losses, shared, _agg(agg), representation=rep, level=level, mode=mode, keep_jacobian=keep, extra=extra)
    assert "representation" in str(err.value) and isinstance(err.value, ValueError)
    # Raised before anything is accumulated: not the heads, not the extra loss, not the encoder.
    assert all(p.grad is None for m in (net, skip, post) for p in m.parameters())


@pytest.mark.parametrize("case", ["leaf", "detached"])
def test_a_detached_representation_is_an_error_even_for_a_plain_sum(case):
    from mtlkit.errors import ConfigError

    torch.manual_seed(8)
    net = _Net(T=2)
    losses, rep, shared = _rep_case(case, net, torch.randn(4, 5))
    with pytest.raises(ConfigError, match="representation"):
        backward(losses, shared, Sum(), representation=rep)


def test_plain_sum_does_not_use_the_representation():
    # Documented: with no per-task gradients z is not used (only the O(1) checks), and the gradient is the sum's.
    torch.manual_seed(9)
    net = _Net(T=2).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    losses, rep, shared = _rep_case("encoder_called_twice", net, x)
    backward(losses, shared, Sum(), representation=rep)
    got = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    net.losses(x).sum().backward()
    for g, p in zip(got, net.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad)


@pytest.mark.parametrize("path", _REP_PATHS, ids=lambda p: "-".join(map(str, p)))
def test_a_task_reading_neither_z_nor_a_shared_parameter_has_a_zero_row(path):
    # Supported (as with representation=None, and _head_phase's "task_without_z" case): that task's gradient w.r.t.
    # the shared parameters and z is zero, and the engine gives exactly that.
    from mtlkit.engine.autodiff import stack

    agg, level, mode, keep = path
    torch.manual_seed(10)
    net = _Net(T=3).double()
    own = nn.Parameter(torch.tensor(0.5, dtype=torch.float64))
    x = torch.randn(4, 5, dtype=torch.float64)

    def run(with_rep):
        net.zero_grad()
        own.grad = None
        z = net.enc(x)
        raw = [((h(z).squeeze(-1) - float(t)) ** 2).mean() for t, h in enumerate(net.heads)]
        raw[1] = (own - 2.0) ** 2
        info = backward(
            stack(raw),
            net.enc.parameters(),
            _agg(agg),
            representation=z if with_rep else None,
            level=level if with_rep else "parameter",
            mode=mode,
            keep_jacobian=keep,
        )
        return info, [p.grad.clone() if p.grad is not None else None for p in net.parameters()] + [own.grad.clone()]

    info, got = run(True)
    if info.jacobian is not None:
        assert bool((info.jacobian[1] == 0).all()) and bool((info.jacobian[0] != 0).any())
    if level == "parameter":
        _, ref = run(False)
        for g, r in zip(got, ref, strict=True):
            assert (g is None) == (r is None)  # head 1 is unused: no gradient, as with representation=None
            if g is not None:
                torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(got[-1], 2 * (own.detach() - 2.0))


def test_a_shared_parameter_read_directly_is_a_valid_representation():
    # A leaf z is an error unless it is itself a shared parameter (e.g. an embedding table the heads read).
    from mtlkit.aggregation import MGDA
    from mtlkit.engine.autodiff import stack

    torch.manual_seed(11)
    emb = nn.Parameter(torch.randn(4, 6, dtype=torch.float64))
    heads = nn.ModuleList(nn.Linear(6, 1).double() for _ in range(3))
    grads = []
    for rep in (emb, None):
        emb.grad = None
        backward(stack([h(emb).pow(2).mean() for h in heads]), [emb], MGDA(), representation=rep)
        grads.append(emb.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_backward_accumulates_into_grad_like_torch():
    # As the README says: backward adds to .grad, so a training loop zeroes the gradients before each call.
    from mtlkit.aggregation import MGDA

    torch.manual_seed(12)
    net = _Net(T=2).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    for n in (1, 2):
        losses, z = net.losses(x, return_z=True)
        backward(losses, net.enc.parameters(), MGDA(), representation=z)
        if n == 1:
            once = [p.grad.clone() for p in net.parameters()]
    for p, g in zip(net.parameters(), once, strict=True):
        torch.testing.assert_close(p.grad, 2 * g)
