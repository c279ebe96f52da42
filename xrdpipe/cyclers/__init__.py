"""Cycler files in, one time-stamped record out: time (absolute), voltage, current.

``read_cycler(path)`` reads BioLogic (.mpr, .mpt/.txt text exports with or without their
header, relative or date-time ``time/s``), Neware (.nda, .ndax, .xlsx), Arbin (.res, .xlsx,
.csv), LAND (.xlsx), Maccor, Basytec and Novonix text exports and generic CSV/TSV/Excel tables
(with a column mapping) into a :class:`CyclerRecord`: POSIX seconds (UTC), volts and
milliamperes, in time order. ``format="auto"`` tells the format from the file's content (its
first kilobytes, :mod:`~xrdpipe.cyclers.sniff`), not its name.

Vendor binaries are read with maintained libraries, installed as optional extras:

=============  ===================  ==================  ======================
format         files                library             extra
=============  ===================  ==================  ======================
``neware``     .nda, .ndax          NewareNDA (BSD)     ``xrdpipe[neware]``
``biologic``   .mpr                 galvani (GPL-3.0)   ``xrdpipe[biologic]``
``arbin``      .res                 access-parser       ``xrdpipe[arbin]``
=============  ===================  ==================  ======================

Text and Excel exports (.mpt, .csv, .tsv, .txt, .xlsx, .xls) need no extra (Excel through
python-calamine). Maccor, Basytec and Novonix exports are read by their vendor's column names
(:mod:`~xrdpipe.cyclers.vendors`): no small maintained reader of them exists on PyPI apart from
whole frameworks (PyProBE, battery-data-toolkit) that would bring polars or pyarrow.

Time: a file either stores absolute times (a time stamp per row, or a start time plus the time
since it) or only relative ones. Absolute times with a UTC offset are used as they are; local
times without one are placed in ``timezone`` (an IANA name; the error says so when it is
missing). A ``start`` replaces the file's own origin: the file's time 0 is placed at ``start``.

Example
-------
>>> rec = read_cycler("cycler.csv", columns={"time": "time/s", "voltage": "Ewe/V", "current": "I/mA"},
...                   start=datetime.fromisoformat("2025-07-02T19:00:00+08:00"))   # doctest: +SKIP
>>> rec.voltage_V[:3]                                                                # doctest: +SKIP

The package: :mod:`~xrdpipe.cyclers.record` (the record, format detection, absolute time),
:mod:`~xrdpipe.cyclers.sniff` (what a file is, from its content),
:mod:`~xrdpipe.cyclers.tables` (CSV/TSV/text and Excel exports),
:mod:`~xrdpipe.cyclers.vendors` (Maccor, Basytec, Novonix, Arbin CSV), one module per vendor binary
(:mod:`~xrdpipe.cyclers.biologic`, :mod:`~xrdpipe.cyclers.neware`, :mod:`~xrdpipe.cyclers.arbin`)
and :mod:`~xrdpipe.cyclers.raw` (the raw form every reader returns).
"""

from __future__ import annotations

from .raw import EXTRAS
from .record import FORMATS, CyclerRecord, detect_format, read_cycler

__all__ = ["CyclerRecord", "read_cycler", "FORMATS", "EXTRAS", "detect_format"]
