"""When each frame was taken: ``frame_times(refs, times)`` gives each frame's exposure start and
end as timezone-aware datetimes (a frame's time is the middle of its exposure), from the file
headers (EIGER/NeXus masters, CBF/EDF/TIFF headers), a scan log (``read_scan_log``) or a start and
a period; times without a UTC offset are placed with the configured time zone."""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from datetime import timezone as _utc_tz
from pathlib import Path
from typing import Sequence
from zoneinfo import ZoneInfo

import numpy as np

from .errors import ConfigError
from .frames import FrameRef, is_hdf5, open_hdf5

__all__ = ["FrameTime", "frame_times", "read_scan_log", "utc_seconds", "iso_seconds"]


@dataclass(frozen=True)
class FrameTime:
    """Exposure start and end (timezone-aware) of one frame."""

    start: datetime
    end: datetime

    @property
    def mid(self) -> datetime:
        return self.start + (self.end - self.start) / 2



def _aware(t: datetime, tz: str | None, where: str, key: str) -> datetime:
    if t.tzinfo is not None:
        return t
    if tz is None:
        raise ConfigError(where, [(key, "the time stamps carry no UTC offset; set a timezone such as 'Europe/London'")])
    return t.replace(tzinfo=ZoneInfo(tz))


_ISO_RE = re.compile(r"(\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:?\d{2})?)")


def _parse_time(text: str) -> datetime | None:
    text = text.strip().replace("Z", "+00:00")
    m = _ISO_RE.search(text)
    if m:
        try:
            return datetime.fromisoformat(m.group(1).replace("Z", "+00:00"))
        except ValueError:
            pass
    for fmt in ("%Y:%m:%d %H:%M:%S", "%a %b %d %H:%M:%S %Y", "%Y/%m/%d %H:%M:%S.%f", "%Y/%m/%d %H:%M:%S"):
        try:
            return datetime.strptime(text, fmt)
        except ValueError:
            continue
    return None


def _header_times_hdf5(path: Path) -> tuple[datetime, float, float]:
    """(start of the series, frame period, exposure) from an EIGER/NeXus master file."""
    with open_hdf5(path) as h5:
        def first(*names):
            for name in names:
                if name in h5:
                    v = h5[name][()]
                    return v.decode() if isinstance(v, bytes) else v
            return None

        start = first("/entry/instrument/detector/detectorSpecific/data_collection_date", "/entry/start_time")
        count = first("/entry/instrument/detector/count_time")
        period = first("/entry/instrument/detector/frame_time") or count
    if start is None or period is None:
        raise ValueError("no data_collection_date/start_time and frame_time/count_time in the header")
    t0 = _parse_time(str(start))
    if t0 is None:
        raise ValueError(f"cannot parse the start time {start!r}")
    count = float(count if count is not None else period)
    return t0, float(period), count


def _header_time_fabio(path: Path) -> tuple[datetime, float]:
    import fabio

    with fabio.open(str(path)) as img:
        header = dict(img.header)
    text = header.get("_array_data.header_contents", "")
    exposure = None
    start = None
    if text:  # Pilatus / EIGER CBF mini-header
        for line in text.splitlines():
            line = line.lstrip("# ").strip()
            if start is None:
                start = _parse_time(line)
            if line.lower().startswith("exposure_time"):
                try:
                    exposure = float(line.split()[1])
                except (IndexError, ValueError):
                    pass
    for key in ("time", "date", "DateTime", "Date", "acq_time", "time_of_day", "datetime"):
        if start is None and key in header:
            start = _parse_time(str(header[key]))
    for key in ("count_time", "exposure_time", "ExposureTime", "acq_expo_time", "exposure"):
        if exposure is None and key in header:
            try:
                exposure = float(str(header[key]).split()[0])
            except ValueError:
                pass
    if start is None:
        raise ValueError("no time stamp in the image header")
    return start, float(exposure or 0.0)


def read_scan_log(path: Path, *, timezone: str | None = None) -> list[tuple[str, datetime, datetime]]:
    """Read a scan log: one row per frame with a file name or scan number, start and end.

    Column names are matched loosely: a ``file``/``filename``/``scan``/``scan_number`` column,
    and ``start``/``start_time`` and ``end``/``end_time`` columns.
    """
    where = str(path)
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            sample = fh.read(4096)
            fh.seek(0)
            dialect = csv.Sniffer().sniff(sample, delimiters=",;\t") if sample.strip() else csv.excel
            rows = list(csv.DictReader(fh, dialect=dialect))
    except FileNotFoundError:
        raise ConfigError(where, [("times.log", "no such scan log")]) from None
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        raise ConfigError(where, [("times.log", f"cannot read the scan log: {exc}")]) from None
    if not rows:
        raise ConfigError(where, [("times.log", "the scan log has no rows")])
    cols = {c.strip().lower(): c for c in rows[0] if c}

    def pick(*names):
        for n in names:
            if n in cols:
                return cols[n]
        return None

    c_id = pick("file", "filename", "file_name", "scan", "scan_number", "scan_no", "scannumber")
    c_start = pick("start", "start_time", "starttime", "t_start")
    c_end = pick("end", "end_time", "endtime", "t_end", "stop", "stop_time")
    missing = [n for n, c in (("file or scan_number", c_id), ("start_time", c_start), ("end_time", c_end)) if c is None]
    if missing:
        raise ConfigError(where, [("times.log", f"expected columns {', '.join(missing)}; found {', '.join(cols)}")])
    out = []
    for i, row in enumerate(rows, start=2):
        s, e = _parse_time(row[c_start] or ""), _parse_time(row[c_end] or "")
        if s is None or e is None:
            raise ConfigError(where, [("times.log", f"line {i}: cannot read start/end times {row[c_start]!r}, {row[c_end]!r}")])
        s = _aware(s, timezone, where, "times.timezone")
        e = _aware(e, timezone, where, "times.timezone")
        if e < s:
            raise ConfigError(where, [("times.log", f"line {i}: end time is before start time")])
        out.append((str(row[c_id]).strip(), s, e))
    return out


def _match_log(name: str, log: list[tuple[str, datetime, datetime]]) -> tuple[datetime, datetime] | None:
    stem = Path(name).stem
    by_id = {entry[0]: entry for entry in log}
    for cand in (name, stem):
        if cand in by_id:
            return by_id[cand][1], by_id[cand][2]
    for number in sorted(re.findall(r"\d+", stem), key=len, reverse=True):
        if number in by_id:
            return by_id[number][1], by_id[number][2]
        if number.lstrip("0") in by_id:
            return by_id[number.lstrip("0")][1], by_id[number.lstrip("0")][2]
    return None


def frame_times(refs: Sequence[FrameRef], times, *, timezone: str | None = None,
                where: str = "experiment") -> list[FrameTime | None]:
    """Each frame's exposure (start, end), or None where unknown.

    ``times`` is the ``frames.times`` spec: ``None``, ``"header"``, a :class:`TimesFromLog` or a
    :class:`TimesPeriodic`. A frame of a log that has no row for it gets None (and is reported),
    never a neighbour's time. Problems with the time source as a whole raise ConfigError.
    """
    from .config import TimesFromLog, TimesPeriodic

    if times is None:
        return [None] * len(refs)
    if isinstance(times, TimesPeriodic):
        exposure = times.exposure_s if times.exposure_s is not None else times.period_s
        out = []
        for i, _ in enumerate(refs):
            s = times.start + timedelta(seconds=i * times.period_s)
            out.append(FrameTime(s, s + timedelta(seconds=exposure)))
        return out
    if isinstance(times, TimesFromLog):
        return _log_times(refs, read_scan_log(times.log, timezone=times.timezone or timezone))
    return _header_times(refs, timezone, where)


def _log_times(refs: Sequence[FrameRef], log) -> list[FrameTime | None]:
    """Each frame's row of a scan log (a stack's frames by file:index), None where it has none."""
    per_file: dict[Path, list[FrameRef]] = {}
    for r in refs:
        per_file.setdefault(r.file, []).append(r)
    out = []
    for r in refs:
        hit = None
        if len(per_file[r.file]) > 1:  # a stack: rows named file:index or one row per frame
            hit = _match_log(f"{r.file.name}:{r.index}", log)
        if hit is None and len(per_file[r.file]) == 1:
            hit = _match_log(r.file.name, log)
        out.append(FrameTime(*hit) if hit else None)
    return out


def _header_times(refs: Sequence[FrameRef], timezone: str | None, where: str) -> list[FrameTime | None]:
    """Each frame's time from its file's header (None where unreadable); ConfigError where none is."""
    out: list[FrameTime | None] = []
    first_problem = None
    cache: dict[Path, tuple[datetime, float, float]] = {}
    for r in refs:
        if r.error:
            out.append(None)
            continue
        try:
            if is_hdf5(r.file):
                if r.file not in cache:
                    cache[r.file] = _header_times_hdf5(r.file)
                t0, period, count = cache[r.file]
                s = _aware(t0, timezone, where, "frames.timezone") + timedelta(seconds=r.index * period)
                out.append(FrameTime(s, s + timedelta(seconds=count)))
            else:
                t0, exposure = _header_time_fabio(r.file)
                s = _aware(t0, timezone, where, "frames.timezone")
                out.append(FrameTime(s, s + timedelta(seconds=exposure)))
        except ConfigError:
            raise
        except Exception as exc:  # this frame stays untimed (it is probably unreadable too)
            first_problem = first_problem or f"{r.file} gives no frame time ({exc})"
            out.append(None)
    if refs and all(t is None for t in out):
        listed = next((r for r in refs if r.error), None)
        if first_problem is None and listed is not None:
            # no frame could even be listed (a dataset not in the files, files that are not
            # frames): that is the mistake to name, not the times read from them
            raise ConfigError(where, [(
                "frames",
                f"no frame can be read: {listed.file}: {listed.error}",
            )])
        raise ConfigError(where, [(
            "frames.times",
            f"times = \"header\" but {first_problem or 'no file could be read'}; "
            "use times = { log = \"scans.csv\" } or { start = ..., period_s = ... }",
        )])
    return out


def utc_seconds(t: datetime | None) -> float:
    """POSIX seconds of an aware datetime; NaN for None."""
    return float("nan") if t is None else t.astimezone(_utc_tz.utc).timestamp()


def iso_seconds(values) -> np.ndarray:
    """POSIX seconds of ISO 8601 times with UTC offset (as the run file stores them); NaN for ''."""
    return np.array([datetime.fromisoformat(v).timestamp() if v else np.nan for v in values], dtype=float)
