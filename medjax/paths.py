"""Run directories, checkpoints and exports on any filesystem `etils.epath` reaches.

A path with a scheme (`gs://bucket/run`, `s3://...`) is remote: it stays as written, and its
files are read and written through `epath`. Any other path is local and made absolute. Code
keeps paths as strings (`os.path.join` keeps `gs://b/run` intact); `epath.Path(p)` opens them.

Remote filesystems have no rename and no append, and libraries such as Hugging Face's
`save_pretrained` or memory-mapped readers write and read local files only: `local_copy`
and `staged` bridge them through a temporary local folder that is always removed.
"""

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

from etils import epath


def is_remote(path: str | os.PathLike[str]) -> bool:
    """Whether `path` names a non-local filesystem (it has a scheme, e.g. `gs://`)."""
    return "://" in os.fspath(path)


def absolute(path: str | os.PathLike[str]) -> str:
    """`path` as the run keeps it: a remote path unchanged, a local one absolute.

    `os.path.abspath("gs://b/run")` would be `<cwd>/gs:/b/run`, a local folder.
    """
    path = os.fspath(path)
    return path if is_remote(path) else os.path.abspath(path)


def exists(path: str | os.PathLike[str]) -> bool:
    """Whether a file or folder is at `path`, on any filesystem."""
    return epath.Path(path).exists()


def read_text(path: str | os.PathLike[str]) -> str:
    return epath.Path(path).read_text(encoding="utf-8")


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Writes `text` to `path` (UTF-8), creating its folder."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def rmtree(path: str | os.PathLike[str]) -> None:
    """Removes the folder `path` and everything in it, if it is there."""
    if is_remote(path):
        path = epath.Path(path)
        if path.exists():
            path.rmtree()
    else:
        shutil.rmtree(path, ignore_errors=True)


def upload(local_dir: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """Copies the files under the local folder `local_dir` into the folder `path`."""
    root = epath.Path(path)
    for folder, _, files in os.walk(local_dir):
        target = root / os.path.relpath(folder, local_dir)
        target.mkdir(parents=True, exist_ok=True)
        for name in sorted(files):
            with open(os.path.join(folder, name), "rb") as f:
                (target / name).write_bytes(f.read())


def download(path: str | os.PathLike[str], local_dir: str | os.PathLike[str]) -> None:
    """Copies the files under the folder `path` into the local folder `local_dir`."""
    os.makedirs(local_dir, exist_ok=True)
    for entry in epath.Path(path).iterdir():
        target = os.path.join(local_dir, entry.name)
        if entry.is_dir():
            download(entry, target)
        else:
            with open(target, "wb") as f:
                f.write(entry.read_bytes())


@contextlib.contextmanager
def local_copy(path: str | os.PathLike[str]) -> Iterator[str]:
    """A local folder with the files of the folder `path`, for readers that need one: `path`
    itself when local, else a temporary copy, removed on exit."""
    if not is_remote(path):
        yield os.fspath(path)
        return
    with tempfile.TemporaryDirectory(prefix="medjax_read_") as tmp:
        download(path, tmp)
        yield tmp


@contextlib.contextmanager
def staged(path: str | os.PathLike[str]) -> Iterator[str]:
    """A local folder to write the folder `path` into, for writers that need one: `path`
    itself when local, else a temporary folder uploaded to `path` on a clean exit, then
    removed (an exception uploads nothing)."""
    if not is_remote(path):
        yield os.fspath(path)
        return
    with tempfile.TemporaryDirectory(prefix="medjax_write_") as tmp:
        yield tmp
        upload(tmp, path)
