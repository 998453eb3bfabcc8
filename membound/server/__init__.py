"""`membound serve`: an OpenAI-compatible HTTP server over the engine."""

from membound.server.app import ServerConfig, build_app, run
from membound.server.async_engine import AsyncEngine, EngineState, SubRequest

__all__ = ["AsyncEngine", "EngineState", "ServerConfig", "SubRequest", "build_app", "run"]
