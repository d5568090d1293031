"""Text backends behind one protocol (`TextBackend`): every LLM role uses it."""

from medjax.llm.base import Generation, Message, TextBackend, TokenBackend
from medjax.llm.jax_backend import JaxPolicyBackend
from medjax.llm.openai_backend import BackendError, OpenAICompatibleBackend
from medjax.llm.scripted import ScriptedBackend

__all__ = [
    "BackendError",
    "Generation",
    "JaxPolicyBackend",
    "Message",
    "OpenAICompatibleBackend",
    "ScriptedBackend",
    "TextBackend",
    "TokenBackend",
]
