"""Shaping tokenised examples into fixed `[B, block_size]` rows.

A row is a list of pieces `(example, start, end)`: a slice of one tokenised example. In SFT a piece is
always a whole (possibly truncated-at-load) example, so no example is ever split across rows; in
pretraining long documents are cut into pieces. Each piece gets its own segment id (1..k in the row)
and positions restarting at 0; padding is segment 0, src_mask True, input id = pad id.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Sequence

import numpy as np

Piece = tuple[int, int, int]
Row = list[Piece]

# Best-fit keeps at most this many rows open; the fullest one closes when the limit is passed.
MAX_OPEN_ROWS = 1024


def fit_example(ids: list[int], src: list[bool], block_size: int, overlength: str
                ) -> tuple[list[int], list[bool], str]:
    """Apply `data.sft.overlength` to one SFT example: returns (ids, src, status) with status
    'ok', 'truncated' (response cut from the end) or 'dropped' (over-length with `drop`, or nothing
    trainable left in the first block_size tokens because the prompt alone fills them)."""
    if len(ids) <= block_size:
        return ids, src, "ok"
    if overlength == "drop":
        return ids, src, "dropped"
    ids, src = ids[:block_size], src[:block_size]
    if all(src):
        return ids, src, "dropped"
    return ids, src, "truncated"


def pack_examples(examples: Sequence[int], lengths: np.ndarray, block_size: int, padding: str) -> list[Row]:
    """SFT rows from examples in the given order. `pad`: one example per row. `pack`: best-fit — each
    example goes into the open row it fills most tightly, else a new row; rows come out in the order
    they were opened, which keeps the stream close to the shuffled order."""
    if padding == "pad":
        return [[(int(e), 0, int(lengths[e]))] for e in examples]
    rows: list[Row] = []
    open_rows: list[tuple[int, int]] = []  # sorted (space left, row index)
    lens = lengths[np.asarray(examples, dtype=np.int64)] if len(examples) else np.zeros(0, np.int64)
    smallest = int(lens.min()) if len(lens) else 1
    for e, n in zip(examples, lens.tolist()):
        k = bisect_left(open_rows, (n, -1))
        if k < len(open_rows):
            space, r = open_rows.pop(k)
            rows[r].append((int(e), 0, n))
        else:
            r = len(rows)
            rows.append([(int(e), 0, n)])
            space = block_size
        space -= n
        if space >= smallest:  # rows that no example can still fit are closed at once
            insort(open_rows, (space, r))
            if len(open_rows) > MAX_OPEN_ROWS:
                open_rows.pop(0)
    return rows


def cut_documents(docs: Sequence[int], lengths: np.ndarray, block_size: int, padding: str) -> list[Row]:
    """Pretraining rows. `pack`: documents (EOS already appended) laid end to end and cut every
    block_size tokens; a document crossing a row boundary continues as a new segment in the next row.
    `pad`: every document starts a new row (long ones still span several)."""
    rows: list[Row] = []
    row: Row = []
    used = 0
    for d in docs:
        n = int(lengths[d])
        start = 0
        if padding == "pad" and row:
            rows.append(row)
            row, used = [], 0
        while start < n:
            take = min(n - start, block_size - used)
            row.append((int(d), start, start + take))
            start += take
            used += take
            if used == block_size:
                rows.append(row)
                row, used = [], 0
    if row:
        rows.append(row)
    return rows


def assemble(rows: Sequence[Row], n_rows: int, tokens: np.ndarray, src: np.ndarray, offsets: np.ndarray,
             block_size: int, pad_id: int) -> dict[str, np.ndarray]:
    """The batch dict of the contract for `rows`, padded with all-padding rows up to n_rows."""
    input_ids = np.full((n_rows, block_size), pad_id, dtype=np.int32)
    src_mask = np.ones((n_rows, block_size), dtype=bool)
    segment_ids = np.zeros((n_rows, block_size), dtype=np.int32)
    position_ids = np.zeros((n_rows, block_size), dtype=np.int32)
    arange = np.arange(block_size, dtype=np.int32)
    for b, row in enumerate(rows):
        p = 0
        for k, (e, s, t) in enumerate(row, start=1):
            n = t - s
            o = int(offsets[e])
            input_ids[b, p:p + n] = tokens[o + s:o + t]
            src_mask[b, p:p + n] = src[o + s:o + t]
            segment_ids[b, p:p + n] = k
            position_ids[b, p:p + n] = arange[:n]
            p += n
        if p > block_size:  # pragma: no cover - guarded by the packers
            raise AssertionError(f"row of {p} tokens exceeds block_size {block_size}")
    return {"input_ids": input_ids, "src_mask": src_mask, "segment_ids": segment_ids,
            "position_ids": position_ids}
