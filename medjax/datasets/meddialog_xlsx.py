"""Reader of the released MedDialogRubrics spreadsheet (.xlsx, Chinese column names).

The release is one sheet, a header row then one case per row, with the columns

    主诉  chief complaint      病历  medical record     诊断  diagnosis
    科室  department           问诊要点  must-ask points (one cell, several items)

(other columns are ignored, order does not matter). `load_xlsx` returns one dict per
non-empty row:

    from medjax.datasets import meddialog_xlsx
    rows = meddialog_xlsx.load_xlsx("MedDialogRubrics.xlsx")
    rows[0]["must_ask"]     # ["询问发热持续时间", "询问有无咳嗽", ...]

The must-ask cell is split into items on line breaks, Chinese or ASCII semicolons and
numbered-item markers ("1." "2、" "(3)" "（4）" "⑤"), markers removed. A marker counts only at
the start of the cell or after white space or 。，, so a number such as "38.5℃" stays whole.
Needs openpyxl (`pip install openpyxl`).
"""

# ruff: noqa: RUF001, RUF002 (full-width Chinese punctuation is what the file holds)

import os
import re
from typing import Any

# Sheet column -> key of the returned dicts.
COLUMNS = {
    "主诉": "chief_complaint",
    "病历": "record",
    "诊断": "diagnosis",
    "科室": "department",
    "问诊要点": "must_ask",
}
ENGLISH = {
    "主诉": "chief complaint",
    "病历": "medical record",
    "诊断": "diagnosis",
    "科室": "department",
    "问诊要点": "must-ask points",
}
_SEPARATORS = re.compile(r"[\r\n;；]+")
_MARKER = re.compile(
    r"(?:^|(?<=[\s。，,]))(?:\d{1,2}[.．、)）](?!\d)|[(（]\d{1,2}[)）]|[\u2460-\u2473])\s*"
)
_STRIP = " \t\u3000,，、"


def split_items(cell: str) -> list[str]:
    """The must-ask items of one cell (see the module docstring), in order, none empty."""
    items = []
    for piece in _SEPARATORS.split(cell):
        for item in _MARKER.split(piece):
            item = item.strip(_STRIP)
            if item:
                items.append(item)
    return items


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def load_xlsx(path: str | os.PathLike, *, sheet: str | None = None) -> list[dict[str, Any]]:
    """The cases of a MedDialogRubrics spreadsheet.

    Args:
      path: the .xlsx file.
      sheet: the sheet name; None is the workbook's active (first) sheet.

    Returns:
      One dict per row with any non-empty cell, in sheet order: chief_complaint, record,
      diagnosis, department (str, stripped), must_ask (list of str, see `split_items`),
      row (the 1-based sheet row).

    Raises:
      FileNotFoundError: no file at `path`.
      ValueError: not a readable .xlsx, no such sheet, required columns missing (named,
        with the header found) or repeated, or a case row with an empty diagnosis or no
        must-ask item (named by row and column).
      ImportError: openpyxl is not installed.
    """
    try:
        import openpyxl
        from openpyxl.utils import get_column_letter
    except ImportError as e:  # An optional dependency: only this reader needs it.
        raise ImportError(
            "meddialog_xlsx needs openpyxl: pip install openpyxl (or medjax[meddialog])."
        ) from e
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"meddialog_xlsx: no file {path!r}.")
    try:
        workbook = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as e:  # zipfile.BadZipFile, openpyxl's InvalidFileException, KeyError.
        raise ValueError(f"meddialog_xlsx: {path!r} is not a readable .xlsx file: {e}") from e
    try:
        if sheet is not None and sheet not in workbook.sheetnames:
            raise ValueError(
                f"meddialog_xlsx: {path!r} has no sheet {sheet!r}; sheets: {workbook.sheetnames}."
            )
        ws = workbook[sheet] if sheet is not None else workbook.active
        rows = ws.iter_rows(values_only=True)
        header = [_cell(v) for v in next(rows, ())]
        missing = [c for c in COLUMNS if c not in header]
        if missing:
            named = ", ".join(f"{c} ({ENGLISH[c]})" for c in missing)
            raise ValueError(
                f"meddialog_xlsx: {path!r} (sheet {ws.title!r}) lacks column(s) {named};"
                f" header row: {[h for h in header if h]}."
            )
        where = f"meddialog_xlsx: {path!r} (sheet {ws.title!r})"
        for column in COLUMNS:
            found = [get_column_letter(i + 1) for i, h in enumerate(header) if h == column]
            if len(found) > 1:  # Which one holds the data is anyone's guess.
                raise ValueError(
                    f"{where} row 1: column {column} ({ENGLISH[column]}) appears"
                    f" {len(found)} times (columns {', '.join(found)}); keep one."
                )
        index = {column: header.index(column) for column in COLUMNS}
        out = []
        for number, values in enumerate(rows, start=2):
            cells = [_cell(v) for v in values]
            if not any(cells):
                continue
            get = {c: cells[i] if i < len(cells) else "" for c, i in index.items()}
            record: dict[str, Any] = {COLUMNS[c]: get[c] for c in COLUMNS if c != "问诊要点"}
            record["must_ask"] = split_items(get["问诊要点"])
            record["row"] = number
            # The diagnosis is the answer and the must-ask points the rubric: a case without
            # either would be scored against nothing.
            for column, empty in (
                ("诊断", not record["diagnosis"]),
                ("问诊要点", not record["must_ask"]),
            ):
                if empty:
                    raise ValueError(
                        f"{where} row {number}, column {get_column_letter(index[column] + 1)}"
                        f" ({column}, {ENGLISH[column]}): no {ENGLISH[column]} in"
                        f" {get[column][:60]!r}; every case needs one."
                    )
            out.append(record)
        return out
    finally:
        workbook.close()
