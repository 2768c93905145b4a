"""lmms-eval model plug-in: run lmms-eval tasks on an exported mmoe model.

Install the harness next to mmoe (it pins nothing we need; keep our torch)::

    pip install lmms_eval        # full install, or for the API only: pip install --no-deps lmms_eval loguru pytz

mmoe's ``pyproject.toml`` declares the entry point ``[project.entry-points."lmms_eval.models"]
mmoe = "mmoe.inference.lmms_plugin:manifest"``, which lmms-eval (>= 0.5, ``ModelRegistryV2``) loads at
start, so after ``pip install -e .`` the model is available by name::

    lmms-eval --model mmoe --model_args pretrained=EXPORT_DIR,device=cuda,batch_size=1 \
        --tasks vqav2_val,pope --log_samples --output_path results/

or programmatically::

    from lmms_eval.evaluator import simple_evaluate
    from mmoe.inference.lmms_plugin import MMoELMMs
    simple_evaluate(model=MMoELMMs(pretrained="EXPORT_DIR"), tasks=["pope"], limit=100)

Model args (``--model_args k=v,...``): ``pretrained`` (export dir; ``model`` / ``model_dir`` are aliases),
``device``, ``batch_size`` (requests per forward, grouped by identical gen kwargs; 1 is the reference),
``max_new_tokens`` (default when a task gives none, 32), ``loglikelihood_output`` (see below).

``generate_until`` (simple model: ``Instance.args = (context, gen_kwargs, doc_to_visual, doc_id, task,
split)``): images = ``doc_to_visual(self.task_dict[task][split][doc_id])``; ``<image>`` placeholders in the
context are honoured, otherwise one per image is put in front (as :class:`~mmoe.inference.VLMPipeline`
does); the context is wrapped in the project chat template; generation honours ``max_new_tokens``,
``temperature`` (0 or ``do_sample=False`` -> greedy), ``top_p`` and ``until`` (output cut at the first stop
string). ``num_beams > 1`` is not supported (greedy is used, with a warning). Results keep request order.

``loglikelihood`` (``args = (context, continuation | doc_to_target, doc_to_visual, doc_id, task, split)``):
the continuation is the assistant answer after the templated context + images, teacher-forced through
``MMoEVLM.forward``; returns ``(sum of log p(continuation token), is_greedy)``. Caution, the harness is
inconsistent here: its API docstring and the ``perplexity`` metric expect log-probabilities (the default,
``loglikelihood_output=logprob``), but ``multiple_choice`` tasks pick ``argmin`` (built-in models return a
mean loss); for those pass ``loglikelihood_output=loss`` (mean negative log-likelihood per continuation
token, like lmms-eval's llava).

When lmms-eval is not installed this module still imports: the class then derives from a small stand-in
with the same interface (``task_dict``, ``rank``, ``world_size``) so it can be used and tested directly.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

try:  # the real harness base class when lmms-eval is installed
    from lmms_eval.api.model import lmms as _LMMSBase

    HAVE_LMMS_EVAL = True
except Exception:  # pragma: no cover - depends on the environment
    HAVE_LMMS_EVAL = False

    class _LMMSBase:  # type: ignore[no-redef]
        """Stand-in for ``lmms_eval.api.model.lmms`` (same attributes the harness relies on)."""

        is_simple: bool = True

        def __init__(self) -> None:
            self._rank, self._world_size = 0, 1
            self.task_dict: dict = {}

        @property
        def rank(self) -> int:
            return self._rank

        @property
        def world_size(self) -> int:
            return self._world_size

        @classmethod
        def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
            args = {}
            for kv in filter(None, (s.strip() for s in arg_string.split(","))):
                k, _, v = kv.partition("=")
                args[k.strip()] = v.strip()
            extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
            return cls(**args, **extra)

MODEL_NAME = "mmoe"


def _flatten_visuals(visuals) -> list:
    """doc_to_visual output -> flat list of RGB PIL images (None / [] -> no image)."""
    from PIL import Image

    from mmoe.data.images import load_image, to_rgb

    if visuals is None:
        return []
    if not isinstance(visuals, (list, tuple)):
        visuals = [visuals]
    out = []
    for v in visuals:
        if v is None:
            continue
        if isinstance(v, (list, tuple)):
            out += _flatten_visuals(v)
        elif isinstance(v, Image.Image):
            out.append(to_rgb(v))
        elif isinstance(v, (str, Path)):
            out.append(load_image(v))
        else:
            raise TypeError(f"mmoe lmms-eval model: unsupported visual of type {type(v).__name__} "
                            "(images only: PIL images or image paths)")
    return out


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """Text up to the first occurrence of any stop string."""
    cut = len(text)
    for s in until:
        if s:
            i = text.find(s)
            if 0 <= i < cut:
                cut = i
    return text[:cut]


class MMoELMMs(_LMMSBase):
    """lmms-eval "simple" model backed by :class:`mmoe.inference.VLMPipeline`."""

    is_simple = True

    def __init__(self, pretrained: str | None = None, device: str | None = None, batch_size: int | str = 1,
                 max_new_tokens: int | str = 32, loglikelihood_output: str = "logprob", pipeline=None,
                 **kwargs: Any) -> None:
        super().__init__()
        pretrained = pretrained or kwargs.pop("model", None) or kwargs.pop("model_dir", None)
        for k in ("max_batch_size", "trust_remote_code", "dtype"):
            kwargs.pop(k, None)
        if kwargs:
            warnings.warn(f"mmoe lmms-eval model: ignoring unknown model_args {sorted(kwargs)}", stacklevel=2)
        if loglikelihood_output not in ("logprob", "loss"):
            raise ValueError(f"loglikelihood_output must be 'logprob' or 'loss', got {loglikelihood_output!r}")
        if pipeline is None:
            if not pretrained:
                raise ValueError("mmoe lmms-eval model needs pretrained=EXPORT_DIR")
            if not Path(pretrained).is_dir():
                raise FileNotFoundError(f"mmoe lmms-eval model: export directory not found: {pretrained}")
            from mmoe.inference import load_pipeline

            pipeline = load_pipeline(pretrained, device=device)
        self.pipe = pipeline
        self.batch_size = max(1, int(batch_size))
        self.max_new_tokens = int(max_new_tokens)
        self.loglikelihood_output = loglikelihood_output

    # ------------------------------------------------------------------ helpers
    @property
    def model(self):
        return self.pipe.model

    @property
    def tokenizer(self):
        return self.pipe.tokenizer

    @property
    def device(self):
        return self.pipe.device

    def _doc(self, task, split, doc_id):
        return self.task_dict[task][split][doc_id]

    def _visuals(self, doc_to_visual: Callable | None, task, split, doc_id) -> list:
        if doc_to_visual is None:
            return []
        return _flatten_visuals(doc_to_visual(self._doc(task, split, doc_id)))

    def _gen_settings(self, gen_kwargs: dict) -> tuple[dict, list[str]]:
        g = dict(gen_kwargs or {})
        until = g.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        temperature = float(g.get("temperature", 0.0) or 0.0)
        if not g.get("do_sample", temperature > 0):
            temperature = 0.0
        if int(g.get("num_beams", 1) or 1) > 1:
            warnings.warn("mmoe lmms-eval model: beam search is not supported; using greedy/sampled decoding",
                          stacklevel=3)
        settings = dict(max_new_tokens=int(g.get("max_new_tokens", self.max_new_tokens) or self.max_new_tokens),
                        temperature=temperature, top_p=float(g.get("top_p", 1.0) or 1.0))
        return settings, until

    # ------------------------------------------------------------------ lmms API
    def generate_until(self, requests) -> list[str]:
        """One answer per request, in request order (batched over requests with equal gen kwargs)."""
        from tqdm import tqdm

        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted((req.args[1] or {}).items(), key=lambda kv: kv[0])), []).append(i)
        pbar = tqdm(total=len(requests), desc="mmoe generate", disable=getattr(self, "rank", 0) != 0)
        for idxs in groups.values():
            settings, until = self._gen_settings(requests[idxs[0]].args[1])
            for s in range(0, len(idxs), self.batch_size):
                chunk = idxs[s: s + self.batch_size]
                images, prompts = [], []
                for i in chunk:
                    context, _, doc_to_visual, doc_id, task, split = requests[i].args
                    images.append(self._visuals(doc_to_visual, task, split, doc_id))
                    prompts.append(context)
                outs = self.pipe.generate(images, prompts, **settings)
                for i, text in zip(chunk, outs):
                    results[i] = cut_at_stop(text, until).strip() if until else text
                pbar.update(len(chunk))
        pbar.close()
        return results  # type: ignore[return-value]

    @torch.no_grad()
    def score_continuation(self, images: list, context: str, continuation: str) -> tuple[float, bool, int]:
        """(sum of log-probs, greedy?, n tokens) of `continuation` as the answer to the templated `context`."""
        from mmoe.data.template import build_prompt

        tok, model = self.tokenizer, self.model
        n_img = len(images)
        text = context if "<image>" in context else "<image>\n" * n_img + context
        if text.count("<image>") != n_img:
            raise ValueError(f"context has {text.count('<image>')} '<image>' placeholders for {n_img} images")
        ctx = build_prompt(tok, text)
        cont = list(tok.encode(continuation.strip(), add_special_tokens=False)) if continuation.strip() else []
        if not cont:
            return 0.0, True, 0
        ids = torch.tensor([ctx + cont], dtype=torch.long, device=self.device)
        mask = torch.ones_like(ids, dtype=torch.bool)
        pixels = self.pipe._pixels(images) if images else None
        out = model(ids, mask, pixels)
        n = len(cont)
        logits = out.logits[0, -n - 1:-1].float()  # positions predicting each continuation token
        target = ids[0, -n:]
        logp = logits.log_softmax(-1).gather(-1, target[:, None]).squeeze(-1)
        greedy = bool((logits.argmax(-1) == target).all())
        return float(logp.sum()), greedy, n

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        from tqdm import tqdm

        res = []
        for req in tqdm(requests, desc="mmoe loglikelihood", disable=getattr(self, "rank", 0) != 0):
            context, target, doc_to_visual, doc_id, task, split = req.args
            continuation = target if isinstance(target, str) else target(self._doc(task, split, doc_id))
            if isinstance(continuation, (list, tuple)):
                continuation = continuation[0]
            images = self._visuals(doc_to_visual, task, split, doc_id)
            lp, greedy, n = self.score_continuation(images, context, str(continuation))
            if self.loglikelihood_output == "loss":
                res.append((-lp / max(n, 1), greedy))
            else:
                res.append((lp, greedy))
        return res

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("mmoe lmms-eval model: multi-round generation is not implemented")


if HAVE_LMMS_EVAL:  # legacy registry (needs lmms-eval's `evaluate` dependency); the manifest is the main path
    try:
        from lmms_eval.api.registry import register_model

        register_model(MODEL_NAME)(MMoELMMs)
    except Exception:  # pragma: no cover
        pass


def manifest():
    """Payload of the ``lmms_eval.models`` entry point: the ModelManifest registering ``mmoe``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.MMoELMMs")


__all__ = ["HAVE_LMMS_EVAL", "MMoELMMs", "cut_at_stop", "manifest"]
