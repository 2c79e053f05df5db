"""Hydra/OmegaConf helpers shared by the entry point and the tests, and where the package's files are.

The configs ship inside the package (``toolkit/conf``; ``conf`` at the top of a checkout links to
it), so an installed toolkit (``pip install .``) runs every task from anywhere. The embedded
miniature (``data/``: model, CLIP and style set, ~50 MB) is not in the wheel: a checkout has it,
an installed package finds it through ``TOOLKIT_DATA=<a checkout's data/>`` or ``paths.data_dir``.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

PACKAGE = Path(__file__).resolve().parent
CONFIG_DIR = PACKAGE / "conf"
# The checkout the package runs from (None for an installed package): pyproject.toml beside it.
ROOT: Path | None = PACKAGE.parent if (PACKAGE.parent / "pyproject.toml").is_file() else None


def data_dir() -> str:
    """``${data_dir:}``: the embedded miniature's folder — ``TOOLKIT_DATA``, else the checkout's
    ``data/``. An installed package without either fails here, saying what to set."""
    if env := os.environ.get("TOOLKIT_DATA"):
        if not (Path(env) / "miniature").is_dir():
            raise FileNotFoundError(f"TOOLKIT_DATA={env!r} holds no miniature/ folder: point it at a checkout's data/")
        return str(Path(env).resolve())
    if ROOT is not None and (ROOT / "data" / "miniature").is_dir():
        return str(ROOT / "data")
    raise FileNotFoundError(
        "the embedded miniature (model, CLIP, style set) is not installed with the package: set TOOLKIT_DATA=<a "
        "checkout's data/ folder> or paths.data_dir=<it>, or name your own model.name_or_path, data.path, "
        "eval.dataset and metrics.clip_model")


def _multirun() -> Any:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    return hc if hc.mode == RunMode.MULTIRUN else None


def in_multirun() -> bool:
    """This process runs a cell of a Hydra multirun (``-m``)."""
    return _multirun() is not None


def sweep_group(task: str) -> str | None:
    """A multirun's cells share one dashboard group: ``<task>/<sweep dir name>``; None outside one."""
    hc = _multirun()
    return f"{task}/{Path(hc.sweep.dir).name}" if hc is not None else None


def swept_keys(sweep_dir: str | Path) -> set[str]:
    """The keys a multirun varies: its command line's sweeps (``module.lora.r=4,8``) and
    ``hydra.sweeper.params``, read from the ``multirun.yaml`` Hydra's sweeper writes before the first
    cell (empty where it cannot be read: the name then shows every override)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    f = Path(sweep_dir) / "multirun.yaml"
    try:
        hydra_node = OmegaConf.load(f).get("hydra") or {}
        task = list(OmegaConf.select(hydra_node, "overrides.task", default=[]) or [])
        params = OmegaConf.select(hydra_node, "sweeper.params", default=None) or {}
        swept = {o.key_or_group for o in OverridesParser.create().parse_overrides(task) if o.is_sweep_override()}
    except Exception:   # a display name only: unreadable, every override is shown, as before
        return set()
    return swept | {str(k) for k in params}


def cell_name() -> str | None:
    """A multirun cell's dashboard name: its number and the overrides the sweep varies, else all its
    overrides, paths left out (``3: eval.guidance_scale=5,eval.seed=1``)."""
    hc = _multirun()
    if hc is None:
        return None
    parts = [p for p in hc.job.override_dirname.split(",") if "/" not in p.partition("=")[2]]
    swept = swept_keys(hc.sweep.dir)
    parts = [p for p in parts if p.partition("=")[0].lstrip("+~") in swept] or parts
    return f"{hc.job.num}: {','.join(parts)}"[:120]


def register_resolvers() -> None:
    """``${data_dir:}`` is the embedded miniature's folder (``data_dir``), so shipped data resolves
    from any working dir; ``${sweep_group:}`` / ``${cell_name:}`` name a multirun's dashboard group and cell."""
    for name, fn in (("data_dir", data_dir), ("sweep_group", sweep_group), ("cell_name", cell_name)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def _dotted_keys(node: Any, prefix: str = "") -> list[str]:
    out = []
    if isinstance(node, DictConfig):
        for k in node:
            key = f"{prefix}{k}"
            out.append(key)
            out.extend(_dotted_keys(node._get_node(k), key + "."))
    return out


def nearest_keys(cfg: DictConfig, key: str, n: int = 3) -> list[str]:
    """Valid dotted keys closest to ``key``: siblings under its deepest existing parent first."""
    parts = key.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        parent = ".".join(parts[:depth])
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if isinstance(node, DictConfig):
            close = difflib.get_close_matches(parts[depth], [str(k) for k in node], n=n, cutoff=0.6)
            if close:
                return [f"{parent}.{k}" if parent else k for k in close]
            break
    return difflib.get_close_matches(key, _dotted_keys(cfg), n=n, cutoff=0.6)


def check_overrides(args: list[str]) -> str | None:
    """Compose the config once for the command-line overrides (sweeps left out) and, if a key
    does not exist, return a message naming it and the nearest valid keys. None: fine, or an
    error Hydra itself reports well (syntax, missing group option)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import ConfigCompositionException

    lines = [a for a in args if "=" in a and not a.startswith("-")]
    if secret := credentials_in(lines):   # before anything could print or save the value
        return secret
    try:
        parsed = OverridesParser.create().parse_overrides(lines)
    except Exception:   # noqa: BLE001 - a syntax error: Hydra's own message is precise
        return None
    plain = [o.input_line for o in parsed if not o.is_sweep_override()]
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        try:
            composed = compose("config", overrides=plain)
            return credentials_in([], composed) or ignored_by_task(composed, parsed)
        except ConfigCompositionException as err:
            text = f"{err} {err.__cause__ or ''}"
        m = re.search(r"full_key: (\S+)", text) or re.search(r"Could not (?:override|append to) '([^']+)'", text)
        if m is None or "not in struct" not in text and "No match in the defaults list" not in text:
            return None
        bad = m.group(1).lstrip("+~")
        culprit = next((line for line in plain if f"{line.lstrip('+~').split('=')[0]}.".startswith(f"{bad}.")),
                       None)
        try:
            cfg = compose("config", overrides=[line for line in plain if line != culprit])
        except ConfigCompositionException:
            return f"unknown config key {bad!r}"
    near = nearest_keys(cfg, bad)
    where = f"the override {culprit!r}" if culprit else "a config file (an experiment or group option)"
    hint = f"; did you mean {' or '.join(repr(k) for k in near)}?" if near else ""
    return (f"unknown config key {bad!r} in {where}{hint} "
            "(python run.py --cfg job prints every valid key; prefix a new key with '+' to add it)")


# A URL's start, and a query naming a secret (presigned URLs).
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_SECRET_QUERY = re.compile(r"[?&][A-Za-z0-9_-]*(signature|credential|token|secret|password)=", re.IGNORECASE)
_HOST_PORT = re.compile(r"[^:]*:\d+")


def _userinfo(value: str) -> list[tuple[int, int]]:
    """The spans of ``value`` holding a URL's user info (``scheme://<span>@host``). Not ``urlparse``:
    it ends the authority at the first ``/`` (RFC 3986), so an unescaped secret holding one, as
    AWS secret keys do (``s3://AKIA…:abc/def@bucket``), would look like a host and a path. Here the
    user info runs to the URL's last ``@`` (before any query or fragment), and counts when it has
    no ``/`` (``user@host``, ``key:secret@host``) or its part before the first ``/`` holds a ``:``
    and is not a ``host:port`` (``user:abc/def@host``); so ``https://host:8080/@user``,
    ``s3://bucket/run:1@v2`` and ``git+https://host/repo@v1`` pass. (A secret whose part before
    its first ``/`` is all digits reads as a port: the one form not caught.)"""
    spans = []
    for m in _SCHEME.finditer(value):
        rest = re.match(r"[^\s?#]*", value[m.end():]).group(0)
        if "@" not in rest:
            continue
        info = rest[: rest.rindex("@")]
        first = info.split("/")[0]
        if "/" not in info or ":" in first and not _HOST_PORT.fullmatch(first):
            spans.append((m.end(), m.end() + len(info)))
    return spans


def has_credentials(value: str) -> bool:
    """Whether a config value holds a URL carrying credentials (``s3://key:secret@bucket``,
    ``http://user:pass@endpoint``, a presigned query): they would be saved with the run."""
    return bool(_userinfo(value) or _SECRET_QUERY.search(value))


def redact_url(value: str) -> str:
    """``value`` with every URL's user info and query replaced by ``<redacted>``."""
    for start, end in reversed(_userinfo(value)):
        value = f"{value[:start]}<redacted>{value[end:]}"
    return re.sub(r"\?[^\s,\]]*", "?<redacted>", value) if _SECRET_QUERY.search(value) else value


def _strings(node: Any, key: str = "") -> Any:
    """(dotted key, value) of every string leaf of a plain container, lists included."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _strings(v, f"{key}[{i}]")
    elif isinstance(node, str):
        yield key, node


def _resolved_strings(node: DictConfig | ListConfig, key: str = "") -> Any:
    """(dotted key, resolved value) of every string leaf that resolves here; one that cannot yet
    (``${hydra:…}`` before Hydra runs, a missing ``???``) is left out: it is checked where it can."""
    is_dict = isinstance(node, DictConfig)
    for k in node.keys() if is_dict else range(len(node)):
        name = (f"{key}.{k}" if key else str(k)) if is_dict else f"{key}[{k}]"
        try:
            value = node[k]
        except Exception:  # noqa: BLE001 - any resolver's error: not resolvable at this point
            continue
        if isinstance(value, DictConfig | ListConfig):
            yield from _resolved_strings(value, name)
        elif isinstance(value, str):
            yield name, value


def credentials_in(args: list[str], cfg: DictConfig | None = None) -> str | None:
    """A message if an override (or, composed, a config file's value, as written or resolved: a
    secret can arrive through ``${oc.env:…}``) is a URL carrying credentials, naming the key with
    the secret redacted; checked before Hydra saves the config, and again at the task's start
    before anything is recorded (``toolkit.cli.main``)."""
    found = [(a.partition("=")[0].lstrip("+~"), a.partition("=")[2]) for a in args if "=" in a]
    if cfg is not None:
        found += list(_strings(OmegaConf.to_container(cfg, resolve=False)))
        found += list(_resolved_strings(cfg))
    bad = next(((k, v) for k, v in found if has_credentials(v)), None)
    if bad is None:
        return None
    return (f"{bad[0]}={redact_url(bad[1])}: credentials in a URL would be saved with the run's config and logs; "
            "give them in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or a credentials file "
            "(~/.aws/credentials), and the URL without them")


# Read by every task (or by the entry itself): never refused as ignored.
ALWAYS_READ = frozenset({"hydra", "task", "task_name", "task_module", "task_reads", "experiment", "debug", "paths",
                         "seed", "chosen"})


def ignored_by_task(cfg: DictConfig, parsed: list[Any]) -> str | None:
    """A message if an override sets a group the task does not read (``task_reads`` in its config),
    e.g. ``task=report trainer.devices=8``: accepted and ignored would look like it took effect.
    One root config serves every task (finetune_eval is train + eval, resume and sweeps compose the
    same tree), so the tasks that read little say what they read instead of a config of their own."""
    reads = cfg.get("task_reads")
    if reads is None:
        return None
    allowed = set(reads) | ALWAYS_READ
    ignored = [o.input_line for o in parsed if o.key_or_group.lstrip("+~").split(".")[0].split("@")[0] not in allowed]
    if not ignored:
        return None
    return (f"task={cfg.task_name} does not read {', '.join(ignored)}: it reads only {', '.join(map(str, reads))} "
            "(and paths, seed); drop the override, or pick the task that uses it")


def as_list(x: Any) -> list[Any]:
    """A config value (None, one value, or a list) as a plain list."""
    if x is None:
        return []
    if isinstance(x, ListConfig | DictConfig):
        x = OmegaConf.to_container(x, resolve=True)
    return list(x) if isinstance(x, list | tuple) else [x]


# Keys renamed in 0.2 (module options grouped by the object they configure): the old names keep
# working for one release, with a message. Exact keys, and prefixes (ending in ".") of sub-trees.
RENAMED: dict[str, str] = {
    "module.caption_dropout": "module.objective.caption_dropout",
    "module.snr_gamma": "module.objective.snr_gamma",
    "module.noise_offset": "module.objective.noise_offset",
    "module.zero_terminal_snr": "module.objective.zero_terminal_snr",
    "module.input_perturbation": "module.objective.input_perturbation",
    "module.debiased_estimation": "module.objective.debiased_estimation",
    "module.masked_loss": "module.objective.masked_loss",
    "module.min_timestep": "module.objective.timesteps.min",
    "module.max_timestep": "module.objective.timesteps.max",
    "module.timestep_density.": "module.objective.timesteps.",
    "module.loss": "module.objective.loss.kind",
    "module.huber_delta": "module.objective.loss.huber_delta",
    "module.gradient_checkpointing": "module.speed.gradient_checkpointing",
    "module.attention": "module.speed.attention",
    "module.channels_last": "module.speed.channels_last",
    "module.compile": "module.speed.compile",
    "module.val_timesteps": "module.validation.timesteps",
    "module.val_seed": "module.validation.seed",
    "metrics.inception_weights": "metrics.features.inception",
}
# Keys whose meaning moved into a list: refused, saying what to write instead.
REPLACED: dict[str, str] = {
    f"metrics.{k}": f"metrics.{k} is gone: a cell computes what metrics.compute lists (default "
                    f"[fid,kid,clip_score,prdc,vendi,cmmd]); add or drop {name} there"
    for k, name in (("prdc", "prdc"), ("vendi", "vendi"), ("fid_infinity", "fid_infinity"))
}


def renamed_key(key: str) -> str | None:
    """The current name of a renamed config key (None: not renamed)."""
    prefix = re.match(r"[+~]*", key).group(0)
    bare = key[len(prefix):]
    if bare in RENAMED and not bare.endswith("."):
        return prefix + RENAMED[bare]
    old = next((o for o in RENAMED if o.endswith(".") and bare.startswith(o)), None)
    return prefix + RENAMED[old] + bare[len(old):] if old else None


def renamed_overrides(args: list[str]) -> tuple[list[str], list[str]]:
    """``args`` with renamed keys under their current names, and one message per rename."""
    out, notes = [], []
    for a in args:
        key, eq, value = a.partition("=")
        if key.lstrip("+~") in REPLACED:
            raise ValueError(REPLACED[key.lstrip("+~")])
        new = renamed_key(key) if eq and not a.startswith("-") else None
        if new is None:
            out.append(a)
            continue
        out.append(f"{new}={value}")
        notes.append(f"{key.lstrip('+~')} is now {new.lstrip('+~')} (the old name works until the next release)")
    return out, notes
