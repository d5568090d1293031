"""Text backends behind one protocol (`TextBackend`): every LLM role uses it."""

from medjax.llm.base import Generation, Message, TextBackend
from medjax.llm.jax_backend import JaxPolicyBackend

__all__ = ["Generation", "JaxPolicyBackend", "Message", "TextBackend"]
