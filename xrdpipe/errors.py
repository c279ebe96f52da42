"""Exceptions raised by xrdpipe.

Every error a user can cause is an :class:`XrdpipeError`; the command line turns it into one
clean line. The hierarchy::

    XrdpipeError
     ├── ConfigError        the experiment file: file, key path, what was expected, a hint
     ├── CalibrationError   PONI, mask, dark or flat unusable for the run as a whole
     ├── FrameReadError     one frame could not be read (recorded as data, the run goes on)
     ├── PatternReadError   one 1D pattern file could not be read (recorded as data)
     ├── CyclerReadError    the cycler file cannot be read (names the optional extra it needs)
     └── StoreError         the run file is missing, foreign or incompatible with the request,
                            or a file cannot be written (full disk, no permission: named)

Failures inside a loop over frames are not raised to the user: they are stored per frame
(``success=False`` and a message) and summarised once at the end.
"""

from __future__ import annotations

__all__ = [
    "XrdpipeError",
    "ConfigError",
    "CalibrationError",
    "FrameReadError",
    "PatternReadError",
    "CyclerReadError",
    "StoreError",
]


class XrdpipeError(Exception):
    """Base class of every error xrdpipe raises on purpose."""


class ConfigError(XrdpipeError):
    """The experiment file is invalid. ``problems`` lists ``(key_path, message)`` pairs."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source = source
        self.problems = list(problems)
        n = len(self.problems)
        lines = [f"{source}: {n} error{'s' if n != 1 else ''}"]
        lines += [f"  {key}: {msg}" if key else f"  {msg}" for key, msg in self.problems]
        super().__init__("\n".join(lines))


class CalibrationError(XrdpipeError):
    """The calibration (PONI, mask, dark, flat) cannot be used for this run."""


class FrameReadError(XrdpipeError):
    """A single frame could not be read; ``file`` and ``index`` name it."""

    def __init__(self, file: str, index: int | None, reason: str):
        self.file = str(file)
        self.index = index
        self.reason = reason
        where = self.file if index is None else f"{self.file} frame {index}"
        super().__init__(f"{where}: {reason}")


class PatternReadError(XrdpipeError):
    """A 1D pattern file could not be read."""

    def __init__(self, file: str, reason: str):
        self.file = str(file)
        self.reason = reason
        super().__init__(f"{self.file}: {reason}")


class CyclerReadError(XrdpipeError):
    """A cycler file could not be read. ``extra`` names the optional extra that would read it,
    when that is what is missing."""

    def __init__(self, file: str, reason: str, *, extra: str | None = None):
        self.file = str(file)
        self.reason = reason
        self.extra = extra
        super().__init__(f"{self.file}: {reason}")


class StoreError(XrdpipeError):
    """The run file cannot be used as asked, or an output cannot be written."""
