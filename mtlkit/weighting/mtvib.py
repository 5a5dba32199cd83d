"""The MTVIB loss (Eq. 23 of W. Qian, B. Chen, Y. Zhang, G. Wen & F. Gechter, "Multi-task variational information
bottleneck", arXiv:2007.00339, 2020, doi:10.48550/arXiv.2007.00339), as a method.

``L = Σ_k [CE_k / σ_k² + log σ_k] + β·KL(p_φ(z|x) || N(0, I))``.

The two parts live where they belong:

* the uncertainty-weighted task part (Eq. 22, the classification form of Kendall et al.'s uncertainty weighting,
  learned ``σ_k``) is :class:`mtlkit.weighting.UW` with ``form="classification"`` — this method is exactly that
  weighting with a plain sum of gradients. Eq. 22 as printed has a sign error (it implies ``CE/σ² − log σ``,
  unbounded below as σ grows); we follow Eq. 23 and Kendall et al. (CVPR 2018): ``CE/σ² + log σ``;
* the ``β·KL`` term belongs to the stochastic architecture: :class:`mtlkit.models.mtvib.MTVIB` computes it in its
  forward pass and exposes it through the generic ``auxiliary_loss()`` hook that the trainer adds to the backward
  (β is the model option ``beta``, 1e-3 by default as in the paper).

So ``--model mtvib --method mtvib`` trains Eq. 23; ``--model hps --method mtvib`` is the paper's UWL baseline. The
method is registered in the composite table of :mod:`mtlkit.methods` (``UW`` with ``form`` fixed to
``"classification"``); this module holds its documentation.

Example:
    >>> from mtlkit.methods import build_method
    >>> m = build_method("mtvib"); type(m.weighting).__name__, m.weighting.form
    ('UW', 'classification')
"""
