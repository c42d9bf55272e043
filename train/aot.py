"""The train step compiled for a TPU topology that is not here: does a config fit, and what would it cost.

`python -m train.run <config keys> compile_only=v5e:2x4` (or `compile_step(cfg, "v5e:2x4")`) traces the
trainer's own step (`trainer.optimizer_step`: forward, backward, clipping, optimizer update) with torch_xla on
this CPU, with the Mosaic kernels lowered for TPU inside it and the trainer's SPMD sharding, and compiles the
graph with libtpu for the topology (DESIGN.md section 6). Nothing runs and no memory is taken:

* parameters and optimizer state are placeholders (no buffer); the batch is synthetic, of the configured shape
  (the compiled program depends on shapes only);
* the HLO torch_xla traced is converted to StableHLO, and what torch_xla would have attached at run time is put
  on its entry arguments: each parameter's and state tensor's sharding (model/sharding.py's table, which
  `mark_sharding` cannot put on a placeholder) and their donation to the updated values;
* libtpu compiles it for the topology's chips (one slice; `dcn_mesh` must be 1) and reports the memory per
  chip, or the compiler's out-of-memory report naming the largest allocations.

FLOPs: XLA counts the body of a scan over layers once, so with `scan_layers` the per-layer FLOPs and bytes
come from two more compiles of the same step with one and two unrolled layers. The kernels contribute their
`pl.CostEstimate`s (upper bounds: the work skipped at run time is not known at compile time).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time

import numpy as np
import torch
from omegaconf import DictConfig, open_dict

from kernels import tpu as ktpu
from train.config import ConfigError, mesh_size

# Optimizer-state entries that are tensors shaped by their parameter (the rest stays on the host).
_STATE_KEYS = ("exp_avg", "exp_avg_sq", "row_var", "col_var", "variance")


def devices_needed(spec: str) -> int:
    """Chips in a topology spec ('v5e:2x4' -> 8): the virtual CPU devices the trace needs."""
    _, grid = ktpu.parse_topology(spec)
    return ktpu.topology_chips(grid)


@dataclasses.dataclass
class StepCompile:
    topology: str
    chip: ktpu.TpuChip
    chips: int
    fits: bool
    hbm_per_chip: int  # bytes the chip needs (arguments + temporaries + outputs not aliased + code)
    arguments: int = 0  # of which parameters, optimizer state and batch
    parameters: int = 0
    optimizer_state: int = 0
    temporaries: int = 0
    outputs: int = 0  # not aliased to an argument
    code: int = 0
    flops: float | None = None  # compiled, per chip, per step (scan bodies counted per layer)
    bytes_accessed: float | None = None
    model_flops: float = 0.0  # per chip: 6 x matmul params x tokens + attention
    trace_seconds: float = 0.0
    compile_seconds: float = 0.0
    oom: str = ""  # the compiler's out-of-memory report when it does not fit

    def to_dict(self) -> dict:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "chip"}
        out.update(chip=self.chip.name, chip_hbm=self.chip.hbm_bytes, headroom=self.headroom,
                   step_seconds_lower_bound=self.step_seconds_lower_bound, mfu_ceiling=self.mfu_ceiling)
        return out

    def write_json(self, path) -> None:
        import json
        from pathlib import Path

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @property
    def headroom(self) -> float:
        return 1.0 - self.hbm_per_chip / self.chip.hbm_bytes

    @property
    def step_seconds_lower_bound(self) -> float | None:
        """Roofline: the step cannot take less than its FLOPs at peak or its HBM traffic at full bandwidth.
        FLOPs: the compiled count, or the model's where that is larger (XLA counts the body of every loop once,
        and besides our scan it makes loops of its own, e.g. matmuls overlapped with FSDP all-gathers)."""
        if self.flops is None:
            return None
        flops = max(self.flops, self.model_flops)
        return max(flops / self.chip.peak_bf16_flops, (self.bytes_accessed or 0) / self.chip.hbm_bytes_per_s)

    @property
    def mfu_ceiling(self) -> float | None:
        t = self.step_seconds_lower_bound
        return None if not t else self.model_flops / (t * self.chip.peak_bf16_flops)


# ---- tracing ------------------------------------------------------------------------------------


def _placeholder(shape, dtype) -> torch.Tensor:
    from torch_xla.core import xla_builder as xb

    return xb.create_placeholder_tensor(tuple(shape), dtype)


def _placeholder_model(cfg: DictConfig, tokenizer):
    """The configured model with every parameter a placeholder on the XLA device (built on the meta device:
    an 8B model's weights never exist here)."""
    from train.build import build_model

    with torch.device("meta"):
        model = build_model(cfg, tokenizer)
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            setattr(module, name, torch.nn.Parameter(_placeholder(param.shape, param.dtype),
                                                     requires_grad=param.requires_grad))
    return model


def _placeholder_optimizer(model, cfg: DictConfig):
    """The configured optimizer with its state created up front and every state tensor a placeholder."""
    from train.optim import build_optimizer, init_optimizer_state

    optimizer = build_optimizer(model, cfg)
    init_optimizer_state(optimizer)
    for state in optimizer.state.values():
        for key in _STATE_KEYS:
            if isinstance(state.get(key), torch.Tensor):
                state[key] = _placeholder(state[key].shape, state[key].dtype)
    return optimizer


def _synthetic_batch(cfg: DictConfig, rows: int) -> dict[str, np.ndarray]:
    """A batch of the configured shape: one example per row, its first half prompt in SFT."""
    length = int(cfg.data.block_size)
    src = np.zeros((rows, length), bool)
    if cfg.training_mode == "sft":
        src[:, : length // 2] = True
    return {"input_ids": np.zeros((rows, length), np.int32), "src_mask": src,
            "segment_ids": np.ones((rows, length), np.int32),
            "position_ids": np.tile(np.arange(length, dtype=np.int32), (rows, 1))}


@dataclasses.dataclass
class _Traced:
    hlo: bytes  # HloModuleProto
    arg_shardings: dict[int, str]  # entry argument -> HLO sharding of a parameter or state tensor
    aliases: dict[int, int]  # entry argument -> the output it is donated to
    num_outputs: int
    parameter_bytes: int
    state_bytes: int


def _trace(cfg: DictConfig, tokenizer, mesh, chip) -> _Traced:
    import torch_xla

    from train import runtime
    from train.trainer import diffusion_config, noise_generator, optimizer_step
    from model.diffusion import draw_noise

    xlac = torch_xla._XLAC
    model = _placeholder_model(cfg, tokenizer)
    optimizer = _placeholder_optimizer(model, cfg)
    params = list(model.parameters())
    names = {id(p): n for n, p in model.named_parameters()}
    states = [(i, key, optimizer.state[p][key]) for i, p in enumerate(params) for key in _STATE_KEYS
              if isinstance(optimizer.state.get(p, {}).get(key), torch.Tensor)]
    # Entry arguments are known by the id of the tensor holding their data, read just before the update: the
    # backward of a scan over layers moves parameters' data into new tensors (new ids), and the update
    # turns every parameter and state tensor into a computed value (no id at all).
    owner: dict[int, tuple] = {}

    def read_ids(*_):
        ids, _ = xlac._get_tensors_xla_device_data_node(params + [t for _, _, t in states])
        which = [("param", i) for i in range(len(params))] + [("state", i, n) for n, (i, _, _) in enumerate(states)]
        owner.update(zip(ids, which))

    optimizer.register_step_pre_hook(read_ids)

    accum = int(cfg.gradient_accumulation_steps)
    rows = int(cfg.global_batch_size) // accum
    diff_cfg = diffusion_config(cfg, tokenizer)
    t_all, u_all = draw_noise(rows * accum, int(cfg.data.block_size), noise_generator(cfg.seed, 0),
                              sampling_eps=diff_cfg.sampling_eps, antithetic=diff_cfg.antithetic)
    with ktpu.compile_for(chip):
        stats = optimizer_step(model, optimizer, [_synthetic_batch(cfg, rows) for _ in range(accum)],
                               t_all, u_all, diff_cfg, cfg, runtime.xla_device())
    # Outputs: the parameters and state tensors (updated in place), then the step's statistics.
    outputs = params + [t for _, _, t in states] + [stats["loss"], stats["grad_norm"]]
    ids, _ = xlac._get_tensors_xla_device_data_node(outputs)
    hlo = xlac._get_xla_tensors_hlo_proto(outputs)

    mesh_shape = dict(mesh.shape()) if mesh is not None else {}
    shardings, aliases = {}, {}
    from model.sharding import parameter_spec

    for arg, tid in enumerate(ids):
        if tid not in owner:
            continue  # batch, noise, scalars: torch_xla traced their shardings
        kind = owner[tid]
        param = params[kind[1]]
        if mesh is not None:
            shardings[arg] = hlo_sharding(parameter_spec(names[id(param)], param.shape, mesh_shape), mesh)
        aliases[arg] = kind[1] if kind[0] == "param" else len(params) + kind[2]
    if len(aliases) != len(params) + len(states):  # a parameter left unsharded would misstate the memory
        raise RuntimeError(f"compile_only: found {len(aliases)} of the {len(params) + len(states)} parameters and "
                           f"optimizer-state tensors among the traced step's inputs")
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    return _Traced(hlo=hlo, arg_shardings=shardings, aliases=aliases, num_outputs=len(outputs),
                   parameter_bytes=nbytes(params), state_bytes=nbytes([t for _, _, t in states]))


def hlo_sharding(spec: tuple, mesh) -> str:
    """The HLO sharding string of a partition spec over a torch_xla Mesh (what mark_sharding would attach):
    each tensor dimension tiled over the product of its mesh axes, the unused axes replicated."""
    names, shape = list(mesh.axis_names), list(mesh.mesh_shape)
    ids = np.asarray(mesh.device_ids).reshape(shape)
    used, tiles = [], []
    for entry in spec:
        axes = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
        used += [names.index(a) for a in axes]
        tiles.append(math.prod(shape[names.index(a)] for a in axes))
    if all(t == 1 for t in tiles):
        return "{replicated}"
    rest = [i for i in range(len(names)) if i not in used]
    replicas = math.prod(shape[i] for i in rest)
    order = ids.transpose(used + rest).reshape(-1)
    dims = tiles + ([replicas] if replicas > 1 else [])
    text = "{devices=[" + ",".join(map(str, dims)) + "]" + ",".join(map(str, order))
    return text + (" last_tile_dim_replicate}" if replicas > 1 else "}")


# ---- compiling ----------------------------------------------------------------------------------


def _stablehlo(traced: _Traced):
    """The traced HLO as a StableHLO module with the parameters' shardings and donations on its entry."""
    from jax._src.interpreters import mlir
    from jax._src.lib import _jax
    from jaxlib.mlir import ir

    context = mlir.make_ir_context()
    with context:
        module = ir.Module.parse(_jax.mlir.hlo_to_stablehlo(traced.hlo))
        main = next(op for op in module.body.operations
                    if ir.StringAttr(op.attributes["sym_name"]).value == "main")
        n_args = len(main.regions[0].blocks[0].arguments)
        old = list(main.attributes["arg_attrs"]) if "arg_attrs" in main.attributes else [None] * n_args
        i32 = ir.IntegerType.get_signless(32)
        args = []
        for i in range(n_args):
            attrs = {a.name: a.attr for a in ir.DictAttr(old[i])} if old[i] is not None else {}
            if i in traced.arg_shardings:
                attrs["mhlo.sharding"] = ir.StringAttr.get(traced.arg_shardings[i])
            if i in traced.aliases:
                attrs["tf.aliasing_output"] = ir.IntegerAttr.get(i32, traced.aliases[i])
            args.append(ir.DictAttr.get(attrs))
        main.attributes["arg_attrs"] = ir.ArrayAttr.get(args)
        donated_to = {out: arg for arg, out in traced.aliases.items()}
        results = []
        for j in range(traced.num_outputs):  # an updated tensor keeps the layout of the one it replaces
            arg = donated_to.get(j)
            attrs = {}
            if arg is not None and arg in traced.arg_shardings:
                attrs["mhlo.sharding"] = ir.StringAttr.get(traced.arg_shardings[arg])
            results.append(ir.DictAttr.get(attrs))
        main.attributes["res_attrs"] = ir.ArrayAttr.get(results)
    return module


def _compile(module, topo, chips: int):
    from jax._src import compiler
    from jax._src.lib import _jax

    devices = list(topo.devices)[:chips]
    options = compiler.get_compile_options(num_replicas=1, num_partitions=chips,
                                           device_assignment=np.array(devices).reshape(1, chips),
                                           use_spmd_partitioning=chips > 1)
    return compiler.backend_compile(devices[0].client, module, _jax.DeviceList(tuple(devices)), options)


# libtpu's two ways of saying a program does not fit HBM: in all, or one buffer alone.
_OOM = re.compile(r"Ran out of memory in memory space hbm\. Used ([\d.]+)([KMGT]?) of")
_OOM_ONE = re.compile(r"Allocation \(size=(\d+)\) would exceed memory \(size=\d+\) :: #\w+ \[(shape = '[^']*')"
                      r"(?:.*?(tag = '[^']*'))?")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _hbm_overflow(message: str) -> tuple[int, str] | None:
    """(bytes needed at least, the compiler's report) when `message` is libtpu's HBM overflow."""
    match = _OOM.search(message)
    if match:
        return int(float(match.group(1)) * _UNITS[match.group(2)]), _oom_summary(message)
    match = _OOM_ONE.search(message)
    if match:
        what = ", ".join(part for part in match.group(2, 3) if part)
        return int(match.group(1)), f"one buffer alone exceeds the chip's HBM: {what}"
    return None


def _cost(executable) -> tuple[float, float]:
    cost = executable.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


def _compile_once(cfg: DictConfig, tokenizer, mesh, topo, chip, chips: int, result: StepCompile | None):
    """Trace and compile; fill `result`'s memory figures (None: only the cost is wanted). Returns the
    executable, or None when it does not fit (the report goes into result.oom)."""
    start = time.perf_counter()
    traced = _trace(cfg, tokenizer, mesh, chip)
    module = _stablehlo(traced)
    traced_at = time.perf_counter()
    try:
        executable = _compile(module, topo, chips)
    except Exception as err:  # libtpu raises XlaRuntimeError; anything but an HBM overflow is a real error
        overflow = _hbm_overflow(str(err))
        if result is None or overflow is None:
            raise
        result.fits = False
        result.hbm_per_chip, result.oom = overflow
        executable = None
    if result is not None:
        result.trace_seconds = traced_at - start
        result.compile_seconds = time.perf_counter() - traced_at
        result.parameters = traced.parameter_bytes // chips  # an estimate when a dimension is not split
        result.optimizer_state = traced.state_bytes // chips
        if executable is not None:
            stats = executable.get_compiled_memory_stats()
            result.arguments = stats.argument_size_in_bytes
            result.temporaries = stats.temp_size_in_bytes
            result.outputs = stats.output_size_in_bytes - stats.alias_size_in_bytes
            result.code = stats.generated_code_size_in_bytes
            result.hbm_per_chip = result.arguments + result.temporaries + result.outputs + result.code
            result.fits = result.hbm_per_chip <= chip.hbm_bytes
    return executable


def _oom_summary(message: str, allocations: int = 8) -> str:
    """The compiler's out-of-memory report: its totals and its `allocations` largest allocations."""
    keep, seen = [], 0
    for line in (ln.strip() for ln in message.splitlines()):
        if re.match(r"^\d+\. Size:", line):
            seen += 1
            if seen > allocations:
                break
        if line.startswith(("Ran out of memory", "Total hbm usage", "Program hbm requirement", "HLO temp",
                            "Largest program allocations", "Operator:", "Shape:", "XLA label:")) \
                or re.match(r"^\d+\. Size:", line):
            keep.append(line)
    return "\n".join(keep) if keep else message[:4000]


def compile_step(cfg: DictConfig, topology: str, *, count_flops: bool = True, log=print) -> StepCompile:
    """Compile the step `cfg` trains with for `topology` (e.g. 'v5e:2x4'); see the module docstring. The
    process must have been started with the topology's chip count of virtual CPU devices
    (train.run does this for compile_only=)."""
    from train import runtime, sharding
    from train.config import check_batch_and_mesh
    from train.build import build_tokenizer, resolve_hf_init

    chip, grid = ktpu.parse_topology(topology)
    chips = ktpu.topology_chips(grid)
    if mesh_size(cfg, "dcn_mesh") != 1:
        raise ConfigError("compile_only: compiles one slice; set dcn_mesh.* to 1 (the data-centre-network axes "
                          "add one gradient all-reduce per step and no memory)")
    if runtime.device_count() != chips:
        raise ConfigError(f"compile_only={topology}: this process has {runtime.device_count()} XLA device(s); the "
                          f"trace needs one per chip ({chips}): start it through python -m train.run")
    check_batch_and_mesh(cfg, chips)
    mesh = sharding.setup_mesh(cfg)
    resolve_hf_init(cfg, log)  # an init_from directory decides the architecture; its weights are not read
    tokenizer = build_tokenizer(cfg)
    try:
        topo = ktpu.topology(topology)
    except ValueError as err:
        raise ConfigError(f"compile_only: {err}") from None
    result = StepCompile(topology=f"{chip.name}:{grid}", chip=chip, chips=chips, fits=True, hbm_per_chip=0)
    log(f"compile_only: tracing the train step for {chips} x TPU {chip.name} ...")
    executable = _compile_once(cfg, tokenizer, mesh, topo, chip, chips, result)
    result.model_flops = model_flops(cfg, tokenizer) / chips
    if executable is not None and count_flops:
        result.flops, result.bytes_accessed = _per_layer_cost(cfg, tokenizer, mesh, topo, chip, chips, executable, log)
    return result


def _per_layer_cost(cfg, tokenizer, mesh, topo, chip, chips, executable, log) -> tuple[float, float]:
    """Compiled FLOPs and bytes per chip with every layer counted: as compiled when the layers are unrolled;
    with scan_layers (XLA counts a loop body once) from the same step unrolled at one and two layers."""
    from train.build import model_config

    flops, nbytes = _cost(executable)
    if cfg.model.get("remat", {}).get("scan_layers") is None:
        return flops, nbytes
    config = model_config(cfg, tokenizer)
    layers = config.num_hidden_layers
    log(f"compile_only: counting FLOPs per layer (the step unrolled at 1 and 2 of {layers} layers) ...")
    costs = []
    for n in (1, 2):
        small = cfg.copy()
        with open_dict(small):
            small.model.remat.scan_layers = None
            small.model.architecture = dataclasses.asdict(dataclasses.replace(config, num_hidden_layers=n))
        costs.append(_cost(_compile_once(small, tokenizer, mesh, topo, chip, chips, None)))
    (f1, b1), (f2, b2) = costs
    return f1 + (layers - 1) * (f2 - f1), b1 + (layers - 1) * (b2 - b1)


def model_flops(cfg: DictConfig, tokenizer) -> float:
    """Model FLOPs of one step (all chips): 6 x matmul parameters x tokens (the decoder's weights and the LM
    head; the embedding lookup is no matmul) plus attention's 12 x layers x query width x sequence length
    per token (bidirectional: every pair of the row)."""
    from train.build import model_config

    c = model_config(cfg, tokenizer)
    tokens = int(cfg.global_batch_size) * int(cfg.data.block_size)
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    layer = c.hidden_size * (2 * q + 2 * kv) + 3 * c.hidden_size * c.intermediate_size
    matmul_params = c.num_hidden_layers * layer + c.vocab_size * c.hidden_size
    attention = 12 * c.num_hidden_layers * q * int(cfg.data.block_size)
    return float(tokens * (6 * matmul_params + attention))


def _size(nbytes: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes / 1024:.0f} KiB"


def format_report(r: StepCompile) -> str:
    gib = _size
    head = (f"compile_only {r.topology}: {'fits' if r.fits else 'does NOT fit'}: {gib(r.hbm_per_chip)} of "
            f"{gib(r.chip.hbm_bytes)} HBM per chip ({r.headroom:+.0%} headroom); traced in {r.trace_seconds:.0f} s, "
            f"compiled in {r.compile_seconds:.0f} s")
    lines = [head]
    if r.arguments:
        lines.append(f"  arguments {gib(r.arguments)} (parameters ~{gib(r.parameters)}, optimizer state "
                     f"~{gib(r.optimizer_state)}), temporaries {gib(r.temporaries)}, outputs {gib(r.outputs)}, "
                     f"code {gib(r.code)}")
    if r.oom:
        lines.append("  what uses the memory (the compiler's report):")
        lines += ["    " + ln for ln in r.oom.splitlines()]
    if not r.fits:
        lines.append("  levers: more chips (ici_mesh.fsdp), fewer rows per chip (global_batch_size or "
                     "gradient_accumulation_steps), model.remat.activation_checkpoint_layers=[Qwen3DecoderLayer], "
                     "a shorter data.block_size")
    if r.flops is not None:
        t = r.step_seconds_lower_bound
        lines.append(f"  per chip and step: compiled {r.flops / 1e12:.2f} TFLOP ({r.flops / r.model_flops:.2f}x the "
                     f"model's {r.model_flops / 1e12:.2f}), {r.bytes_accessed / 1e9:.1f} GB of HBM traffic; roofline "
                     f"step >= {t * 1e3:.0f} ms, MFU <= {r.mfu_ceiling:.0%} at {r.chip.peak_bf16_flops / 1e12:.0f} "
                     f"TFLOP/s and {r.chip.hbm_bytes_per_s / 1e12:.2f} TB/s")
    return "\n".join(lines)
