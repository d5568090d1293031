"""Orbax checkpoints of a `TrainState` plus a JSON record (data position, stage, ...).

Saves are asynchronous (the next steps run while the arrays are written), keep the last K
(also after a process was killed between a save and orbax's removal of older checkpoints:
opening the folder again removes them), and restore onto whatever mesh the target state
lives on: the target's shardings decide where each restored array goes, so a run saved on
one mesh shape resumes on another. The folder may be remote (`gs://...`): orbax writes it
through tensorstore, and the checks here read it through `etils.epath`.
"""

import jax
import orbax.checkpoint as ocp
from etils import epath

from medjax import paths


class CheckpointDirError(ValueError):
    """A checkpoint directory that holds something other than medjax checkpoints."""


def _check_directory(directory: str) -> None:
    folder = epath.Path(directory)
    if not folder.exists():
        return
    if not folder.is_dir():
        raise CheckpointDirError(f"{directory} is a file, not a checkpoint directory.")
    entries = [e.name for e in folder.iterdir() if not e.name.startswith(".")]
    strays = [e for e in entries if not (e.isdigit() or ".orbax-checkpoint-tmp" in e)]
    if strays:
        raise CheckpointDirError(
            f"{directory} is not a checkpoint directory (it holds {sorted(strays)[:5]});"
            " point the run somewhere else or remove them. Nothing was written."
        )
    for e in entries:
        if e.isdigit() and not _unfinished(folder / e) and not (folder / e / "meta").is_dir():
            raise CheckpointDirError(
                f"{directory}/{e} is not a medjax checkpoint (no meta/); nothing was written."
            )


def _unfinished(step_dir: epath.Path) -> bool:
    """Whether `step_dir` is a save a killed process left half-written on GCS, where orbax
    writes in place and marks a finished save with commit_success.txt (it removes such a
    save when the folder is opened again). Local saves are renamed when finished."""
    return paths.is_remote(step_dir) and not (step_dir / "commit_success.txt").exists()


class Checkpointer:
    """Every `save_every` steps and at the end; the last `keep` kept (older ones left by a
    killed process are removed when the folder is opened).

    Args:
      directory: the stage's checkpoint folder (created on the first save), local or remote.
      save_every: the save interval in steps (the final step is always saved).
      keep: how many checkpoints to keep.
      async_save: write in a background thread.
    """

    def __init__(self, directory: str, *, save_every: int, keep: int = 2, async_save: bool = True):
        self.directory = paths.absolute(directory)
        _check_directory(self.directory)
        self.save_every = save_every
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
            # On GCS a save is written in place and marked finished by commit_success.txt
            # (no rename): a save that a killed process left half-written is removed, else
            # saving that step again would write into its leftover database. Local saves are
            # renamed into place, and their leftovers never look like a step.
            cleanup_tmp_directories=paths.is_remote(self.directory),
        )  # fmt: skip
        self._manager = ocp.CheckpointManager(epath.Path(self.directory), options=options)
        self._prune(keep)

    def _prune(self, keep: int) -> None:
        """Deletes all but the newest `keep` checkpoints. Orbax removes older ones only once a
        save has committed, after it: a process killed in between leaves one more, and none
        is ever removed if that was the stage's last save (its rerun saves nothing)."""
        for step in sorted(self._manager.all_steps())[:-keep]:
            self._manager.delete(step)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def should_save(self, step: int, final: bool) -> bool:
        return final or (self.save_every > 0 and step % self.save_every == 0)

    def save(self, step: int, state, meta: dict) -> None:
        """Saves `state` (a TrainState or a tuple of them) without their `frozen` weights."""
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_without_frozen(state)), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )

    def restore(self, step: int, target):
        """(state, meta) of `step`, placed like `target` (arrays or ShapeDtypeStructs); a
        TrainState's `frozen` weights are `target`'s own (checkpoints do not hold them)."""
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
            _without_frozen(target),
        )
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
        return _with_frozen_of(out["state"], target), out["meta"]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _is_train_state(x) -> bool:
    return hasattr(x, "_replace") and hasattr(x, "frozen")


def _without_frozen(state):
    """A TrainState (or a tuple of them) with `frozen` None: a LoRA model's base weights are
    not the stage's to save; they are loaded again from where the stage started."""
    if _is_train_state(state):
        return state._replace(frozen=None)
    if isinstance(state, tuple):
        return tuple(_without_frozen(s) for s in state)
    return state


def _with_frozen_of(state, target):
    if _is_train_state(state):
        return state._replace(frozen=target.frozen)
    if isinstance(state, tuple):
        return tuple(_with_frozen_of(s, t) for s, t in zip(state, target, strict=True))
    return state
