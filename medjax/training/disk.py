"""A full disk, reported once: the run's writes (the run directory, caches, orbax's writer
threads) that fail for lack of space become one line naming the file, instead of dozens of
tracebacks; running the same command again resumes.
"""

import errno
import logging
import os
import re
import sys

# Writes that fail because the disk (or the user's quota, or the file size limit) is full.
NO_SPACE = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "no space left (disk quota exceeded)",
    errno.EFBIG: "no space left (file too large for the file size limit)",
}

# Tensorstore (orbax's array writer) raises ValueError with the OS error code in the text.
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")
_FAILED_FILE = re.compile(r'(?:Failed writing|local file):? "([^"]+)"')


def no_space(error: BaseException | None) -> tuple[int, str | None] | None:
    """(errno, path or None) of the out-of-space write failure behind `error` (itself, its
    cause or its context), if there is one."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in NO_SPACE:
            return error.errno, error.filename and os.fspath(error.filename)
        code = _OS_ERROR_CODE.search(str(error))
        if code and int(code.group(1)) in NO_SPACE:
            path = _FAILED_FILE.search(str(error))
            return int(code.group(1)), path and path.group(1)
        error = error.__cause__ or error.__context__
    return None


class NoSpaceLogFilter(logging.Filter):
    """Holds back the log records of out-of-space write failures: orbax's background threads
    log each failed array write with its traceback (dozens for one full disk); train()
    reports the failure once, in one line.

    Also holds back the "Event loop is closed" errors that tensorstore's writer threads raise
    when they call back into the event loop of an orbax save that has already failed: Python
    reports those through `sys.unraisablehook` (a traceback each), never to train()."""

    LOGGERS = ("absl", "asyncio")

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return no_space(error) is None and no_space(ValueError(record.getMessage())) is None

    def _unraisable(self, unraisable) -> None:
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            self._previous_hook(unraisable)

    def install(self) -> None:
        for name in self.LOGGERS:
            logging.getLogger(name).addFilter(self)
        self._previous_hook, sys.unraisablehook = sys.unraisablehook, self._unraisable

    def remove(self) -> None:
        for name in self.LOGGERS:
            logging.getLogger(name).removeFilter(self)
        if sys.unraisablehook == self._unraisable:
            sys.unraisablehook = self._previous_hook


def no_space_message(full: tuple[int, str | None], run_dir: str) -> str:
    """The one line for the out-of-space failure `full` (`no_space(error)`)."""
    code, path = full
    return (
        f"{path or f'a file being written (the run directory is {run_dir})'}: {NO_SPACE[code]};"
        " free some space and run the same command again to resume."
    )
