"""What the HTTP server tests share: a server run on a thread of the test's process, and the
tiny model they serve (the same shape everywhere, so its programs compile once a process)."""

import contextlib
import threading

from flax import nnx

from medjax import models
from medjax.llm import serve


@contextlib.contextmanager
def running(server):
    """`server` (any `socketserver` server) answering on a daemon thread, shut down and its
    socket closed on exit."""
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def serving(backend, **kwargs):
    """`medjax.llm.serve` in front of `backend` (`make_server`'s keyword arguments), running."""
    return running(serve.make_server(backend, **kwargs))


def tiny_model(tok) -> models.DecoderLM:
    """A 2-layer qwen2 model of `tok`'s vocabulary, seed 0."""
    config = models.ModelConfig(
        family="qwen2", vocab_size=len(tok), hidden_size=32, intermediate_size=48,
        num_layers=2, num_heads=4, num_kv_heads=2, qkv_bias=True,
    )  # fmt: skip
    return models.DecoderLM(config, rngs=nnx.Rngs(0))
