"""Compose documented commands as the entry would, in a process of their own (``tests/test_docs.py``).

    python tests/docs_compose.py < commands.json > results.json

Each command (a JSON list of ``{"id", "args"}``) goes through ``toolkit.cli.prepare_args`` (renamed
keys, misspelt keys, the job's run dir, a resume's saved overrides, the settings that follow the
model), then every cell of it (a ``-m`` line: one per combination of its swept values, with the
settings that follow its model chosen for it as the sweeper does) is composed with Hydra and
resolved whole (a ``???`` left open fails). A process of its own because the hub
stand-ins are found through ``HF_HUB_CACHE``, which huggingface_hub reads when it is imported.
"""

from __future__ import annotations

import json
import sys
import traceback


def sweep_cells(parsed: list) -> list[list[str]]:
    """The cells that tell a multirun's compositions apart: every combination of the swept config
    groups (``experiment=a,b``: each a different tree), and each swept value once with the other
    values at their first (``x=1,2 y=3,4``: their product composes the same keys with the same types)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    from toolkit.config import CONFIG_DIR

    names = {d.name for d in CONFIG_DIR.iterdir() if d.is_dir()}
    group = [not o.is_sweep_override() or "/" in o.key_or_group or o.key_or_group.lstrip("+~") in names
             for o in parsed]
    groups = [o for o, g in zip(parsed, group) if g]
    values = [o for o, g in zip(parsed, group) if not g]
    base = BasicSweeper.split_arguments(groups, None)[0]
    firsts = [f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}" for o in values]
    cells = [[*cell, *firsts] for cell in base]
    for k, o in enumerate(values):
        for v in list(o.sweep_string_iterator())[1:]:
            cells.append([*base[0], *firsts[:k], f"{o.get_key_element()}={v}", *firsts[k + 1:]])
    return cells


def compose_cells(args: list[str]) -> list[dict]:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf, open_dict

    from toolkit.config import CONFIG_DIR
    from toolkit.model_defaults import cell_overrides, chosen_lines

    overrides = [a for a in args if not a.startswith("-")]
    multirun = any(a in ("-m", "--multirun") for a in args)
    cells = sweep_cells(OverridesParser.create().parse_overrides(overrides)) if multirun else [overrides]
    out = []
    for cell in cells:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("config", overrides=list(cell), return_hydra_config=True)
            if multirun and (chosen := cell_overrides(cfg, list(cell))):   # as the sweeper does, per cell
                cfg = compose("config", overrides=[*cell, *chosen], return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = "/tmp/docs-compose"
            cfg.hydra.job.num = 0
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)   # every value resolves, none left ???
        out.append({"task": cfg.get("task_name"), "chosen": chosen_lines(cfg)})
    return out


def main() -> None:
    from toolkit.cli import ArgsError, prepare_args
    from toolkit.config import register_resolvers

    register_resolvers()
    results = {}
    for cmd in json.load(sys.stdin):
        try:
            args = prepare_args(list(cmd["args"]))
        except ArgsError as err:
            results[cmd["id"]] = {"refused": str(err)}
            continue
        except Exception as err:   # noqa: BLE001 - reported per command
            results[cmd["id"]] = {"crash": f"{type(err).__name__}: {err}\n{traceback.format_exc()[-1500:]}"}
            continue
        try:
            results[cmd["id"]] = {"args": args, "cells": compose_cells(args)}
        except Exception as err:   # noqa: BLE001 - reported per command
            results[cmd["id"]] = {"args": args, "crash": f"{type(err).__name__}: {err}"}
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
