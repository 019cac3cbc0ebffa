"""VISOR (VISion On Request): sparse vision-language inference over Hugging Face LVLMs."""

from .api import Generation, VisorModel, convert, export, load
from .errors import CheckpointError, ConfigError, InputError, OutputError, VisorError
from .flops import FlopReport
from .flops import count_flops as flops
from .schedule import Schedule

__version__ = "0.1.0"
__all__ = [
    "CheckpointError",
    "ConfigError",
    "FlopReport",
    "Generation",
    "InputError",
    "OutputError",
    "Schedule",
    "VisorError",
    "VisorModel",
    "convert",
    "export",
    "flops",
    "load",
]
