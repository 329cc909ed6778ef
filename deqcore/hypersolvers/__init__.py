"""Learned solvers (HyperDEQ): a trained initialiser and HyperAnderson iterations, written once
over the backend protocol, trained against a frozen layer and used as
``deqcore.solve(f, x, solver=hs)``."""

from ..solvers._base import Hypersolver
from ._hyperanderson import HyperAnderson, HyperAndersonIteration, HyperAndersonState, load_hypersolver
from ._mixers import NORMALISATIONS, AndersonMixer, TemporalConvMixer, project_weights
from ._pieces import DenseInitialiser, IdentityCompression
from ._training import TRAIN_OPTIONS, hypersolver_losses, train_hypersolver

__all__ = [
    "NORMALISATIONS",
    "TRAIN_OPTIONS",
    "AndersonMixer",
    "DenseInitialiser",
    "HyperAnderson",
    "HyperAndersonIteration",
    "HyperAndersonState",
    "Hypersolver",
    "IdentityCompression",
    "TemporalConvMixer",
    "hypersolver_losses",
    "load_hypersolver",
    "project_weights",
    "train_hypersolver",
]
