"""How Qwen3 is laid out over a torch_xla SPMD mesh: the one table to read and edit.

Mesh axes (built by train/sharding.py from `ici_mesh.*` x `dcn_mesh.*`):
  data    pure data parallel: parameters replicated, the batch split
  fsdp    fully sharded data parallel: the batch split AND every parameter (hence its gradient and
          its optimizer state, which follow the parameter) split along one dimension
  tensor  tensor parallel (Megatron style): attention heads and MLP columns/rows split
  expert  reserved for mixture-of-experts models; dense Qwen3 has none (must be 1)

Specs give, per tensor dimension, the mesh axis (or tuple of axes, or None = whole) it is split
over. nn.Linear stores [out_features, in_features]: a column-parallel projection (q/k/v, gate/up)
splits `out` over `tensor`, a row-parallel one (o, down) splits `in`; the other dimension is split
over `fsdp`. An axis whose size does not divide its dimension is dropped from that dimension (the
dimension stays whole) rather than padded.
"""

from __future__ import annotations

import math
import re

BATCH = ("data", "fsdp")  # the axes the batch dimension is split over (inputs, activations)

# (regular expression over Hugging Face parameter names, spec). First match wins. `model.layers.N.`
# may also be `model.layers.` alone: the decoder weights stacked along a leading layer axis for scan
# (model.remat.scan_layers), whose extra first dimension stays whole.
_LAYER = r"model\.layers\.(\d+\.)?"
PARAMETERS: list[tuple[str, tuple]] = [
    (r"model\.embed_tokens\.weight", ("fsdp", "tensor")),                      # [V, H]
    (r"lm_head\.weight", ("fsdp", "tensor")),                                  # [V, H] (untied head)
    (_LAYER + r"self_attn\.[qkv]_proj\.weight", ("tensor", "fsdp")),           # [heads*D, H] column
    (_LAYER + r"self_attn\.o_proj\.weight", ("fsdp", "tensor")),               # [H, Hq*D] row
    (_LAYER + r"mlp\.(gate|up)_proj\.weight", ("tensor", "fsdp")),             # [I, H] column
    (_LAYER + r"mlp\.down_proj\.weight", ("fsdp", "tensor")),                  # [H, I] row
    (_LAYER + r"self_attn\.[qk]_norm\.weight", (None,)),                       # [D] (tiny)
    (_LAYER + r"(input|post_attention)_layernorm\.weight", ("fsdp",)),         # [H]
    (r"model\.norm\.weight", ("fsdp",)),                                       # [H]
]

# Activations the model pins (with their gradients), so GSPMD keeps the batch split instead of
# gathering activations to meet a parameter's sharding. The attention and cross-entropy kernels
# shard themselves (kernels/binding.py: batch over BATCH, heads over `tensor`).
ACTIVATIONS: dict[str, tuple] = {
    "decoder_input": (BATCH, None, None),  # [B, L, H] entering every decoder layer
    # The embedding table as the lookup reads it: whole, i.e. gathered like every FSDP weight. Left
    # to itself GSPMD looks a vocabulary-split table up by gathering every token id and all-reducing
    # a [B*L, H] activation (and gathers [B*L, H] again for the gradient).
    "embedding_table": (None, None),
}


def _axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def fit_spec(spec: tuple, shape, mesh_shape: dict) -> tuple:
    """`spec` for a tensor of `shape` on a mesh of `mesh_shape` ({axis: size}): axes missing from the
    mesh or of size 1 are dropped, and so is every axis of a dimension its product does not divide."""
    out = []
    for entry, size in zip(spec, shape):
        axes = tuple(a for a in _axes(entry) if mesh_shape.get(a, 1) > 1)
        if not axes or size % math.prod(mesh_shape[a] for a in axes):
            out.append(None)
        else:
            out.append(axes[0] if len(axes) == 1 else axes)
    return tuple(out)


def parameter_spec(name: str, shape, mesh_shape: dict) -> tuple:
    """The spec of parameter `name` (replicated when no rule matches), fitted to the mesh."""
    for pattern, spec in PARAMETERS:
        match = re.fullmatch(pattern, name)
        if match:
            if name.startswith("model.layers.") and not match.group(1) and len(shape) == len(spec) + 1:
                spec = (None, *spec)  # stacked decoder weights: the layer axis stays whole
            if len(spec) != len(shape):
                raise ValueError(f"model/sharding.py: rule {pattern!r} has {len(spec)} dims, "
                                 f"{name} has shape {tuple(shape)}")
            return fit_spec(spec, shape, mesh_shape)
    return (None,) * len(shape)


def constrain(x, name: str):
    """Pin activation `name` (and its gradient) to its ACTIVATIONS spec when torch_xla runs SPMD
    over a mesh; the identity otherwise (one device, CPU tensors, no torch_xla)."""
    from kernels.binding import spmd_mesh

    if x.device.type != "xla":
        return x
    mesh = spmd_mesh()
    if mesh is None:
        return x
    spec = fit_spec(ACTIVATIONS[name], x.shape, dict(mesh.shape()))
    import torch_xla
    import torch_xla.distributed.spmd as xs

    if x.is_leaf or _annotated(x):
        # A tensor that carries an annotation already (a parameter) cannot be re-annotated, and a
        # clone keeps it; a view is a fresh value. (So is it for a parameter without data: the
        # placeholders of an ahead-of-time compile, train/aot.py, which mark_sharding crashes on.)
        x = x.view(x.shape)
    return xs.mark_sharding_with_gradients(x, mesh, spec)


def _annotated(x) -> bool:
    import torch_xla

    try:
        return bool(torch_xla._XLAC._get_xla_sharding_spec(x))
    except RuntimeError:  # a traced stand-in (scan's AOTAutograd tracing): carries nothing yet
        return False
