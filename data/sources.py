"""Where records come from: local files and folders, fsspec URLs (gs://...), Hugging Face datasets and the
bundled samples. Each record comes with a locator ("line 12", "index 3", "row 7") for error messages.

Name resolution, in order: `bundled:<path>` (inside data/bundled/, independent of the working directory);
`<scheme>://...` (fsspec; gs:// needs gcsfs); an existing local path; something that looks like a path
(has a data-file suffix or starts with / . ~) -> "not found"; anything else -> a Hugging Face dataset
name, optionally `name@split` (default split: `data.hf_split`).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DataError, MissingDependencyError

BUNDLED_PREFIX = "bundled:"
BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
RECORD_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")
TEXT_SUFFIXES = (".txt",)  # pretraining only: one document per file


@dataclass(frozen=True)
class RawRecord:
    file: str            # file (or dataset) the record came from, as shown in messages
    locator: str         # "line 12" / "index 3" / "row 7"
    value: Any           # the parsed record, or a DataError when the record itself could not be parsed


@dataclass(frozen=True)
class Source:
    name: str            # as configured
    kind: str            # local | url | hf
    path: str            # resolved path / URL / dataset name
    split: str | None = None


def bundled_path(rel: str) -> Path:
    return BUNDLED_DIR / rel


def resolve(name: str, hf_split: str = "train") -> Source:
    if name.startswith(BUNDLED_PREFIX):
        path = bundled_path(name[len(BUNDLED_PREFIX):])
        if not path.exists():
            available = sorted(str(p.relative_to(BUNDLED_DIR)) for p in BUNDLED_DIR.rglob("*") if p.is_file()
                               and p.suffix in RECORD_SUFFIXES)
            raise DataError(f"no such bundled file; available: {', '.join(BUNDLED_PREFIX + a for a in available)}",
                            source=name)
        return Source(name, "local", str(path))
    if "://" in name:
        return Source(name, "url", name)
    expanded = os.path.expanduser(name)
    if os.path.exists(expanded):
        return Source(name, "local", os.path.abspath(expanded))
    looks_like_path = (name.startswith(("/", ".", "~")) or os.sep in name and os.path.splitext(name)[1] != ""
                       or name.endswith(RECORD_SUFFIXES + TEXT_SUFFIXES))
    if looks_like_path:
        raise DataError(f"file or folder not found (working directory {os.getcwd()})", source=name)
    dataset, _, split = name.partition("@")
    return Source(name, "hf", dataset, split or hf_split)


def heldout_counterpart(name: str) -> str | None:
    """The bundled held-out file next to a bundled training file (train.* -> heldout.*), if any."""
    if not name.startswith(BUNDLED_PREFIX):
        return None
    rel = Path(name[len(BUNDLED_PREFIX):])
    if not rel.stem.startswith("train"):
        return None
    other = rel.with_name("heldout" + rel.stem[len("train"):] + rel.suffix)
    return BUNDLED_PREFIX + other.as_posix() if bundled_path(other.as_posix()).exists() else None


# ----------------------------------------------------------------------------------------------- files

def _parse_json_text(text: str, display: str) -> Iterator[RawRecord]:
    """A .json file: a list of records, a single record, or (common in practice) JSON lines."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        first = next((line for line in text.splitlines() if line.strip()), "")
        if text.lstrip().startswith("{") and _is_json(first):
            yield from _parse_jsonl_text(text, display)
            return
        raise DataError(f"malformed JSON: {e.msg}", source=display,
                        record=f"line {e.lineno} column {e.colno}") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise DataError(f"expected a list of records, got {type(data).__name__}", source=display)
    for i, rec in enumerate(data):
        yield RawRecord(display, f"index {i}", rec)


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
        return True
    except json.JSONDecodeError:
        return False


def _parse_jsonl_text(text: str, display: str) -> Iterator[RawRecord]:
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            rec = DataError(f"malformed JSON: {e.msg} (column {e.colno})", source=display, record=f"line {lineno}")
        yield RawRecord(display, f"line {lineno}", rec)


def _parse_csv_text(text: str, display: str) -> Iterator[RawRecord]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    for row in reader:
        rec: Any = row
        if None in row:  # more cells than header names
            rec = DataError(f"{len(row[None])} more cell(s) than the header has columns", source=display,
                            record=f"line {reader.line_num}")
        yield RawRecord(display, f"line {reader.line_num}", rec)


def _parse_parquet_bytes(data: bytes, display: str) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(data))
    except Exception as e:  # pyarrow raises several types for broken files
        raise DataError(f"unreadable parquet file: {e}", source=display) from None
    for i, rec in enumerate(table.to_pylist()):
        yield RawRecord(display, f"row {i}", rec)


def parse_bytes(data: bytes, display: str, suffix: str, text_field: str | None) -> Iterator[RawRecord]:
    """Records of one file's contents; `suffix` picks the reader."""
    if suffix == ".parquet":
        yield from _parse_parquet_bytes(data, display)
        return
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"not UTF-8 text: line {line}, byte {column} of the line "
                        f"({data[e.start:e.start + 4]!r}, byte {e.start} of the file)", source=display) from None
    if suffix == ".json":
        yield from _parse_json_text(text, display)
    elif suffix == ".jsonl":
        yield from _parse_jsonl_text(text, display)
    elif suffix == ".csv":
        yield from _parse_csv_text(text, display)
    elif suffix in TEXT_SUFFIXES and text_field:
        yield RawRecord(display, "file", {text_field: text})
    else:
        raise DataError(f"unsupported file type {suffix!r}; supported: {', '.join(_suffixes(text_field))}",
                        source=display)


def _suffixes(text_field: str | None) -> tuple[str, ...]:
    return RECORD_SUFFIXES + (TEXT_SUFFIXES if text_field else ())


def _local_files(path: str, text_field: str | None) -> list[str]:
    if os.path.isfile(path):
        return [path]
    files = sorted(str(p) for p in Path(path).rglob("*")
                   if p.is_file() and p.suffix.lower() in _suffixes(text_field)
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise DataError(f"folder holds no {', '.join(_suffixes(text_field))} files", source=path)
    return files


def _url_fs(url: str):
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        scheme = url.split("://", 1)[0]
        extra = " (pip install 'pallas-dlm[gcs]' or pip install gcsfs)" if scheme in ("gs", "gcs") else ""
        raise MissingDependencyError(f"reading {scheme}:// paths needs a filesystem package that is not "
                                     f"installed{extra}: {e}", source=url) from None


def _read_url(url: str, text_field: str | None) -> Iterator[RawRecord]:
    fs, root = _url_fs(url)
    scheme = url.split("://", 1)[0]
    if not fs.exists(root):
        raise DataError("file or folder not found", source=url)
    if fs.isdir(root):
        files = sorted(f for f in fs.find(root) if os.path.splitext(f)[1].lower() in _suffixes(text_field))
        if not files:
            raise DataError(f"folder holds no {', '.join(_suffixes(text_field))} files", source=url)
    else:
        files = [root]
    for f in files:
        display = f if "://" in f else f"{scheme}://{f}"
        with fs.open(f, "rb") as fh:
            data = fh.read()
        yield from parse_bytes(data, display, os.path.splitext(f)[1].lower(), text_field)


def _read_hf(source: Source) -> Iterator[RawRecord]:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        raise ImportError("loading Hugging Face datasets needs the `datasets` package") from None
    try:
        ds = datasets.load_dataset(source.path, split=source.split)
    except Exception as e:
        raise DataError(f"not a local file or folder (working directory {os.getcwd()}), and loading it as a "
                        f"Hugging Face dataset (split {source.split!r}) failed: {type(e).__name__}: {e}",
                        source=source.name) from None
    display = f"{source.path}@{source.split}"
    for i, rec in enumerate(ds):
        yield RawRecord(display, f"row {i}", rec)


def read_records(source: Source, text_field: str | None = None) -> list[RawRecord]:
    """Every record of a source, in file order. Whole-file problems raise DataError; per-record parse
    problems come back as RawRecord.value = DataError so that `on_error=skip` can skip just them."""
    if source.kind == "hf":
        return list(_read_hf(source))
    if source.kind == "url":
        return list(_read_url(source.path, text_field))
    out: list[RawRecord] = []
    for f in _local_files(source.path, text_field):
        suffix = os.path.splitext(f)[1].lower()
        with open(f, "rb") as fh:
            out.extend(parse_bytes(fh.read(), f, suffix, text_field))
    return out
