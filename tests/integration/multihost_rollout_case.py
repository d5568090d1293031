"""What tests/integration/test_multihost_rollouts.py and its worker processes share: the tiny
model and tokenizer, the prompts, their streams and the sampling settings."""

from medjax import sampling
from medjax.models import tokenizer as tokenizer_lib
from tests.servers import tiny_model
from tests.unit.test_llm_backends import CORPUS

SEED = 5
# Token ids of 4 prompts of different lengths (other paddings in each process's call).
PROMPTS = [[5, 17, 33, 90, 41], [7, 7, 120, 64, 3, 200, 15, 9, 88], [250, 31], [44, 12, 19]]
STREAMS = [101, 202, 303, 404]
PARAMS = sampling.SamplingParams(max_new_tokens=12, temperature=1.0)


def tiny():
    """(a random 2-layer qwen2 model, a BPE tokenizer of 320 ids), the same in every process."""
    tok = tokenizer_lib.train_bpe(CORPUS, vocab_size=320)
    return tiny_model(tok), tok
