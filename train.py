"""Train mmoe models: `python train.py fit --config configs/default.yaml` (also validate, test, --help)."""

from mmoe.training.cli import cli_main

if __name__ == "__main__":
    cli_main()
