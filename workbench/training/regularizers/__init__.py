"""Loss-side regularizers, each registered by the name a recipe uses for it."""

from workbench.training.regularizers.base import PENALTIES, Penalty, PenaltyConfig, register
from workbench.training.regularizers.delta_l2 import DeltaL2
from workbench.training.regularizers.ewc import EWC, EWCConfig
from workbench.training.regularizers.kl import KLConfig, KLToBase

__all__ = ["PENALTIES", "Penalty", "PenaltyConfig", "register", "DeltaL2", "EWC", "EWCConfig",
           "KLConfig", "KLToBase"]
