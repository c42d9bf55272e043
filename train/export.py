"""`python -m train.export <checkpoint> <out_dir>`: a pallas-dlm checkpoint as a Hugging Face model directory.

The directory loads with `transformers.AutoModelForCausalLM.from_pretrained(out_dir)` (Qwen3ForCausalLM, no
missing or unexpected weights) and `AutoTokenizer.from_pretrained(out_dir)`:
  config.json               Qwen3 architecture + our diffusion settings: mask_token_id, shift_logits,
                            diffusion_loss_norm, diffusion_sampling_eps, diffusion_attention,
                            diffusion_objective, diffusion_block_size
                            (bidirectional unless trained with model.causal=true)
  model.safetensors         weights by HF name, bit for bit unless --dtype casts them (a tied head has no
                            lm_head.weight, as transformers saves it); sharded with an index past
                            --max-shard-size
  generation_config.json    bos/eos/pad ids (stop at <|im_end|> or <|endoftext|>)
  tokenizer.json, tokenizer_config.json
                            the run's tokenizer, `<|mask|>` included: for `qwen3` a byte-level BPE built
                            from the same ranks (one merge per token, derived from the ranks), Qwen's
                            pre-tokenizer regex, NFC, specials at their ids; for `byte` the 256 bytes plus
                            the specials; a Hugging Face tokenizer is saved as it is. tokenizer_config.json
                            carries a chat template that renders what training saw (Qwen3, thinking off)
                            when the run used the qwen3 template; a separator-format run gets none.

<checkpoint> is a step folder, a checkpoints folder (its `latest`) or a run's output_dir. The directory is
written to a temporary sibling and renamed into place; an existing export is replaced only with
--overwrite.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Rendered exactly as data/templates.py renders the qwen3 template (Qwen3's own format, thinking off):
# the final assistant turn after the last user turn, and the generation prompt, carry an empty think
# block; tool results are wrapped in a user turn. enable_thinking=true drops the block from the prompt.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}{%- if m['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if loop.last and loop.index0 > ns.last_user -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}"
    "{{- m['content'] + '<|im_end|>\\n' -}}"
    "{%- elif m['role'] == 'tool' -%}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}"
    "{{- '\\n<tool_response>\\n' + m['content'] + '\\n</tool_response>' -}}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- else -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is not defined or not enable_thinking -%}{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}{%- endif -%}"
)


class ExportError(RuntimeError):
    """The checkpoint cannot be exported; one line naming the file or setting."""


# ---- tokenizer -----------------------------------------------------------------------------------

def byte_to_unicode() -> dict[int, str]:
    """GPT-2 byte-level alphabet: printable bytes stand for themselves, the rest map to chr(256 + k),
    so every byte string is a printable, whitespace-free token string (what Qwen's vocab uses)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _last_merge(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The pair BPE merged last to make `token`: run BPE on its bytes with only the merges that rank
    below it (tiktoken's rule: merge the adjacent pair whose concatenation has the lowest rank); two
    pieces remain."""
    parts = [token[i:i + 1] for i in range(len(token))]
    pair_rank = [ranks.get(parts[i] + parts[i + 1]) for i in range(len(parts) - 1)]
    while len(parts) > 2:
        best, at = rank, -1
        for i, r in enumerate(pair_rank):
            if r is not None and r < best:
                best, at = r, i
        if at < 0:
            break
        parts[at:at + 2] = [parts[at] + parts[at + 1]]
        del pair_rank[at]
        if at > 0:
            pair_rank[at - 1] = ranks.get(parts[at - 1] + parts[at])
        if at < len(parts) - 1:
            pair_rank[at] = ranks.get(parts[at] + parts[at + 1])
    if len(parts) != 2:
        raise ExportError(f"BPE ranks: token {token!r} (rank {rank}) cannot be built from lower-ranked tokens")
    return parts[0], parts[1]


def _byte_level_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]], specials: dict[str, int],
                          *, pattern: str | None, nfc: bool):
    """A tokenizers.Tokenizer: [NFC] -> [regex split] -> bytes as printable chars -> BPE; specials by id."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    # ignore_merges: a pre-token that is itself in the vocabulary is one token, as tiktoken does.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False,
                               ignore_merges=True))
    if nfc:
        tok.normalizer = normalizers.NFC()
    steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)]
    if pattern:
        steps.insert(0, pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    base = tok.get_vocab_size(with_added_tokens=False)
    order = sorted(specials.items(), key=lambda kv: kv[1])
    if [i for _, i in order] != list(range(base, base + len(order))):
        raise ExportError(f"special token ids {[i for _, i in order]} do not follow the {base}-entry vocabulary "
                          f"contiguously; cannot place them at their ids")
    # All special: the run's tokenizer never reads a special token out of plain text, and
    # split_special_tokens=True must then reproduce it exactly.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, _ in order])
    for t, i in order:
        if tok.token_to_id(t) != i:
            raise ExportError(f"special token {t} landed at id {tok.token_to_id(t)}, expected {i}")
    return tok


def qwen3_hf_tokenizer(tokenizer):
    """tokenizers.Tokenizer equal to our offline qwen3 tokenizer (same BPE ranks, regex, NFC, specials)."""
    from data.tokenizer import QWEN_PATTERN, _load_ranks, qwen_bpe_file

    ranks = _load_ranks(qwen_bpe_file())
    table = str.maketrans({chr(b): c for b, c in byte_to_unicode().items()})

    def text(b: bytes) -> str:
        return b.decode("latin-1").translate(table)  # latin-1: byte k -> chr(k), then the alphabet

    vocab = {text(t): r for t, r in ranks.items()}
    merges = [tuple(text(p) for p in _last_merge(t, r, ranks))
              for t, r in sorted(ranks.items(), key=lambda kv: kv[1]) if len(t) > 1]
    return _byte_level_tokenizer(vocab, merges, tokenizer.special_ids, pattern=QWEN_PATTERN, nfc=True)


def byte_hf_tokenizer(tokenizer):
    """tokenizers.Tokenizer equal to our byte tokenizer: UTF-8 bytes are ids 0..255, no merges, no
    normalisation, specials from 256."""
    chars = byte_to_unicode()
    vocab = {chars[b]: b for b in range(256)}
    return _byte_level_tokenizer(vocab, [], tokenizer.special_ids, pattern=None, nfc=False)


def write_tokenizer_files(tokenizer, out_dir: str | Path, *, model_max_length: int,
                          qwen3_chat: bool = True) -> list[Path]:
    """tokenizer.json + tokenizer_config.json for `qwen3` and `byte`; a Hugging Face tokenizer saves itself."""
    from data.tokenizer import EOS_TOKEN, MASK_TOKEN, ByteTokenizer, HFTokenizer, Qwen3Tokenizer

    out = Path(out_dir)
    if isinstance(tokenizer, HFTokenizer):
        return [Path(p) for p in tokenizer._tok.save_pretrained(str(out))]
    if isinstance(tokenizer, Qwen3Tokenizer):
        hf, tokenizer_class = qwen3_hf_tokenizer(tokenizer), "Qwen2Tokenizer"
    elif isinstance(tokenizer, ByteTokenizer):
        hf, tokenizer_class = byte_hf_tokenizer(tokenizer), "PreTrainedTokenizerFast"
    else:
        raise ExportError(f"tokenizer {tokenizer.name!r} ({type(tokenizer).__name__}): no way to write it")
    hf.save(str(out / "tokenizer.json"))
    # Only a run that rendered Qwen3's template gets it (a separator-format run has no chat template to give).
    chat = qwen3_chat and tokenizer.im_start_id is not None and tokenizer.im_end_id is not None
    config: dict[str, Any] = {
        "tokenizer_class": tokenizer_class,
        "model_max_length": int(model_max_length),
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": tokenizer.id_to_special[tokenizer.pad_id],
        "unk_token": None,
        "mask_token": MASK_TOKEN,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "errors": "replace",
        **({"chat_template": CHAT_TEMPLATE} if chat else {}),
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": EOS_TOKEN, "pad_token": config["pad_token"], "mask_token": MASK_TOKEN}, indent=2) + "\n")
    return [out / "tokenizer.json", out / "tokenizer_config.json", out / "special_tokens_map.json"]


# ---- the export ----------------------------------------------------------------------------------

def diffusion_fields(cfg, diffusion) -> dict[str, Any]:
    """Our diffusion settings as config.json keys (transformers keeps unknown keys as attributes)."""
    return {
        "mask_token_id": int(diffusion.mask_token_id),
        "shift_logits": bool(diffusion.shift_logits),
        "diffusion_loss_norm": str(diffusion.loss_norm),
        "diffusion_sampling_eps": float(diffusion.sampling_eps),
        "diffusion_attention": "causal" if bool(cfg.model.causal) else "bidirectional",
        "diffusion_objective": str(diffusion.objective),
        "diffusion_block_size": int(diffusion.block_size),
    }


def _prepare_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ExportError(f"{out}: exists and is not empty (pass --overwrite to replace an earlier export)")
        if not (out / "config.json").is_file():  # never delete a folder that is not a model directory
            raise ExportError(f"{out}: not empty and holds no config.json; refusing to replace it")


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, *, dtype: torch.dtype | None = None,
                      max_shard_bytes: int | None = None, tokenizer_name: str | None = None,
                      overwrite: bool = False, log=print) -> Path:
    """Write the Hugging Face directory for a checkpoint; returns `out_dir`."""
    from omegaconf import OmegaConf

    from data.config import sft_section
    from data.templates import resolve_template
    from model.hf import DEFAULT_MAX_SHARD_BYTES, check_state_dict, save_hf_model
    from train import checkpoint as ckpt
    from train.generate import find_checkpoint
    from train.build import build_tokenizer, diffusion_config, model_config

    found = find_checkpoint(checkpoint)
    out = Path(out_dir).resolve()
    _prepare_target(out, overwrite)
    loaded = ckpt.load_checkpoint(found, with_optimizer=False)
    saved = loaded.trainer_state.get("config")
    if not saved:
        raise ExportError(f"{found}: trainer_state.json holds no 'config'; cannot tell the architecture")
    cfg = OmegaConf.create(saved)
    if tokenizer_name:
        cfg.tokenizer_name = tokenizer_name
    try:
        tokenizer = build_tokenizer(cfg)
    except (OSError, ValueError) as err:
        raise ExportError(f"{found}: cannot load the run's tokenizer {cfg.tokenizer_name!r} ({err}); "
                          f"pass --tokenizer") from None
    config = model_config(cfg, tokenizer)
    diffusion = diffusion_config(cfg, tokenizer)
    state = check_state_dict(loaded.model_state, config, str(found))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        eos = tokenizer.eos_id
        extra = {"bos_token_id": eos, "eos_token_id": eos, **diffusion_fields(cfg, diffusion),
                 "pallas_dlm": {"checkpoint": str(found), "step": loaded.step,
                                "training_mode": str(cfg.training_mode), "tokenizer": tokenizer.name}}
        save_hf_model(state, config, tmp, extra_config=extra, dtype=dtype,
                      max_shard_bytes=max_shard_bytes or DEFAULT_MAX_SHARD_BYTES)
        stops = [i for i in (tokenizer.im_end_id, eos) if i is not None]
        generation = {"bos_token_id": eos, "eos_token_id": stops if len(stops) > 1 else stops[0],
                      "pad_token_id": tokenizer.pad_id}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        write_tokenizer_files(tokenizer, tmp, model_max_length=config.max_position_embeddings,
                              qwen3_chat=resolve_template(sft_section(cfg.data), tokenizer)[0] == "qwen3")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"exported {found} (step {loaded.step}) to {out}: Qwen3ForCausalLM, {config.num_parameters() / 1e6:.2f}M "
        f"parameters, {'tied' if config.tie_word_embeddings else 'untied'} head, tokenizer {tokenizer.name} "
        f"(<|mask|> = {diffusion.mask_token_id}), shift_logits={diffusion.shift_logits}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    from model.hf import HFCheckpointError, parse_size
    from train.checkpoint import CheckpointError

    parser = argparse.ArgumentParser(prog="python -m train.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="step folder, checkpoints folder (its latest) or a run's output_dir")
    parser.add_argument("out_dir", help="the Hugging Face model directory to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="cast the weights (default: keep the checkpoint's dtype, bit for bit)")
    parser.add_argument("--max-shard-size", default="5GB", help="shard the weights past this size (default 5GB)")
    parser.add_argument("--tokenizer", default=None, help="override the run's tokenizer (qwen3, byte, HF name/dir)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export in out_dir")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        export_checkpoint(args.checkpoint, args.out_dir, dtype=DTYPES.get(args.dtype),
                          max_shard_bytes=parse_size(args.max_shard_size), tokenizer_name=args.tokenizer,
                          overwrite=args.overwrite)
    except (ExportError, CheckpointError, HFCheckpointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
