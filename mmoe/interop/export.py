"""Export a trained model to a self-contained directory: config.json + model.safetensors + tokenizer.

Written to a temporary sibling directory and renamed into place, so a kill never leaves a half export.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import save_model

from mmoe import __version__
from mmoe.config_io import to_dict
from mmoe.model.vlm import MMoEVLM, VLMConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


def export_model(model: MMoEVLM, out_dir: str | Path, tokenizer=None, extra: dict | None = None) -> Path:
    """Write `out_dir` atomically; `tokenizer` is a HF tokenizer (saved with save_pretrained) or a directory."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        config = {"model_type": "mmoe-vlm", "mmoe_version": __version__, "arch": to_dict(model.cfg)}
        if extra:
            config["extra"] = extra
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        save_model(model, str(tmp / "model.safetensors"))
        if tokenizer is not None:
            if isinstance(tokenizer, (str, Path)):
                for name in TOKENIZER_FILES:
                    if (Path(tokenizer) / name).exists():
                        shutil.copy(Path(tokenizer) / name, tmp / name)
            else:
                tokenizer.save_pretrained(str(tmp))
        if out_dir.exists():
            old = out_dir.with_name(out_dir.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_export_config(model_dir: str | Path) -> VLMConfig:
    from mmoe.config_io import from_dict
    model_dir = Path(model_dir)
    cfg_path = model_dir / "config.json"
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    if not cfg_path.exists():
        raise FileNotFoundError(f"{model_dir} is not an exported mmoe model: {cfg_path.name} is missing")
    data = json.loads(cfg_path.read_text())
    if data.get("model_type") != "mmoe-vlm":
        raise ValueError(f"{cfg_path}: model_type is {data.get('model_type')!r}, expected 'mmoe-vlm'")
    return from_dict(VLMConfig, data["arch"], "arch")
