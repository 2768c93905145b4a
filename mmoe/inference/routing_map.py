"""Record which expert every image patch and every generated token went to, and draw it.

Nothing in the model changes: :func:`capture_routing` registers forward hooks on every MoE module whose
forward returns ``(tensor, RoutingResult)`` (``MoEFFN`` -- also the one inside each ``VisionMoEMlp`` and the
connector's ``MoEProjector`` -- and ``MoAAttention``, plus any other module with a ``Router`` whose output has
that shape) and pre-hooks on the vision encoder and the decoder to number their forward passes::

    with capture_routing(model) as rec:
        answer = pipeline.generate([[img]], ["What shape is it?"], stream_callback=...)
    data = rec.to_json(tokenizer, new_token_ids)     # raw assignments (see :meth:`RoutingRecorder.to_json`)
    plot_routing_map(rec, img, tokens, "map.png")    # or plot_routing_map(data, ...)

Decoder rows: generation runs one prefill pass and one pass per further token, so generated token ``t`` is
produced by decoder pass ``t`` (the prefill's last prompt position for ``t = 0``, then the decode step that
fed token ``t - 1``). Its row holds, for every MoE decoder layer (``attention.i``, ``ffn.i``), the top-1
expert of the last position of that pass. Top-1 = the kept slot with the largest combine weight (-1 when a
token was dropped by capacity). Vision panels: the top-1 expert of every patch (prefix / CLS tokens removed)
in every MoE ViT layer.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from mmoe.model.moe.routing import Router, RoutingResult

DECODER_SITES = ("attention", "ffn")


def top1_experts(r: RoutingResult) -> Tensor:
    """(N,) long: expert of the kept slot with the largest weight per token; -1 where no slot was kept."""
    w = r.weights.float().masked_fill(~r.kept, float("-inf"))
    best = w.argmax(-1)
    top = r.expert_idx.gather(1, best[:, None]).squeeze(1)
    return torch.where(r.kept.any(-1), top, torch.full_like(top, -1))


@dataclass
class RoutingRecord:
    """One MoE layer call: where it ran and its assignments (CPU copies)."""

    site: str  # vision | connector | attention | ffn
    layer: int
    module: str  # qualified module name inside the model
    pass_index: int  # forward pass of the enclosing encoder / decoder (0-based, counted per site group)
    batch_shape: tuple[int, int]
    num_experts: int
    top1: Tensor  # (B, T) long, -1 = dropped
    expert_idx: Tensor  # (B, T, K) long
    kept: Tensor  # (B, T, K) bool
    weights: Tensor  # (B, T, K) float

    @property
    def name(self) -> str:
        return f"{self.site}.{self.layer}"


class RoutingRecorder:
    """Collects :class:`RoutingRecord` s in call order; see the module docstring for what rows mean."""

    def __init__(self, num_prefix_tokens: int = 0, grid: tuple[int, int] | None = None):
        self.records: list[RoutingRecord] = []
        self.num_prefix_tokens = num_prefix_tokens
        self.grid = grid
        self.vision_passes = 0
        self.decoder_passes = 0

    def clear(self) -> None:
        self.records.clear()
        self.vision_passes = self.decoder_passes = 0

    # ------------------------------------------------------------------ hooks
    def _record(self, module_name: str, r: RoutingResult) -> None:
        B, T = r.batch_shape
        if r.site in DECODER_SITES:
            pass_index = self.decoder_passes - 1
        else:
            pass_index = self.vision_passes - 1
        K = r.expert_idx.shape[1]
        self.records.append(RoutingRecord(
            site=r.site, layer=int(r.layer), module=module_name, pass_index=pass_index, batch_shape=(B, T),
            num_experts=int(r.num_experts), top1=top1_experts(r).view(B, T).cpu(),
            expert_idx=r.expert_idx.view(B, T, K).cpu(), kept=r.kept.view(B, T, K).cpu(),
            weights=r.weights.detach().float().view(B, T, K).cpu()))

    # ------------------------------------------------------------------ views
    def layer_names(self, sites: Sequence[str]) -> list[str]:
        """Distinct layer names of `sites`, ordered by layer then site order (attention before ffn)."""
        names = {(rec.layer, sites.index(rec.site), rec.name) for rec in self.records if rec.site in sites}
        return [n for _, _, n in sorted(names)]

    def vision(self, pass_index: int = -1) -> dict[str, Tensor]:
        """{'vision.i': (n_images, P) top-1 expert per patch} of one vision pass (default: the last)."""
        return self._encoder("vision", pass_index, drop_prefix=True)

    def connector(self, pass_index: int = -1) -> dict[str, Tensor]:
        """{'connector.i': (n_images, P') top-1 expert per image token} of one connector pass."""
        return self._encoder("connector", pass_index, drop_prefix=False)

    def _encoder(self, site: str, pass_index: int, drop_prefix: bool) -> dict[str, Tensor]:
        recs = [r for r in self.records if r.site == site]
        if not recs:
            return {}
        want = max(r.pass_index for r in recs) if pass_index < 0 else pass_index
        out = {}
        for r in recs:
            if r.pass_index == want:
                top = r.top1
                if drop_prefix and self.num_prefix_tokens:
                    top = top[:, self.num_prefix_tokens:]
                out[r.name] = top
        return out

    def decoder_steps(self, row: int = 0) -> list[dict[str, int]]:
        """One dict per decoder pass: {'attention.i' / 'ffn.i': top-1 expert of the pass's last position}.

        With a stream of generated tokens, entry t is the routing that produced generated token t."""
        steps: list[dict[str, int]] = [{} for _ in range(self.decoder_passes)]
        for r in self.records:
            if r.site in DECODER_SITES and 0 <= r.pass_index < len(steps):
                steps[r.pass_index][r.name] = int(r.top1[row, -1])
        return steps

    def decoder_topk(self, row: int = 0) -> list[dict[str, list[int]]]:
        """Like :meth:`decoder_steps` but with every kept expert of the last position (by weight)."""
        steps: list[dict[str, list[int]]] = [{} for _ in range(self.decoder_passes)]
        for r in self.records:
            if r.site in DECODER_SITES and 0 <= r.pass_index < len(steps):
                w, idx, kept = r.weights[row, -1], r.expert_idx[row, -1], r.kept[row, -1]
                order = torch.argsort(w, descending=True, stable=True)
                steps[r.pass_index][r.name] = [int(idx[k]) for k in order if bool(kept[k])]
        return steps

    def num_experts(self) -> dict[str, int]:
        return {r.name: r.num_experts for r in self.records}

    def to_json(self, tokenizer=None, token_ids: Sequence[int] | None = None, row: int = 0) -> dict:
        """Raw assignments as plain JSON types.

        ``vision``: one entry per MoE ViT layer ``{"name", "layer", "num_experts", "experts": [[P ids] per
        image]}``; ``connector`` likewise per image token; ``decoder_layers``: the MoE decoder layer names;
        ``tokens``: one row per generated token ``{"id", "text", "experts": {layer: top-1 id},
        "topk": {layer: [kept ids by weight]}}`` (only the first ``len(token_ids)`` passes when ids are given).
        """
        ne = self.num_experts()

        def enc(site_map: dict[str, Tensor], site: str) -> list[dict]:
            return [{"name": n, "layer": int(n.rsplit(".", 1)[1]), "num_experts": ne[n],
                     "experts": site_map[n][:, :].tolist()} for n in self.layer_names((site,)) if n in site_map]

        steps, topk = self.decoder_steps(row), self.decoder_topk(row)
        n = len(steps) if token_ids is None else min(len(steps), len(token_ids))
        tokens = []
        for t in range(n):
            tid = None if token_ids is None else int(token_ids[t])
            text = None
            if tokenizer is not None and tid is not None:
                text = tokenizer.decode([tid], skip_special_tokens=False)
            tokens.append({"id": tid, "text": text, "experts": steps[t], "topk": topk[t]})
        vis = self.vision()
        P = next(iter(vis.values())).shape[1] if vis else 0
        return {
            "grid": list(self.grid) if self.grid else None,
            "num_patches": P,
            "vision": enc(vis, "vision"),
            "connector": enc(self.connector(), "connector"),
            "decoder_layers": self.layer_names(DECODER_SITES),
            "decoder_num_experts": {k: v for k, v in ne.items() if k.split(".")[0] in DECODER_SITES},
            "tokens": tokens,
        }


def _is_moe_module(m: nn.Module) -> bool:
    from mmoe.model.moe.attention import MoAAttention
    from mmoe.model.moe.ffn import MoEFFN

    return isinstance(m, (MoEFFN, MoAAttention)) or isinstance(getattr(m, "router", None), Router)


@contextmanager
def capture_routing(model: nn.Module) -> Iterator[RoutingRecorder]:
    """Hook every MoE module of `model` while the block runs; yields the :class:`RoutingRecorder`."""
    from mmoe.model.decoder import Decoder
    from mmoe.model.vision import VisionEncoder

    prefix, grid = 0, None
    for m in model.modules():
        if isinstance(m, VisionEncoder):
            prefix = 0 if m.cfg.keep_cls else int(m.num_prefix_tokens)
            grid = tuple(int(g) for g in m.vit.patch_embed.grid_size)
            break
    rec = RoutingRecorder(prefix, grid)
    handles = []

    def on_output(name):
        def hook(module, args, output):
            if isinstance(output, tuple) and len(output) == 2 and isinstance(output[1], RoutingResult):
                rec._record(name, output[1])
        return hook

    def count(attr):
        def pre(module, args):
            setattr(rec, attr, getattr(rec, attr) + 1)
        return pre

    try:
        for name, m in model.named_modules():
            if isinstance(m, Decoder):
                handles.append(m.register_forward_pre_hook(count("decoder_passes")))
            elif isinstance(m, VisionEncoder):
                handles.append(m.register_forward_pre_hook(count("vision_passes")))
            if _is_moe_module(m):
                handles.append(m.register_forward_hook(on_output(name)))
        if not any(isinstance(m, VisionEncoder) for m in model.modules()):
            rec.vision_passes = 1  # connector-only / bare use: records still get pass 0
        yield rec
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------------------------------- plotting
def _square_view(img, size: int):
    """The model's view of a PIL image: shorter side resized to `size`, centre-cropped (like the transform)."""
    from PIL import Image, ImageOps

    return ImageOps.fit(img.convert("RGB"), (size, size), method=Image.BICUBIC, centering=(0.5, 0.5))


def plot_routing_map(recorder: RoutingRecorder | dict, image, tokens: Sequence[str] | None,
                     out_path: str | Path, title: str | None = None) -> Path:
    """Write a PNG: per image, the image and one top-1-expert patch grid per MoE ViT layer; below, a
    generated-token x MoE-decoder-layer table coloured by top-1 expert (cell text = expert id).

    `recorder` is a :class:`RoutingRecorder` or its :meth:`~RoutingRecorder.to_json` dict; `image` a PIL
    image or a list of them (one per image of the prompt); `tokens` the decoded text of each generated
    token (default: the texts stored in the JSON dict, else the token index).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import BoundaryNorm, ListedColormap

    data = recorder if isinstance(recorder, dict) else recorder.to_json()
    images = list(image) if isinstance(image, (list, tuple)) else ([image] if image is not None else [])
    vis = data.get("vision", [])
    rows = data.get("tokens", [])
    layers = data.get("decoder_layers", [])
    if tokens is None:
        tokens = [r.get("text") if r.get("text") is not None else str(i) for i, r in enumerate(rows)]
    tokens = list(tokens)[: len(rows)]
    n_img = max(len(images), len(vis[0]["experts"]) if vis else 0)
    max_e = max([v["num_experts"] for v in vis] + list(data.get("decoder_num_experts", {}).values()) + [1])
    base = plt.get_cmap("tab20" if max_e > 10 else "tab10")
    colors = ["#d9d9d9"] + [base(i % base.N) for i in range(max_e)]  # -1 (dropped) is grey
    cmap = ListedColormap(colors)
    norm = BoundaryNorm(np.arange(-1.5, max_e + 0.5), cmap.N)

    n_cols = max(1, 1 + len(vis))
    vis_rows = n_img if vis or images else 0
    tok_h = 0.6 + 0.28 * max(1, len(rows)) if layers else 0
    heights = [2.4] * vis_rows + ([tok_h] if layers else [])
    if not heights:
        heights = [1.0]
    fig = plt.figure(figsize=(max(2.6 * n_cols, 1.6 + 1.1 * len(layers)), sum(heights) + 0.8))
    gs = fig.add_gridspec(len(heights), n_cols, height_ratios=heights)
    grid = data.get("grid")
    for i in range(vis_rows):
        ax = fig.add_subplot(gs[i, 0])
        if i < len(images):
            side = 224
            ax.imshow(_square_view(images[i], side))
            if grid:
                for g in range(1, grid[1]):
                    ax.axvline(g * side / grid[1] - 0.5, color="white", lw=0.4, alpha=0.6)
                for g in range(1, grid[0]):
                    ax.axhline(g * side / grid[0] - 0.5, color="white", lw=0.4, alpha=0.6)
        ax.set_title(f"image {i}", fontsize=9)
        ax.axis("off")
        for j, v in enumerate(vis):
            ax = fig.add_subplot(gs[i, 1 + j])
            e = np.asarray(v["experts"][i])
            gh, gw = grid if grid and grid[0] * grid[1] == e.size else (1, e.size)
            ax.imshow(e.reshape(gh, gw), cmap=cmap, norm=norm, interpolation="nearest")
            if gh * gw <= 256:
                for (r, c), val in np.ndenumerate(e.reshape(gh, gw)):
                    ax.text(c, r, str(val), ha="center", va="center", fontsize=6, color="black")
            ax.set_title(f"{v['name']} top-1 expert", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    if layers:
        ax = fig.add_subplot(gs[len(heights) - 1, :])
        mat = np.array([[r["experts"].get(lname, -1) for lname in layers] for r in rows] or
                       [[-1] * len(layers)])
        ax.imshow(mat, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
        for (r, c), val in np.ndenumerate(mat):
            if rows:
                ax.text(c, r, str(val), ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(layers)), layers, fontsize=8)
        ax.xaxis.tick_top()
        ax.set_yticks(range(len(tokens)), [repr(t)[1:-1] or "''" for t in tokens], fontsize=8)
        ax.set_ylabel("generated token")
        ax.set_title("decoder: top-1 expert per generated token", fontsize=9, pad=18)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_routing_json(data: dict, out_path: str | Path) -> Path:
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, ensure_ascii=False) + "\n", encoding="utf-8")
    return out


__all__ = ["RoutingRecord", "RoutingRecorder", "capture_routing", "plot_routing_map", "top1_experts",
           "write_routing_json"]
