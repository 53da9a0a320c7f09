"""The typed errors, where users import them (`from magnet_engine.errors import ...`).

They are defined in the engine (`magnet_engine.engine.errors`) so the engine and kernels raise
them without importing the public surface; this module only re-exports them.
"""
from magnet_engine.engine.errors import (CheckpointError, ConfigError, DependencyError, InvalidInputError,
                                         InvalidOptionError, MagnetEngineError, ModelNotFoundError,
                                         NumericalError, RegionError)

__all__ = ["MagnetEngineError", "ModelNotFoundError", "CheckpointError", "ConfigError", "InvalidInputError",
           "InvalidOptionError", "NumericalError", "DependencyError", "RegionError"]
