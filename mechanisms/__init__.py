"""Model zoo and training mechanisms (non-private and private), with dp-accounting.

Importing the package registers the built-in mechanisms. This package imports nothing else
of the project.
"""

from . import dplis as _dplis  # noqa: F401  (registers "dplis")
from . import dpsgd as _dpsgd  # noqa: F401  (registers "dpsgd")
from . import encoding as _encoding  # noqa: F401  (registers "encoding")
from . import residual as _residual  # noqa: F401  (registers "residual")
from . import screening as _screening  # noqa: F401  (registers "screening")
from . import sgd as _sgd  # noqa: F401  (registers "sgd")
from .base import Mechanism, NonFiniteLossError, Privacy, TrainConfig, TrainResult, config_from_mapping
from .dpsgd import DpSgdConfig
from .models import MODELS, build_model, model_names
from .registry import get_mechanism, mechanism_names, register_mechanism

__all__ = [
    "MODELS",
    "DpSgdConfig",
    "Mechanism",
    "NonFiniteLossError",
    "Privacy",
    "TrainConfig",
    "TrainResult",
    "build_model",
    "config_from_mapping",
    "get_mechanism",
    "mechanism_names",
    "model_names",
    "register_mechanism",
]
