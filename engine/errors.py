"""Typed errors. Each says what was expected and what was found."""


class MagnetEngineError(Exception):
    """Base class of every error magnet_engine raises on purpose."""


class ModelNotFoundError(MagnetEngineError, FileNotFoundError):
    """Unknown model id, or a directory / file that does not exist."""


class CheckpointError(MagnetEngineError, ValueError):
    """A checkpoint file that is truncated, corrupt, not plain tensors, or has bad keys."""


class ConfigError(MagnetEngineError, ValueError):
    """A checkpoint config (xp.cfg) that is missing fields or describes an unsupported model."""


class InvalidInputError(MagnetEngineError, ValueError):
    """A bad argument from the caller: descriptions, duration, prompt, codes."""


class InvalidOptionError(MagnetEngineError, ValueError):
    """A decoding option outside its domain (e.g. top_p outside (0, 1])."""


class NumericalError(MagnetEngineError, RuntimeError):
    """NaN or inf where a probability or logit was expected."""


class DependencyError(MagnetEngineError, ImportError):
    """An optional dependency needed for the requested path is not installed."""


class RegionError(InvalidInputError):
    """Infill regions that are empty, outside the clip, or cover all of it."""


# Users import these from `magnet_engine.errors`, which re-exports them: tracebacks, reprs and
# pickles (Ray sends a replica's error to the ingress) name them there, as before they moved
# into the engine; unpickling imports that module, which holds the same classes.
for _error in (MagnetEngineError, ModelNotFoundError, CheckpointError, ConfigError, InvalidInputError,
               InvalidOptionError, NumericalError, DependencyError, RegionError):
    _error.__module__ = "magnet_engine.errors"
del _error
