"""User-facing errors: one line that says what is wrong and what to do."""

import errno

# The errno values of a device (or a quota) that has no room left: never transient, a retry writes nothing.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# How libraries that do their own I/O (polars, pyarrow) word it when they hand on no errno.
_DISK_FULL_WORDS = ("no space left on device", "disk quota exceeded", "os error 28", "os error 122")


class PmdError(Exception):
    """A configuration, input or dependency problem that stops the run with a one-line message."""


class StopBuild(PmdError):
    """A problem no retry of a shard can help (a full device, a link inside OUT): the whole run stops, once."""


class DiskFull(StopBuild):
    """The output device (or the quota) is full: the build stops once, and a re-run resumes."""


def is_disk_full(err: BaseException) -> bool:
    """True when `err`, or an exception it was raised from, says the device has no space left."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS:
            return True
        if any(words in str(err).lower() for words in _DISK_FULL_WORDS):
            return True
        err = err.__cause__ or err.__context__
    return False
