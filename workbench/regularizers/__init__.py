"""Loss-side regularizers, each registered by the name a recipe uses for it."""

from .base import PENALTIES, Penalty, PenaltyConfig, register
from .delta_l2 import DeltaL2
from .ewc import EWC, EWCConfig
from .kl import KLConfig, KLToBase

__all__ = ["PENALTIES", "Penalty", "PenaltyConfig", "register", "DeltaL2", "EWC", "EWCConfig",
           "KLConfig", "KLToBase"]
