"""Exception types that tell the user what was wrong and what is allowed."""


class MemboundError(Exception):
    """Base class for errors raised by membound."""


class ConfigError(MemboundError, ValueError):
    """An engine or model configuration value is invalid."""


class ModelLoadError(MemboundError):
    """Model files are missing, corrupt or describe an unsupported model."""


class InvalidRequestError(MemboundError, ValueError):
    """A single request is invalid; the engine keeps serving the others."""
