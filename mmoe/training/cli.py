"""LightningCLI for mmoe: `python train.py fit --config configs/default.yaml`.

Typed dataclass configs become nested YAML groups (`model.arch.decoder.ffn_moe.top_k`); attribute
docstrings become `--help` text. Unknown keys and bad values fail with the field named.
"""

from __future__ import annotations

import os

from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningCLI

from mmoe.data.datamodule import MMoEDataModule

from .module import MMoEModule

set_parsing_settings(docstring_parse_attribute_docstrings=True)


class MMoECLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--export_dir", type=str | None, default=None,
                            help="Export the trained model here when fit ends (config.json + safetensors + "
                                 "tokenizer); default: <log_dir>/export")
        parser.link_arguments("data.image_size", "model.arch.vision.image_size")

    def after_fit(self) -> None:
        from .callbacks import export_after_fit
        export_after_fit(self.trainer, self.model, self.datamodule, self.config.get(self.subcommand, {}).get("export_dir"))


def cli_main(args: list[str] | None = None, run: bool = True) -> MMoECLI:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return MMoECLI(MMoEModule, MMoEDataModule, args=args, run=run, seed_everything_default=0,
                   save_config_kwargs={"overwrite": True})
