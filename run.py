"""Entry point: compose the Hydra config and run one task.

    python run.py                                   # default job on the embedded miniature
    python run.py task=train model.name_or_path=<hub id | dir> data.path=<dataset> trainer=gpu
    python run.py experiment=<name> trainer=ddp trainer.devices=8 trainer.num_nodes=2
    python run.py task=sample | task=eval | task=summarize ...
"""

import importlib
import sys

import hydra
from omegaconf import DictConfig

from toolkit.config import check_overrides, register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> dict:
    return importlib.import_module(f"toolkit.tasks.{cfg.task_name}").run(cfg)


if __name__ == "__main__":
    if problem := check_overrides(sys.argv[1:]):   # names the nearest valid key; Hydra does not
        sys.exit(f"config error: {problem}")
    main()
