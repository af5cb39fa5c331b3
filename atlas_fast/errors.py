"""The errors that mean bad input or a failing environment, not a bug: each says in one line what to change.

OptionError names a parameter and its value: `lr=1e+30: training diverged ...` from Python, and the command line
shows it under the flag's name, `--lr 1e+30: ...`. WriteError is an output file that could not be written (full
disk, a folder in the way, a missing folder): it names that file, and nothing was written there. FileChangedError
is a memory-mapped file that changed under its tensors.
"""


class OptionError(ValueError):
    """A parameter whose value cannot work: `option` is its Python name, `value` what was given, `reason` why."""

    def __init__(self, option, value, reason):
        self.option, self.value, self.reason = option, value, reason
        super().__init__(f"{option}={value!r}: {reason}")


class WriteError(OSError):
    """An output file that could not be written: WriteError(errno, reason, path). The previous file there (if any)
    is kept."""

    def __str__(self):
        return f"{self.filename}: cannot write: {self.strerror}"


class FileChangedError(ValueError):
    """A memory-mapped file that was replaced, removed, truncated or modified since it was opened; load it again."""
