"""Memory planner: will a training config fit N GPUs under ddp_ep or fsdp_ep, and with what micro-batch?

    python -m mmoe.plan --config configs/cumo_large.yaml --gpus 8 --gpu-mem 80 [--strategy fsdp_ep] [--ep 4]

Counts parameters exactly (the model is built on the meta device from the config's `model.arch`), splits them
into expert weights (sharded over EP) and the rest, and prints per-rank bytes of:
* state: fp32 master parameters, fp32 gradients, AdamW moments (2 x fp32) - ddp_ep keeps every non-expert
  weight on every rank plus 1/ep of the experts; fsdp_ep keeps 1/W of everything. fsdp_ep adds the
  all-gathered compute copies of the two largest FSDP units (the current one and the prefetched next one),
  in the compute dtype, and their unsharded gradients, plus the root unit (embeddings, head, norms), which
  stays unsharded from forward through backward.
* activations per micro-batch sample, with and without activation checkpointing (an estimate, below);
then the largest micro-batch that fits in `--gpu-mem` less a reserve (default 10 %: allocator fragmentation,
CUDA context, communication buffers) and a plain verdict. The state bytes are exact (checked against a real
sharded run in tests/test_fsdp_ep.py); the activation model is a first-order estimate:
  per token and layer without checkpointing: attention  (x, norm, q, k, v, attention out, o_proj out)
  ~ 7 D + 2 D_kv values; FFN (x, norm, router) ~ 3 D + per routed copy (k of them) the expert input, hidden
  and activated hidden (D + 3 H for SwiGLU's gate|up and product); in the compute dtype. With checkpointing
  only each block's input (D values per token) is kept, plus one block's full activations during recompute.
  Logits: supervised positions x vocab in fp32 (cross-entropy) counted once per sample at full length.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch

GiB = 1024 ** 3


@dataclass
class ModelCounts:
    dense: int  # trainable non-expert parameters
    expert: int  # trainable expert parameters (all experts)
    frozen: int  # parameters without gradients (held in the compute dtype only)
    largest_unit: int  # parameters of the largest FSDP unit (a block with its experts)
    act_per_sample: int  # activation values per sample, no checkpointing (all layers)
    act_per_sample_ckpt: int  # with per-block checkpointing
    logits_values: int  # fp32 logits values per sample
    seq_len: int  # decoder positions per sample (text + image tokens)
    root_unit: int = 0  # parameters of the FSDP root (embeddings, head, norms): unsharded for the whole step


def count_model(arch, freeze: list[str] | None = None, text_len: int | None = None) -> ModelCounts:
    """Parameter and activation counts of `arch` (a VLMConfig) built on the meta device; the decoder sees
    `text_len` text tokens plus the image's tokens (default: decoder.max_seq_len)."""
    from mmoe.model.moe.experts import GroupedLinear
    from mmoe.model.vlm import MMoEVLM

    with torch.device("meta"):
        model = MMoEVLM(arch)
    if freeze:
        from mmoe.training.stage_init import apply_freeze
        apply_freeze(model, freeze)
    expert_ids = {id(p) for m in model.modules() if isinstance(m, GroupedLinear) for p in m.parameters()}
    dense = expert = frozen = 0
    for p in model.parameters():
        if not p.requires_grad:
            frozen += p.numel()
        elif id(p) in expert_ids:
            expert += p.numel()
        else:
            dense += p.numel()
    units = [b for n, m in model.named_modules() if n.split(".")[-1] in ("layers", "blocks")
             and isinstance(m, (torch.nn.ModuleList, torch.nn.Sequential)) for b in m]
    largest = max([sum(p.numel() for p in u.parameters()) for u in units] or [0])
    connector = getattr(model, "connector", None)
    in_units = {id(p) for u in units + ([connector] if isinstance(connector, torch.nn.Module) else [])
                for p in u.parameters()}
    root = sum(p.numel() for p in model.parameters() if id(p) not in in_units)

    img_tokens = model.num_image_tokens
    max_seq = arch.decoder.max_seq_len
    seq = min(max_seq, text_len + img_tokens - 1) if text_len else max_seq
    act = ckpt = 0
    for width_tokens, dim, kv, hidden, layers, moe, moe_layers in _towers(arch, img_tokens, seq):
        k = moe.top_k if moe is not None else 1
        per_token_layer = 7 * dim + 2 * kv + 3 * dim + k * (dim + 3 * hidden)
        act += width_tokens * per_token_layer * layers
        ckpt += width_tokens * dim * layers + width_tokens * per_token_layer  # inputs + one recomputed block
    logits = seq * arch.decoder.vocab_size
    return ModelCounts(dense, expert, frozen, largest, act, ckpt, logits, seq, root)


def _towers(arch, img_tokens: int, seq: int):
    v, d = arch.vision, arch.decoder
    v_hidden = int(v.dim * v.mlp_ratio)
    yield img_tokens, v.dim, v.dim, v_hidden, v.depth, v.moe, None
    yield seq, d.dim, d.n_kv_heads * d.head_size, d.hidden, d.n_layers, d.ffn_moe, None


@dataclass
class Plan:
    strategy: str
    gpus: int
    ep: int
    params: float
    grads: float
    optimizer: float
    gathered: float  # fsdp: unsharded compute copies + their grads of the live units
    act_per_sample: float
    act_per_sample_ckpt: float
    budget: float

    @property
    def state(self) -> float:
        return self.params + self.grads + self.optimizer + self.gathered

    def max_micro_batch(self, checkpointing: bool) -> int:
        per = self.act_per_sample_ckpt if checkpointing else self.act_per_sample
        free = self.budget - self.state
        return max(0, int(free // per)) if per > 0 else 0


def plan(counts: ModelCounts, gpus: int, gpu_mem_gib: float, strategy: str = "fsdp_ep", ep: int = 1, *,
         param_bytes: int = 4, compute_bytes: int = 2, optim_states: int = 2, reserve: float = 0.10) -> Plan:
    """Per-rank bytes for `strategy` on `gpus` ranks with expert-parallel size `ep`."""
    if strategy not in ("ddp_ep", "fsdp_ep"):
        raise ValueError(f"--strategy must be ddp_ep or fsdp_ep, got {strategy!r}")
    if ep < 1 or gpus % ep:
        raise ValueError(f"--ep {ep} must divide --gpus {gpus}")
    if strategy == "ddp_ep":
        trainable = counts.dense + counts.expert / ep
        frozen = counts.frozen
        gathered = 0.0
    else:
        trainable = (counts.dense + counts.expert) / gpus
        frozen = counts.frozen / gpus
        # two live units (current + prefetched) in the compute dtype, and one unit's unsharded gradient
        gathered = 2 * counts.largest_unit * compute_bytes + counts.largest_unit * compute_bytes
        # the root unit is not resharded after forward: its compute copy and, in backward, its gradient
        gathered += 2 * counts.root_unit * compute_bytes
    act = (counts.act_per_sample * compute_bytes + counts.logits_values * 4)
    act_ckpt = (counts.act_per_sample_ckpt * compute_bytes + counts.logits_values * 4)
    return Plan(strategy, gpus, ep, params=trainable * param_bytes + frozen * compute_bytes,
                grads=trainable * param_bytes, optimizer=trainable * param_bytes * optim_states,
                gathered=gathered, act_per_sample=act, act_per_sample_ckpt=act_ckpt,
                budget=gpu_mem_gib * GiB * (1 - reserve))


def load_config(path: str) -> dict:
    import yaml
    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    if "model" not in cfg or "arch" not in cfg["model"]:
        raise ValueError(f"{path}: no model.arch section")
    return cfg


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mmoe.plan", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--gpus", type=int, required=True)
    ap.add_argument("--gpu-mem", type=float, required=True, help="GiB per GPU")
    ap.add_argument("--strategy", default=None, help="ddp_ep or fsdp_ep (default: the config's trainer.strategy)")
    ap.add_argument("--ep", type=int, default=None, help="expert-parallel size (default: model.parallel.ep_size)")
    ap.add_argument("--reserve", type=float, default=0.10, help="fraction of GPU memory kept free")
    args = ap.parse_args(argv)

    from mmoe.config_io import from_dict
    from mmoe.model.vlm import VLMConfig
    cfg = load_config(args.config)
    model_cfg = cfg["model"]
    arch = from_dict(VLMConfig, model_cfg["arch"])
    strategy = args.strategy or (cfg.get("trainer", {}).get("strategy") or "ddp_ep")
    ep = args.ep or int((model_cfg.get("parallel") or {}).get("ep_size", 1))
    text_len = (cfg.get("data") or {}).get("max_len")
    micro = int((cfg.get("data") or {}).get("batch_size", 1))
    ckpt_on = bool(model_cfg.get("activation_checkpointing", False))
    counts = count_model(arch, (model_cfg.get("stage") or {}).get("freeze"), int(text_len) if text_len else None)
    p = plan(counts, args.gpus, args.gpu_mem, strategy, ep, reserve=args.reserve)

    g = lambda b: f"{b / GiB:8.2f} GiB"
    print(f"config {args.config}: {counts.dense / 1e9:.2f} B non-expert + {counts.expert / 1e9:.2f} B expert "
          f"trainable parameters, {counts.frozen / 1e9:.2f} B frozen")
    print(f"strategy {strategy}, {args.gpus} GPUs x {args.gpu_mem:g} GiB, ep {ep} (edp {args.gpus // ep})")
    print(f"per rank: parameters {g(p.params)}  gradients {g(p.grads)}  optimizer {g(p.optimizer)}"
          f"  gathered units {g(p.gathered)}  = state {g(p.state)}")
    print(f"activations per sample (seq {counts.seq_len}): {g(p.act_per_sample)} without, "
          f"{g(p.act_per_sample_ckpt)} with activation checkpointing")
    mb_no, mb_ck = p.max_micro_batch(False), p.max_micro_batch(True)
    print(f"largest micro-batch that fits: {mb_no} without, {mb_ck} with checkpointing "
          f"(budget {g(p.budget)} after a {args.reserve:.0%} reserve)")
    need = mb_ck if ckpt_on else mb_no
    fits = p.state < p.budget and micro <= need
    print(f"config micro-batch {micro} (data.batch_size), checkpointing {'on' if ckpt_on else 'off'}: "
          f"{'FITS' if fits else 'DOES NOT FIT'}")
    return 0 if fits else 1


if __name__ == "__main__":
    sys.exit(main())
