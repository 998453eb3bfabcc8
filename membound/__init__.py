"""membound: an LLM inference engine for one GPU, built around memory bandwidth."""

from membound.config import EngineConfig
from membound.engine.llm_engine import LLMEngine
from membound.entrypoints.llm import LLM
from membound.errors import ConfigError, InvalidRequestError, MemboundError, ModelLoadError
from membound.outputs import CompletionOutput, Logprob, RequestOutput
from membound.sampling_params import RequestOutputKind, SamplingParams

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "CompletionOutput",
    "ConfigError",
    "EngineConfig",
    "InvalidRequestError",
    "LLMEngine",
    "Logprob",
    "MemboundError",
    "ModelLoadError",
    "RequestOutput",
    "RequestOutputKind",
    "SamplingParams",
]
