"""Gradient-space multi-task methods: each turns the T x P matrix of per-task gradients into one update.

Importing this package registers every method with :mod:`mtlkit.methods` (one file per method).
"""
# Import order matters: mtlkit.methods imports mtlkit.weighting._base, and the weighting package's method files import
# mtlkit.methods. Loading the weighting package first lets mtlkit.methods finish before any method file here needs it,
# whichever of mtlkit.aggregation / mtlkit.weighting / mtlkit.methods is imported first.
import mtlkit.weighting  # noqa: F401  (must precede the method files below)
from mtlkit.aggregation._base import Aggregator, Mean, Sum
from mtlkit.aggregation.aligned_mtl import AlignedMTL
from mtlkit.aggregation.cagrad import CAGrad
from mtlkit.aggregation.dualproj import DualProj
from mtlkit.aggregation.graddrop import GradDrop
from mtlkit.aggregation.gradvac import GradVac
from mtlkit.aggregation.imtl_g import IMTLG
from mtlkit.aggregation.mamg import MAMG
from mtlkit.aggregation.mgda import MGDA
from mtlkit.aggregation.nash_mtl import NashMTL
from mtlkit.aggregation.pcgrad import PCGrad
from mtlkit.aggregation.upgrad import UPGrad

__all__ = [
    "Aggregator",
    "AlignedMTL",
    "CAGrad",
    "DualProj",
    "GradDrop",
    "GradVac",
    "IMTLG",
    "MAMG",
    "MGDA",
    "Mean",
    "NashMTL",
    "PCGrad",
    "Sum",
    "UPGrad",
]
