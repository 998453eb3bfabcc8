"""Exception types that tell the user what was wrong and what is allowed."""


class MemboundError(Exception):
    """Base class for errors raised by membound."""


class ConfigError(MemboundError, ValueError):
    """An engine or model configuration value is invalid."""


class ModelLoadError(MemboundError):
    """Model files are missing, corrupt or describe an unsupported model."""


class InvalidRequestError(MemboundError, ValueError):
    """A single request is invalid; the engine keeps serving the others.

    `param` names the offending field when there is one (the server reports it).
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class QueueFullError(MemboundError):
    """Too many requests are already waiting; the caller should retry later."""


class EngineDeadError(MemboundError):
    """The engine is not running (still loading, failed, or shutting down)."""


class RequestFailedError(MemboundError):
    """One request failed inside the engine (say, its output could not be detokenized); the
    engine and every other request go on."""
