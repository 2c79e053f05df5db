"""Entry point: compose the Hydra config and run one task.

    python run.py                                   # default job on the embedded miniature
    python run.py task=train model.name_or_path=<hub id | dir> data.path=<dataset> trainer=gpu
    python run.py experiment=<name> trainer=ddp trainer.devices=8 trainer.num_nodes=2
    python run.py hydra.run.dir=<run dir> ckpt_path=last     # resume a run with its own settings
    python run.py task=sample | task=eval | task=summarize ...

Installed with pip, the same entry is the ``toolkit`` command (toolkit/cli.py).
TOOLKIT_VERBOSE=1 shows the library messages that are filtered out as harmless (toolkit/logs.py).
"""

from toolkit.cli import entry

if __name__ == "__main__":
    entry()
