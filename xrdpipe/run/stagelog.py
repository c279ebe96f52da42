"""``/entry/process/stages`` of the run file: what each stage of ``xrdpipe run`` last finished,
from which inputs (its key), when, its summary and the files it wrote (:func:`mark_stage`,
:func:`read_stages`); the workflow skips a stage whose record matches."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from .access import reading, text
from .paths import ENTRY, FORMAT, PROCESS, STAGES, h5path

__all__ = ["StageRecord", "read_stages", "mark_stage"]


@dataclass(frozen=True)
class StageRecord:
    """What a stage of ``xrdpipe run`` last finished: from which inputs (``key``), when, its
    summary and the files it wrote."""

    key: str
    finished: str = ""
    summary: str = ""
    outputs: tuple[str, ...] = ()


def read_stages(path: Path | str) -> dict[str, StageRecord]:
    """The finished stages of a run file. A stage appears only once it has finished; empty for a
    run file that does not exist yet."""
    from ..safeio import active

    session = active(path)
    if not Path(path).exists() and (session is None or session.readable() is None):
        return {}
    with reading(path) as h5:
        g = h5[ENTRY].get(STAGES)
        if g is None:
            return {}
        out = {}
        for name, sub in g.items():
            a = {k: text(v) for k, v in sub.attrs.items()}
            out[name] = StageRecord(a.get("key", ""), a.get("finished", ""), a.get("summary", ""),
                                    tuple(json.loads(a.get("outputs") or "[]")))
        return out


def mark_stage(path: Path | str, stage: str, key: str | None, summary: str = "",
               outputs: Sequence[Path | str] = ()) -> None:
    """Record that ``stage`` finished from inputs ``key``, writing ``outputs`` (or, with None,
    forget it: the stage has started and its outputs are in flux until it finishes)."""
    from ..safeio import active, transaction

    session = active(path)
    if not Path(path).exists() and (session is None or session.readable() is None):
        return
    with transaction(path) as session:
        h5 = session.writable()
        if h5.attrs.get("format") != FORMAT or h5path(PROCESS) not in h5:
            return                       # not a run file: whoever opens it next says so
        g = h5[ENTRY].require_group(STAGES)
        if stage in g:
            del g[stage]
        if key is not None:
            sub = g.create_group(stage)
            sub.attrs.update({"key": key, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                              "summary": summary, "outputs": json.dumps([str(p) for p in outputs])})
