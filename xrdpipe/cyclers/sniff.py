"""What a cycler file is, from its content (the first kilobytes), not its name.

:func:`container` tells the kind of file (a vendor binary, a spreadsheet, text);
:func:`sniff_text` tells the vendor of a text export from its header lines. Both only read the
start of the file, so a 1 GB export is told as fast as a small one.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

from ..errors import CyclerReadError

#: bytes read to tell a file
HEAD_BYTES = 16384

# the vendor text exports, told by a line of their header (compared on the first HEAD_BYTES)
_TEXT_SIGNS: tuple[tuple[str, re.Pattern], ...] = (
    ("biologic", re.compile(r"^\s*(EC-Lab|BT-Lab|EC-Lab Express)\s+ASCII\s+FILE", re.I | re.M)),
    ("biologic", re.compile(r"^\s*Nb header lines\s*:", re.I | re.M)),
    # an EC-Lab table without its header block: tab-separated, EC-Lab's column names
    ("biologic", re.compile(r"^(?=[^\n]*(?:^|\t)time/s\t)(?=[^\n]*(?:^|\t)(?:<?Ewe>?|Ecell)/V(?:\t|$))[^\n]*$", re.M)),
    ("basytec", re.compile(r"^~\s*Resultfile from Basytec", re.I | re.M)),
    ("basytec", re.compile(r"^~\s*Time\[[a-z]+\]\s*\t", re.I | re.M)),
    ("novonix", re.compile(r"^\[Summary\]\s*$(?s:.*)^Novonix", re.I | re.M)),
    ("novonix", re.compile(r"^Date and Time,Cycle Number,Step Type,Run Time \(", re.M)),
    ("maccor", re.compile(r"^Date of Test\s*:", re.I | re.M)),
    ("maccor", re.compile(r"^Rec[\t,]\s*Cycle\s*(?:C|P)?[\t,]", re.M)),
    ("arbin", re.compile(r"^\ufeff?Data[ _]Point[\t,]\s*Date[ _]Time[\t,]\s*Test[ _]Time", re.M)),
)


def head(path: Path, n: int = HEAD_BYTES) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(n)
    except OSError as exc:
        raise CyclerReadError(path, f"cannot read the file: {exc}") from None


def container(path: Path) -> str:
    """``"mpr"`` (BioLogic binary), ``"nda"``, ``"ndax"`` (Neware binaries), ``"res"`` (Arbin
    Access database), ``"excel"`` (xlsx/xls/ods), ``"text"`` or ``"binary"`` (none of these)."""
    b = head(path)
    if b.startswith(b"BIO-LOGIC MODULAR FILE"):
        return "mpr"
    if b.startswith(b"NEWARE"):
        return "nda"
    if b[4:19] in (b"Standard Jet DB", b"Standard ACE DB"):
        return "res"
    if b.startswith(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"):          # OLE2: legacy .xls
        return "excel"
    if b.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise CyclerReadError(path, f"a damaged zip archive (expected an .xlsx or .ndax): {exc}") from None
        if any(n.endswith(".ndc") for n in names):
            return "ndax"
        if any(n.startswith("xl/") for n in names) or "content.xml" in names:
            return "excel"
        return "binary"
    if b"\x00" in b:
        # UTF-16 text has NULs too: a byte order mark says so
        return "text" if b[:2] in (b"\xff\xfe", b"\xfe\xff") else "binary"
    return "text"


def decode(data: bytes, *, partial: bool) -> str:
    """Text from the bytes of an export: UTF-16 with a byte order mark, UTF-8, else Latin-1.
    ``partial``: the bytes are the head of the file (a UTF-8 character may be cut at its end)."""
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return data.decode("utf-16", errors="replace")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        if partial and exc.start >= len(data) - 3 and exc.reason == "unexpected end of data":
            return data[:exc.start].decode("utf-8-sig")
        return data.decode("latin-1")


def sniff_text(path: Path) -> str | None:
    """The vendor of a text export from its header lines, or None (a generic table)."""
    text = decode(head(path), partial=True).replace("\r\n", "\n").replace("\r", "\n")
    for fmt, sign in _TEXT_SIGNS:
        if sign.search(text):
            return fmt
    return None
