"""Setups for the documentation's code snippets (tests/test_readme.py runs every ```python block).

A snippet that uses names the reader already has (their model, their data) names one of these functions in an HTML
comment right above its block::

    <!-- test-setup: tests/readme_setups.py::own_loop -->

The function returns the names the snippet may use (a dict), or yields them, pytest-fixture style: the code after
the ``yield`` runs after the snippet, with the snippet's names, and checks what it did.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


def own_loop() -> Iterator[dict[str, Any]]:
    """README, "In your own training loop": the reader's model (a shared encoder and task heads), a batch ``x``,
    one target per task ``ys``, a loss function and an optimizer."""
    torch.manual_seed(0)

    class TwoTaskNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(36 * 36, 32), nn.ReLU())
            self.heads = nn.ModuleList([nn.Linear(32, 10) for _ in range(2)])

    model = TwoTaskNet()
    before = [p.detach().clone() for p in model.parameters()]
    ns: dict[str, Any] = {
        "model": model,
        "x": torch.rand(16, 1, 36, 36),
        "ys": [torch.randint(0, 10, (16,)) for _ in range(2)],
        "loss_fn": nn.functional.cross_entropy,
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.1),
    }
    yield ns
    # The snippet made one optimizer step from a gradient on every parameter: the encoder's combined by the
    # aggregator, each head's its own task's.
    for p, p0 in zip(model.parameters(), before, strict=True):
        assert p.grad is not None and torch.isfinite(p.grad).all()
        assert not torch.equal(p.detach(), p0)


def new_method() -> Iterator[dict[str, Any]]:
    """README, "Your own method": the snippet registers a method; afterwards it is checked and unregistered again, so
    that the registry-derived method lists of the other tests stay as they are."""
    from mtlkit._registry import METHODS
    from mtlkit.methods import available_methods, method_options

    yield {}
    try:
        assert "loss_power" in available_methods() and method_options("loss_power") == {"p": 0.5}
    finally:
        METHODS._entries.pop("loss_power", None)  # test-only: the registry offers no public way to forget a name
