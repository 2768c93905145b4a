"""Models and float64 reference checks shared by the thread-rank expert-parallel tests (tests/_ep_threads.py):
a decoder with MoA and MoE FFNs, a biased GELU connector site, per-rank copies made expert-parallel, and checks
of each rank's expert shards and gradients against one process holding every expert."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import torch
from torch import nn

from _ep_threads import ThreadWorld
from mmoe.model.decoder import Decoder, DecoderConfig
from mmoe.model.moe import MoEConfig
from mmoe.model.moe.ffn import MoEFFN
from mmoe.parallel.expert_parallel import SHARD_ATTR, enable_expert_parallel, expert_parameters, is_expert_param

TOL = 1e-12


def decoder() -> Decoder:
    """MoA (4 experts) in layer 1, MoE FFN (8 experts + 1 shared) in both layers."""
    torch.manual_seed(0)
    cfg = DecoderConfig(vocab_size=40, dim=16, n_layers=2, n_heads=8, n_kv_heads=2, hidden=24, max_seq_len=32,
                        tie_embeddings=True, attn_moe=MoEConfig(num_experts=4, top_k=2), attn_moe_layers="1",
                        ffn_moe=MoEConfig(num_experts=8, top_k=2, num_shared_experts=1), ffn_moe_layers="all")
    m = Decoder(cfg).double()
    m.reset_parameters(std=0.2)
    return m


class Connector(nn.Module):
    """A connector-like MoE site: GELU experts with biases, no causal routing."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.moe = MoEFFN(6, 10, MoEConfig(num_experts=4, top_k=2), activation="gelu", bias=True, causal=False,
                          site="connector", layer=0, out_dim=5).double()
        with torch.no_grad():
            for p in self.moe.parameters():
                p.normal_(0, 0.3)  # biases nonzero too, so a bias left unsharded or misplaced shows

    def forward(self, x):
        return self.moe(x)[0]


def output_of(o):
    return o.logits if hasattr(o, "logits") else o


def expert_shards(ref: nn.Module, m: nn.Module, ep_rank: int, ep: int):
    """(name, local param, the reference's full param, lo, hi) of every expert tensor of rank model `m`,
    after checking its shard bookkeeping against the reference's expert count."""
    ref_modules = dict(ref.named_modules())
    out = []
    for name, gl in m.named_modules():
        shard = getattr(gl, SHARD_ATTR, None)
        if shard is None:
            continue
        full = ref_modules[name]
        El = full.num_experts // ep
        lo, hi = ep_rank * El, (ep_rank + 1) * El
        assert (shard.num_experts, shard.lo, shard.hi, gl.num_experts) == (full.num_experts, lo, hi, El)
        assert name.startswith(shard.owner + ".") and hasattr(m.get_submodule(shard.owner), "dispatcher")
        for pname in ("weight", "bias"):
            p, q = getattr(gl, pname), getattr(full, pname)
            assert (p is None) == (q is None), (name, pname)
            if p is not None:
                assert is_expert_param(p)
                out.append((f"{name}.{pname}", p, q, lo, hi))
    assert out, "no expert parameter was sharded"
    return out


def ep_ranks(tw: ThreadWorld, ref: nn.Module, ep: int) -> list[nn.Module]:
    """One copy of `ref` per rank, expert-parallel at `ep` (gradients reduced by hand: grad_sync 'manual')."""
    ranks = [copy.deepcopy(ref) for _ in range(tw.world)]
    for r, m in enumerate(ranks):
        enable_expert_parallel(m, ep, mesh=tw.mesh(r, ep)).grad_sync = "manual"
    return ranks


def connector_inputs(world: int) -> list[torch.Tensor]:
    return [torch.randn(2, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(r)) for r in range(world)]


def forward_backward(tw: ThreadWorld, ref: nn.Module, ranks: list[nn.Module], inputs: list) -> None:
    """Each rank's output equals `ref` on the same inputs; then one backward of sum_r L_r, L_r = <out_r, gy_r>,
    through every rank and through the reference."""
    outs = tw.run(lambda r: output_of(ranks[r](inputs[r])))
    ref_outs = [output_of(ref(x)) for x in inputs]
    gys = [torch.randn_like(o, generator=torch.Generator().manual_seed(5 + i)) for i, o in enumerate(ref_outs)]
    for o, ro in zip(outs, ref_outs, strict=True):
        torch.testing.assert_close(o, ro, rtol=0, atol=TOL)
    sum((o * gy).sum() for o, gy in zip(outs, gys, strict=True)).backward()
    sum((o * gy).sum() for o, gy in zip(ref_outs, gys, strict=True)).backward()


def assert_shards_equal_reference(ref: nn.Module, m: nn.Module, ep_rank: int, ep: int, rtol: float) -> set[str]:
    """Each expert shard of rank model `m` holds its rows of the reference's weights and gradients; returns the
    sharded parameter names."""
    sharded = set()
    for name, p, q, lo, hi in expert_shards(ref, m, ep_rank, ep):
        torch.testing.assert_close(p.detach(), q.detach()[lo:hi], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(p.grad, q.grad[lo:hi], rtol=rtol, atol=TOL, msg=name)
        sharded.add(name)
    return sharded


def ddp_average(ref: nn.Module, ranks: list[nn.Module]) -> None:
    """What DDP does to the replicated parameters: every rank's gradient := the mean over the ranks."""
    expert = {id(p) for m in ranks for p in expert_parameters(m)}
    for name, _ in ref.named_parameters():
        ps = [dict(m.named_parameters())[name] for m in ranks]
        if id(ps[0]) not in expert:
            mean = torch.stack([p.grad for p in ps]).mean(0)
            for p in ps:
                p.grad = mean.clone()


def assert_grads_equal_reference(ref: nn.Module, m: nn.Module, ep_rank: int, ep: int, rtol: float) -> None:
    """Expert shards hold their rows of the reference's weights and gradients, every other parameter its grad."""
    sharded = assert_shards_equal_reference(ref, m, ep_rank, ep, rtol)
    for name, q in ref.named_parameters():
        if name not in sharded:
            torch.testing.assert_close(dict(m.named_parameters())[name].grad, q.grad, rtol=rtol, atol=TOL, msg=name)


def assert_same_state(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for k, v in want.items():
        assert got[k].shape == v.shape, k
        torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=k)


class Holder(pl.LightningModule):
    """The LightningModule a strategy sees: the model as `.model`, and `activation_checkpointing` when given
    (None: a module without the attribute)."""

    def __init__(self, model: nn.Module, activation_checkpointing: bool | None = None):
        super().__init__()
        self.model = model
        if activation_checkpointing is not None:
            self.activation_checkpointing = activation_checkpointing

    def forward(self, x):
        return self.model(x)
