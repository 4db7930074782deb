"""The one exception type users see. The CLI prints its message on one line and exits non-zero;
library callers catch it like any other exception."""


class CnnkitError(Exception):
    """A problem the user can fix: the message says what went wrong and what to do."""


class TrainingInterrupted(CnnkitError):
    """Ctrl-C during training: the last good checkpoint is kept and the run can be resumed."""


class TrainingDiverged(CnnkitError):
    """The loss or the weights became non-finite: training stopped, keeping only finite files."""


# What to do about each everyday filesystem fault: the CLI turns an OSError naming a path into one
# line, "cannot write PATH: Read-only file system; <this>", instead of an internal error.
OS_ERROR_FIXES = {
    "EROFS": "the file system is read-only: choose a path on a writable disk",
    "EACCES": "permission denied: choose a path this user may use, or change its permissions",
    "EPERM": "not permitted: choose a path this user may use, or change its permissions",
    "ENOSPC": "the disk is full: free some space or choose a path on another disk",
    "EDQUOT": "the disk quota is used up: free some space or choose a path on another disk",
    "EEXIST": "a file of that name is in the way: remove it or choose another path",
    "ENOTDIR": "part of the path is a file, not a folder: choose another path",
    "EISDIR": "it is a folder where a file was expected: choose another path",
    "ENOENT": "no such file or folder: check the path",
    "ELOOP": "a symbolic link loop (its links point at each other): fix the link",
    "ENAMETOOLONG": "the name is too long: choose a shorter path",
    "EIO": "the disk reported an input/output error: check the disk, or choose a path on another one",
    "EMFILE": "too many open files: raise the limit (ulimit -n)",
}


WRITE_FAULTS = ("EROFS", "ENOSPC", "EDQUOT", "EEXIST")


def os_error_message(e: OSError, action: str | None = None) -> str | None:
    """One line for an everyday filesystem fault ("cannot write runs/x: ...; what to do"), or None
    for an OSError that is not one (a bug of ours stays an internal error)."""
    import errno
    name = errno.errorcode.get(e.errno or -1, "")
    if name not in OS_ERROR_FIXES:
        return None
    action = action or ("write" if name in WRITE_FAULTS else "use")
    where = f" {e.filename}" if e.filename else ""
    also = f" (and {e.filename2})" if getattr(e, "filename2", None) else ""
    return f"cannot {action}{where}{also}: {OS_ERROR_FIXES[name]}"
