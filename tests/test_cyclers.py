"""Cycler files: every vendor file reads with time, voltage and current in the right units (or
names the extra it needs), and generic tables give the same record as the vendor's own."""

import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pytest

from xrdpipe.cyclers import detect_format, read_cycler
from xrdpipe.echem import analyse_record
from xrdpipe.errors import CyclerReadError

CYCLERS = Path(__file__).parent / "data" / "cyclers"
VENDOR_FILES = sorted(p for p in CYCLERS.glob("*/*") if p.is_file() and p.parent.name not in ("pyprobe", "handmade") and p.name != "LICENSE")


def _net_mAh(rec):
    return analyse_record(rec).charge_mAs / 3600.0


def test_every_vendor_file_is_here():
    assert len(VENDOR_FILES) == 10
    assert {detect_format(p) for p in VENDOR_FILES} == {"neware", "biologic", "arbin"}


@pytest.mark.parametrize("path", VENDOR_FILES, ids=lambda p: p.name)
def test_vendor_file_reads_in_the_right_units(path):
    rec = read_cycler(path, timezone="Europe/London")
    assert len(rec) >= 2
    assert np.all(np.diff(rec.time) >= 0) and np.isfinite(rec.time).all()
    assert datetime(2010, 1, 1, tzinfo=timezone.utc) < rec.start < datetime(2026, 1, 1, tzinfo=timezone.utc)
    assert np.all(np.abs(rec.voltage_V) < 6.0)
    # the charge integrated from our current agrees with the vendor's own capacity columns
    # (mA against A, seconds against hours, and the sign all show here)
    fmt, ext = detect_format(path), path.suffix
    if fmt == "neware":
        import NewareNDA

        df = NewareNDA.read(str(path))
        step = df["Step_Index"].to_numpy()
        vendor = (df["Charge_Capacity(mAh)"] - df["Discharge_Capacity(mAh)"].abs()).to_numpy(float)
        ends = np.flatnonzero(np.r_[np.diff(step) != 0, True])
        starts = np.r_[0, ends[:-1] + 1]
        if len(rec) == len(df):      # the cycler's counter, made continuous, keeps each step's count
            for s, e in zip(starts, ends):
                assert rec.counter_mAh[e] - rec.counter_mAh[s] == pytest.approx(vendor[e] - vendor[s], abs=1e-6)
        ec = analyse_record(rec)
        ours = ec.charge_mAs / 3600.0
        scale = max(1e-3, np.abs(rec.counter_mAh).max())
        if any("too sparse" in n for n in ec.notes):
            # 2-1-6: a pulsed current sampled too sparsely to integrate; the cycler's count is used on request
            assert path.name.startswith("2-1-6")
            counted = analyse_record(rec, capacity_source="cycler")
            np.testing.assert_allclose(counted.charge_mAs / 3600.0, rec.counter_mAh)
        else:
            np.testing.assert_allclose(ours, rec.counter_mAh, atol=0.02 * scale)
    elif fmt == "biologic" and "OCV" not in path.name:
        from galvani import BioLogic

        q = BioLogic.MPRfile(str(path)).data["(Q-Qo)/mA.h"]
        ours = _net_mAh(rec)
        np.testing.assert_allclose(ours - ours[0], q - q[0], atol=1e-4 * max(1e-3, np.abs(q).max()))
    elif fmt == "biologic":
        assert np.all(rec.current_mA == 0) and any("OCV" in n for n in rec.notes)
    elif fmt == "arbin" and ext == ".res":
        from access_parser import AccessParser

        d = AccessParser(str(path)).parse_table("Channel_Normal_Table")
        o = np.argsort(d["Data_Point"])
        vendor = (np.array(d["Charge_Capacity"]) - np.array(d["Discharge_Capacity"]))[o] * 1e3   # Ah -> mAh
        step = np.array(d["Step_Index"])[o]
        ours = _net_mAh(rec)
        ends = np.flatnonzero(np.r_[np.diff(step) != 0, True])
        starts = np.r_[0, ends[:-1] + 1]
        checked = 0
        for s, e in zip(starts, ends):
            if abs(vendor[e] - vendor[s]) > 0.05:
                assert ours[e] - ours[s] == pytest.approx(vendor[e] - vendor[s], rel=1e-3)
                checked += 1
        assert checked >= 6
    elif fmt == "arbin":
        from python_calamine import CalamineWorkbook

        rows = CalamineWorkbook.from_path(str(path)).get_sheet_by_name("Channel_11_1").to_python()
        head = rows[0]
        data = np.array([[r[head.index(c)] for c in ("Charge_Capacity(Ah)", "Discharge_Capacity(Ah)")]
                         for r in rows[1:]], float)
        vendor = (data[:, 0] - data[:, 1]) * 1e3
        ours = _net_mAh(rec)
        assert ours.max() == pytest.approx(vendor.max(), rel=0.01)


def test_known_clocks_of_real_files(data_dir):
    # cc8.ndax: local wall clock 2025-07-02 19:08:11 (BST) for its first row
    rec = read_cycler(data_dir / "datalab-coincell8" / "cc8.ndax", timezone="Europe/London")
    assert rec.start == datetime(2025, 7, 2, 19, 8, 11, tzinfo=ZoneInfo("Europe/London"))
    # the same file read in another zone moves by the offset difference
    rec_sh = read_cycler(data_dir / "datalab-coincell8" / "cc8.ndax", timezone="Asia/Shanghai")
    assert rec.time[0] - rec_sh.time[0] == pytest.approx(7 * 3600)
    # BioLogic: the acquisition start of the header plus time/s
    rec = read_cycler(CYCLERS / "navani" / "jdb11-1_c3_gcpl_5cycles_2V-3p8V_C-24_data_C09.mpr", timezone="UTC")
    assert rec.start == datetime(2020, 10, 26, 12, 49, 58, tzinfo=timezone.utc)
    # Neware files that store UTC stamps need no timezone
    rec = read_cycler(CYCLERS / "NewareNDA" / "123456789012_Unit27_Example_Data_File.ndax")
    assert rec.start == datetime(2024, 11, 18, 12, 43, 45, 422000, tzinfo=timezone.utc)


def test_a_corrected_cycler_clock_keeps_acquisition_order():
    rec = read_cycler(CYCLERS / "NewareNDA" / "TestFile.nda")
    assert np.all(np.diff(rec.time) >= 0)
    assert any("clock went back 165 s" in n for n in rec.notes)


@pytest.mark.parametrize("module, name, extra", [
    ("NewareNDA", "NewareNDA/TestFile.nda", "neware"),
    ("galvani", "navani/00_test_04_MB_C01.mpr", "biologic"),
    ("access_parser", "navani/arbin_example.res", "arbin"),
])
def test_a_missing_extra_is_named(monkeypatch, module, name, extra):
    monkeypatch.setitem(sys.modules, module, None)      # as if not installed
    with pytest.raises(CyclerReadError) as err:
        read_cycler(CYCLERS / name, timezone="UTC")
    assert err.value.extra == extra
    assert f"pip install 'xrdpipe[{extra}]'" in str(err.value) and name.split("/")[1] in str(err.value)


def test_local_times_need_a_timezone(data_dir):
    with pytest.raises(CyclerReadError, match=r"timezone"):
        read_cycler(data_dir / "datalab-coincell8" / "cc8.ndax")


# ------------------------------------------------------------------------------------------
# generic tables and text exports: the same record whatever the form

T0 = datetime(2025, 3, 30, 0, 30, 0)           # naive local time, Europe/London (DST starts 01:00 UTC)


def _truth(n=400, dt=10.0):
    t = np.arange(n) * dt
    i = np.where(t < 1000, 0.0, np.where(t < 3000, 0.25, -0.25))     # mA
    v = 3.0 + 1e-4 * t
    return t, v, i


def _check(rec, *, tz="Europe/London", naive_start=T0):
    t, v, i = _truth()
    start = naive_start.replace(tzinfo=ZoneInfo(tz)).timestamp()
    np.testing.assert_allclose(rec.time - start, t, atol=1e-3)
    np.testing.assert_allclose(rec.voltage_V, v, atol=1e-9)
    np.testing.assert_allclose(rec.current_mA, i, atol=1e-9)


def test_csv_with_relative_time_and_start(tmp_path):
    t, v, i = _truth()
    f = tmp_path / "c.csv"
    f.write_text("time/s,Ewe/V,I/mA\n" + "\n".join(f"{a},{b},{c}" for a, b, c in zip(t, v, i)))
    with pytest.raises(CyclerReadError, match=r"relative times only; set \[electrochemistry\] start"):
        read_cycler(f)
    start = T0.replace(tzinfo=ZoneInfo("Europe/London"))
    _check(read_cycler(f, format="csv", columns={"time": "time/s", "voltage": "Ewe/V", "current": "I/mA"},
                       start=start))


def test_semicolon_decimal_comma_amperes_and_local_datetimes_across_dst(tmp_path):
    t, v, i = _truth()
    rows = [f"{(T0 + timedelta(seconds=float(a))).strftime('%d.%m.%Y %H:%M:%S')};{str(b).replace('.', ',')};"
            f"{str(c / 1000).replace('.', ',')}" for a, b, c in zip(t, v, i)]
    f = tmp_path / "c.csv"
    f.write_text("Cell 7 export\n\nDate Time;Voltage(V);Current(A)\n" + "\n".join(rows))
    # 00:30 local is GMT; from 01:00 the clock jumps to BST. The record crosses the change.
    rec = read_cycler(f, format="csv", columns={"datetime": "Date Time", "voltage": "Voltage(V)",
                                                "current": "Current(A)"}, timezone="Europe/London")
    wall = np.array([(T0 + timedelta(seconds=float(a))) for a in t])
    expect = np.array([w.replace(tzinfo=ZoneInfo("Europe/London")).timestamp() for w in wall])
    np.testing.assert_allclose(rec.time, expect)
    np.testing.assert_allclose(rec.current_mA, i, atol=1e-12)


def test_units_must_be_known(tmp_path):
    f = tmp_path / "c.csv"
    f.write_text("time,voltage,current\n0,3.0,0\n10,3.1,1\n")
    with pytest.raises(CyclerReadError, match=r"current column 'current' does not say its unit; set "
                                               r"\[electrochemistry\] units"):
        read_cycler(f, start=datetime(2025, 1, 1, tzinfo=timezone.utc), units={"time": "s"})
    rec = read_cycler(f, start=datetime(2025, 1, 1, tzinfo=timezone.utc), units={"time": "min", "current": "uA"})
    assert rec.time[1] - rec.time[0] == 600 and rec.current_mA[1] == pytest.approx(1e-3)


def test_a_wrong_column_name_gets_a_hint(tmp_path):
    f = tmp_path / "c.csv"
    f.write_text("time/s,Ewe/V,I/mA\n0,3.0,0\n10,3.1,1\n")
    with pytest.raises(CyclerReadError, match=r"cannot find a header row with time = 'time', voltage = 'Ewe/V'"):
        read_cycler(f, columns={"time": "time", "voltage": "Ewe/V", "current": "I/mA"})


def _xlsx(path, sheets):
    openpyxl = pytest.importorskip("openpyxl")
    wb = openpyxl.Workbook()
    wb.remove(wb.active)
    for name, rows in sheets:
        ws = wb.create_sheet(name)
        for r in rows:
            ws.append(list(r))
    wb.save(path)


def _hms(s):
    s = float(s)
    return f"{int(s // 3600)}:{int(s % 3600 // 60):02d}:{s % 60:06.3f}"


def test_land_neware_and_arbin_excel_exports(tmp_path):
    t, v, i = _truth()
    wall = [T0 + timedelta(seconds=float(a)) for a in t]
    # LAND: data split over Record sheets, the later ones without a header; TestTime in h:mm:ss
    head = ["Index", "TestTime", "StepTime", "Current/mA", "Capacity/mAh", "Voltage/V", "SysTime"]
    rows = [[k + 1, _hms(a), _hms(a), c, 0.0, b, w.strftime("%Y-%m-%d %H:%M:%S")]
            for k, (a, b, c, w) in enumerate(zip(t, v, i, wall))]
    _xlsx(tmp_path / "land.xlsx", [("Record", [head] + rows[:250]), ("Record1", rows[250:])])
    assert detect_format(tmp_path / "land.xlsx") == "land"
    _check(read_cycler(tmp_path / "land.xlsx", timezone="Europe/London"))
    # Neware export: a lower-case 'record' sheet beside others, Date as date-times
    head = ["DataPoint", "Step Type", "Total Time", "Current(mA)", "Voltage(V)", "Date"]
    rows = [[k + 1, "CC", _hms(a), c, b, w] for k, (a, b, c, w) in enumerate(zip(t, v, i, wall))]
    _xlsx(tmp_path / "neware.xlsx", [("unit", [["x"]]), ("test", [["y"]]), ("record", [head] + rows)])
    assert detect_format(tmp_path / "neware.xlsx") == "neware"
    _check(read_cycler(tmp_path / "neware.xlsx", timezone="Europe/London"))
    # Arbin export: Channel sheets, amperes
    head = ["Date_Time", "Test_Time(s)", "Step_Index", "Voltage(V)", "Current(A)"]
    rows = [[w, a, 1, b, c / 1000] for a, b, c, w in zip(t, v, i, wall)]
    _xlsx(tmp_path / "arbin.xlsx", [("Global_Info", [["TEST REPORT"]]), ("Channel_1_1", [head] + rows),
                                    ("Channel_Chart", [["chart"]])])
    assert detect_format(tmp_path / "arbin.xlsx") == "arbin"
    _check(read_cycler(tmp_path / "arbin.xlsx", timezone="Europe/London"))


def test_a_csv_table_read_as_biologic_is_told_its_separator(tmp_path):
    """A comma-separated table named ``format = "biologic"``: the error says the columns it
    names are separated by commas where BioLogic's are by tabs, and which formats read it (it
    said the line should name time/s, Ewe/V and I/mA, which it did)."""
    f = tmp_path / "cycler.csv"
    f.write_text("datetime,time/s,Ewe/V,I/mA\n2025-07-02T19:04:59+08:00,0.0,2.4,0.0\n")
    with pytest.raises(CyclerReadError) as err:
        read_cycler(f, format="biologic")
    assert str(err.value).endswith("line 1 (after the header block) should name the columns (time/s, Ewe/V or "
                                   "Ecell/V, I/mA), tab-separated; it reads 'datetime,time/s,Ewe/V,I/mA': a "
                                   "BioLogic export separates its columns by tabs, this line by ',' (another table: "
                                   "[electrochemistry] format = \"auto\", or \"csv\" with its columns)")
    assert str(f) in str(err.value)


def test_biologic_text_export(tmp_path):
    t, v, i = _truth()
    lines = ["EC-Lab ASCII FILE", "Nb header lines : 6", "", "Galvanostatic Cycling with Potential Limitation",
             f"Acquisition started on : {T0.strftime('%m/%d/%Y %H:%M:%S')}.000", "mode\ttime/s\tEwe/V\tI/mA\tdq/mA.h"]
    lines += [f"1\t{a:.4f}\t{b:.6f}".replace(".", ",") + f"\t{c:.6f}\t0".replace(".", ",") for a, b, c in zip(t, v, i)]
    f = tmp_path / "gcpl.mpt"
    f.write_text("\n".join(lines), encoding="latin-1")
    _check(read_cycler(f, timezone="Europe/London"))
