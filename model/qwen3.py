"""Qwen3 as Hugging Face defines it, with segment-aware (packed) attention through `kernels`.

Architecture facts (transformers' Qwen3): pre-norm decoder layers; RMSNorm computed in fp32 and cast
back before the weight multiply; per-head RMSNorm on q and k (over head_dim) before RoPE; RoPE
angles position * rope_theta^(-2i/head_dim) in fp32, rotate-half layout; no biases; SwiGLU MLP
(down(silu(gate(x)) * up(x))); GQA with query head h reading kv head h // (Hq / Hkv); attention
scale head_dim^-0.5; final RMSNorm; LM head optionally tied to the embedding.

Parameter names equal Hugging Face `Qwen3ForCausalLM.state_dict()` names, so checkpoints map 1:1
(`lm_head.weight` exists only when the head is untied). With `scan_layers=True` the decoder layers'
weights are stacked ([num_layers, ...], Qwen3StackedLayers) and run as torch_xla's scan; state_dict()
and load_state_dict() still use the per-layer `model.layers.{i}.*` names.

Under SPMD (train/sharding.py) the model pins a few tensors' layouts through model/sharding.py's
`constrain` (a no-op on one device); the kernels shard themselves (kernels/binding.py).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from model.config import Qwen3Config
from model.sharding import constrain

# model.attention_kernel / model.loss_kernel values -> kernels backend names. The seed's names
# `flash_attention` and `default` stay accepted.
KERNEL_ALIASES = {
    "pallas": "pallas",
    "flash_attention": "pallas",
    "reference": "reference",
    "default": "reference",
    "naive": "naive",
    "interpret": "interpret",
    "mosaic": "mosaic",
}


def resolve_kernel(value: str, key: str) -> str:
    name = KERNEL_ALIASES.get(str(value).strip().lower())
    if name is None:
        raise ValueError(f"model: {key}={value!r} is unknown; allowed: "
                         f"{', '.join(KERNEL_ALIASES)}")
    return name


class Qwen3RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin [B, L, head_dim] for integer positions, computed in fp32 like HF, then cast.

    Computed per call from the config rather than kept as a buffer, so a model built on the meta
    device and materialised later (to_empty) has nothing stale.
    """
    exponent = torch.arange(0, head_dim, 2, device=position_ids.device,
                            dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta ** exponent)  # [D/2]
    angles = position_ids.float()[..., None] * inv_freq  # [B, L, D/2]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, L, D]; cos/sin [B, L, D]."""
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + _rotate_half(x) * sin


# XLA:CPU computes nn.Linear's x @ W^T (W stored [out, in], contracted on its last dimension) through
# Eigen at 25-60 GFLOP/s when x has under ~1,024 rows, and W @ x^T (the small operand transposed) at
# 85-100, one core, fp32 (qwen3-0.6b's shapes at 256 rows: 41 against 97). XLA's algebraic simplifier
# turns (W @ x^T)^T back into x @ W^T unless an optimization barrier sits between the product and its
# transpose. The backward's two products (g @ W, g^T @ x) already run in fast forms.
CPU_TRANSPOSED_PRODUCT_MAX_ROWS = 1024


def _on_xla_cpu(x: torch.Tensor) -> bool:
    from kernels.binding import lowering_platform

    return x.device.type == "xla" and lowering_platform() == "cpu"


class _CpuLinear(torch.autograd.Function):
    """x [N, in] @ W^T computed as (W @ x^T)^T behind an optimization barrier (XLA:CPU only)."""

    @staticmethod
    def forward(ctx, x, weight):
        import torch_xla.core.xla_model as xm

        if torch.is_autocast_enabled("xla"):  # autocast does not reach a Function's backward: cast here
            dtype = torch.get_autocast_dtype("xla")
            x, weight = x.to(dtype), weight.to(dtype)
        product = weight @ x.t()  # [out, N]
        xm.optimization_barrier_([product])
        ctx.save_for_backward(x, weight)
        return product.t()

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.to(weight.dtype)
        return grad @ weight, grad.t() @ x


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight^T ordered for the backend that runs it: on XLA:CPU with few rows, _CpuLinear; anywhere
    else F.linear (a TPU's layout assignment and eager CPU kernels need no help)."""
    rows = x.numel() // x.shape[-1]
    if rows <= CPU_TRANSPOSED_PRODUCT_MAX_ROWS and _on_xla_cpu(x):
        return _CpuLinear.apply(x.reshape(rows, x.shape[-1]), weight).reshape(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight)


class Linear(nn.Linear):
    """nn.Linear (same parameters and names) whose product goes through `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return linear(x, self.weight)
        return F.linear(x, self.weight, self.bias)


class Qwen3Attention(nn.Module):
    def __init__(self, config: Qwen3Config, *, causal: bool, backend: str, block_sizes,
                 block_diffusion: bool = False):
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = d
        self.causal = causal
        # segment_ids are block-diffusion ids (kernels/__init__.py) in every full forward
        self.block_diffusion = block_diffusion
        self.backend = backend
        self.block_sizes = block_sizes
        self.q_proj = Linear(h, self.num_heads * d, bias=False)
        self.k_proj = Linear(h, self.num_kv_heads * d, bias=False)
        self.v_proj = Linear(h, self.num_kv_heads * d, bias=False)
        self.o_proj = Linear(self.num_heads * d, h, bias=False)
        self.q_norm = Qwen3RMSNorm(d, config.rms_norm_eps)
        self.k_norm = Qwen3RMSNorm(d, config.rms_norm_eps)

    def forward(self, x, cos, sin, segment_ids, kv=None):
        """kv: None, or one layer's slot of a model.kv_cache recorder or window (cached decoding)."""
        b, l, _ = x.shape
        # norm per head over head_dim, on [B, L, H, D], then heads first for the kernel
        q = self.q_norm(self.q_proj(x).view(b, l, self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, l, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, l, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = self.attend(q, k, v, segment_ids) if kv is None else kv.attend(self, q, k, v, segment_ids)
        return self.o_proj(o.transpose(1, 2).reshape(b, l, self.num_heads * self.head_dim))

    def attend(self, q, k, v, segment_ids):
        return kernels.masked_attention(q, k, v, segment_ids, causal=self.causal,
                                        sm_scale=self.head_dim ** -0.5, backend=self.backend,
                                        block_sizes=self.block_sizes,
                                        block_diffusion=self.block_diffusion)


class Qwen3MLP(nn.Module):
    def __init__(self, config: Qwen3Config):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = Linear(h, i, bias=False)
        self.up_proj = Linear(h, i, bias=False)
        self.down_proj = Linear(i, h, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, config: Qwen3Config, **attn_kwargs):
        super().__init__()
        self.self_attn = Qwen3Attention(config, **attn_kwargs)
        self.mlp = Qwen3MLP(config)
        self.input_layernorm = Qwen3RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = Qwen3RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, segment_ids, kv=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, segment_ids, kv)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3Model(nn.Module):
    """The backbone (HF's `model.` prefix): embeddings, decoder layers, final norm."""

    def __init__(self, config: Qwen3Config, **attn_kwargs):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            Qwen3DecoderLayer(config, **attn_kwargs) for _ in range(config.num_hidden_layers))
        self.norm = Qwen3RMSNorm(config.hidden_size, config.rms_norm_eps)


class Qwen3StackedLayers(nn.Module):
    """The decoder layers with every weight stacked along a new leading layer axis, for torch_xla's
    scan (model.remat.scan_layers): `self_attn.q_proj.weight` is [num_layers, out, in], and so on.

    The scan then steps through the stacked weights as they are (nothing is stacked per step), and the
    gradient and the optimizer see one tensor per kind of weight instead of one per layer, so neither
    the traced nor the compiled step grows with depth. `state_dict()` still speaks Hugging Face:
    `model.layers.{i}.<name>` entries (views of row i of the stacked weight), and `load_state_dict`
    accepts them. Computation goes through `template`, a layer on the meta device (outside the module
    tree) whose code runs with row i of every weight swapped in (torch.func.functional_call).
    """

    def __init__(self, layers: nn.ModuleList):
        super().__init__()
        self.num_layers = len(layers)
        first = layers[0]
        for name, child in first.named_children():  # the same tree as a layer, weights replaced below
            self.add_module(name, copy.deepcopy(child))
        with torch.no_grad():
            for name, _ in list(self.named_parameters()):
                owner, _, leaf = name.rpartition(".")
                stacked = torch.stack([layer.get_parameter(name).detach() for layer in layers])
                setattr(self.get_submodule(owner), leaf, nn.Parameter(stacked))
        object.__setattr__(self, "template", copy.deepcopy(first).to("meta"))
        self.register_state_dict_post_hook(_unstack_state)
        self.register_load_state_dict_pre_hook(_stack_state)

    def layer_weights(self, i: int | None = None) -> dict[str, torch.Tensor]:
        """{name inside a layer: stacked weight}, or layer i's row of each."""
        weights = dict(self.named_parameters())
        return weights if i is None else {n: w[i] for n, w in weights.items()}

    def set_attention(self, backend, block_sizes) -> None:
        self.template.self_attn.backend = backend
        self.template.self_attn.block_sizes = block_sizes

    def forward(self, *args, **kwargs):
        raise RuntimeError("Qwen3StackedLayers runs through Qwen3ForDiffusionLM.forward")


def _unstack_state(module, state_dict, prefix, local_metadata) -> None:
    for name in [n for n, _ in module.named_parameters()]:
        stacked = state_dict.pop(prefix + name)
        for i in range(module.num_layers):
            state_dict[f"{prefix}{i}.{name}"] = stacked[i]


def _stack_state(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                 error_msgs) -> None:
    for name in [n for n, _ in module.named_parameters()]:
        rows = [state_dict.get(f"{prefix}{i}.{name}") for i in range(module.num_layers)]
        if all(r is not None for r in rows) and prefix + name not in state_dict:
            for i in range(module.num_layers):
                del state_dict[f"{prefix}{i}.{name}"]
            state_dict[prefix + name] = torch.stack([r.detach() for r in rows])


class Qwen3ForDiffusionLM(nn.Module):
    """Qwen3 returning final-norm hidden states; the LM head is applied by the loss kernel.

    forward(input_ids [B,L], segment_ids [B,L] | None, position_ids [B,L] | None) -> [B,L,H].
    segment_ids: 1..k per packed example, 0 = padding (attends nowhere, output unused);
    None = one segment per row. position_ids: restart at 0 per example; None = 0..L-1.
    block_diffusion (the bd3lm objective): every full forward's segment_ids are block-diffusion ids
    (kernels/__init__.py; model/diffusion.py builds them), so the attention follows the BD3-LM pattern.
    """

    def __init__(self, config: Qwen3Config, *, causal: bool = False, block_diffusion: bool = False,
                 attention_kernel: str = "reference", loss_kernel: str = "reference",
                 attention_kernel_config: dict | None = None,
                 loss_kernel_config: dict | None = None,
                 gradient_checkpointing: bool = False, scan_layers: bool = False):
        super().__init__()
        # Recompute each decoder layer in backward instead of keeping its activations.
        self.gradient_checkpointing = bool(gradient_checkpointing)
        # Keep the decoder layers' weights stacked (Qwen3StackedLayers) and, on XLA, run them as one
        # torch_xla scan (a While loop): one layer is traced and compiled whatever the depth.
        self.scan_layers = bool(scan_layers)
        self._scan_fns: dict = {}
        self.config = config.validate()
        self.causal = bool(causal)
        self.block_diffusion = bool(block_diffusion)
        if self.causal and self.block_diffusion:
            raise ValueError("model: causal attention and block diffusion exclude each other")
        self.attention_kernel = resolve_kernel(attention_kernel, "model.attention_kernel")
        self.loss_kernel = resolve_kernel(loss_kernel, "model.loss_kernel")
        self.attention_kernel_config = _plain_config(attention_kernel_config)
        self.loss_kernel_config = _plain_config(loss_kernel_config)
        self.model = Qwen3Model(config, causal=self.causal, backend=self.attention_kernel,
                                block_sizes=self.attention_kernel_config,
                                block_diffusion=self.block_diffusion)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.reset_parameters()
        if self.scan_layers:  # initialised layer by layer first: the same weights as unstacked
            self.model.layers = Qwen3StackedLayers(self.model.layers)

    def decoder_layers(self) -> list[nn.Module]:
        """The decoder layers as modules (empty when they are stacked for scan)."""
        return [] if self.scan_layers else list(self.model.layers)

    def stacked_parameter_names(self) -> set[str]:
        """Parameters that hold all decoder layers along a leading axis (model.remat.scan_layers)."""
        if not self.scan_layers:
            return set()
        return {f"model.layers.{n}" for n, _ in self.model.layers.named_parameters()}

    def set_kernels(self, *, attention_kernel: str | None = None, loss_kernel: str | None = None,
                    attention_kernel_config=None, loss_kernel_config=None) -> None:
        """Switch backends after construction (e.g. evaluate a checkpoint with another kernel).
        A config given replaces the old one; None keeps it."""
        if attention_kernel is not None:
            self.attention_kernel = resolve_kernel(attention_kernel, "model.attention_kernel")
        if attention_kernel_config is not None:
            self.attention_kernel_config = _plain_config(attention_kernel_config)
        if loss_kernel is not None:
            self.loss_kernel = resolve_kernel(loss_kernel, "model.loss_kernel")
        if loss_kernel_config is not None:
            self.loss_kernel_config = _plain_config(loss_kernel_config)
        for layer in self.decoder_layers():
            layer.self_attn.backend = self.attention_kernel
            layer.self_attn.block_sizes = self.attention_kernel_config
        if self.scan_layers:
            self.model.layers.set_attention(self.attention_kernel, self.attention_kernel_config)

    def add_backward_optimization_barriers(self) -> None:
        """An XLA optimization barrier on each decoder layer's gradients (torch_xla's
        apply_backward_optimization_barrier), so XLA cannot merge the layers' backward passes into
        one huge buffer. Needs the model on the XLA device. (A scanned stack is one While loop: its
        layers are already kept apart.)"""
        import torch_xla.distributed.spmd as xs

        for layer in self.decoder_layers():
            xs.apply_backward_optimization_barrier(layer)

    # ---- parameters ----------------------------------------------------------------------------

    def reset_parameters(self) -> None:
        """HF's init: every Linear and the embedding ~ N(0, initializer_range), norms = 1; the
        embedding uses config.embedding_init_std instead when it is set.
        Also the way to initialise a model built on the meta device after `to_empty`."""
        std = self.config.initializer_range
        emb_std = self.config.embedding_init_std or std
        for module in self.modules():
            if isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=emb_std)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, Qwen3RMSNorm):
                module.reset_parameters()

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """[V, H]: the embedding matrix when tied, else lm_head.weight."""
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.weight
        return self.lm_head.weight

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weight counted once

    def load_hf_state_dict(self, state_dict: dict[str, torch.Tensor], *, strict: bool = True):
        """Load a Hugging Face Qwen3ForCausalLM state dict (names are identical). With a tied
        head, HF's `lm_head.weight` (the embedding itself) is accepted and dropped."""
        sd = dict(state_dict)
        if self.config.tie_word_embeddings and "lm_head.weight" in sd:
            head = sd.pop("lm_head.weight")
            emb = sd.get("model.embed_tokens.weight")
            if emb is not None and head is not emb and not torch.equal(head.cpu(), emb.cpu()):
                raise ValueError("model: checkpoint has an lm_head.weight different from "
                                 "model.embed_tokens.weight but the config ties them "
                                 "(tie_word_embeddings=true)")
        return self.load_state_dict(sd, strict=strict)

    # ---- compute -------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, segment_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, *, kv=None) -> torch.Tensor:
        """kv (decoding only): a model.kv_cache.KVRecorder (record every layer's keys and values) or
        KVWindow (the inputs are a window of the sequence, attending over the recorded keys)."""
        b, l = input_ids.shape
        if segment_ids is None:
            segment_ids = torch.ones((b, l), dtype=torch.int32, device=input_ids.device)
        if position_ids is None:
            position_ids = torch.arange(l, device=input_ids.device).expand(b, l)
        x = F.embedding(input_ids, constrain(self.model.embed_tokens.weight, "embedding_table"))
        segment_ids = segment_ids.to(torch.int32)
        if kv is not None:
            return self.model.norm(self._layers_with_cache(x, position_ids, segment_ids, kv))
        if self.scan_layers:
            return self.model.norm(self._stacked_layers(x, position_ids, segment_ids))
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        checkpoint = _checkpoint_fn(x) if self.gradient_checkpointing and self.training else None
        for layer in self.model.layers:
            x = constrain(x, "decoder_input")
            if checkpoint is not None and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, segment_ids)
            else:
                x = layer(x, cos, sin, segment_ids)
        return self.model.norm(x)

    def _layers_with_cache(self, x, position_ids, segment_ids, kv):
        """The decoder layers one by one (stacked weights too: decoding runs no backward, and the
        cache needs each layer's keys), each given its slot of `kv`."""
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        if not self.scan_layers:
            for i, layer in enumerate(self.model.layers):
                x = layer(x, cos, sin, segment_ids, kv.layer(i))
            return x
        stack = self.model.layers
        for i in range(stack.num_layers):
            x = torch.func.functional_call(stack.template, stack.layer_weights(i),
                                           (x, cos, sin, segment_ids, kv.layer(i)), strict=True)
        return x

    def _stacked_layers(self, x, position_ids, segment_ids):
        """The stacked decoder layers: on XLA one torch_xla scan over the stacked weights, each step
        one layer (RoPE angles recomputed inside the step from the positions: cheap and elementwise,
        and the only per-step inputs besides the weights are two int32 [B, L] maps). With gradient
        checkpointing each step keeps only its inputs for the backward, which recomputes the layer
        (_recompute_layer_partition). Elsewhere (CPU tensors) a plain loop over the rows of the weights."""
        stack = self.model.layers
        if x.device.type != "xla":
            cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
            for i in range(stack.num_layers):
                x = torch.func.functional_call(stack.template, stack.layer_weights(i),
                                               (x, cos, sin, segment_ids), strict=True)
            return x
        from torch_xla.experimental.scan import scan

        remat = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        if remat:
            partition = _recompute_layer_partition
        else:
            from functorch.compile import default_partition as partition
        n = stack.num_layers
        ints = tuple(t.to(torch.int32).expand(n, *t.shape) for t in (position_ids, segment_ids))
        x, _ = scan(self._scan_fn(remat), x, (stack.layer_weights(), *ints), partition_fn=partition,
                    is_fn_pure=True)
        return x

    def _scan_fn(self, remat: bool):
        """One step of the scan, kept per kernel setting: scan caches its traced graphs by the
        function's identity, so the same function must come back on every call."""
        template = self.model.layers.template
        attn = template.self_attn
        key = (attn.backend, repr(attn.block_sizes), attn.causal, attn.block_diffusion, remat)
        fn = self._scan_fns.get(key)
        if fn is None:
            head_dim, theta = self.config.head_dim, self.config.rope_theta

            def fn(x, xs):
                weights, position_ids, segment_ids = xs
                cos, sin = rope_cos_sin(position_ids, head_dim, theta, x.dtype)
                x = constrain(x, "decoder_input")
                # the layer's code with this step's row of every stacked weight swapped in
                out = torch.func.functional_call(template, weights, (x, cos, sin, segment_ids),
                                                 strict=True)
                return out, None

            self._scan_fns[key] = fn
        return fn

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits [..., V] (generation, evaluation; training uses the loss kernel)."""
        return linear(hidden, self.lm_head_weight)

    def extra_repr(self) -> str:
        return (f"causal={self.causal}, block_diffusion={self.block_diffusion}, attention_kernel={self.attention_kernel!r}, "
                f"loss_kernel={self.loss_kernel!r}, "
                f"gradient_checkpointing={self.gradient_checkpointing}, "
                f"scan_layers={self.scan_layers}")


def _recompute_layer_partition(joint_module, joint_inputs, **kwargs):
    """Activation checkpointing of a scanned layer: the forward keeps only the step's inputs and the
    backward recomputes the rest (AOTAutograd's min-cut partitioner at an activation memory budget
    of 0). At its default budget the partitioner keeps every matmul output instead, e.g. a
    [layers, tokens, intermediate] bf16 stack per MLP projection: 2.6 GiB each for Qwen3-1.7B at
    8 x 1,024 tokens per chip, which kept the SFT recipe off a v5e-8 (train/aot.py found it)."""
    from functorch.compile import min_cut_rematerialization_partition
    from torch._functorch import config

    with config.patch(activation_memory_budget=0.0):
        return min_cut_rematerialization_partition(joint_module, joint_inputs, **kwargs)


def _checkpoint_fn(x: torch.Tensor):
    """torch_xla's checkpoint on XLA tensors (it adds an optimization barrier so XLA cannot fuse
    the recomputation away), torch's elsewhere."""
    if x.device.type == "xla":
        from torch_xla.utils.checkpoint import checkpoint

        return lambda fn, *args: checkpoint(fn, *args, use_reentrant=True)
    from torch.utils.checkpoint import checkpoint

    return lambda fn, *args: checkpoint(fn, *args, use_reentrant=False)


def _plain_config(value):
    """Block-size configs (possibly OmegaConf nodes) as plain dicts/tuples of Python scalars; the
    kernel call cache keys on their values, so they must be hashable leaves."""
    if value is None:
        return None
    if hasattr(value, "items"):
        items = {str(k): _plain_config(v) for k, v in value.items()}
        return dict(sorted(items.items())) or None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
        return tuple(_plain_config(v) for v in value)
    return value
