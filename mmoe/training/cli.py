"""LightningCLI for mmoe: `python train.py fit --config configs/default.yaml`.

Typed dataclass configs become nested YAML groups (`model.arch.decoder.ffn_moe.top_k`); attribute
docstrings become `--help` text. Unknown keys and bad values fail with the field named.
"""

from __future__ import annotations

import os

from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningCLI

import mmoe.parallel.strategy  # noqa: F401  (registers --trainer.strategy ddp_ep)
from mmoe.data.datamodule import MMoEDataModule

from .module import MMoEModule

set_parsing_settings(docstring_parse_attribute_docstrings=True)


class MMoECLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--export_dir", type=str | None, default=None,
                            help="Export the trained model here when fit ends (config.json + safetensors + "
                                 "tokenizer); default: <log_dir>/export")
        # preprocessing follows the vision backbone's own config
        for f in ("image_size", "image_mean", "image_std"):
            parser.link_arguments(f"model.arch.vision.{f}", f"data.{f}")

    def instantiate_trainer(self, **kwargs):
        """Loggers unless the config names its own: CSV always, TensorBoard when installed, both under
        trainer.default_root_dir (so one override moves the whole run)."""
        cfg = self._get(self.config_init, "trainer", default={})
        if cfg.get("logger") in (None, True) and "logger" not in kwargs:
            from lightning.pytorch.loggers import CSVLogger
            root = cfg.get("default_root_dir") or "runs/default"
            loggers = [CSVLogger(root, name="", version="")]
            try:
                import tensorboard  # noqa: F401
                from lightning.pytorch.loggers import TensorBoardLogger
                loggers.append(TensorBoardLogger(root, name="", version="tb", default_hp_metric=False))
            except ImportError:
                pass
            kwargs["logger"] = loggers
        parallel = getattr(self.model, "parallel_cfg", None)
        if parallel is not None and parallel.ep_size > 1 and cfg.get("strategy") in (None, "auto") \
                and "strategy" not in kwargs:
            kwargs["strategy"] = "ddp_ep"  # expert parallelism needs its gradient and checkpoint handling
        if not cfg.get("plugins") and "plugins" not in kwargs:
            from .reliability import AtomicCheckpointIO
            kwargs["plugins"] = [AtomicCheckpointIO()]
        return super().instantiate_trainer(**kwargs)

    def _instantiate_trainer(self, config, callbacks):
        """Adds the progress display fit for the output (bar on a terminal, lines in a log) unless the config
        names a progress bar or disables it, and the SIGTERM checkpoint callback."""
        from lightning.pytorch.callbacks import ProgressBar

        from .progress import choose_progress_bar
        from .reliability import CheckpointOnSigterm

        configured = config.get("callbacks") or []
        listed = (configured if isinstance(configured, list) else [configured]) + list(callbacks)
        extra = []
        if config.get("enable_progress_bar", True) is not False and not any(isinstance(c, ProgressBar)
                                                                             for c in listed):
            extra.append(choose_progress_bar())
        if not any(isinstance(c, CheckpointOnSigterm) for c in listed):
            extra.append(CheckpointOnSigterm())
        return super()._instantiate_trainer(config, list(callbacks) + extra)

    def after_fit(self) -> None:
        from .callbacks import export_after_fit
        export_after_fit(self.trainer, self.model, self.datamodule, self.config.get(self.subcommand, {}).get("export_dir"))


def cli_main(args: list[str] | None = None, run: bool = True) -> MMoECLI:
    """Runs the CLI; a SIGTERM during fit (checkpoint saved by `CheckpointOnSigterm`) exits with code 143."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from .reliability import SIGTERM_EXIT_CODE

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # no abbreviated flags: a typo such as --model.arch.decoder.n_layer must fail, not set n_layers
    try:
        return MMoECLI(MMoEModule, MMoEDataModule, args=args, run=run, seed_everything_default=0,
                       save_config_kwargs={"overwrite": True}, parser_kwargs={"allow_abbrev": False})
    except SIGTERMException as e:
        raise SystemExit(SIGTERM_EXIT_CODE) from e
