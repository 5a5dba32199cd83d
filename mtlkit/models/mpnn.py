"""The MPNN of Gilmer et al. as the QM9 multi-task papers run it (edge network + GRU + Set2Set, hidden 64).

Gilmer, Schoenholz, Riley, Vinyals, Dahl, "Neural Message Passing for Quantum Chemistry", ICML 2017, PMLR 70:1263-1272
(arXiv:1704.01212). Message passing for T steps, Eqs. (1)-(2), then a readout, Eq. (3):

    m_v^{t+1} = AGG_{w ∈ N(v)} M(h_v^t, h_w^t, e_vw),    h_v^{t+1} = U(h_v^t, m_v^{t+1}),    ŷ = R({h_v^T})

with the *edge network* message M = A(e_vw) h_w (Sec. 5.1: A maps the edge features to a d x d matrix), the GRU
update U (Sec. 5.1, weights tied over the steps) and the set2set readout R (Vinyals, Bengio, Kudlur, "Order Matters:
Sequence to sequence for sets", ICLR 2016). Concretely, as in the code of Nash-MTL (Navon et al., "Multi-Task Learning
as a Bargaining Game", ICML 2022, PMLR 162; experiments/quantum_chemistry/models.py, itself PyG's qm9_nn_conv
example), which FAMO and LibMTL reuse:

* h^0 = ReLU(W_0 x_v), width ``dim`` = 64;
* 3 steps of m = ReLU(NNConv(h, e)) with A = Linear(5, 128) - ReLU - Linear(128, 64·64) and **mean** aggregation
  (Gilmer et al. sum), then (h, state) = GRU(m, state);
* Set2Set with 3 processing steps (output 2·dim), then z = ReLU(W_1 · set2set) (width 64): the shared representation
  (:meth:`MPNN.encode`, everything above is :attr:`MPNN.encoder`);
* one Linear(64, 1) head per task (:meth:`MPNN.decode`). The papers' text speaks of one 11-output linear layer; their
  code has 11 separate Linear(64, 1) heads, which is the same function (each output row of an 11 x 64 layer is one
  head), with the heads as the task-specific parameters and W_1 as the last shared layer.

Inputs are :class:`mtlkit.data.qm9.GraphBatch` es (node features, complete-graph edges with bond one-hot + distance);
the layers come from PyTorch Geometric (``NNConv``, ``Set2Set``: pure Python, no torch_scatter needed), installed by
``pip install -e '.[molecules]'``.

Example:
    >>> import numpy as np, torch
    >>> from types import SimpleNamespace
    >>> from mtlkit.data.qm9 import GraphInputs, molecule_graph
    >>> from mtlkit.tasks import Task
    >>> w = molecule_graph("O", np.array([8, 1, 1]), np.array([[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]], "float32"))
    >>> x = GraphInputs.from_graphs([w, w])
    >>> data = SimpleNamespace(train=SimpleNamespace(x=x), tasks=[Task("a", "regression"), Task("b", "regression")])
    >>> m = build_mpnn(data)
    >>> {k: tuple(v.shape) for k, v in m(x.to("cpu")).items()}
    {'a': (2, 1), 'b': (2, 1)}
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlkit.errors import ConfigError
from mtlkit.models.base import MTLModel, register_model


def _pyg() -> Any:
    try:
        import torch_geometric.nn as pyg_nn
    except ImportError as e:
        raise ConfigError(
            "model mpnn needs PyTorch Geometric, which is not installed: pip install -e '.[molecules]' "
            "(rdkit, torch-geometric)"
        ) from e
    return pyg_nn


class MPNNEncoder(nn.Module):
    """Message passing (edge network + GRU, ``steps`` times, weights tied) and Set2Set, then Linear + ReLU.

    ``forward(batch)`` takes a :class:`~mtlkit.data.qm9.GraphBatch` and returns (graphs, ``dim``).
    """

    def __init__(
        self,
        node_features: int,
        edge_features: int,
        dim: int = 64,
        steps: int = 3,
        set2set_steps: int = 3,
        edge_hidden: int = 128,
    ) -> None:
        super().__init__()
        for name, v in (
            ("node_features", node_features),
            ("edge_features", edge_features),
            ("dim", dim),
            ("steps", steps),
            ("set2set_steps", set2set_steps),
            ("edge_hidden", edge_hidden),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"mpnn: {name} must be an integer >= 1, got {v!r}")
        pyg_nn = _pyg()
        self.steps = steps
        self.lin0 = nn.Linear(node_features, dim)
        edge_net = nn.Sequential(nn.Linear(edge_features, edge_hidden), nn.ReLU(), nn.Linear(edge_hidden, dim * dim))
        self.conv = pyg_nn.NNConv(dim, dim, edge_net, aggr="mean")
        self.gru = nn.GRU(dim, dim)
        self.set2set = pyg_nn.Set2Set(dim, processing_steps=set2set_steps)
        self.lin1 = nn.Linear(2 * dim, dim)
        self.out_features = dim

    def edge_conv(self, h: Tensor, weights: Tensor, edge_index: Tensor) -> Tensor:
        """``self.conv(h, edge_index, edge_attr)`` given ``weights = A(edge_attr)`` (edges, dim, dim): the mean over
        in-edges of h_w A(e_vw), plus the root term ``conv.lin(h_v)`` and the bias, as PyG's ``NNConv.forward``."""
        src, dst = edge_index[0], edge_index[1]
        msg = torch.bmm(h[src].unsqueeze(1), weights).squeeze(1)
        deg = torch.zeros(h.shape[0], dtype=h.dtype, device=h.device).index_add_(
            0, dst, torch.ones_like(dst, dtype=h.dtype)
        )
        agg = torch.zeros_like(h).index_add_(0, dst, msg) / deg.clamp(min=1).unsqueeze(1)  # no in-edge: 0, as PyG
        out = agg + self.conv.lin(h)
        return out + self.conv.bias if self.conv.bias is not None else out

    def forward(self, batch: Any) -> Tensor:
        out = F.relu(self.lin0(batch.x))
        h = out.unsqueeze(0)
        # The edge network A(e_vw) depends on the edges only and its weights are tied over the steps: evaluated
        # once, not once per step as NNConv would (3x less of the dominant cost, E x 128 x dim² per step; the same
        # function, tests/test_qm9.py compares it with NNConv).
        dim = self.out_features
        weights = self.conv.nn(batch.edge_attr).view(-1, dim, dim)
        for _ in range(self.steps):
            m = F.relu(self.edge_conv(out, weights, batch.edge_index))
            out, h = self.gru(m.unsqueeze(0), h)
            out = out.squeeze(0)
        pooled = self.set2set(out, batch.batch, dim_size=batch.num_graphs)
        return F.relu(self.lin1(pooled))


class MPNN(MTLModel):
    """:class:`MPNNEncoder` (shared) and one ``Linear(dim, outputs)`` head per task."""

    def __init__(self, encoder: MPNNEncoder, task_outputs: dict[str, int]) -> None:
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleDict({k: nn.Linear(encoder.out_features, n) for k, n in task_outputs.items()})

    def encode(self, x: Any) -> Tensor:
        return self.encoder(x)

    def decode(self, z: Tensor) -> dict[str, Tensor]:
        return {name: h(z) for name, h in self.heads.items()}


@register_model("mpnn")
def build_mpnn(data: Any, dim: int = 64, steps: int = 3, set2set_steps: int = 3, edge_hidden: int = 128) -> MPNN:
    """Gilmer et al.'s MPNN as in the Nash-MTL/FAMO code (hidden 64) for a molecular-graph dataset (``qm9``)."""
    x = data.train.x
    if not (hasattr(x, "num_node_features") and hasattr(x, "num_edge_features")):
        raise ConfigError(
            "model mpnn needs molecular-graph inputs (a dataset whose splits hold mtlkit.data.qm9.GraphInputs, "
            f"e.g. qm9); this dataset's inputs are {type(x).__name__}"
        )
    enc = MPNNEncoder(int(x.num_node_features), int(x.num_edge_features), dim, steps, set2set_steps, edge_hidden)
    return MPNN(enc, {t.name: t.num_outputs for t in data.tasks})


__all__ = ["MPNN", "MPNNEncoder", "build_mpnn"]
