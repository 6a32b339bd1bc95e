"""The command line: ``python -m flexround_pl fit --config configs/demo.yaml``.

A ``LightningCLI`` whose ``fit`` subcommand runs the block-by-block PTQ
pipeline instead of ``Trainer.fit`` (overriding ``fit`` on the CLI class is
how LightningCLI lets a subcommand be replaced). Everything else — YAML
configs, ``--print_config``, dotted overrides such as
``--trainer.max_steps 500`` or ``--model.quant.weight.bits 3`` — is stock
LightningCLI / jsonargparse.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Optional

from jsonargparse import ArgumentError
from lightning.pytorch.cli import LightningCLI

from flexround_pl import pipeline
from flexround_pl.data.base import PTQDataModule
from flexround_pl.ptq import PTQModel


class FlexRoundCLI(LightningCLI):
    def __init__(self, args: Optional[list[str]] = None, run: bool = True) -> None:
        super().__init__(
            model_class=PTQModel,
            datamodule_class=PTQDataModule,
            subclass_mode_data=True,
            save_config_callback=None,  # saved once by fit(), not once per block trainer
            auto_configure_optimizers=False,
            seed_everything_default=0,
            parser_kwargs={"exit_on_error": False},
            args=args,
            run=run,
        )

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        # The CLI's own trainer only carries settings; block trainers are built per block.
        with pipeline.quiet_lightning():
            return super().instantiate_trainer(**kwargs)

    def _trainer_settings(self) -> dict[str, Any]:
        return self.config[self.subcommand]["trainer"].as_dict()

    def fit(self, model: PTQModel, datamodule: PTQDataModule, **_: Any) -> None:
        settings = pipeline.TrainerSettings(self._trainer_settings())
        model.source.check()
        os.makedirs(settings.root, exist_ok=True)
        self._parser(self.subcommand).save(
            self.config[self.subcommand], os.path.join(settings.root, "config.yaml"), overwrite=True
        )
        self.results = pipeline.run(model, datamodule, settings)


def main(args: Optional[list[str]] = None) -> int:
    try:
        FlexRoundCLI(args=args)
    except ArgumentError as err:
        print(f"flexround_pl: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as err:
        print(f"flexround_pl: error: {_one_line(err)}", file=sys.stderr)
        return 2
    return 0


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())
