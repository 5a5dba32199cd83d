"""Loss-space multi-task methods: each turns the T per-task losses into T weighted losses.

One file per method; each registers its class with :data:`mtlkit._registry.METHODS` (``mtlkit.methods`` builds
them). This package only re-exports the classes.

Example:
    >>> from mtlkit.weighting import DWA
    >>> DWA().temperature
    2.0
"""

from mtlkit.weighting._base import EW, StepContext, Weighting
from mtlkit.weighting.auto_lambda import AutoLambda, AutoLambdaMeta
from mtlkit.weighting.constant import Constant
from mtlkit.weighting.dbmtl import DBMTLAggregator, LogLoss
from mtlkit.weighting.dwa import DWA
from mtlkit.weighting.excess_mtl import ExcessMTL
from mtlkit.weighting.famo import FAMO
from mtlkit.weighting.gls import GLS
from mtlkit.weighting.gradnorm import GradNorm
from mtlkit.weighting.imtl_l import IMTLL
from mtlkit.weighting.mtmlan_tdb import MTMLANTDB
from mtlkit.weighting.rlw import RLW
from mtlkit.weighting.stch import STCH
from mtlkit.weighting.uw import UW

__all__ = [
    "DWA",
    "EW",
    "FAMO",
    "GLS",
    "IMTLL",
    "MTMLANTDB",
    "RLW",
    "STCH",
    "UW",
    "AutoLambda",
    "AutoLambdaMeta",
    "Constant",
    "DBMTLAggregator",
    "ExcessMTL",
    "GradNorm",
    "LogLoss",
    "StepContext",
    "Weighting",
]
