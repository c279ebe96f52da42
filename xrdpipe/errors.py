"""Exceptions raised by xrdpipe.

Every error a user can cause is an :class:`XrdpipeError`; the command line turns it into one
clean line. The hierarchy::

    XrdpipeError
     ├── ConfigError        the experiment file: file, key path, what was expected, a hint
     ├── CalibrationError   PONI, mask, dark or flat unusable for the run as a whole
     ├── FrameReadError     one frame could not be read (recorded as data, the run goes on)
     ├── PatternReadError   one 1D pattern file could not be read (recorded as data)
     ├── ChunkDecodeError   a compressed chunk of a frame must not be decompressed (caught in
     │                      frames.py, where h5py then reads the frame and names the problem)
     ├── CyclerReadError    the cycler file cannot be read (names the optional extra it needs)
     ├── WindowSetupError   [[windows]] that cannot be set up on this run's data (per window)
     ├── StructureError     a crystal structure cannot be built or read (CIF, space group, element)
     ├── RefinementError    a whole-pattern refinement cannot be set up or did not converge
     ├── PlotError          a figure cannot be drawn from this run file (and which command makes it)
     ├── InitError          `xrdpipe init` cannot write the experiment file (no frames, PONI, phase)
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
    "ChunkDecodeError",
    "CyclerReadError",
    "WindowSetupError",
    "StructureError",
    "RefinementError",
    "PlotError",
    "InitError",
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


class ChunkDecodeError(XrdpipeError):
    """A compressed chunk of a frame that must not be decompressed (the message says why)."""


class WindowSetupError(XrdpipeError):
    """Windows that cannot be set up on this run's data: ``problems`` is [(window index, why)],
    each ``why`` naming the window; the run layer turns it into a :class:`ConfigError` on
    ``windows.<i>.<key>`` (``peaks`` unless the problem is another key's)."""

    def __init__(self, problems: list[tuple[int, str]], key: str = "peaks"):
        super().__init__("; ".join(f"window {i}: {m}" for i, m in problems))
        self.problems = problems
        self.key = key


class StructureError(XrdpipeError):
    """A structure cannot be built or read (the file or the key, and what was expected)."""


class RefinementError(XrdpipeError):
    """A refinement cannot be set up or did not converge (which frame or key, and why)."""


class PlotError(XrdpipeError):
    """A figure cannot be drawn from this run file (what is missing, and which command makes it)."""


class InitError(XrdpipeError):
    """``xrdpipe init`` cannot write the experiment file: no frames matched, the PONI cannot be
    read, a phase is not in the library..."""


class StoreError(XrdpipeError):
    """The run file cannot be used as asked, or an output cannot be written."""
