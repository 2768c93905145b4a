"""Packed expert weights and their grouped matmul.

Weights of all E experts live in one (E, in, out) parameter so that one contiguous block of tokens
sorted by expert is multiplied expert by expert without copies: `torch._grouped_mm` on CUDA (bf16,
Hopper-class GPUs), a split + per-expert matmul loop elsewhere. Upcycling copies a dense layer into
every expert.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import activation_fn


KERNELS = ("auto", "grouped_mm", "loop", "dense")
_kernel_override = "auto"


@contextmanager
def expert_kernel(name: str):
    """Force the grouped-matmul kernel inside the block ('auto' restores the device/dtype choice).

    grouped_mm: `torch._grouped_mm` with device-side offsets (CUDA bf16 on Hopper+; on CPU bf16, fp32 eager);
    loop: one matmul per expert from host-side counts (CPU only: it reads the counts to the host; under
        torch.compile it is one opaque custom op, `mmoe::expert_loop_mm`);
    dense: every expert on every row, then a per-row gather (any device and dtype, E/K x the FLOPs).
    """
    global _kernel_override
    if name not in KERNELS:
        raise ValueError(f"expert kernel must be one of {KERNELS}, got {name!r}")
    prev, _kernel_override = _kernel_override, name
    try:
        yield
    finally:
        _kernel_override = prev


def _aligned(w: Tensor) -> bool:
    """torch._grouped_mm needs 16-byte aligned row strides on both sides."""
    return hasattr(torch, "_grouped_mm") and all(n * w.element_size() % 16 == 0 for n in w.shape[-2:])


@torch.compiler.assume_constant_result
def _cuda_major(index: int) -> int:
    """Compute capability major of a CUDA device; a constant for torch.compile (no graph break)."""
    return torch.cuda.get_device_capability(index)[0]


def _grouped_mm_native(x: Tensor, w: Tensor) -> bool:
    """CUDA's fast grouped GEMM: bf16 on compute capability >= 9 with 16-byte aligned rows."""
    return (x.is_cuda and x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16 and _aligned(w)
            and _cuda_major(x.device.index if x.device.index is not None else torch.cuda.current_device()) >= 9)


def choose_kernel(x: Tensor, w: Tensor) -> str:
    """Kernel by device, dtype and compile state, never by routing outcome (see `expert_kernel`)."""
    if _kernel_override != "auto":
        return _kernel_override
    if x.is_cuda:
        return "grouped_mm" if _grouped_mm_native(x, w) else "dense"
    if x.device.type == "cpu":
        # fastest on CPU, where reading counts to the host costs nothing; compiled as one opaque op
        return "loop"
    return "dense"


class _GroupedMM(torch.autograd.Function):
    """y[rows of e] = x[rows of e] @ w[e] (+ b[e]) for a block sorted by expert; `counts` is a host list.

    CPU eager kernel. Rows past sum(counts) (slots that weigh 0) are set to 0. Written as one autograd
    node so the backward writes each expert's weight gradient straight into one (E, in, out) buffer:
    indexing `w[e]` per expert instead would make autograd materialise a full-size zero gradient per
    expert, and `torch.cat` of the outputs would copy the block once more.
    """

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor | None, counts: list[int]) -> Tensor:
        out = x.new_empty(x.shape[0], w.shape[-1])
        s = 0
        for e, c in enumerate(counts):
            if c:
                if b is None:
                    torch.mm(x[s:s + c], w[e], out=out[s:s + c])
                else:
                    torch.addmm(b[e], x[s:s + c], w[e], out=out[s:s + c])
                s += c
        out[s:].zero_()
        ctx.save_for_backward(x, w)
        ctx.counts, ctx.has_bias = counts, b is not None
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        x, w = ctx.saved_tensors
        counts = ctx.counts
        g = g.contiguous()
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx = torch.empty_like(x) if need_x else None
        gw = torch.empty_like(w) if need_w else None
        gb = g.new_empty(w.shape[0], w.shape[-1]) if need_b and ctx.has_bias else None
        s = 0
        for e, c in enumerate(counts):
            if c == 0:
                if gw is not None:
                    gw[e].zero_()
                if gb is not None:
                    gb[e].zero_()
                continue
            ge = g[s:s + c]
            if gx is not None:
                torch.mm(ge, w[e].t(), out=gx[s:s + c])
            if gw is not None:
                torch.mm(x[s:s + c].t(), ge, out=gw[e])
            if gb is not None:
                torch.sum(ge, 0, out=gb[e])
            s += c
        if gx is not None:
            gx[s:].zero_()
        return gx, gw, gb, None


@torch.library.custom_op("mmoe::expert_loop_mm", mutates_args=())
def expert_loop_mm(x: Tensor, w: Tensor, counts: Tensor) -> Tensor:
    """CPU loop kernel as one opaque op, so torch.compile keeps it whole (fullgraph, no recompiles): the
    host read of `counts` happens inside, where a CPU pays nothing for it. Rows past sum(counts) are 0."""
    return _GroupedMM.forward(_NoCtx(), x, w, None, counts.tolist())


@expert_loop_mm.register_fake
def _(x: Tensor, w: Tensor, counts: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], w.shape[-1])


@torch.library.custom_op("mmoe::expert_loop_mm_backward", mutates_args=())
def expert_loop_mm_backward(g: Tensor, x: Tensor, w: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    ctx = _NoCtx()
    ctx.saved_tensors, ctx.counts, ctx.has_bias = (x, w), counts.tolist(), False
    ctx.needs_input_grad = (True, True, False)
    gx, gw, _, _ = _GroupedMM.backward(ctx, g)
    return gx, gw


@expert_loop_mm_backward.register_fake
def _(g: Tensor, x: Tensor, w: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x), torch.empty_like(w)


def _loop_setup(ctx, inputs, output) -> None:
    x, w, counts = inputs
    ctx.save_for_backward(x, w, counts)


def _loop_backward(ctx, g):
    x, w, counts = ctx.saved_tensors
    gx, gw = expert_loop_mm_backward(g.contiguous(), x, w, counts)
    return gx, gw, None


expert_loop_mm.register_autograd(_loop_backward, setup_context=_loop_setup)


class _NoCtx:
    """Stand-in autograd ctx so the custom op reuses _GroupedMM's forward/backward bodies."""

    def save_for_backward(self, *t: Tensor) -> None:
        self.saved_tensors = t


class RowGroups:
    """Device-side description of rows sorted by expert, computed once per layer for all its matmuls.

    offsets: (E,) int32 end row of each expert for torch._grouped_mm, the last set to the row count so
    the last expert also computes the trailing rows that weigh 0; row_expert: (rows,) expert of each row
    (for biases and the dense kernel), computed on first use.
    """

    def __init__(self, tokens_per_expert: Tensor, rows: int):
        self.tokens_per_expert, self.rows = tokens_per_expert, rows
        self._offsets: Tensor | None = None
        self._row_expert: Tensor | None = None

    @property
    def offsets(self) -> Tensor:
        if self._offsets is None:
            self._offsets = self.tokens_per_expert.cumsum(0, dtype=torch.int32)
            self._offsets[-1:].fill_(self.rows)
        return self._offsets

    @property
    def row_expert(self) -> Tensor:
        if self._row_expert is None:
            rows = torch.arange(self.rows, device=self.tokens_per_expert.device, dtype=torch.int32)
            self._row_expert = torch.searchsorted(self.offsets, rows, right=True)
        return self._row_expert


class _SwiGLUAct(torch.autograd.Function):
    """silu(gate) * up on h = [gate | up]; the backward writes both halves into one buffer (no cat)."""

    @staticmethod
    def forward(ctx, h: Tensor) -> Tensor:
        g, u = h.chunk(2, dim=-1)
        sg = F.silu(g)
        ctx.save_for_backward(g, u, sg)
        return sg * u

    @staticmethod
    def backward(ctx, grad: Tensor):
        g, u, sg = ctx.saved_tensors
        if torch.compiler.is_compiling():  # compile fuses these; out= into chunk views does not trace
            return torch.cat([torch.ops.aten.silu_backward(grad * u, g), grad * sg], dim=-1)
        dh = grad.new_empty(*grad.shape[:-1], 2 * grad.shape[-1])
        dg, du = dh.chunk(2, dim=-1)
        torch.mul(grad, sg, out=du)
        torch.mul(grad, u, out=dg)
        torch.ops.aten.silu_backward.grad_input(dg, g, grad_input=dg)
        return dh


def swiglu_act(h: Tensor) -> Tensor:
    """silu(h[..., :H]) * h[..., H:] for a fused gate/up projection."""
    return _SwiGLUAct.apply(h)


class GroupedLinear(nn.Module):
    """E independent linear maps applied to a block of tokens sorted by expert."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.num_experts, self.in_features, self.out_features = num_experts, in_features, out_features
        self.weight = nn.Parameter(torch.empty(num_experts, in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(num_experts, out_features)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.in_features)  # nn.Linear's default, per expert
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor, tokens_per_expert: Tensor, groups: RowGroups | None = None) -> Tensor:
        """x: (A, in) rows sorted by expert, tokens_per_expert (E,) counted rows each (rows past their sum
        weigh 0: they get any finite value), or x: (E, C, in) capacity buffer -> (A, out) / (E, C, out).
        `groups` shares the device-side offsets between the layers of one expert MLP."""
        w, b = self.weight, self.bias
        dev = x.device.type
        if torch.is_autocast_enabled(dev):  # mixed precision: cast like autocast would for a matmul
            dt = torch.get_autocast_dtype(dev)
            x, w = x.to(dt), w.to(dt)
            b = b.to(dt) if b is not None else None
        with torch.autocast(dev, enabled=False):
            if x.dim() == 3:  # static capacity buffer: one batched matmul
                return torch.bmm(x, w) if b is None else torch.baddbmm(b[:, None], x, w)
            kernel = choose_kernel(x, w)
            if kernel == "loop" and not torch.compiler.is_compiling():
                return _GroupedMM.apply(x, w, b, tokens_per_expert.tolist())
            groups = groups if groups is not None else RowGroups(tokens_per_expert, x.shape[0])
            if kernel == "loop":  # under torch.compile: the same loop as one custom op
                y = expert_loop_mm(x, w, tokens_per_expert)
                return y if b is None else y + b.index_select(0, groups.row_expert)
            if kernel == "grouped_mm":
                y = torch._grouped_mm(x, w, offs=groups.offsets)
            else:  # dense: (E, A, out) then each row's own expert
                idx = groups.row_expert.long().view(1, -1, 1).expand(1, -1, w.shape[-1])
                y = torch.matmul(x, w).gather(0, idx)[0]
            if b is not None:
                y = y + b.index_select(0, groups.row_expert)
            return y

    @torch.no_grad()
    def copy_dense_(self, linear: nn.Linear, experts: slice | None = None,
                    in_slice: slice = slice(None), out_slice: slice = slice(None)) -> None:
        """Copy an nn.Linear (out, in) into experts (all by default); slices pick sub-blocks (MoA heads)."""
        _refuse_dropped_bias(linear.bias, self)
        w = linear.weight[out_slice, in_slice].t()
        self.weight[experts or slice(None)] = w.to(self.weight.dtype)
        if self.bias is not None:
            b = linear.bias[out_slice] if linear.bias is not None else torch.zeros_like(self.bias[0])
            self.bias[experts or slice(None)] = b.to(self.bias.dtype)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


class GroupedExperts(nn.Module):
    """E feed-forward experts: SwiGLU (Llama/Mixtral) or a 2-layer MLP with GELU-family activation (ViT)."""

    def __init__(self, num_experts: int, dim: int, hidden: int, activation: str = "swiglu", bias: bool = False,
                 out_dim: int | None = None):
        super().__init__()
        self.activation = activation
        self.glu = activation == "swiglu"
        self.w_in = GroupedLinear(num_experts, dim, 2 * hidden if self.glu else hidden, bias=bias)
        self.w_out = GroupedLinear(num_experts, hidden, out_dim or dim, bias=bias)
        self.act = activation_fn("silu" if self.glu else activation)

    def forward(self, x: Tensor, tokens_per_expert: Tensor) -> Tensor:
        groups = RowGroups(tokens_per_expert, x.shape[0]) if x.dim() == 2 else None
        h = self.w_in(x, tokens_per_expert, groups)
        if self.glu:
            h = swiglu_act(h)
        else:
            h = self.act(h)
        return self.w_out(h, tokens_per_expert, groups)

    @torch.no_grad()
    def upcycle_(self, dense: nn.Module, reinit: float = 0.0) -> None:
        """Copy a dense MLP into every expert (co-upcycling): identical experts reproduce the dense MLP.

        `reinit` > 0 is Drop-Upcycling (Nakamura et al., ICLR 2025): in each expert a different random
        `reinit` fraction of the hidden units is redrawn, so the experts start apart and the router gets a
        task-loss gradient from the first step (identical experts give it none)."""
        if not 0.0 <= reinit <= 1.0:
            raise ValueError(f"upcycle reinit fraction must be in [0, 1], got {reinit}")
        dense_hidden = (dense_glu_parts(dense)[0] if self.glu else dense_mlp_parts(dense)[0]).weight.shape[0]
        own_hidden = self.w_out.in_features
        if dense_hidden != own_hidden:
            raise ValueError(f"cannot upcycle a dense MLP of hidden width {dense_hidden} into experts of width "
                             f"{own_hidden}: copies are exact only at equal width (set moe.expert_hidden to 0 or "
                             f"{dense_hidden})")
        if self.glu:
            gate, up, down = dense_glu_parts(dense)
            hid = gate.weight.shape[0]
            self.w_in.weight[:, :, :hid] = gate.weight.t()
            self.w_in.weight[:, :, hid:] = up.weight.t()
            for part, cols in ((gate, slice(None, hid)), (up, slice(hid, None))):
                _refuse_dropped_bias(part.bias, self.w_in)
                if self.w_in.bias is not None:
                    self.w_in.bias[:, cols] = part.bias if part.bias is not None else 0.0
            self.w_out.copy_dense_(down)
        else:
            fc1, fc2 = dense_mlp_parts(dense)
            self.w_in.copy_dense_(fc1)
            self.w_out.copy_dense_(fc2)
        if reinit > 0:
            self._redraw_hidden_units_(round(reinit * own_hidden))

    def _redraw_hidden_units_(self, n: int) -> None:
        """Redraw n random hidden units per expert: their input columns (gate and up for SwiGLU) and output row
        from a normal with the mean and std of the copied matrix they belong to; their input biases zeroed."""
        hidden = self.w_out.in_features
        # w_in.weight (E, in, parts * hidden): parts = 2 for SwiGLU (gate | up), each a copied dense matrix
        in_parts = [self.w_in.weight[:, :, i * hidden:(i + 1) * hidden] for i in range(2 if self.glu else 1)]
        out_w = self.w_out.weight  # (E, hidden, out)
        stats = [(m[0].mean(), m[0].std()) for m in (*in_parts, out_w)]  # experts are identical copies
        for e in range(out_w.shape[0]):
            units = torch.randperm(hidden)[:n].to(out_w.device)
            for (mean, std), m in zip(stats, in_parts):
                m[e, :, units] = torch.randn_like(m[e, :, units]) * std + mean
            mean, std = stats[-1]
            out_w[e, units] = torch.randn_like(out_w[e, units]) * std + mean
            if self.w_in.bias is not None:
                for i in range(len(in_parts)):
                    self.w_in.bias[e, units + i * hidden] = 0.0


GLU_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))  # Llama/Qwen2/Mistral, Mixtral expert
MLP_NAMES = (("fc1", "fc2"), ("c_fc", "c_proj"), ("linear_1", "linear_2"))  # timm, open_clip, mmoe/LLaVA


def _find_parts(m: nn.Module, conventions: tuple[tuple[str, ...], ...]) -> tuple[nn.Linear, ...]:
    for names in conventions:
        if all(hasattr(m, n) for n in names):
            return tuple(getattr(m, n) for n in names)
    expected = " or ".join("/".join(names) for names in conventions)
    raise TypeError(f"cannot upcycle {type(m).__name__}: expected {expected} linears")


def dense_glu_parts(m: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
    """(gate, up, down) linears of a SwiGLU MLP in Llama (gate/up/down_proj) or Mixtral-expert (w1/w3/w2) naming."""
    return _find_parts(m, GLU_NAMES)  # type: ignore[return-value]


def dense_mlp_parts(m: nn.Module) -> tuple[nn.Linear, nn.Linear]:
    """(in, out) linears of a 2-layer MLP in timm (fc1/fc2), open_clip (c_fc/c_proj) or mmoe naming."""
    return _find_parts(m, MLP_NAMES)  # type: ignore[return-value]


def _refuse_dropped_bias(bias: Tensor | None, into: GroupedLinear) -> None:
    """Upcycling must not silently drop a dense bias the experts have no slot for."""
    if bias is not None and into.bias is None:
        raise ValueError(f"cannot upcycle a dense linear with a bias into experts without one "
                         f"({into.extra_repr()}): build the MoE layer with bias=True")


def reference_expert(experts: GroupedExperts, e: int, x: Tensor) -> Tensor:
    """Expert e applied to x with plain ops: the loop reference the packed path is tested against."""
    w_in, w_out = experts.w_in, experts.w_out
    h = x @ w_in.weight[e] + (w_in.bias[e] if w_in.bias is not None else 0)
    if experts.glu:
        g, u = h.chunk(2, -1)
        h = F.silu(g) * u
    else:
        h = experts.act(h)
    return h @ w_out.weight[e] + (w_out.bias[e] if w_out.bias is not None else 0)
