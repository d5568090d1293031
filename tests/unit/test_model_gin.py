"""gin/models/: every file parses into a ModelConfig with the checkpoint's published size."""

import pathlib

import gin
import pytest

from medjax.models import config

GIN_DIR = pathlib.Path(__file__).resolve().parents[2] / "gin" / "models"
# Parameter counts published with the checkpoints (embeddings counted once when tied);
# for Qwen3-1.7B and -8B the model cards give the non-embedding count (1.4B, 6.95B).
PUBLISHED = {
    "qwen2_5_0_5b": 494_032_768,
    "qwen2_5_1_5b": 1_543_714_304,
    "qwen2_5_7b": 7_615_616_512,
    "qwen3_0_6b": 596_049_920,
    "qwen3_8b": 8_190_735_360,
    "llama3_2_1b": 1_235_814_400,
    "llama3_2_3b": 3_212_749_824,
    "llama3_1_8b": 8_030_261_248,
}
# Non-embedding billions as the model cards print them: (value, decimals).
NON_EMBEDDING_BILLIONS = {"qwen3_1_7b": (1.4, 1), "qwen3_0_6b": (0.44, 2), "qwen3_8b": (6.95, 2)}


def _load(name: str) -> config.ModelConfig:
    gin.clear_config()
    try:
        gin.parse_config_file(str(GIN_DIR / f"{name}.gin"))
        return gin.get_configurable(config.ModelConfig)()
    finally:
        gin.clear_config()


def test_every_file_is_covered():
    names = {p.stem for p in GIN_DIR.glob("*.gin")}
    assert names == set(PUBLISHED) | set(NON_EMBEDDING_BILLIONS) | {"tiny"}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_parameter_counts(name):
    assert _load(name).num_params == PUBLISHED[name]


@pytest.mark.parametrize("name", sorted(NON_EMBEDDING_BILLIONS))
def test_published_non_embedding_counts(name):
    c = _load(name)
    embeddings = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    value, decimals = NON_EMBEDDING_BILLIONS[name]
    assert round((c.num_params - embeddings) / 1e9, decimals) == value


def test_families_and_switches():
    assert _load("qwen2_5_7b").qkv_bias and not _load("qwen2_5_7b").tie_word_embeddings
    assert _load("qwen3_0_6b").qk_norm and not _load("qwen3_0_6b").qkv_bias
    llama = _load("llama3_1_8b")
    assert llama.family == "llama" and llama.rope_scaling == config.RopeScaling(8.0, 1.0, 4.0, 8192)
    assert _load("llama3_2_1b").rope_scaling.factor == 32.0
    assert _load("tiny").num_params < 1_000_000
