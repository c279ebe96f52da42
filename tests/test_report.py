"""The run report (report.html): its content against the run file read independently, a page
that needs nothing outside itself, and a real headless browser (Debian's chromium) that loads it
without a console message, decodes every image and draws a non-blank page. The browser test
skips where chromium is missing, but never under CI (``CI`` set): there it fails."""

import html
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from xrdpipe.cli import main
from xrdpipe.config import load_experiment
from xrdpipe.report import coexistence, phase_ranges, phase_transitions
from xrdpipe.run.report import report_experiment
from xrdpipe.run.workflow import run_experiment
from xrdpipe.testing import make_experiment

HOSTILE = '# a note with <script>alert("x")</script> & <b>tags</b> in it\n'
BAD_FRAME = 5


@pytest.fixture(scope="module")
def report_run(tmp_path_factory):
    """14 imported patterns (one unreadable), O3 -> P3 with coexistence, PNG figures; the
    experiment file carries markup that the report must escape."""
    folder = tmp_path_factory.mktemp("report") / "exp"
    syn = make_experiment(folder, n_frames=14, frame_format="xye", seed=3, counts=0.02, background=20.0,
                          run_name="report-test")
    text = syn.experiment_file.read_text()
    syn.experiment_file.write_text(HOSTILE + text[:text.index("# Figures of")]
                                   + '[plots]\nformats = ["png"]\ndpi = 50\n\n[export]\nformats = ["xye"]\n')
    syn.frame_files[BAD_FRAME].write_text("not a pattern\n")
    exp = load_experiment(syn.experiment_file)
    summary = run_experiment(exp, progress=False)
    return exp, summary, exp.run.output / "report.html"


# ----------------------------------------------------------------------------------------------
# reading the page back

class _Page(HTMLParser):
    """Tables by id (rows of cell texts), element texts by id, every src/href, script tags."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tables: dict[str, list[list[str]]] = {}
        self.texts: dict[str, str] = {}
        self.links: list[str] = []
        self.tags: list[str] = []
        self.meta: list[dict] = []
        self._table = self._cell = self._id = None
        self._row: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        self.links += [v for k, v in attrs if k in ("src", "href") and v is not None]
        if tag == "meta":
            self.meta.append(a)
        if tag == "table" and "id" in a:
            self._table = a["id"]
            self.tables[a["id"]] = []
        elif tag == "tr" and self._table:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = ""
        elif "id" in a and tag not in ("table", "h2"):
            self._id = a["id"]
            self.texts[self._id] = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(self._cell.strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            if self._row and self._table:
                self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None
        elif self._id and tag in ("dd", "span", "p"):
            self._id = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data
        elif self._id:
            self.texts[self._id] += data


def _page(path: Path) -> _Page:
    p = _Page()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def _truth(run_file: Path):
    """Frames, failures and phases read from the run file with h5py alone."""
    with h5py.File(run_file, "r") as h5:
        status = h5["/entry/frames/status"][()]
        message = [m.decode() for m in h5["/entry/frames/message"][()]]
        key = [k.decode() for k in h5["/entry/frames/key"][()]]
        lat = h5["/entry/lattice"]
        phases = [p.decode() for p in lat["phase"][()]]
        frame = lat["frame"][()]
        seen = np.isfinite(lat["c_A"][()]) | (np.nan_to_num(lat["fraction"][()]) > 0)
        x = h5["/entry/electrochemistry/x"][()]
    return status, message, key, phases, frame, seen, x


def _runs(rows: np.ndarray) -> str:
    """Consecutive frames as "a–b, c" (written independently of xrdpipe.report)."""
    out, start = [], None
    for i, f in enumerate(rows):
        if start is None:
            start = f
        if i + 1 == len(rows) or rows[i + 1] != f + 1:
            out.append(str(start) if start == f else f"{start}–{f}")
            start = None
    return ", ".join(out) or "none"


# ----------------------------------------------------------------------------------------------
# content

def test_the_report_says_what_the_run_file_holds(report_run):
    exp, summary, path = report_run
    assert summary.report == "ran" and summary.outputs["report"] == str(path)
    status, message, key, phases, frame, seen, x = _truth(exp.run.run_file)
    page = _page(path)
    assert int(page.texts["frame-count"]) == status.size == 14
    assert int(page.texts["failed-count"]) == int((status == -1).sum()) == 1
    assert int(page.texts["done-count"]) == int((status == 1).sum()) == 13
    failed = np.flatnonzero(status == -1)
    assert failed.tolist() == [BAD_FRAME]
    assert page.tables["failures"][1:] == [[str(i), key[i], message[i]] for i in failed]
    assert message[BAD_FRAME] == "no numeric data found"
    # phases: frames where each is present (integrated frames only), their x range
    ok = status[frame] == 1
    rows = page.tables["phase-ranges"]
    assert rows[0] == ["phase", "frames", "present in frames", "x", "time (s)"]
    assert [r[0] for r in rows[1:]] == phases == ["O3", "P3"]
    for r, (i, name) in zip(rows[1:], enumerate(phases)):
        on = frame[ok][seen[ok][:, i]]
        assert int(r[1]) == on.size > 0
        assert r[2] == _runs(on)
        assert r[3] == f"{np.nanmin(x[on]):.3f} to {np.nanmax(x[on]):.3f}"
    # transitions: the integrated frames compared one by one
    f_ok, s_ok = frame[ok], seen[ok]
    expected = [[str(f_ok[r]), name, "appears" if s_ok[r, i] else "disappears", f"{x[f_ok[r]]:.3f}"]
                for r in range(1, len(f_ok)) for i, name in enumerate(phases) if s_ok[r, i] != s_ok[r - 1, i]]
    assert [row[:4] for row in page.tables["transitions"][1:]] == expected and expected
    both = f_ok[s_ok.all(axis=1)]
    assert both.size, "the run has frames with both phases (the coexistence table is exercised)"
    co = page.tables["coexistence"][1:]
    assert ", ".join(r[0] for r in co) == _runs(both) and {r[1] for r in co} == {"O3 + P3"}
    # stages and when they ran; the experiment text, escaped
    stages = {r[0]: r[1] for r in page.tables["stages"][1:]}
    assert stages == {"integrate": "up to date", "echem": "up to date", "fit": "up to date",
                      "lattice": "up to date", "plots": "up to date", "export": "up to date",
                      "refine": "not configured"}
    text = path.read_text()
    assert html.escape(HOSTILE.strip(), quote=True) in text and "<b>tags</b>" not in text


def test_the_report_needs_nothing_outside_itself(report_run):
    exp, summary, path = report_run
    page = _page(path)
    text = path.read_text()
    assert "script" not in page.tags and "link" not in page.tags and "iframe" not in page.tags
    assert all(v.startswith(("data:image/png;base64,", "#")) for v in page.links), page.links
    assert sum(v.startswith("data:") for v in page.links) == len(summary.figures) == 5
    assert not re.search(r"url\(|@import|https?://", text)
    assert not any(m.get("http-equiv") == "refresh" for m in page.meta)   # only watch's page reloads


def test_phase_tables_of_a_known_series():
    present = [[True, False], [True, True], [True, True], [False, True], [False, False], [True, False]]
    x = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5]
    r = phase_ranges(["O3", "P3"], present, x=x)
    assert [(p.phase, p.frames, p.segments, p.x_range) for p in r] == [
        ("O3", 4, [(0, 2), (5, 5)], (0.5, 1.0)), ("P3", 3, [(1, 3)], (0.7, 0.9))]
    t = phase_transitions(["O3", "P3"], present, x=x)
    assert [(e.frame, e.phase, e.event, e.x) for e in t] == [
        (1, "P3", "appears", 0.9), (3, "O3", "disappears", 0.7), (4, "P3", "disappears", 0.6),
        (5, "O3", "appears", 0.5)]
    c = coexistence(["O3", "P3"], present, frame=[10, 11, 12, 13, 14, 15])
    assert [(k.first, k.last, k.phases) for k in c] == [(11, 12, ("O3", "P3"))]


def test_a_second_run_keeps_the_report_and_the_command_rewrites_it(report_run):
    exp, _, path = report_run
    before = path.stat().st_mtime_ns
    again = run_experiment(load_experiment(exp.source), progress=False)
    assert not again.did_work and again.report == "skipped" and path.stat().st_mtime_ns == before
    path.unlink()
    result = CliRunner().invoke(main, ["report", str(exp.source)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"report: {path} (14 frame(s), 1 failed, 5 figure(s))")
    assert int(_page(path).texts["frame-count"]) == 14


def test_a_run_with_only_some_stages_says_what_is_missing(tmp_path):
    syn = make_experiment(tmp_path / "exp", n_frames=3, frame_format="xye", seed=1)
    text = syn.experiment_file.read_text()
    syn.experiment_file.write_text(text[:text.index("[electrochemistry]")] + text[text.index("[patterns]"):]
                                   .split("[[windows]]")[0].split("[[phases]]")[0])
    exp = load_experiment(syn.experiment_file)
    from xrdpipe.run.integrate import integrate_experiment

    integrate_experiment(exp, progress=False)          # only the patterns: no echem, fit, lattice, plots
    s = report_experiment(exp)
    assert s.missing == ["electrochemistry: the echem stage has not run (no [electrochemistry] section); no x per frame",
                         "lattice: no [[windows]] and [[phases]] configured",
                         "figures: the plots stage has not run (or has not finished)"]
    page = _page(s.path)
    assert int(page.texts["frame-count"]) == 3 and "phase-ranges" not in page.tables


# ----------------------------------------------------------------------------------------------
# a real browser

_CHECK = ('<script>window.addEventListener("load",function(){var im=[].slice.call(document.images);'
          'document.body.setAttribute("data-images",String(im.length));'
          'document.body.setAttribute("data-decoded",String(im.filter(function(i){'
          'return i.complete&&i.naturalWidth>0;}).length));});</script>')


def _chromium() -> str:
    exe = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed, but CI is set: .ci/run installs it (apt-get install chromium)")
        pytest.skip("chromium is not installed (CI installs it)")
    return exe


def _browse(exe: str, page: Path, tmp: Path) -> tuple[dict[str, int], list[str], np.ndarray]:
    """Load a copy of ``page`` with the image check added: (image counts, console lines, screenshot)."""
    from PIL import Image

    copy = tmp / "page.html"
    copy.write_text(page.read_text(encoding="utf-8").replace("</body>", _CHECK + "</body>"), encoding="utf-8")
    shot = tmp / "shot.png"
    run = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          "--disable-dev-shm-usage", f"--user-data-dir={tmp / 'profile'}", "--enable-logging=stderr",
                          "--v=0", "--window-size=1200,1600", f"--screenshot={shot}", "--dump-dom",
                          copy.as_uri()], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", run.stdout).group(1)
    counts = {k: int(v) for k, v in re.findall(r'data-(images|decoded)="(\d+)"', body)}
    console = [line for line in run.stderr.splitlines() if ":CONSOLE" in line]
    return counts, console, np.asarray(Image.open(shot).convert("RGB"))


def test_the_browser_check_sees_errors_and_broken_images(tmp_path):
    """The checks below can fail: a console error and an image that does not decode are seen."""
    exe = _chromium()
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><head><meta charset="utf-8"></head><body><p>x</p>'
                   '<img src="data:image/png;base64,AAAA"><script>console.error("boom")</script></body></html>')
    counts, console, _ = _browse(exe, bad, tmp_path)
    assert counts == {"images": 1, "decoded": 0}
    assert len(console) == 1 and '"boom"' in console[0]


def test_the_report_in_a_headless_browser(report_run, tmp_path):
    exe = _chromium()
    exp, summary, path = report_run
    counts, console, img = _browse(exe, path, tmp_path)
    assert console == []
    assert counts == {"images": 5, "decoded": 5}
    assert img.shape == (1600, 1200, 3)
    colours = np.unique((img[..., 0].astype(np.int32) << 16) | (img[..., 1].astype(np.int32) << 8) | img[..., 2])
    assert img.std() > 20 and colours.size > 50


def test_the_report_refreshes_itself_during_watch_only(report_run):
    """Last in the module: the watch records its own stage keys in the run file."""
    from xrdpipe.run.watch import watch_experiment

    exp, _, path = report_run
    seen = []

    def on_poll(result):
        seen.append(any(m.get("http-equiv") == "refresh" and m.get("content") == "5" for m in _page(path).meta))

    summary = watch_experiment(exp.source, interval_s=0.1, settle_s=0.0, max_polls=1, on_poll=on_poll)
    assert summary.last is not None and summary.last.report == "ran"
    assert seen == [True]
    assert not any(m.get("http-equiv") == "refresh" for m in _page(path).meta)   # the watch stopped
