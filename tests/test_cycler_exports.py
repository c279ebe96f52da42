"""Real text exports of other cyclers (PyProBE's sample data, BSD-3, tests/data/cyclers/pyprobe):
each reads with time (s), voltage (V) and current (mA) equal to the numbers parsed here
independently with str.split, its format is told from the content (also under a wrong name),
and a file that is not data or is cut short gets a one-line error naming it."""

import shutil
from datetime import datetime, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pytest

from xrdpipe.cyclers import detect_format, read_cycler
from xrdpipe.errors import CyclerReadError

PYPROBE = Path(__file__).parent / "data" / "cyclers" / "pyprobe"
LONDON = ZoneInfo("Europe/London")


def _lines(path):
    return path.read_bytes().decode("latin-1").replace("\ufeff", "").splitlines()


def _table(path, header_at, sep):
    """(header names, rows of cells) from the header line index on."""
    lines = [ln for ln in _lines(path)[header_at:] if ln.strip()]
    return [h.strip() for h in lines[0].split(sep)], [ln.split(sep) for ln in lines[1:]]


def _col(header, rows, name, conv=float):
    j = header.index(name)
    return np.array([conv(r[j].strip()) for r in rows])


def _stamp(text, fmt):
    return datetime.strptime(text.strip(), fmt).replace(tzinfo=LONDON).timestamp()


def _same_record(rec, t, v, i_mA):
    """The record equals the independent numbers row by row (time to 1 µs)."""
    assert len(rec) == len(t)
    np.testing.assert_allclose(rec.time, t, rtol=0, atol=1e-6)
    np.testing.assert_allclose(rec.voltage_V, v, rtol=1e-12)
    np.testing.assert_allclose(rec.current_mA, i_mA, rtol=1e-12, atol=1e-12)


def _maccor():
    path = PYPROBE / "maccor" / "sample_data_maccor.csv"
    header, rows = _table(path, 2, ",")
    rel = _col(header, rows, "Test Time (sec)")
    first = _stamp(rows[0][header.index("DPT Time")], "%d-%b-%y %I:%M:%S %p")
    # DPT Time has whole seconds; Test Time (sec) is placed on its clock (the median offset: the first row's here)
    return path, first + rel - rel[0], _col(header, rows, "Voltage"), _col(header, rows, "Current") * 1e3


def _basytec():
    path = PYPROBE / "basytec" / "sample_data_basytec.txt"
    lines = _lines(path)
    start = next(ln.split(":", 1)[1] for ln in lines if ln.startswith("~Start of Test"))
    k = next(n for n, ln in enumerate(lines) if ln.startswith("~Time[s]"))
    header, rows = _table(path, k, "\t")
    t = _stamp(start, "%d.%m.%Y %H:%M:%S") + _col(header, rows, "~Time[s]")
    return path, t, _col(header, rows, "U[V]"), _col(header, rows, "I[A]") * 1e3


def _novonix():
    path = PYPROBE / "novonix" / "sample_data_novonix.csv"
    k = _lines(path).index("[Data]") + 1
    header, rows = _table(path, k, ",")
    rel = _col(header, rows, "Run Time (h)") * 3600.0
    stamps = np.array([_stamp(r[0], "%Y-%m-%d %H:%M:%S") for r in rows])
    t = np.median(stamps - rel) + rel
    return path, t, _col(header, rows, "Potential (V)"), _col(header, rows, "Current (A)") * 1e3


def _arbin():
    path = PYPROBE / "arbin" / "sample_data_arbin.csv"
    header, rows = _table(path, 0, ",")
    rel = _col(header, rows, "Test Time (s)")
    stamps = np.array([_stamp(r[1], "%m/%d/%Y %H:%M:%S.%f") for r in rows])
    t = np.median(stamps - rel) + rel
    return path, t, _col(header, rows, "Voltage (V)"), _col(header, rows, "Current (A)") * 1e3


def _biologic_timestamped():
    path = PYPROBE / "biologic" / "Sample_data_biologic_timestamped.txt"
    header, rows = _table(path, 97, "\t")            # "Nb header lines : 98"
    t = _col(header, rows, "time/s", lambda s: _stamp(s, "%m/%d/%Y %H:%M:%S.%f"))
    return path, t, _col(header, rows, "Ecell/V"), _col(header, rows, "I/mA")


def _biologic_ca1():
    path = PYPROBE / "biologic" / "Sample_data_biologic_CA1.txt"
    origin = _stamp("05/13/2024 11:19:51.602", "%m/%d/%Y %H:%M:%S.%f")   # its "Acquisition started on"
    assert "Acquisition started on : 05/13/2024 11:19:51.602" in _lines(path)[14]
    header, rows = _table(path, 102, "\t")           # "Nb header lines : 103"
    return path, origin + _col(header, rows, "time/s"), _col(header, rows, "Ecell/V"), _col(header, rows, "I/mA")


EXPORTS = {"maccor": _maccor, "basytec": _basytec, "novonix": _novonix, "arbin": _arbin,
           "biologic_timestamped": _biologic_timestamped, "biologic_CA1": _biologic_ca1}
FORMAT = {"maccor": "maccor", "basytec": "basytec", "novonix": "novonix", "arbin": "arbin",
          "biologic_timestamped": "biologic", "biologic_CA1": "biologic"}


@pytest.mark.parametrize("name", EXPORTS)
def test_export_reads_the_numbers_of_the_file(name, tmp_path):
    path, t, v, i = EXPORTS[name]()
    assert detect_format(path) == FORMAT[name]
    rec = read_cycler(path, timezone="Europe/London")
    assert rec.format == FORMAT[name]
    _same_record(rec, t, v, i)
    # the same with the format named, and under a wrong extension (told from the content)
    _same_record(read_cycler(path, format=FORMAT[name], timezone="Europe/London"), t, v, i)
    wrong = tmp_path / ("renamed.csv" if path.suffix == ".txt" else "renamed.txt")
    shutil.copy(path, wrong)
    assert detect_format(wrong) == FORMAT[name]
    _same_record(read_cycler(wrong, timezone="Europe/London"), t, v, i)


def test_what_the_exports_hold():
    """The numbers of the report: rows, time span and a current in each export."""
    held = {}
    for name, make in EXPORTS.items():
        rec = read_cycler(make()[0], timezone="Europe/London")
        held[name] = (len(rec), round(float(rec.time[-1] - rec.time[0]), 3), round(float(np.abs(rec.current_mA).max()), 3))
    assert held == {"maccor": (15, 13.06, 28844.0), "basytec": (74, 70.236, 453.506),
                    "novonix": (207, 12287.48, 499.995), "arbin": (13, 271.214, 2650.138),
                    "biologic_timestamped": (8, 12.464, 450.017), "biologic_CA1": (1397, 139.524, 900.063)}
    # local wall clocks placed in the zone: BST in June and May, GMT in November
    assert read_cycler(_basytec()[0], timezone="Europe/London").start == datetime(2023, 6, 19, 16, 56, 53, tzinfo=timezone.utc)
    assert read_cycler(_maccor()[0], timezone="Europe/London").start == datetime(2023, 11, 23, 15, 56, 11, tzinfo=timezone.utc)


def test_biologic_table_without_its_header_has_relative_times(tmp_path):
    path = PYPROBE / "biologic" / "Sample_data_biologic_no_header.mpt"
    header, rows = _table(path, 0, "\t")
    rel, v, i = _col(header, rows, "time/s"), _col(header, rows, "Ecell/V"), _col(header, rows, "I/mA")
    assert detect_format(path) == "biologic"
    with pytest.raises(CyclerReadError, match="relative times only; set \\[electrochemistry\\] start"):
        read_cycler(path)
    start = datetime(2024, 3, 1, 9, 0, tzinfo=timezone.utc)
    _same_record(read_cycler(path, start=start), start.timestamp() + rel, v, i)
    wrong = tmp_path / "no_header.csv"
    shutil.copy(path, wrong)
    _same_record(read_cycler(wrong, start=start), start.timestamp() + rel, v, i)


def test_binaries_are_told_by_their_content(tmp_path):
    navani = PYPROBE.parent / "navani"
    for src, fmt in (("test.nda", "neware"), ("00_test_01_OCV_C01.mpr", "biologic")):
        wrong = tmp_path / (src + ".bin")
        shutil.copy(navani / src, wrong)
        assert detect_format(wrong) == fmt
        a, b = read_cycler(navani / src, timezone="UTC"), read_cycler(wrong, timezone="UTC")
        np.testing.assert_array_equal(a.time, b.time)
        np.testing.assert_array_equal(a.current_mA, b.current_mA)


def test_a_cell_list_is_not_data():
    path = PYPROBE / "neware" / "Experiment_Record.xlsx"
    with pytest.raises(CyclerReadError) as err:
        read_cycler(path)
    assert str(err.value) == (
        f"{path}: 'sample_data_neware' is an experiment record (one row per cell: Name, Chemistry, "
        "Nominal Capacity [Ah], Start date), not cycler data; give the cycler's data export of the cell "
        "(.nda/.ndax, .mpr/.mpt, or a CSV/Excel of time, voltage and current)")


def test_truncated_exports_get_one_line_errors(tmp_path):
    ca1 = tmp_path / "ca1.txt"
    ca1.write_text("\n".join(_lines(PYPROBE / "biologic" / "Sample_data_biologic_CA1.txt")[:50]), encoding="latin-1")
    with pytest.raises(CyclerReadError) as err:
        read_cycler(ca1)
    assert str(err.value) == (f"{ca1}: truncated: 'Nb header lines' says 103 but the file ends after 50 lines "
                              "(expected the column names on line 103)")
    novonix = tmp_path / "novonix.csv"
    novonix.write_text("\n".join(_lines(PYPROBE / "novonix" / "sample_data_novonix.csv")[:19]), encoding="utf-8")
    with pytest.raises(CyclerReadError) as err:
        read_cycler(novonix)
    assert str(err.value) == (f"{novonix}: not a complete novonix export: no header row with run time, "
                              "potential/voltage and current columns in the first 5000 rows (is the file truncated?)")
    assert "\n" not in str(err.value)


def test_maccor_mode_column_signs_the_current(tmp_path):
    # a Maccor export of the kind that writes the current unsigned beside a mode column
    rows = [("1", "0.0", "0.000", "R", "3.70"), ("2", "10.0", "0.500", "C", "3.80"), ("3", "20.0", "0.500", "D", "3.60")]
    f = tmp_path / "maccor.txt"
    f.write_text("Today's Date\t28-Nov-23\nDate of Test:\t23-Nov-23 3:56:08 PM\n"
                 "Rec\tCycle P\tTest Time (sec)\tAmps\tMD\tVolts\n" + "\n".join("\t".join((r[0], "1", *r[1:3], r[3], r[4])) for r in rows))
    assert detect_format(f) == "maccor"
    rec = read_cycler(f, timezone="Europe/London")
    np.testing.assert_array_equal(rec.current_mA, [0.0, 500.0, -500.0])
    np.testing.assert_array_equal(rec.voltage_V, [3.7, 3.8, 3.6])
    # no date-time column: the "Date of Test" of the header is the time 0 (GMT in November)
    assert rec.start == datetime(2023, 11, 23, 15, 56, 8, tzinfo=timezone.utc)
    np.testing.assert_array_equal(rec.time - rec.time[0], [0.0, 10.0, 20.0])


# ---- hand-made files (tests/data/cyclers/handmade/README.md) --------------------------------
HANDMADE = PYPROBE.parent / "handmade"
UTC = timezone.utc


def test_us_maccor_dates_are_month_first_with_am_pm(tmp_path):
    path = HANDMADE / "maccor_us.csv"
    rec = read_cycler(path, timezone="Europe/London")          # GMT on 5 November 2023
    assert rec.format == "maccor"
    first = datetime(2023, 11, 5, 11, 59, 58, tzinfo=UTC).timestamp()
    np.testing.assert_allclose(rec.time, first + np.array([0.0, 1.0, 2.0, 3.0, 4.0]), rtol=0, atol=1e-6)
    assert datetime(2023, 11, 5, 12, 0, 0, tzinfo=UTC).timestamp() == rec.time[2]      # 12:00:00 PM is noon
    np.testing.assert_array_equal(rec.current_mA, [0.0, 0.0, 500.0, 500.0, -500.0])  # MD D: discharge
    # without the rows' DPT Time, the header's "Date of Test" is time 0, also month first
    lines = path.read_text().splitlines()
    no_dpt = tmp_path / "no_dpt.csv"
    no_dpt.write_text("\n".join(lines[:2] + [ln.rsplit(",", 1)[0] for ln in lines[2:]]))
    rec = read_cycler(no_dpt, timezone="Europe/London")
    assert rec.start == datetime(2023, 11, 5, 11, 59, 55, tzinfo=UTC)
    # a date that cannot be read names the file, the column and the row
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(lines[:5] + [lines[5].replace("12:00:00 PM", "12:00:00 XM")] + lines[6:]))
    with pytest.raises(CyclerReadError) as err:
        read_cycler(bad, timezone="Europe/London")
    assert str(err.value) == f"{bad}: column 'DPT Time', row 3: cannot read '11/05/2023 12:00:00 XM' as a date and time"
    bad.write_text("\n".join(lines[:3] + [lines[3].replace("11:59:58 AM", "11:59:58 XM")] + lines[4:]))
    with pytest.raises(CyclerReadError) as err:
        read_cycler(bad, timezone="Europe/London")
    assert str(err.value) == f"{bad}: column 'DPT Time', row 1: cannot read '11/05/2023 11:59:58 XM' as a date and time"


def test_a_date_column_is_read_in_one_order(tmp_path):
    rec = read_cycler(HANDMADE / "day_first_dates.csv", timezone="UTC")
    t0 = datetime(2024, 11, 5, 10, 0, 0, tzinfo=UTC).timestamp()
    t1 = datetime(2024, 11, 13, 10, 0, 0, tzinfo=UTC).timestamp()
    np.testing.assert_allclose(rec.time, [t0, t0 + 10.0, t1, t1 + 10.0], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(rec.voltage_V, [3.70, 3.71, 4.20, 4.19])     # in the file's order
    assert not any("sorted" in n for n in rec.notes)
    # no field above 12: the vendor's order (month first for a generic table), said in the notes
    f = tmp_path / "ambiguous.csv"
    f.write_text("Date Time,Voltage (V),Current (mA)\n05/11/2024 10:00:00,3.7,0.5\n06/11/2024 10:00:00,3.8,0.5\n")
    rec = read_cycler(f, timezone="UTC")
    np.testing.assert_allclose(rec.time, [datetime(2024, 5, 11, 10, tzinfo=UTC).timestamp(),
                                          datetime(2024, 6, 11, 10, tzinfo=UTC).timestamp()], rtol=0, atol=1e-6)
    assert "column 'Date Time': no slash date has a field above 12; read month first (the vendor's order)" in rec.notes
    # a two-digit year and a 12-hour clock, day first told by the second row
    f.write_text("Date Time,Voltage (V),Current (mA)\n05/11/24 11:59:59 PM,3.7,0.5\n13/11/24 12:00:01 AM,3.8,0.5\n")
    rec = read_cycler(f, timezone="UTC")
    np.testing.assert_allclose(rec.time, [datetime(2024, 11, 5, 23, 59, 59, tzinfo=UTC).timestamp(),
                                          datetime(2024, 11, 13, 0, 0, 1, tzinfo=UTC).timestamp()], rtol=0, atol=1e-6)
    # both orders in one column is an error
    f.write_text("Date Time,Voltage (V),Current (mA)\n13/11/2024 10:00:00,3.7,0.5\n11/14/2024 10:00:00,3.8,0.5\n")
    with pytest.raises(CyclerReadError) as err:
        read_cycler(f, timezone="UTC")
    assert str(err.value) == (f"{f}: column 'Date Time' mixes day-first ('13/11/2024 10:00:00') and "
                              "month-first ('11/14/2024 10:00:00') dates")


def test_eclab_table_with_time_first_is_biologic():
    path = HANDMADE / "eclab_time_first.txt"
    assert detect_format(path) == "biologic"
    start = datetime(2024, 3, 1, 9, 0, tzinfo=UTC)
    rec = read_cycler(path, start=start)
    assert rec.format == "biologic"
    np.testing.assert_allclose(rec.time, start.timestamp() + np.array([0.0, 10.0, 20.0]), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(rec.voltage_V, [3.70, 3.71, 3.72])


def test_biologic_time_column_with_utc_offsets_or_durations(tmp_path):
    f = tmp_path / "aware.txt"
    f.write_text("time/s\tEcell/V\tI/mA\n2024-03-01T09:00:00+01:00\t3.70\t0.5\n2024-03-01T09:00:10+01:00\t3.71\t0.5\n")
    rec = read_cycler(f)                         # no timezone needed: the stamps carry their offset
    t0 = datetime(2024, 3, 1, 8, 0, 0, tzinfo=UTC).timestamp()
    np.testing.assert_allclose(rec.time, [t0, t0 + 10.0], rtol=0, atol=1e-6)
    assert "time/s holds date-times with a UTC offset" in rec.notes
    f = tmp_path / "durations.txt"
    f.write_text("time/s\tEcell/V\tI/mA\n0:00:00\t3.70\t0.5\n0:01:30\t3.71\t0.5\n1:00:00\t3.72\t0.5\n")
    start = datetime(2024, 3, 1, 9, 0, tzinfo=UTC)
    rec = read_cycler(f, start=start)
    np.testing.assert_allclose(rec.time, start.timestamp() + np.array([0.0, 90.0, 3600.0]), rtol=0, atol=1e-6)
    assert "time/s holds durations (h:mm:ss), read as seconds" in rec.notes


def test_whole_files_keep_their_last_latin1_character():
    from xrdpipe.cyclers.sniff import decode

    data = "Spannung;Strom\n3,7;0,5 gr\xfc\xdf".encode("latin-1")       # the only non-UTF-8 bytes at the end
    assert decode(data, partial=False) == "Spannung;Strom\n3,7;0,5 gr\xfc\xdf"
    # a head read may cut a UTF-8 character: the cut one is dropped
    head = "Spannung;Strom in \xb5A".encode("utf-8")[:-2]
    assert decode(head, partial=True) == "Spannung;Strom in "


def test_user_columns_find_a_renamed_maccor_header(tmp_path):
    lines = (HANDMADE / "maccor_us.csv").read_text().splitlines()
    f = tmp_path / "renamed.csv"
    f.write_text("\n".join(lines[:2] + [lines[2].replace(",Voltage,", ",Cell V,")] + lines[3:]))
    with pytest.raises(CyclerReadError, match="not a complete maccor export"):
        read_cycler(f, timezone="Europe/London")
    rec = read_cycler(f, columns={"voltage": "Cell V"}, timezone="Europe/London")
    np.testing.assert_array_equal(rec.voltage_V, [3.668, 3.669, 3.709, 3.713, 3.650])
    np.testing.assert_array_equal(rec.current_mA, [0.0, 0.0, 500.0, 500.0, -500.0])
    assert rec.columns == {"time": "Test Time (sec)", "datetime": "DPT Time", "voltage": "Cell V",
                           "current": "Current"}           # the columns read, as the header spells them


def test_maccor_mode_column_across_continuation_sheets(tmp_path):
    openpyxl = pytest.importorskip("openpyxl")
    wb = openpyxl.Workbook()
    ws = wb.active
    ws.title = "Sheet1"
    ws.append(["Date of Test:", "11/25/2023 11:59:55"])          # read alike before and after the date fixes
    ws.append(["Rec", "Cycle C", "Test Time (sec)", "Current", "Voltage", "MD"])
    ws.append([1, 1, 0.0, 0.5, 3.70, "C"])
    ws.append([2, 1, 1.0, 0.5, 3.60, "D"])
    ws2 = wb.create_sheet("Sheet2")             # a continuation sheet without its header
    ws2.append([3, 1, 2.0, 0.5, 3.55, "D"])
    ws2.append([4, 1, 3.0, 0.0, 3.58, "R"])
    f = tmp_path / "maccor.xlsx"
    wb.save(f)
    rec = read_cycler(f, format="maccor", timezone="UTC")
    np.testing.assert_array_equal(rec.current_mA, [500.0, -500.0, -500.0, 0.0])
    np.testing.assert_array_equal(rec.voltage_V, [3.70, 3.60, 3.55, 3.58])
    assert rec.start == datetime(2023, 11, 25, 11, 59, 55, tzinfo=UTC)


def test_neware_binaries_under_any_name(tmp_path):
    navani = PYPROBE.parent / "navani"
    for src, names in (("test.nda", ("UPPER.NDA", "renamed.bin")), ("test.ndax", ("UPPER.NDAX", "renamed.zip"))):
        a = read_cycler(navani / src, timezone="UTC")
        for name in names:
            wrong = tmp_path / name
            shutil.copy(navani / src, wrong)
            b = read_cycler(wrong, timezone="UTC")
            assert b.format == "neware" and len(b) == len(a) > 0
            np.testing.assert_array_equal(a.time, b.time)
            np.testing.assert_array_equal(a.voltage_V, b.voltage_V)
            np.testing.assert_array_equal(a.current_mA, b.current_mA)


def test_the_format_list_is_the_config_one():
    import typing

    from xrdpipe.config.electrochemistry import ElectrochemistrySpec
    from xrdpipe.cyclers import FORMATS

    assert typing.get_args(ElectrochemistrySpec.model_fields["format"].annotation) == FORMATS
