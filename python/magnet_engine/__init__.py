"""magnet-engine: fast, faithful inference for MAGNeT (Ziv et al., ICLR 2024)."""
from magnet_engine.errors import (  # noqa: F401
    CheckpointError, ConfigError, DependencyError, InvalidInputError, InvalidOptionError,
    MagnetEngineError, ModelNotFoundError, NumericalError,
)

__version__ = "0.1.0"


def __getattr__(name):
    # The API pulls in torch and transformers: import it only when asked for.
    if name == "MAGNeT":
        from magnet_engine.api import MAGNeT
        return MAGNeT
    if name in ("PlayDiffusion", "InpaintInput", "TTSInput", "RVCInput"):
        from magnet_engine import playdiffusion
        return getattr(playdiffusion, name)
    raise AttributeError(name)
