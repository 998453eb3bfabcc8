"""`membound serve`: an OpenAI-compatible HTTP server over the engine (one model, or several)."""

from membound.server.app import ServedModel, ServerConfig, build_app, build_models_app, run, run_models
from membound.server.async_engine import AsyncEngine, EngineState, SubRequest

__all__ = [
    "AsyncEngine",
    "EngineState",
    "ServedModel",
    "ServerConfig",
    "SubRequest",
    "build_app",
    "build_models_app",
    "run",
    "run_models",
]
