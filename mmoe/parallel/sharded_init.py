"""Sharded initialisation (`model.parallel.sharded_init`): no rank ever holds the whole model.

    rec = record_build(lambda: MMoEVLM(cfg))     # built on the meta device; every aten op of the build recorded
    enable_expert_parallel(rec.model, ep); apply_fsdp_ep(rec.model, mesh)   # shard the meta model
    materialize_sharded(rec.model, rec, device)  # to_empty, then each rank fills only its own shards

The values equal the ordinary build's (`torch.manual_seed(s); MMoEVLM(cfg)`) exactly: the build's op sequence
(every random draw, fill and in-place update, in order) is replayed on the CPU from the generator state the
build started with, so the random stream is consumed exactly as the ordinary build consumes it. A liveness
pass over the recorded ops keeps the replay small: a tensor's value is computed only while it is still read
or is a parameter's final value, superseded initialisations (nn.Linear's default init before the model's own)
only draw their random numbers into a scratch tensor, and a parameter's final value is sliced into this rank's
shard and freed as soon as it is complete. So a rank holds its shards plus, transiently, about one full tensor
(the largest parameter) - never the model. The cost is the random generation of the whole model on every
rank's CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

# in-place ops whose result does not depend on the tensor's previous values (reads: only their other inputs)
_OVERWRITE = {"normal_", "uniform_", "zero_", "fill_", "random_", "exponential_", "log_normal_", "cauchy_",
              "geometric_", "bernoulli_", "copy_"}


@dataclass(frozen=True)
class _Ref:
    """A tensor of the recorded build: its storage, view geometry and dtype."""

    key: int
    size: tuple
    stride: tuple
    offset: int
    dtype: torch.dtype
    nelem: int  # elements in the whole storage

    @property
    def covers_storage(self) -> bool:
        n = 1
        for s in self.size:
            n *= s
        return self.offset == 0 and n == self.nelem and _is_dense(self.size, self.stride)


def _is_dense(size, stride) -> bool:
    """Non-overlapping and dense (any dim order)."""
    expected = 1
    for s, st in sorted(zip(size, stride), key=lambda x: x[1]):
        if s == 1:
            continue
        if st != expected:
            return False
        expected *= s
    return True


@dataclass
class _Event:
    func: Any = None
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    outputs: list = field(default_factory=list)  # _Ref or None per flattened output
    rng: bool = False
    reads: frozenset = frozenset()
    writes: frozenset = frozenset()
    full: frozenset = frozenset()  # storages this event overwrites entirely (previous value dead)
    extract: int | None = None  # pseudo-event: a final value (param / buffer storage) is complete
    needed: bool = False
    free_after: tuple = ()


@dataclass
class BuildRecord:
    """A meta-device model and the recorded ops that initialise it (see the module docstring)."""

    model: nn.Module
    events: list[_Event]
    finals: dict[int, list[tuple[str, _Ref]]]  # storage key -> (state name, tensor view) of params / buffers
    rng_state: Tensor
    constants: dict[int, Tensor] = field(default_factory=dict)
    stats: dict = field(default_factory=dict)


def _ref(t: Tensor) -> _Ref:
    st = t.untyped_storage()
    return _Ref(st._cdata, tuple(t.shape), tuple(t.stride()), t.storage_offset(), t.dtype,
                st.nbytes() // max(t.element_size(), 1))


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.events: list[_Event] = []
        self.known: set[int] = set()
        self.keep: list[Tensor] = []  # keeps every storage alive so no storage address is reused
        self.constants: dict[int, Tensor] = {}  # real (non-meta) tensors made before the build and read by it

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self._record(func, args, kwargs, out)
        return out

    def _record(self, func, args, kwargs, out) -> None:
        written: set[int] = set()
        self_key, self_ref = None, None
        schema = func._schema
        for i, a in enumerate(schema.arguments):
            v = args[i] if i < len(args) else kwargs.get(a.name)
            if a.alias_info is not None and a.alias_info.is_write:
                for t in tree_flatten(v)[0]:
                    if isinstance(t, Tensor):
                        written.add(_ref(t).key)
                if i == 0 and isinstance(v, Tensor):
                    self_key, self_ref = _ref(v).key, _ref(v)
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
        reads = {_ref(t).key for t in inputs}
        for t in inputs:
            if not t.is_meta and _ref(t).key not in self.known:
                self.constants[_ref(t).key] = t.detach().clone()
        full: set[int] = set()
        name = schema.name.split("::")[-1]
        if self_ref is not None and name in _OVERWRITE and self_ref.covers_storage:
            full.add(self_key)
            if not any(_ref(t).key == self_key for t in inputs[1:]):
                reads.discard(self_key)
        outs = []
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                r = _ref(t)
                if r.key not in self.known and r.key not in reads:
                    full.add(r.key)
                    written.add(r.key)
                outs.append(r)
                self.keep.append(t)
            else:
                outs.append(None)
        self.keep.extend(inputs)
        self.known |= reads | written
        conv = tree_map(lambda x: _ref(x) if isinstance(x, Tensor) else x, (args, kwargs))
        self.events.append(_Event(func, conv[0], conv[1], outs, torch.Tag.nondeterministic_seeded in func.tags,
                                  frozenset(reads), frozenset(written), frozenset(full)))


def record_build(build: Callable[[], nn.Module]) -> BuildRecord:
    """Run `build()` on the meta device, recording its ops, from the current CPU random state."""
    rng_state = torch.get_rng_state()
    rec = _Recorder()
    with torch.device("meta"), rec:
        model = build()
    finals: dict[int, list[tuple[str, _Ref]]] = {}
    named = dict(model.state_dict(keep_vars=True))
    named.update({n: b for n, b in model.named_buffers() if n not in named})
    for name, t in named.items():
        if isinstance(t, Tensor):
            r = _ref(t)
            if r.key not in rec.known:
                raise RuntimeError(f"sharded init: {name} was created outside the recorded build")
            finals.setdefault(r.key, []).append((name, r))
    events = _plan(rec.events, set(finals), set(rec.constants))
    return BuildRecord(model, events, finals, rng_state, rec.constants)


def _plan(events: list[_Event], final_keys: set[int], constants: set[int]) -> list[_Event]:
    """Insert the 'final value complete' pseudo-events, then mark which events must run and what each frees."""
    last_write: dict[int, int] = {}
    for i, e in enumerate(events):
        for k in e.writes:
            last_write[k] = i
    after: dict[int, list[int]] = {}
    for k in final_keys:
        after.setdefault(last_write.get(k, -1), []).append(k)
    out = [_Event(extract=k) for k in after.get(-1, [])]
    for i, e in enumerate(events):
        out.append(e)
        out += [_Event(extract=k) for k in after.get(i, [])]
    live: set[int] = set()
    for e in reversed(out):
        if e.extract is not None:
            e.needed = True
            e.free_after = () if e.extract in live else (e.extract,)
            live.add(e.extract)
            continue
        e.needed = e.rng or bool(e.writes & live)
        if e.needed:
            e.free_after = tuple((e.reads | e.writes) - live)
            live -= e.full
            live |= e.reads
    if live - constants:  # values read before the build made them: meta tensors from outside the recording
        raise RuntimeError("sharded init: the model build reads meta tensors created outside it; build the model "
                           "inside record_build")
    return out


def replay(rec: BuildRecord, sink: Callable[[str, Tensor], None]) -> dict:
    """Re-run the recorded build on the CPU, handing each parameter / buffer's final (full) value to
    `sink(state_name, tensor)` as soon as it is complete; returns {'peak_bytes': most bytes live at once,
    'largest_bytes': the largest single tensor it made}."""
    env: dict[int, Tensor] = {k: v.clone() for k, v in rec.constants.items()}

    def resolve(r):
        if not isinstance(r, _Ref):
            return torch.device("cpu") if isinstance(r, torch.device) and r.type == "meta" else r
        base = env.get(r.key)
        if base is None:
            base = env[r.key] = torch.empty(r.nelem, dtype=r.dtype)
        if base.dtype != r.dtype:
            raise NotImplementedError(f"sharded init: a storage read as {base.dtype} and {r.dtype} (dtype views)")
        return torch.as_strided(base, r.size, r.stride, r.offset)

    saved = torch.get_rng_state()
    torch.set_rng_state(rec.rng_state)
    peak = largest = 0
    try:
        for e in rec.events:
            if e.extract is not None:
                for name, r in rec.finals[e.extract]:
                    sink(name, resolve(r))
            elif e.needed:
                args, kwargs = tree_map(resolve, (e.args, e.kwargs))
                out = e.func(*args, **kwargs)
                for r, t in zip(e.outputs, tree_flatten(out)[0]):
                    if r is not None and r.key in e.full and r.key not in env:
                        env[r.key] = t
            sizes = [t.untyped_storage().nbytes() for t in env.values()]
            peak, largest = max(peak, sum(sizes)), max([largest, *sizes])
            for k in e.free_after:
                env.pop(k, None)
    finally:
        torch.set_rng_state(saved)
    return {"peak_bytes": peak, "largest_bytes": largest}


def _local_region(t: DTensor) -> tuple[slice, ...]:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return tuple(slice(o, o + s) for o, s in zip(offset, shape))


@torch.no_grad()
def materialize_sharded(model: nn.Module, rec: BuildRecord, device: torch.device | str) -> dict:
    """Allocate `model`'s (FSDP / EP sharded, meta) tensors on `device` and fill them with the recorded build's
    values, each rank only its own shards. Returns stats: 'peak_bytes' (replay scratch), 'filled'."""
    from .fsdp_checkpoint import clean_name, sharded_state_dict
    model.to_empty(device=device)
    targets = dict(sharded_state_dict(model))
    targets.update({clean_name(n): b for n, b in model.named_buffers() if clean_name(n) not in targets})
    filled: set[str] = set()

    def sink(name: str, full: Tensor) -> None:
        t = targets.get(name)
        if t is None:
            raise RuntimeError(f"sharded init: the recorded build has {name}, the sharded model does not")
        if isinstance(t, DTensor):
            if tuple(t.shape) != tuple(full.shape):
                raise RuntimeError(f"sharded init: {name} is {tuple(full.shape)} in the build, "
                                   f"{tuple(t.shape)} sharded")
            t.to_local().copy_(full[_local_region(t)])
        else:
            t.copy_(full)
        filled.add(name)

    stats = replay(rec, sink)
    missing = sorted(n for n, t in targets.items() if isinstance(t, Tensor) and n not in filled)
    if missing:
        raise RuntimeError(f"sharded init: no recorded value for {missing[:5]}")
    stats["filled"] = len(filled)
    return stats


__all__ = ["BuildRecord", "materialize_sharded", "record_build", "replay"]
