"""A run directory describes itself: a resume continues the run with the settings it was started with.

    python run.py task=train data.path=my_data trainer.max_steps=500          # writes <run>/.hydra/
    python run.py hydra.run.dir=<run> ckpt_path=last                           # resumes: same data, 500 steps
    python run.py hydra.run.dir=<run> ckpt_path=last trainer.max_steps=800     # extends it
    python run.py hydra.run.dir=<run> ckpt_path=last data.path=other           # refused, naming the saved value

``launch_args`` (toolkit/cli.py, before Hydra) turns a resume command into the run's saved overrides
(``<run>/.hydra/overrides.yaml``) followed by the new ones, refuses new ones that would change the
run's identity (``toolkit.run.identity``: anything but ``RESUMABLE`` and the keys that cannot change
a number; naming each key with its saved and its new value), and sends
Hydra's files for the attempt to ``<run>/.hydra/resume-<n>/``, so the first run's ``.hydra/``
is never written over. In the task function, ``restore`` takes the run's saved config as the
truth (if ``conf/`` changed since the run started, the saved values win, with a warning) and
``run.history.record_attempt`` appends each start and resume to ``<run>/run_history.jsonl``.
"""

from __future__ import annotations

import logging
import re
import shlex
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from toolkit.config import CONFIG_DIR, ROOT, register_resolvers, renamed_overrides
from toolkit.run.identity import RESUMABLE, identity, may_change_on_resume
from toolkit.run.lifecycle import RunDirError, check_fresh, nothing_to_resume, rank_zero

log = logging.getLogger(__name__)
SAVED = Path(".hydra")
_ABSENT = "(absent)"


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted leaf keys of a plain container (lists and empty dicts are leaves)."""
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def _container(cfg: Any) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else dict(cfg)


def _parse(args: list[str]) -> list[Any]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides([a for a in args
                                                     if ("=" in a or a.startswith("~")) and not a.startswith("-")])


def _compose(overrides: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_resolvers()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            return compose("config", overrides=overrides)
    finally:
        GlobalHydra.instance().clear()


def hydra_quote(value: str) -> str:
    """``value`` as a Hydra override value (quoted when it holds characters Hydra parses)."""
    if re.fullmatch(r"[\w/.\-+~@%]+", value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def resume_command(run: str | Path) -> str:
    """The shell command that resumes ``run`` (works as printed from any directory)."""
    return shlex.join([*launcher(), f"hydra.run.dir={hydra_quote(str(Path(run).resolve()))}", "ckpt_path=last"])


_SUBDIRS: dict[str, str | None] = {}


def hydra_subdir() -> str | None:
    """``${hydra_subdir:}``, Hydra's ``output_subdir``: ``.hydra`` for rank zero of a run, nothing for
    the other ranks (their files would be rank zero's again), and ``.hydra/rerun-<n>`` for a sweep
    cell whose folder already holds a ``.hydra/`` (the same sweep dir run again): Hydra writes these
    files before any task code runs, so this is what keeps a cell's first record from being written
    over by another cell's settings. Decided once per folder and process."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not rank_zero():
        return None
    hc = HydraConfig.get()
    out = str(hc.runtime.output_dir)
    if out not in _SUBDIRS:
        first = Path(out) / SAVED / "config.yaml"
        n = 1 + len(list((Path(out) / SAVED).glob("rerun-*")))
        _SUBDIRS[out] = f"{SAVED}/rerun-{n}" if hc.mode == RunMode.MULTIRUN and first.is_file() else str(SAVED)
    return _SUBDIRS[out]


def relaunch_as_cell(ckpt_path: str | None) -> None:
    """In a multirun cell, make the command Lightning's DDP launcher re-runs for the other ranks
    (``sys.argv`` plus ``hydra.run.dir``) run this cell, not the sweep again: the cell's own
    resolved overrides (no ``-m``, no sweep syntax), its run dir, and its resume decision. In a
    cell that submitit started (``hydra/launcher=local``: ``python -m submitit.core._submit``),
    Lightning would re-run submitit's module: the other ranks run the toolkit's entry instead."""
    import importlib.util
    import sys

    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict, read_write

    import __main__

    spec = getattr(__main__, "__spec__", None)
    if spec is not None and spec.name.split(".")[0] not in ("toolkit", "miniature"):
        __main__.__spec__ = importlib.util.find_spec("toolkit.__main__")   # Lightning runs python -m <this>
    hc = HydraConfig.get()
    args = [a for a in hc.overrides.task if not a.startswith("ckpt_path=")]
    sys.argv[1:] = [*args, *([f"ckpt_path={ckpt_path}"] if ckpt_path else [])]
    with read_write(hc), open_dict(hc):
        hc.run.dir = hc.runtime.output_dir   # what the launcher passes as hydra.run.dir


def launcher() -> list[str]:
    """How this process was started, as a command a user can type: ``python run.py`` (a checkout),
    ``toolkit`` (the installed console script) or ``python -m toolkit``."""
    import sys

    import __main__

    if Path(sys.argv[0]).name == "toolkit":   # the console script
        return ["toolkit"]
    spec = getattr(__main__, "__spec__", None)
    if spec is not None and spec.name.split(".")[0] in ("toolkit", "miniature"):   # python -m <it>
        return ["python", "-m", spec.name.split(".")[0]]
    if ROOT is None:   # an installed package, started some other way: its command
        return ["toolkit"]
    return ["python", "run.py" if Path.cwd().resolve() == ROOT else str(ROOT / "run.py")]


def has_last_checkpoint(run: Path) -> bool:
    return any(p.is_file() for p in run.rglob("last.ckpt"))


def launch_args(args: list[str]) -> list[str]:
    """The command-line overrides Hydra gets for ``args``.

    A fresh run: ``args`` unchanged (refused if its run dir already holds another run's
    checkpoints). A resume (``ckpt_path`` set and ``hydra.run.dir`` naming a run with a saved
    config): the run's saved overrides, then ``args``, then ``hydra.output_subdir`` pointing at a
    new ``.hydra/resume-<n>`` (ranks other than zero write no Hydra files). Raises
    ``RunDirError`` with what to do instead."""
    if any(a in ("-m", "--multirun") for a in args):   # sweeps: each job dir is its own run
        return args
    given = {o.key_or_group: o for o in _parse(args) if o.package is None}
    run_o, ckpt_o = given.get("hydra.run.dir"), given.get("ckpt_path")
    run = Path(str(run_o.value())).expanduser() if run_o is not None else None
    ckpt = ckpt_o.value() if ckpt_o is not None else None
    if ckpt in (None, "null"):
        if run is not None and rank_zero() and (run / "checkpoints").is_dir() and _trains(args):
            check_fresh(run, resume_command(run))
        return args
    if run is None:
        if ckpt == "last":
            raise RunDirError("ckpt_path=last resumes a run: name it with hydra.run.dir=<its run dir>, e.g. "
                              "python run.py hydra.run.dir=outputs/train/<time> ckpt_path=last")
        return args   # start a fresh run dir from a checkpoint file
    if ckpt == "last" and not has_last_checkpoint(run):
        raise nothing_to_resume(f"{run} " + ("does not exist" if not run.exists()
                                             else "holds no checkpoint (no last.ckpt under it)"))
    if not (run / SAVED / "config.yaml").is_file():
        return args   # a checkpoint without a saved config (not written by run.py): resume as told
    saved = saved_overrides(run)
    merged = merge_overrides(saved, args)
    check_resume(run, saved, merged)
    n = 1 + len(list((run / SAVED).glob("resume-*")))
    subdir = f"{SAVED}/resume-{n}" if rank_zero() else "null"
    return [*merged, f"hydra.output_subdir={subdir}"]


def saved_overrides(run: Path) -> list[str]:
    """The overrides ``run`` was started with (``.hydra/overrides.yaml``), after the config search
    path it was composed with (``hydra.searchpath``, in ``.hydra/hydra.yaml``): an experiment of
    the user's own config folder composes again on resume."""
    # as written: an override's ${...} is the run's to resolve, not this reader's
    saved = renamed_overrides([str(x) for x in OmegaConf.to_container(OmegaConf.load(run / SAVED / "overrides.yaml"),
                                                                       resolve=False)])[0]
    hydra_file = run / SAVED / "hydra.yaml"
    hydra = OmegaConf.to_container(OmegaConf.load(hydra_file).hydra.overrides.hydra, resolve=False) \
        if hydra_file.is_file() else []
    return [*(str(o) for o in hydra if str(o).startswith("hydra.searchpath=")), *saved]


def merge_overrides(saved: list[str], args: list[str]) -> list[str]:
    """``saved`` then ``args``, each setting once. The commands that resume a run repeat its own
    overrides (a requeued SLURM job, a restarted torchrun group, the rank Lightning's launcher
    starts with the parent's command line), and Hydra refuses a second ``+key=...``: an override
    of a key the saved ones set replaces that one where it stands (keeping its ``+``), an
    identical one is dropped, the rest follow."""

    def keyed(lines: list[str]) -> dict[str, Any]:   # a deletion (~key) is keyed apart from a value of that key
        ok = [a for a in lines if ("=" in a or a.startswith("~")) and not a.startswith("-")]
        return {a: ("del" if a.startswith("~") else "set", o.key_or_group, o.package) for a, o in zip(ok, _parse(ok))}

    mine = keyed(saved)
    at = {mine[a]: i for i, a in enumerate(saved) if a in mine}
    out, given = list(saved), keyed(args)
    for a in args:
        i = at.get(given.get(a))
        if i is None:
            out.append(a)
            continue
        plus = re.match(r"\+*", out[i]).group()
        out[i] = plus + a.lstrip("+") if plus and not a.startswith("+") else a
    return out


def _plain(args: list[str]) -> list[str]:
    """The overrides among ``args`` that shape the config (deletions, ``~key``, included): no flags, no
    ``hydra.*`` but the search path."""
    return [a for a in args if ("=" in a or a.startswith("~")) and not a.startswith("-") and
            (not a.lstrip("+~").startswith("hydra.") or a.lstrip("+").startswith("hydra.searchpath="))]


def _trains(args: list[str]) -> bool:
    """The task of ``args`` trains (its config has ``ckpt_path``); False if they do not compose
    (Hydra then reports why)."""
    try:
        return "ckpt_path" in _compose(_plain(args))
    except Exception:   # noqa: BLE001 - composition errors are Hydra's to report
        return False


def check_resume(run: Path, saved: list[str], args: list[str]) -> None:
    """Refuse ``args`` (``merge_overrides(saved, new)``) if they change the identity of the run saved
    in ``run`` (``RESUMABLE`` aside)."""
    from hydra.errors import HydraException

    try:
        before, after = _compose(saved), _compose(_plain(args))
    except HydraException as err:
        raise RunDirError(f"cannot resume {run}: its saved overrides ({run / SAVED / 'overrides.yaml'}) and "
                          f"these do not compose with the current conf/: {err}") from None
    changed = identity(after, with_contents=False).differences(identity(before, with_contents=False).keys,
                                                               allow=RESUMABLE, labels=("saved", "given"))
    if not changed:
        return
    lines = [f"  {line}" for line in changed[:12]] + ([f"  ... and {len(changed) - 12} more"] if len(changed) > 12
                                                       else [])
    raise RunDirError(
        f"cannot resume {run} with different settings: a resume continues the run with the settings it "
        f"started with ({run / SAVED / 'config.yaml'}), and these overrides change them:\n" +
        "\n".join(lines) + "\nOn resume only " + ", ".join(RESUMABLE) + " may change, besides what cannot change a "
        "number (toolkit/run/identity.py: outputs, logging, progress, loader workers; the number of processes "
        "with the same trainer.devices × trainer.num_nodes × trainer.accumulate_grad_batches). To train with other "
        f"settings, start a new run (another hydra.run.dir), e.g. from this run's weights with module.init_adapter="
        f"{run / 'adapter'}.")


def _set(tree: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for p in parents:
        if not isinstance(tree.get(p), dict):
            tree[p] = {}
        tree = tree[p]
    tree[leaf] = value


def _delete(tree: dict[str, Any], key: str) -> None:
    *parents, leaf = key.split(".")
    for p in parents:
        tree = tree.get(p) if isinstance(tree.get(p), dict) else {}
    tree.pop(leaf, None)


def restore(cfg: DictConfig, output_dir: str | Path) -> DictConfig:
    """On a resume, the run's saved config, with only the keys a resume may change taken from ``cfg``
    (``toolkit.run.identity.may_change_on_resume``).

    ``cfg`` is what Hydra composed from the saved overrides plus the new ones (already checked by
    ``launch_args``); it differs from the saved config elsewhere only if ``conf/`` changed since
    the run started, and then the saved values are kept, with a warning."""
    saved_file = Path(output_dir) / SAVED / "config.yaml"
    if not cfg.get("ckpt_path") or not saved_file.is_file():
        return cfg
    now, saved_tree = _container(cfg), _container(OmegaConf.load(saved_file))
    flat_now, flat_saved = flatten(now), flatten(saved_tree)
    if flat_now == flat_saved:
        return cfg
    drift = []
    for key in sorted(set(flat_now) | set(flat_saved)):
        if flat_now.get(key, _ABSENT) == flat_saved.get(key, _ABSENT):
            continue
        if not may_change_on_resume(key):
            drift.append(key)
        elif key in flat_now:
            _set(saved_tree, key, flat_now[key])
        elif not any(k.startswith(f"{key}.") for k in flat_now):
            _delete(saved_tree, key)
    if drift and rank_zero():
        log.warning("conf/ changed since this run started; the resume keeps the run's saved values of %s",
                    ", ".join(drift[:10]) + (f" and {len(drift) - 10} more" if len(drift) > 10 else ""))
    out = OmegaConf.create(saved_tree)
    OmegaConf.set_struct(out, True)
    return out
