"""pallas-dlm data: dataset records -> chat messages -> token ids + masks -> packed fixed-shape batches.

Batch contract (DESIGN.md section 3): dict of numpy arrays `[B, block_size]`: `input_ids` int32,
`src_mask` bool (True = never noised: prompt and padding), `segment_ids` int32 (1..k per packed example,
0 = padding), `position_ids` int32 (restarting at 0 per example).
"""

from .config import DEFAULTS, normalize as normalize_config
from .errors import DataError
from .formats import to_messages
from .pipeline import BatchStream, build_batch_stream, build_eval_batches, load_eval_examples
from .templates import Rendered, render_example, render_prompt
from .tokenizer import ByteTokenizer, HFTokenizer, Qwen3Tokenizer, Tokenizer, load_tokenizer

__all__ = [
    "BatchStream", "ByteTokenizer", "DEFAULTS", "DataError", "HFTokenizer", "Qwen3Tokenizer", "Rendered",
    "Tokenizer", "build_batch_stream", "build_eval_batches", "load_eval_examples", "load_tokenizer",
    "normalize_config", "render_example", "render_prompt", "to_messages",
]
