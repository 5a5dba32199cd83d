"""Gradient-space multi-task methods: each turns the T x P matrix of per-task gradients into one update.

One file per method; each registers its class with :data:`mtlkit._registry.METHODS` (``mtlkit.methods`` builds
them). This package only re-exports the classes.

Example:
    >>> from mtlkit.aggregation import MGDA
    >>> MGDA.scale
    'convex'
"""

from mtlkit.aggregation._base import Aggregator, Mean, Sum, SumScale, on_sum_scale
from mtlkit.aggregation.aligned_mtl import AlignedMTL
from mtlkit.aggregation.cagrad import CAGrad
from mtlkit.aggregation.conflict_free import ConFIG
from mtlkit.aggregation.dualproj import DualProj
from mtlkit.aggregation.fairgrad import FairGrad
from mtlkit.aggregation.graddrop import GradDrop
from mtlkit.aggregation.gradvac import GradVac
from mtlkit.aggregation.imtl_g import IMTLG
from mtlkit.aggregation.mamg import MAMG
from mtlkit.aggregation.mgda import MGDA
from mtlkit.aggregation.moco import MoCo
from mtlkit.aggregation.modo import MoDo, MoDoSampler
from mtlkit.aggregation.nash_mtl import NashMTL
from mtlkit.aggregation.pcgrad import PCGrad
from mtlkit.aggregation.sdmgrad import SDMGrad
from mtlkit.aggregation.upgrad import UPGrad

__all__ = [
    "IMTLG",
    "MAMG",
    "MGDA",
    "Aggregator",
    "AlignedMTL",
    "CAGrad",
    "ConFIG",
    "DualProj",
    "FairGrad",
    "GradDrop",
    "GradVac",
    "Mean",
    "MoCo",
    "MoDo",
    "MoDoSampler",
    "NashMTL",
    "PCGrad",
    "SDMGrad",
    "Sum",
    "SumScale",
    "UPGrad",
    "on_sum_scale",
]
