"""The Gramian ``G = J Jᵀ`` of the encoder's per-task gradients without holding the T x P Jacobian ``J``.

Gramian-based aggregators (MGDA, CAGrad, IMTL-G, Nash-MTL, UPGrad, DualProj, Aligned-MTL, ...) only need the T x T
matrix ``G`` to choose task weights ``w``; their update is ``wᵀ J``. Two facts make both parts cheap:

1. **A linear layer's rows of J never need to exist.** For a layer ``y = x Wᵀ + b`` on a batch ``X`` (B x in) whose
   output receives ``Δ_t`` (B x out) from task t, task t's weight gradient is ``Δ_tᵀ X``, so

   ``<Δ_iᵀ X, Δ_jᵀ X> = <Δ_i, (X Xᵀ) Δ_j>``  and the bias part is ``<1ᵀ Δ_i, 1ᵀ Δ_j>``

   (the "ghost norm" identity used for per-sample gradient norms, Goodfellow 2015; Li et al. 2022). Keeping
   ``Δ_t`` (B·out numbers) instead of the gradient (in·out numbers) is smaller whenever B < in, and the per-task
   backward passes stop at the layer's output: they never compute a weight gradient.
2. **The update needs no further backward pass.** ``wᵀ J`` of that layer is ``(Σ_t w_t Δ_t)ᵀ X``: one product.

Parameters of other layers (convolutions, normalisation, anything not recognised) get explicit per-task rows, as in
the plain engine; for the usual encoders these are small. A linear layer is recognised in the autograd graph (an
``addmm``/``mm`` node whose weight comes straight from a shared parameter through a transpose, used once), so the
user's model needs no hooks or wrappers.

Cost per task: one backward pass of the encoder without the weight-gradient products of the recognised layers.
Memory: T·B·out per recognised layer plus T x (explicit parameters), instead of T x P.

Example:
    >>> import torch
    >>> enc = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4))
    >>> z = enc(torch.randn(3, 6))
    >>> dz = torch.randn(2, 3, 4)  # two tasks' gradients w.r.t. z
    >>> G = encoder_gramian(z, dz, list(enc.parameters()))
    >>> J = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(z, list(enc.parameters()), d,
    ...                                                                     retain_graph=True)]) for d in dz])
    >>> torch.allclose(G, J @ J.T, atol=1e-5)
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge, Node

from mtlkit.engine._graph import walk

#: Tasks per block when forming ``(X Xᵀ) Δ``: bounds that temporary to this many copies of one task's Δ.
_BLOCK = 8


@dataclass
class LinearSite:
    """A linear layer found in the graph: ``node`` computes ``x Wᵀ (+ b)`` with ``x`` saved for its backward."""

    node: Node
    x: Tensor
    weight: Tensor
    bias: Tensor | None


def linear_sites(z: Tensor, shared: list[Tensor]) -> list[LinearSite]:
    """Linear layers between the shared parameters and ``z`` whose rows of J can be replaced by their ``Δ_t``.

    A site must be an ``addmm`` (with bias, α = β = 1) or ``mm`` node, its weight a shared parameter reached only
    through that node's transpose, its bias (if any) a shared 1-D parameter used only there, and its input have
    fewer rows than columns (B < in; otherwise explicit rows are as small and cheaper).
    """
    ids = {id(p) for p in shared}
    nodes = list(walk([z.grad_fn], lambda fn: False))
    uses: dict[int, int] = {}  # edges into each node: a parameter or transpose used twice is not a site
    for fn in nodes:
        for nxt, _ in fn.next_functions:
            if nxt is not None:
                uses[id(nxt)] = uses.get(id(nxt), 0) + 1

    def param_of(fn: Node | None) -> Tensor | None:
        var = getattr(fn, "variable", None)
        return var if var is not None and id(var) in ids and uses.get(id(fn)) == 1 else None

    sites = []
    for fn in nodes:
        kind = type(fn).__name__
        if kind not in ("AddmmBackward0", "MmBackward0"):
            continue
        nf = fn.next_functions
        tnode = nf[2][0] if kind == "AddmmBackward0" else nf[1][0]
        if tnode is None or type(tnode).__name__ != "TBackward0" or uses.get(id(tnode)) != 1:
            continue
        weight = param_of(tnode.next_functions[0][0])
        if weight is None or weight.dim() != 2:
            continue
        # The generated node classes (AddmmBackward0, MmBackward0) expose their saved values as attributes that the
        # stubs of Node do not declare.
        saved: Any = fn
        bias = None
        if kind == "AddmmBackward0":
            if saved._saved_alpha != 1 or saved._saved_beta != 1:
                continue
            if nf[0][0] is not None:
                bias = param_of(nf[0][0])
                if bias is None or bias.dim() != 1:
                    continue
        try:  # a saved-tensor hook (checkpointing, offloading) may refuse to unpack: then explicit rows
            x = saved._saved_mat1 if kind == "AddmmBackward0" else saved._saved_self
        except RuntimeError:
            continue
        if x is None or x.dim() != 2 or x.shape[0] >= x.shape[1]:
            continue
        sites.append(LinearSite(fn, x.detach(), weight, bias))
    return sites


class EncoderGramian:
    """The per-task gradients of the shared parameters, held as what their Gramian and their combinations need.

    Built from z, each task's ``∂L_t/∂z`` (``dz``, T x z.shape) and the shared parameters: one backward pass per
    task (``mode="loop"``) or vectorised over tasks (``"batched"``, chunks of ``chunk_size``) that stops at the
    recognised linear layers' outputs (their ``Δ_t``) and gives explicit rows for every other parameter.

    * :attr:`gramian` is ``G = J Jᵀ`` (T x T, symmetric);
    * :meth:`combine` gives ``wᵀ J`` per parameter: ``(Σ_t w_t Δ_t)ᵀ X`` for a linear layer's weight, the batch sum
      of ``Σ_t w_t Δ_t`` for its bias, ``wᵀ J_explicit`` for the rest. No extra backward pass is needed.
    """

    def __init__(
        self,
        z: Tensor,
        dz: Tensor,
        shared: list[Tensor],
        mode: Literal["loop", "batched"] = "loop",
        chunk_size: int | None = None,
    ) -> None:
        if mode not in ("loop", "batched"):
            raise ValueError(f"unknown mode {mode!r}; valid modes are: loop, batched")
        T = dz.shape[0]
        self.shared = list(shared)
        self.sites = linear_sites(z, self.shared)
        in_site = {id(p) for s in self.sites for p in (s.weight, s.bias) if p is not None}
        self.explicit = [p for p in self.shared if id(p) not in in_site]
        # Edges and tensors mixed: autograd.grad takes them (each input is handled on its own), but its stubs only
        # allow a sequence of one kind, hence the two ignores below.
        inputs = [GradientEdge(s.node, 0) for s in self.sites] + self.explicit
        self.deltas = [
            torch.zeros(T, s.x.shape[0], s.weight.shape[0], dtype=dz.dtype, device=dz.device) for s in self.sites
        ]
        self.J_e = torch.zeros(T, sum(p.numel() for p in self.explicit), dtype=dz.dtype, device=dz.device)
        step = 1 if mode == "loop" else (T if chunk_size is None else max(1, int(chunk_size)))
        n = len(self.sites)
        for s in range(0, T, step):
            if mode == "loop":
                g = torch.autograd.grad(
                    z,
                    inputs,  # type: ignore[arg-type]
                    grad_outputs=dz[s],
                    retain_graph=True,
                    allow_unused=True,
                )
                g = tuple(gi.unsqueeze(0) if gi is not None else None for gi in g)
            else:
                g = torch.autograd.grad(
                    z,
                    inputs,  # type: ignore[arg-type]
                    grad_outputs=dz[s : s + step],
                    retain_graph=True,
                    allow_unused=True,
                    is_grads_batched=True,
                )
            for k in range(n):
                if g[k] is not None:
                    self.deltas[k][s : s + step] = g[k]
            offset = 0
            for gi, p in zip(g[n:], self.explicit, strict=True):
                if gi is not None:
                    self.J_e[s : s + step, offset : offset + p.numel()] = gi.reshape(gi.shape[0], -1)
                offset += p.numel()
        G = self.J_e @ self.J_e.T
        for site, D in zip(self.sites, self.deltas, strict=True):
            x = site.x.to(D.dtype)
            K = x @ x.T  # B x B
            flat = D.reshape(T, -1)
            for b in range(0, T, _BLOCK):
                G[b : b + _BLOCK] += torch.matmul(K, D[b : b + _BLOCK]).reshape(-1, flat.shape[1]) @ flat.T
            if site.bias is not None:
                S = D.sum(dim=1)
                G += S @ S.T
        self.gramian = (G + G.T) / 2

    def combine(self, w: Tensor) -> list[Tensor]:
        """``wᵀ J`` shaped like each shared parameter (in the order given), for T task weights ``w``."""
        w = w.to(self.J_e.dtype)
        out: dict[int, Tensor] = {}
        for site, D in zip(self.sites, self.deltas, strict=True):
            d = torch.tensordot(w, D, dims=1)  # B x out: the combined output gradient
            out[id(site.weight)] = (d.T @ site.x.to(d.dtype)).to(site.weight.dtype)
            if site.bias is not None:
                out[id(site.bias)] = d.sum(dim=0).to(site.bias.dtype)
        flat = w @ self.J_e
        offset = 0
        for p in self.explicit:
            out[id(p)] = flat[offset : offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()
        return [out[id(p)] for p in self.shared]


def encoder_gramian(
    z: Tensor,
    dz: Tensor,
    shared: list[Tensor],
    mode: Literal["loop", "batched"] = "loop",
    chunk_size: int | None = None,
) -> Tensor:
    """``G = J Jᵀ`` where row t of J is ``dz[t]ᵀ ∂z/∂θ`` over the ``shared`` parameters, without forming J.

    See :class:`EncoderGramian` (which also gives the update ``wᵀ J``).
    """
    return EncoderGramian(z, dz, shared, mode, chunk_size).gramian
