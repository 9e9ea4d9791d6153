"""What the distributed tests run on each gloo rank (see :mod:`ranks`), and the plain
single-process twins they are compared with.

Gradients are set directly, the same whole tensors on every run (a reduce-scatter sums
in another order than one rank does), each rank taking its shard.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import adamkit

#: The FSDP2 test model's parameters: even shards (8 rows on 2 ranks), uneven ones (3 | 2
#: rows), a rank with an empty shard, a convolution weight (rows of 64·2·2 = 256
#: elements), rows that are not whole quantization blocks (600 columns: a flat block
#: would straddle two shards), a 1-D parameter (its only dimension sharded), a small one.
SHAPES = {
    "even": (8, 512),
    "uneven": (5, 1024),
    "lonely": (1, 2048),
    "conv": (6, 64, 2, 2),
    "straddle": (3, 600),
    "bias": (4096,),
    "tiny": (3,),
}
#: Which of them get quantized state under sharding (rows of whole blocks, not sharded along).
ROW_BLOCKED = ("even", "uneven", "lonely", "conv")
MIN_QUANT = 1024
STEPS = 6
#: (class, keyword arguments) of the parity runs.
CONFIGS = {
    "adamw32": ("AdamW", dict(lr=1e-2, weight_decay=0.1)),
    "adamw16": ("AdamW", dict(lr=1e-2, weight_decay=0.1, state_bits=16)),
    "adamw8": ("AdamW", dict(lr=1e-2, weight_decay=0.1, state_bits=8)),
    "adamw4": ("AdamW", dict(lr=1e-2, weight_decay=0.1, state_bits=4)),
    "adam8-amsgrad": ("Adam", dict(lr=1e-2, weight_decay=0.01, amsgrad=True, state_bits=8)),
    "nadam4": ("NAdam", dict(lr=1e-2, state_bits=4)),
    "adamax8": ("Adamax", dict(lr=1e-2, state_bits=8, maximize=True)),
    "adamw32-reference": ("AdamW", dict(lr=1e-2, weight_decay=0.1, fused=False)),
}


def make_module(seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    module = nn.Module()
    for name, shape in SHAPES.items():
        module.register_parameter(name, nn.Parameter(torch.randn(shape, generator=gen)))
    return module


def full_grad(name: str, step: int, bad: bool | str = False) -> torch.Tensor:
    """The whole gradient of parameter ``name`` at ``step`` (``bad``: step 4 of the
    "uneven" parameter holds an inf on rank 1's rows, and unless ``bad == "rank1"`` the
    "even" one a NaN on rank 0's)."""
    gen = torch.Generator().manual_seed(1000 * step + sum(map(ord, name)))
    g = torch.randn(SHAPES[name], generator=gen) * (0.1 if name == "bias" else 1.0)
    if bad and step == 4 and name == "uneven":
        g[4, 7] = float("inf")
    if bad and bad != "rank1" and step == 4 and name == "even":
        g[0, 0] = float("nan")
    return g


def set_grads(module: nn.Module, step: int, bad: bool | str = False) -> None:
    from torch.distributed.tensor import DTensor, distribute_tensor

    for name, p in module.named_parameters():
        g = full_grad(name, step, bad)
        if isinstance(p, DTensor):  # this rank's shard, cut locally
            g = distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None)
        p.grad = g


def full(t: Any) -> Any:
    """A tensor (a DTensor gathered) on the CPU; anything else as it is."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        return t.full_tensor().cpu()
    return t.detach().cpu().clone() if isinstance(t, torch.Tensor) else t


def snapshot(module: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Every parameter and state entry, whole, by parameter name; the state's kinds."""
    out: dict[str, Any] = {"params": {}, "state": {}, "kinds": {}}
    for name, p in module.named_parameters():
        out["params"][name] = full(p)
        st = opt.state.get(p, {})
        out["state"][name] = {k: full(v) for k, v in st.items()}
        out["kinds"][name] = {k: type(v).__name__ for k, v in st.items()}
    out["nonfinite_count"] = getattr(opt, "nonfinite_count", 0)
    out["skipped_steps"] = getattr(opt, "skipped_steps", 0)
    return out


def build(config: str, params: Any) -> torch.optim.Optimizer:
    cls, kwargs = CONFIGS[config]
    kwargs = dict(kwargs)
    if kwargs.get("state_bits", 32) in (8, 4):
        kwargs["min_quant_size"] = MIN_QUANT
    return getattr(adamkit, cls)(params, **kwargs)


def sharded_module(seed: int = 0, **kwargs: Any) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    module = make_module(seed)
    fully_shard(module, **kwargs)
    return module


# ------------------------------------------------------------------ rank functions
def fsdp_parity(rank: int, world: int, configs: list[str], bad: bool, hsdp: bool = False) -> dict[str, Any]:
    """Each config trained STEPS steps on the FSDP2-sharded module (``hsdp``: on a
    (2, world / 2) mesh, replicated along its first dimension): whole parameters and state."""
    kwargs: dict[str, Any] = {}
    if hsdp:
        from torch.distributed.device_mesh import init_device_mesh

        kwargs["mesh"] = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    out = {}
    for config in configs:
        module = sharded_module(**kwargs)
        opt = build(config, module.parameters())
        for step in range(1, STEPS + 1):
            set_grads(module, step, bad)
            opt.step()
        out[config] = snapshot(module, opt)
    return out


def plain_parity(config: str, bad: bool) -> dict[str, Any]:
    """The single-process twin of :func:`fsdp_parity`: plain tensors, the parameters
    whose sharded state is 32-bit given 32-bit state here too."""
    module = make_module()
    cls, kwargs = CONFIGS[config]
    quantized = kwargs.get("state_bits", 32) in (8, 4)
    named = dict(module.named_parameters())
    groups = [{"params": [named[n] for n in ROW_BLOCKED]}]
    others = [p for n, p in named.items() if n not in ROW_BLOCKED]
    groups.append({"params": others, **({"state_bits": 32} if quantized else {})})
    opt = build(config, groups)
    for step in range(1, STEPS + 1):
        set_grads(module, step, bad)
        opt.step()
    return snapshot(module, opt)


def fsdp_global(rank: int, world: int) -> dict[str, Any]:
    """Options global by nature: skip/raise decided on all ranks, percentile clipping on
    global norms, clip_grad_norm_ before the step, GlobalOptimManager across fully_shard."""
    out: dict[str, Any] = {}
    module = sharded_module()
    opt = adamkit.AdamW(module.parameters(), lr=1e-2, nonfinite="skip")
    for step in range(1, STEPS + 1):
        set_grads(module, step, bad="rank1")
        before = {n: full(p) for n, p in module.named_parameters()}
        opt.step()
        if step == 4:
            out["unchanged_by_skip"] = all(torch.equal(before[n], full(p)) for n, p in module.named_parameters())
    out["skip"] = snapshot(module, opt)

    module = sharded_module()
    opt = adamkit.AdamW(module.parameters(), lr=1e-2, nonfinite="raise")
    set_grads(module, 4, bad="rank1")
    try:
        opt.step()
        out["raised"] = None
    except FloatingPointError as err:
        out["raised"] = str(err)
    out["raise"] = snapshot(module, opt)

    module = sharded_module()
    opt = adamkit.AdamW(module.parameters(), lr=1e-2, state_bits=8, min_quant_size=MIN_QUANT, percentile_clipping=50)
    for step in range(1, STEPS + 1):
        set_grads(module, step)
        if step == 5:  # a spike for the clipping to cut
            for p in module.parameters():
                p.grad.mul_(100.0)
        opt.step()
    out["percentile"] = snapshot(module, opt)

    module = sharded_module()
    opt = adamkit.AdamW(module.parameters(), lr=1e-2)
    norms = []
    for step in range(1, STEPS + 1):
        set_grads(module, step)
        norms.append(float(full(nn.utils.clip_grad_norm_(module.parameters(), 5.0))))
        opt.step()
    out["clip"] = snapshot(module, opt)
    out["clip_norms"] = norms

    mng = adamkit.GlobalOptimManager.get_instance()
    mng.initialize()
    module = make_module()
    mng.register_parameters(module.parameters())
    mng.override_config(module.even, "optim_bits", 32)
    mng.register_module_override(module, "uneven", {"optim_bits": 32})
    from torch.distributed.fsdp import fully_shard

    fully_shard(module)  # new DTensor parameters: overrides by position and by module
    opt = adamkit.AdamW8bit(module.parameters(), min_8bit_size=MIN_QUANT)
    set_grads(module, 1)
    opt.step()
    out["manager"] = snapshot(module, opt)["kinds"]
    mng.initialize()
    return out


def plain_global(kind: str) -> dict[str, Any]:
    """The single-process twins of :func:`fsdp_global`'s percentile and clip runs."""
    module = make_module()
    named = dict(module.named_parameters())
    if kind == "percentile":
        groups = [{"params": [named[n] for n in ROW_BLOCKED]}]
        groups.append({"params": [p for n, p in named.items() if n not in ROW_BLOCKED], "state_bits": 32})
        opt = adamkit.AdamW(groups, lr=1e-2, state_bits=8, min_quant_size=MIN_QUANT, percentile_clipping=50)
    else:
        opt = adamkit.AdamW(module.parameters(), lr=1e-2)
    norms = []
    for step in range(1, STEPS + 1):
        set_grads(module, step)
        if kind == "percentile" and step == 5:
            for p in module.parameters():
                p.grad.mul_(100.0)
        if kind == "clip":
            norms.append(float(nn.utils.clip_grad_norm_(module.parameters(), 5.0)))
        opt.step()
    return {**snapshot(module, opt), "norms": norms}


# ------------------------------------------------------------------ checkpoints
def _dcp_state(module: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(module), "optim": get_optimizer_state_dict(module, opt)}


def _dcp_set(module: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(module, state["model"])
    set_optimizer_state_dict(module, opt, state["optim"])


def _maker(config: str) -> Any:
    """(module, optimizer) for a checkpoint config: an adamkit CONFIGS name, possibly with
    "+tensor-lr", or "torch" (torch.optim.AdamW, for checkpoints crossing over)."""
    name, _, extra = config.partition("+")
    module = sharded_module()
    if name == "torch":
        return module, torch.optim.AdamW(module.parameters(), lr=1e-2, weight_decay=0.1)
    opt = build(name, module.parameters())
    if extra == "tensor-lr":
        for group in opt.param_groups:
            group["lr"] = torch.tensor(group["lr"])
    return module, opt


def dcp_save(rank: int, world: int, config: str, path: str, half: int = 3) -> dict[str, Any]:
    """Train ``half`` steps, save with torch.distributed.checkpoint, train on to STEPS."""
    import torch.distributed.checkpoint as dcp

    module, opt = _maker(config)
    for step in range(1, half + 1):
        set_grads(module, step)
        opt.step()
    dcp.save(_dcp_state(module, opt), checkpoint_id=path)
    for step in range(half + 1, STEPS + 1):
        set_grads(module, step)
        opt.step()
    return snapshot(module, opt)


def dcp_load(rank: int, world: int, config: str, path: str, half: int = 3, partial: bool = False) -> dict[str, Any]:
    """A fresh module and optimizer (no state: DCP's zero-lr step makes it) loaded from
    ``path``, trained from step ``half + 1`` to STEPS. ``partial``: a checkpoint lacking
    some of the optimizer's group keys (torch.optim's, read by adamkit) loads with DCP's
    ``allow_partial_load``; those keys keep the optimizer's values."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    module, opt = _maker(config)
    state = _dcp_state(module, opt)
    dcp.load(state, checkpoint_id=path, planner=DefaultLoadPlanner(allow_partial_load=partial))
    _dcp_set(module, opt, state)
    loaded = snapshot(module, opt)
    for step in range(half + 1, STEPS + 1):
        set_grads(module, step)
        opt.step()
    return {**snapshot(module, opt), "loaded": loaded}


def full_save(rank: int, world: int, config: str, half: int = 3) -> dict[str, Any]:
    """``half`` steps sharded, then the optimizer's whole state as plain tensors
    (``full_state_dict=True``), keyed as a single-process optimizer's ``state_dict``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    module, opt = _maker(config)
    for step in range(1, half + 1):
        set_grads(module, step)
        opt.step()
    osd = get_optimizer_state_dict(module, opt, options=StateDictOptions(full_state_dict=True))
    names = [n for n, _ in module.named_parameters()]
    state = {names.index(fqn): dict(st) for fqn, st in osd["state"].items()}
    groups = [{**g, "params": [names.index(fqn) for fqn in g["params"]]} for g in osd["param_groups"]]
    return {
        "sd": {"state": state, "param_groups": groups},
        "params": {n: full(p) for n, p in module.named_parameters()},
    }


def _set_params(module: nn.Module, params: dict[str, torch.Tensor]) -> None:
    """Whole parameter values copied into ``module``'s (a DTensor's shard from its part)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        for name, p in module.named_parameters():
            value = params[name]
            if isinstance(p, DTensor):
                value = distribute_tensor(value, p.device_mesh, p.placements, src_data_rank=None).to_local()
                p = p.to_local()
            p.copy_(value)


def full_load(
    rank: int, world: int, config: str, sd: dict[str, Any], params: dict[str, torch.Tensor], half: int = 3
) -> dict[str, Any]:
    """A single-process run's parameters and optimizer ``state_dict`` (plain, whole
    tensors) loaded into the sharded module and optimizer (``load_state_dict``), trained
    on to STEPS."""
    module, opt = _maker(config)
    _set_params(module, params)
    opt.load_state_dict(sd)
    for step in range(half + 1, STEPS + 1):
        set_grads(module, step)
        opt.step()
    return snapshot(module, opt)


def plain_run(
    config: str,
    first: int = 1,
    last: int = STEPS,
    sd: dict[str, Any] | None = None,
    params: dict[str, torch.Tensor] | None = None,
) -> Any:
    """A single-process optimizer of ``config`` (one group: the "straddle" and "bias"
    parameters get quantized state here, 32-bit state when sharded) run from step
    ``first`` to ``last`` after loading ``params`` and ``sd``: (snapshot, state_dict)."""
    module = make_module()
    if params is not None:
        _set_params(module, params)
    name, _, extra = config.partition("+")
    opt = build(name, module.parameters())
    if extra == "tensor-lr":
        for group in opt.param_groups:
            group["lr"] = torch.tensor(group["lr"])
    if sd is not None:
        opt.load_state_dict(sd)
    for step in range(first, last + 1):
        set_grads(module, step)
        opt.step()
    return snapshot(module, opt), opt.state_dict()


def rewritten_groups(rank: int, world: int) -> dict[str, Any]:
    """An optimizer made on a module's plain parameters whose ``param_groups`` are then
    rewritten in place with the DTensors ``fully_shard`` made (as Accelerate's FSDP2
    path does): it steps them, at 8 bits, as one made on the DTensors."""
    from torch.distributed.fsdp import fully_shard

    module = make_module()
    opt = build("adamw8", module.parameters())
    fully_shard(module)
    opt.param_groups[0]["params"] = list(module.parameters())
    for step in range(1, STEPS + 1):
        set_grads(module, step)
        opt.step()
    return snapshot(module, opt)


# ------------------------------------------------------------------ without DTensor
def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 256), nn.Tanh(), nn.Linear(256, 16))  # 8192 weights: 8-bit state


def _batch(rank: int, step: int) -> torch.Tensor:
    return torch.randn(4, 32, generator=torch.Generator().manual_seed(100 * step + rank))


def ddp_family(rank: int, world: int, path: str) -> dict[str, Any]:
    """DDP with adamkit at 8 bits; ZeroRedundancyOptimizer over adamkit.AdamW at 32 and 8
    bits (consolidated on rank 0); DCP of DDP's plain tensors saved and loaded back."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    out: dict[str, Any] = {}
    for kind in ("ddp", "zero32", "zero8"):
        model = DDP(_mlp())
        if kind == "ddp":
            opt = adamkit.AdamW(model.parameters(), lr=1e-2, state_bits=8)
        else:
            bits = 32 if kind == "zero32" else 8
            opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=adamkit.AdamW, lr=1e-2, state_bits=bits)
        for step in range(1, 5):
            model(_batch(rank, step)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        out[kind] = [p.detach().clone() for p in model.parameters()]
        if kind != "ddp":
            opt.consolidate_state_dict(to=0)
            if rank == 0:
                sd = opt.state_dict()
                out[kind + "_state_keys"] = sorted({k for st in sd["state"].values() for k in st})
        else:
            from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

            dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=path)
            fresh = adamkit.AdamW(model.parameters(), lr=1e-2, state_bits=8)
            target = {"optim": get_optimizer_state_dict(model, fresh)}  # DCP's zero-lr step makes the state
            dcp.load(target, checkpoint_id=path)
            set_optimizer_state_dict(model, fresh, target["optim"])
            saved, loaded = opt.state_dict()["state"], fresh.state_dict()["state"]
            out["dcp_equal"] = saved.keys() == loaded.keys() and all(
                torch.equal(_tensor_of(v), _tensor_of(loaded[i][k])) for i, st in saved.items() for k, v in st.items()
            )
    return out


def _tensor_of(v: Any) -> torch.Tensor:
    return v if isinstance(v, torch.Tensor) else torch.tensor(float(v))


def ddp_twin(world: int) -> list[torch.Tensor]:
    """One process stepping the mean of the ranks' gradients (what DDP all-reduces)."""
    model = _mlp()
    opt = adamkit.AdamW(model.parameters(), lr=1e-2, state_bits=8)
    for step in range(1, 5):
        loss = sum(model(_batch(r, step)).pow(2).mean() for r in range(world)) / world
        loss.backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


#: Tensor-parallel placements of the "even", "uneven" and "lonely" parameters.
TP_PLACEMENTS = {"even": "Shard(1)", "uneven": "Replicate()", "lonely": "Shard(0)"}


def tensor_parallel(rank: int, world: int, configs: list[str]) -> dict[str, Any]:
    """Parameters distributed by hand (Shard(1), Replicate, Shard(0)), no FSDP."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    kinds = {"Shard(1)": Shard(1), "Replicate()": Replicate(), "Shard(0)": Shard(0)}
    out = {}
    for config in configs:
        module = make_module()
        for name, placement in TP_PLACEMENTS.items():
            p = getattr(module, name)
            setattr(module, name, nn.Parameter(distribute_tensor(p.detach(), mesh, [kinds[placement]])))
        opt = build(config, [getattr(module, n) for n in TP_PLACEMENTS])
        for step in range(1, STEPS + 1):
            for name in TP_PLACEMENTS:
                p = getattr(module, name)
                p.grad = distribute_tensor(full_grad(name, step, True), mesh, p.placements, src_data_rank=None)
            opt.step()
        snap = snapshot(module, opt)
        out[config] = {k: {n: v[n] for n in TP_PLACEMENTS} if isinstance(v, dict) else v for k, v in snap.items()}
    return out


def fsdp_training(rank: int, world: int, variant: str) -> dict[str, Any]:
    """A real forward/backward under FSDP2 (``variant``: "reshard", "keep" for
    reshard_after_forward=False, "mixed" for bf16 compute over fp32 sharded
    parameters, "offload" for CPUOffloadPolicy), 8-bit AdamW; the batch split over ranks."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    model = _mlp()
    kwargs: dict[str, Any] = {"reshard_after_forward": variant != "keep"}
    if variant == "mixed":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if variant == "offload":
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=False)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    opt = adamkit.AdamW(model.parameters(), lr=1e-2, state_bits=8)
    for step in range(1, 5):
        batch = torch.cat([_batch(r, step) for r in range(2)])  # the same 8 samples on any world size
        part = batch.chunk(world)[rank]
        (model(part).float().pow(2).mean() / world).backward()  # FSDP2 averages over ranks: mean of means
        opt.step()
        opt.zero_grad()
    return {"params": [full(p) for p in model.parameters()], "dtypes": [p.dtype for p in model.parameters()]}


def hostile_sharded(rank: int, world: int) -> dict[str, Any]:
    """What a hostile user can do to DTensor parameters and their state: each case's
    error message (None: no error), and whether the parameters stayed unchanged."""
    from torch.distributed.tensor import DTensor, Replicate

    out: dict[str, Any] = {}

    def attempt(case: str, module: nn.Module, action: Any) -> None:
        before = [full(p) for p in module.parameters()]
        try:
            action()
            out[case] = None
        except (RuntimeError, ValueError) as err:
            out[case] = f"{type(err).__name__}: {err}"
        out[case + ":unchanged"] = all(torch.equal(a, full(p)) for a, p in zip(before, module.parameters()))

    def trained(bits: int = 8) -> tuple[nn.Module, torch.optim.Optimizer]:
        module = sharded_module()
        opt = adamkit.AdamW(module.parameters(), lr=1e-2, state_bits=bits, min_quant_size=MIN_QUANT)
        set_grads(module, 1)
        opt.step()
        set_grads(module, 2)
        return module, opt

    module, opt = trained(32)
    opt.state[module.even]["exp_avg"] = full(opt.state[module.even]["exp_avg"])  # swapped for a plain tensor
    attempt("plain state", module, opt.step)

    module, opt = trained(8)
    st = opt.state[module.even]
    st["exp_avg_codes"] = st["exp_avg_codes"].redistribute(placements=[Replicate()])
    attempt("other placements", module, opt.step)

    module, opt = trained(32)
    st = opt.state[module.uneven]
    small = torch.zeros(1, 1024)  # a local shard that lies about its size
    st["exp_avg"] = DTensor.from_local(small, module.uneven.device_mesh, module.uneven.placements, run_check=False,
                                       shape=module.uneven.shape, stride=module.uneven.stride())  # fmt: skip
    attempt("lying shard", module, opt.step)

    module, opt = trained(32)
    module.even.grad = full(module.even.grad)
    attempt("plain gradient", module, opt.step)

    module, opt = trained(8)
    plain = adamkit.AdamW(make_module().parameters(), lr=1e-2, state_bits=8, min_quant_size=MIN_QUANT)
    attempt("dtensor state for a plain parameter", module, lambda: plain.load_state_dict(opt.state_dict()))

    module, opt = trained(32)
    sd = opt.state_dict()
    sd["state"] = {k: {n: full(t) for n, t in v.items()} for k, v in sd["state"].items()}  # whole, plain
    sd["state"][0]["exp_avg"] = sd["state"][0]["exp_avg"][:1]
    fresh = adamkit.AdamW(module.parameters(), lr=1e-2)
    attempt("whole state of the wrong size", module, lambda: fresh.load_state_dict(sd))
    out["fresh untouched"] = not fresh.state
    return out


def empty_shards(rank: int, world: int) -> dict[str, Any]:
    """One (1, 2048) parameter: rank 1's shard is empty; a NaN in rank 0's, mask mode."""
    from torch.distributed.fsdp import fully_shard

    module = nn.Module()
    module.register_parameter("w", nn.Parameter(torch.randn(1, 2048, generator=torch.Generator().manual_seed(0))))
    fully_shard(module)
    opt = adamkit.AdamW(module.parameters(), lr=1e-2, state_bits=8, min_quant_size=MIN_QUANT)
    for step in range(1, 4):
        from torch.distributed.tensor import distribute_tensor

        g = torch.randn(1, 2048, generator=torch.Generator().manual_seed(step))
        g[0, 5] = float("nan") if step == 2 else g[0, 5]
        module.w.grad = distribute_tensor(g, module.w.device_mesh, module.w.placements, src_data_rank=None)
        opt.step()
    return {"nonfinite_count": opt.nonfinite_count}


def sr_replicas(rank: int, world: int) -> dict[str, Any]:
    """A replicated bf16 parameter, stochastic rounding, each rank seeded differently:
    the replicas must still round alike (the step's seed is agreed over the mesh)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    full_p = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)).bfloat16()
    p = nn.Parameter(distribute_tensor(full_p.clone(), mesh, [Replicate()]))  # (its local tensor may be the input)
    opt = adamkit.AdamW([p], lr=1e-3, stochastic_rounding=True)
    torch.manual_seed(1234 + rank)  # the ranks' generators differ
    for step in range(1, 4):
        g = torch.randn(64, 256, generator=torch.Generator().manual_seed(step)).bfloat16()
        p.grad = distribute_tensor(g, mesh, [Replicate()], src_data_rank=None)
        opt.step()
    return {"local": p.to_local().detach().clone(), "changed": not torch.equal(p.to_local(), full_p)}
