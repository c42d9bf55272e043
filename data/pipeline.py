"""From configured sources to an infinite, resumable stream of fixed-shape batches.

Everything is tokenised once, up front, into flat arrays (the datasets a trainer like this fine-tunes
on fit in memory; ~100k examples tokenise in seconds). The order of examples is a pure function of
(seed, epoch), so the stream position is two integers and a resumed run sees exactly the batches an
unbroken one would have seen.

Mixing: with several sources, an "epoch" is as many examples as all sources hold together, drawn from
source i in proportion to data.weights[i] (largest-remainder counts, so proportions are exact per epoch);
each source cycles through its own reshuffled passes, independent of the others.

Data parallelism: every rank builds the same global row sequence; a global step takes
batch_size * world_size consecutive rows and rank r takes rows [r * batch_size, (r + 1) * batch_size).
The state counts global rows, so it stays valid if a run resumes on a different number of ranks.
"""

from __future__ import annotations

import hashlib
import logging
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import config as config_mod
from .errors import DataError
from .formats import to_messages, to_text
from .packing import Row, assemble, cut_documents, fit_example, pack_examples
from .sources import RawRecord, heldout_counterpart, read_records, resolve
from .templates import pad_final_response, render_example, render_prompt
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

STATE_VERSION = 1
HOLDOUT_MAX_FRACTION = 10  # hold out at most 1/10 of a source when no held-out set is given


# --------------------------------------------------------------------------------------------- splits

@dataclass
class _Part:
    """Records of one source that belong to a split."""
    name: str
    records: list[RawRecord]


def _holdout_indices(name: str, n_records: int, k: int) -> np.ndarray:
    # Seeded by the source name, not the run seed: the held-out set must not move between runs.
    rng = np.random.default_rng([0x5EED, zlib.crc32(name.encode("utf-8"))])
    return np.sort(rng.permutation(n_records)[:k])


def _holdout_counts(cfg: dict, sizes: list[int]) -> list[int]:
    weights = cfg["weights"] or [float(s) for s in sizes]
    shares = _largest_remainder(cfg["eval_examples"], weights)
    return [min(k, n // HOLDOUT_MAX_FRACTION) for k, n in zip(shares, sizes)]


def _eval_plan(cfg: dict) -> tuple[str, list[str]]:
    """How the held-out split is made: ('given', names) | ('bundled', names) | ('holdout', []) | ('none', [])."""
    if cfg["eval_dataset_name"]:
        return "given", list(cfg["eval_dataset_name"])
    counterparts = [heldout_counterpart(n) for n in cfg["dataset_name"]]
    if all(counterparts):
        return "bundled", counterparts  # type: ignore[return-value]
    if cfg["eval_examples"] > 0:
        return "holdout", []
    return "none", []


def _read_split(cfg: dict, training_mode: str, split: str) -> list[_Part]:
    text_field = cfg["text_field"] if training_mode == "pretrain" else None
    plan, eval_names = _eval_plan(cfg)

    def read(name: str) -> list[RawRecord]:
        return read_records(resolve(name, cfg["hf_split"]), text_field)

    if split == "eval" and plan in ("given", "bundled"):
        return [_Part(n, read(n)) for n in eval_names]
    if split == "eval" and plan == "none":
        return []
    parts = [_Part(n, read(n)) for n in cfg["dataset_name"]]
    if plan != "holdout":
        return parts
    counts = _holdout_counts(cfg, [len(p.records) for p in parts])
    out = []
    for p, k in zip(parts, counts):
        held = set(_holdout_indices(p.name, len(p.records), k).tolist())
        keep = (lambda i: i in held) if split == "eval" else (lambda i: i not in held)
        out.append(_Part(p.name, [r for i, r in enumerate(p.records) if keep(i)]))
    return out


# ------------------------------------------------------------------------------------------ tokenising

@dataclass
class _Examples:
    """Tokenised examples of a split in flat arrays: example e is tokens[offsets[e]:offsets[e + 1]]."""
    tokens: np.ndarray
    src: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray
    source: np.ndarray                  # source index per example
    source_names: list[str]
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.lengths)

    def of_source(self, i: int) -> np.ndarray:
        return np.flatnonzero(self.source == i)


def _tokenise(parts: list[_Part], cfg: dict, tok: Tokenizer, training_mode: str) -> _Examples:
    sft = cfg["sft"]
    L = cfg["block_size"]
    ids_all: list[int] = []
    src_all: list[bool] = []
    lengths: list[int] = []
    source: list[int] = []
    stats: dict[str, Any] = {"records": 0, "truncated": 0, "dropped": 0, "empty": 0, "skipped": 0,
                             "skipped_records": [], "per_source": {}, "response_pad_tokens": 0}
    for si, part in enumerate(parts):
        kept = 0
        for rec in part.records:
            stats["records"] += 1
            try:
                if isinstance(rec.value, DataError):
                    raise rec.value
                if training_mode == "pretrain":
                    text = to_text(rec.value, cfg["text_field"])
                    if not text.strip():  # empty documents are common in corpora: counted, not an error
                        stats["empty"] += 1
                        continue
                    ids = tok.encode(text)
                    ids.append(tok.eos_id)
                    src = [False] * len(ids)
                else:
                    r = render_example(to_messages(rec.value, sft["format"], sft), tok, sft)
                    padded = pad_final_response(r, sft["pad_response_to"], tok.eos_id, L)
                    if padded is not r:
                        stats["response_pad_tokens"] += padded.assistant_spans[-1][1] - r.assistant_spans[-1][1]
                    r = padded
                    if r.n_maskable == 0:  # formats guarantee an assistant turn; this guards the invariant
                        raise DataError("no trainable token (no assistant turn left to train on)")
                    ids, src, status = fit_example(r.ids, r.src, L, sft["overlength"])
                    if status == "dropped":
                        stats["dropped"] += 1
                        continue
                    if status == "truncated":
                        stats["truncated"] += 1
            except DataError as e:
                e = e.located(rec.file, rec.locator)
                if cfg["on_error"] == "raise":
                    raise e from None
                stats["skipped"] += 1
                stats["skipped_records"].append(str(e))
                log.warning("skipped record: %s", e)
                continue
            ids_all.extend(ids)
            src_all.extend(src)
            lengths.append(len(ids))
            source.append(si)
            kept += 1
        stats["per_source"][part.name] = kept
    lengths_np = np.asarray(lengths, dtype=np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths_np, out=offsets[1:])
    ex = _Examples(tokens=np.asarray(ids_all, dtype=np.int32), src=np.asarray(src_all, dtype=bool),
                   offsets=offsets, lengths=lengths_np, source=np.asarray(source, dtype=np.int32),
                   source_names=[p.name for p in parts], stats=stats)
    stats["examples"] = ex.n
    stats["tokens"] = int(len(ex.tokens))
    stats["maskable_tokens"] = int(len(ex.src) - int(ex.src.sum()))
    return ex


def _require_trainable(ex: _Examples, what: str, cfg: dict) -> None:
    if ex.stats["maskable_tokens"] > 0:
        return
    s = ex.stats
    why = (f"{s['records']} records read, {s['skipped']} skipped as bad, {s['dropped']} dropped as longer than "
           f"data.block_size={cfg['block_size']} (data.sft.overlength={cfg['sft']['overlength']})")
    raise DataError(f"the {what} data has no trainable token: {why}", source=", ".join(ex.source_names) or None)


def _largest_remainder(total: int, weights: Sequence[float]) -> list[int]:
    w = np.asarray(weights, dtype=np.float64)
    exact = total * w / w.sum()
    counts = np.floor(exact).astype(np.int64)
    short = total - int(counts.sum())
    # ties broken by source order, so the counts are deterministic
    order = sorted(range(len(w)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[:short]:
        counts[i] += 1
    return counts.tolist()


# ------------------------------------------------------------------------------------------ ordering

class _Order:
    """The example order of every epoch, a pure function of (seed, epoch)."""

    def __init__(self, ex: _Examples, weights: list[float] | None, seed: int, shuffle: bool):
        self.seed = int(seed)
        self.shuffle = shuffle
        self.members = [ex.of_source(i) for i in range(len(ex.source_names))]
        sizes = [len(m) for m in self.members]
        self.epoch_size = sum(sizes)
        if weights is None:
            self.counts = sizes
        else:
            for name, n, w in zip(ex.source_names, sizes, weights):
                if w > 0 and n == 0:
                    raise DataError("has weight > 0 in data.weights but no usable example", source=name)
            self.counts = _largest_remainder(self.epoch_size, weights)
        self._perms: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def _perm(self, i: int, epoch: int) -> np.ndarray:
        key = (i, epoch)
        if key not in self._perms:
            n = len(self.members[i])
            perm = (np.random.default_rng([self.seed, 1, i, epoch]).permutation(n) if self.shuffle
                    else np.arange(n))
            self._perms[key] = self.members[i][perm]
            while len(self._perms) > 2 * len(self.members) + 2:
                self._perms.popitem(last=False)
        return self._perms[key]

    def _source_slice(self, i: int, a: int, b: int) -> np.ndarray:
        # items [a, b) of source i's endless sequence of reshuffled passes
        n = len(self.members[i])
        out = []
        while a < b:
            e, off = divmod(a, n)
            take = min(b - a, n - off)
            out.append(self._perm(i, e)[off:off + take])
            a += take
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def epoch(self, c: int) -> np.ndarray:
        pieces = [self._source_slice(i, c * k, (c + 1) * k) for i, k in enumerate(self.counts) if k > 0]
        if len(pieces) == 1:
            return pieces[0]
        order = np.concatenate(pieces)
        if self.shuffle:
            return order[np.random.default_rng([self.seed, 2, c]).permutation(len(order))]
        # no shuffle: spread each source evenly through the epoch (item j of a source with k items at j/k)
        keys = np.concatenate([(np.arange(k) + 0.5) / k for k in self.counts if k > 0])
        return order[np.argsort(keys, kind="stable")]


def _rows_for(order: np.ndarray, ex: _Examples, cfg: dict, training_mode: str) -> list[Row]:
    if training_mode == "pretrain":
        return cut_documents(order, ex.lengths, cfg["block_size"], cfg["padding"])
    return pack_examples(order, ex.lengths, cfg["block_size"], cfg["padding"])


# ------------------------------------------------------------------------------------------- stream

class BatchStream:
    """Infinite iterator of batch dicts (`input_ids`, `src_mask`, `segment_ids`, `position_ids`; numpy,
    `[batch_size, block_size]`) for one data-parallel rank. Resumable with state_dict/load_state_dict."""

    def __init__(self, ex: _Examples, cfg: dict, tokenizer: Tokenizer, *, training_mode: str, batch_size: int,
                 seed: int, rank: int, world_size: int):
        self.cfg = cfg
        self.training_mode = training_mode
        self.batch_size = batch_size
        self.block_size = cfg["block_size"]
        self.rank = rank
        self.world_size = world_size
        self.seed = int(seed)
        self.pad_id = tokenizer.pad_id
        self._ex = ex
        self._order = _Order(ex, cfg["weights"], seed, cfg["shuffle"])
        self._rows: OrderedDict[int, list[Row]] = OrderedDict()
        self._epoch = 0
        self._row = 0
        self.fingerprint = self._fingerprint()
        self.summary = self._make_summary()

    # -- iteration
    def _epoch_rows(self, c: int) -> list[Row]:
        if c not in self._rows:
            self._rows[c] = _rows_for(self._order.epoch(c), self._ex, self.cfg, self.training_mode)
            while len(self._rows) > 2:
                self._rows.popitem(last=False)
        return self._rows[c]

    def _take(self, epoch: int, row: int, n: int) -> tuple[list[Row], int, int]:
        """n global rows starting at (epoch, row); returns them and the position after them."""
        out: list[Row] = []
        while n > 0:
            rows = self._epoch_rows(epoch)
            if row >= len(rows):
                epoch, row = epoch + 1, row - len(rows)
                continue
            got = rows[row:row + n]
            out.extend(got)
            row += len(got)
            n -= len(got)
        return out, epoch, row

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        B = self.batch_size
        epoch, row = self._epoch, self._row
        _, epoch, row = self._take(epoch, row, self.rank * B)  # skip the shares of lower ranks
        mine, _, _ = self._take(epoch, row, B)
        _, self._epoch, self._row = self._take(self._epoch, self._row, B * self.world_size)
        ex = self._ex
        return assemble(mine, B, ex.tokens, ex.src, ex.offsets, self.block_size, self.pad_id)

    # -- resume
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable stream position (global rows, valid for any number of ranks)."""
        return {"version": STATE_VERSION, "epoch": self._epoch, "row": self._row, "seed": self.seed,
                "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"data stream state: expected version {STATE_VERSION}, got {state!r}")
        if state.get("fingerprint") != self.fingerprint or state.get("seed") != self.seed:
            log.warning("data stream state was saved for different data, seed or block size; "
                        "resuming at its position anyway (the batches will differ from the original run)")
        self._epoch, self._row = int(state["epoch"]), int(state["row"])

    def _fingerprint(self) -> str:
        h = hashlib.sha1()
        h.update(np.asarray([self.block_size, len(self._ex.lengths)], dtype=np.int64).tobytes())
        h.update(self._ex.lengths.tobytes())
        h.update(self._ex.tokens[: 1 << 20].tobytes())
        h.update(repr((self.cfg["padding"], self.cfg["weights"], self.cfg["shuffle"],
                       self.training_mode)).encode())
        return h.hexdigest()[:16]

    # -- reporting
    @property
    def rows_per_epoch(self) -> int:
        return len(self._epoch_rows(0))

    def _make_summary(self) -> dict[str, Any]:
        s = dict(self._ex.stats)
        rows = self._epoch_rows(0)
        filled = sum(t - a for row in rows for _, a, t in row)
        slots = len(rows) * self.block_size
        s.update({
            "training_mode": self.training_mode,
            "sources": list(self._ex.source_names),
            "weights": self.cfg["weights"],
            "examples_per_epoch": self._order.epoch_size,
            "epoch_counts": dict(zip(self._ex.source_names, self._order.counts)),
            "block_size": self.block_size,
            "padding": self.cfg["padding"],
            "rows_per_epoch": len(rows),
            "examples_per_row": (sum(len(r) for r in rows) / len(rows)) if rows else 0.0,
            "maskable_share": s["maskable_tokens"] / max(1, s["tokens"]),
            "padding_share": 1.0 - filled / max(1, slots),
            "batches_per_epoch": len(rows) / (self.batch_size * self.world_size),
            "eval_split": _eval_plan(self.cfg)[0],
        })
        return s

    def format_summary(self) -> str:
        s = self.summary
        what = "documents" if self.training_mode == "pretrain" else "examples"
        lines = [
            f"data ({s['training_mode']}): {s['examples']:,} {what} from {len(s['sources'])} source(s): "
            + ", ".join(f"{n} ({k:,})" for n, k in s["per_source"].items()),
            f"  tokens: {s['tokens']:,}; maskable {100 * s['maskable_share']:.1f}% of them",
            f"  rows: {s['rows_per_epoch']:,} x {s['block_size']} per epoch ({s['padding']}, "
            f"{s['examples_per_row']:.2f} {what}/row); padding {100 * s['padding_share']:.1f}% of row slots; "
            f"{s['batches_per_epoch']:.1f} global batches/epoch",
        ]
        if len(s["sources"]) > 1:
            lines.append("  mixing per epoch: " + ", ".join(f"{n} {k:,}" for n, k in s["epoch_counts"].items()))
        empty = f", {s['empty']:,} empty documents ignored" if s["empty"] else ""
        if s["response_pad_tokens"]:
            lines.append(f"  final responses padded with {s['response_pad_tokens']:,} maskable EOS tokens "
                         f"(data.sft.pad_response_to={self.cfg['sft']['pad_response_to']})")
        lines.append(f"  truncated {s['truncated']:,}, dropped {s['dropped']:,} (over block_size), "
                     f"skipped {s['skipped']:,} bad records{empty}")
        limit = 20
        for msg in s["skipped_records"][:limit]:
            lines.append(f"    skipped: {msg}")
        if len(s["skipped_records"]) > limit:
            lines.append(f"    ... and {len(s['skipped_records']) - limit} more (summary['skipped_records'])")
        plan = {"given": "data.eval_dataset_name", "bundled": "bundled held-out files",
                "holdout": f"{self.cfg['eval_examples']} records held out of the training sources",
                "none": "none"}[s["eval_split"]]
        lines.append(f"  held-out split: {plan}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------- public API

def _check_args(training_mode: str, batch_size: int, rank: int = 0, world_size: int = 1) -> None:
    config_mod.check_training_mode(training_mode)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    if not (isinstance(world_size, (int, np.integer)) and world_size >= 1 and 0 <= rank < world_size):
        raise ValueError(f"rank/world_size: expected 0 <= rank < world_size, got rank={rank}, "
                         f"world_size={world_size}")


def build_batch_stream(data_cfg: Any, tokenizer: Tokenizer, *, training_mode: str, batch_size: int, seed: int,
                       rank: int = 0, world_size: int = 1) -> BatchStream:
    """The training stream for one data-parallel rank; `batch_size` rows per batch on this rank."""
    cfg = config_mod.normalize(data_cfg)
    _check_args(training_mode, batch_size, rank, world_size)
    ex = _tokenise(_read_split(cfg, training_mode, "train"), cfg, tokenizer, training_mode)
    _require_trainable(ex, "training", cfg)
    return BatchStream(ex, cfg, tokenizer, training_mode=training_mode, batch_size=int(batch_size), seed=seed,
                       rank=int(rank), world_size=int(world_size))


def build_eval_batches(data_cfg: Any, tokenizer: Tokenizer, *, training_mode: str,
                       batch_size: int) -> list[dict[str, np.ndarray]]:
    """Every held-out example once, in file order, as `[batch_size, block_size]` batches (the last one
    filled with all-padding rows). Empty list when there is no held-out split."""
    cfg = config_mod.normalize(data_cfg)
    _check_args(training_mode, batch_size)
    parts = _read_split(cfg, training_mode, "eval")
    if not parts or not any(p.records for p in parts):
        return []
    ex = _tokenise(parts, cfg, tokenizer, training_mode)
    _require_trainable(ex, "held-out", cfg)
    rows = _rows_for(np.arange(ex.n), ex, cfg, training_mode)
    return [assemble(rows[i:i + batch_size], batch_size, ex.tokens, ex.src, ex.offsets, cfg["block_size"],
                     tokenizer.pad_id) for i in range(0, len(rows), batch_size)]


def load_eval_examples(data_cfg: Any, tokenizer: Tokenizer, *, max_examples: int | None = None,
                       training_mode: str = "sft") -> list[tuple[list[int], str]]:
    """Held-out SFT examples for exact-match evaluation: (prompt ids ending where the answer starts,
    reference answer = content of the last assistant turn), in file order. Prompts are not cut to
    block_size: the caller decides how long a prompt it can generate from. Empty for pretraining."""
    cfg = config_mod.normalize(data_cfg)
    if config_mod.check_training_mode(training_mode) == "pretrain":
        return []
    sft = cfg["sft"]
    out: list[tuple[list[int], str]] = []
    for part in _read_split(cfg, "sft", "eval"):
        for rec in part.records:
            if max_examples is not None and len(out) >= max_examples:
                return out
            try:
                if isinstance(rec.value, DataError):
                    raise rec.value
                messages = to_messages(rec.value, sft["format"], sft)
            except DataError as e:
                e = e.located(rec.file, rec.locator)
                if cfg["on_error"] == "raise":
                    raise e from None
                log.warning("skipped record: %s", e)
                continue
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            out.append((render_prompt(messages[:last], tokenizer, sft), messages[last]["content"]))
    return out
