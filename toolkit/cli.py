"""The command line: compose the Hydra config (``toolkit/conf``) and run one task.

``python run.py ...`` in a checkout, ``toolkit ...`` (the console script) or ``python -m toolkit ...``
where the package is installed: the same entry, the same configs. Your own configs (an
experiment, a model preset) go in a folder of yours, added with Hydra's search path:
``toolkit 'hydra.searchpath=[file:///abs/path/to/my_conf]' experiment=my_style``.

TOOLKIT_VERBOSE=1 shows the library messages that are filtered out as harmless (toolkit/logs.py).
"""


import gc
import importlib
import logging
import os
import sys

from toolkit.allocator import fix_mmap_threshold
from toolkit.logs import quiet

quiet()   # before any library is imported: some speak at import time

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from toolkit.config import check_overrides, credentials_in, register_resolvers, renamed_overrides  # noqa: E402
from toolkit.logs import finish_trackers, once_per_job, route_library_logs  # noqa: E402
from toolkit.model_defaults import chosen_lines, model_overrides  # noqa: E402
from toolkit.run import signals  # noqa: E402
from toolkit.run.history import record_attempt  # noqa: E402
from toolkit.run.launch import check_restartable, elastic_resume, job_run_id, shared_run_dir  # noqa: E402
from toolkit.run.lifecycle import rank_zero  # noqa: E402
from toolkit.run.resume import hydra_subdir, launch_args, restore  # noqa: E402
from toolkit.run.world import adopt_srun_layout, job_world  # noqa: E402

register_resolvers()
OmegaConf.register_new_resolver("hydra_subdir", hydra_subdir, replace=True)   # Hydra's own files: the entry's
log = logging.getLogger("toolkit")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> dict:
    # the job's stop signals, in every phase (also in a submitit cell, which does not pass the entry)
    signals.install(cfg.get("max_requeues"))
    once_per_job(job_world().rank)             # routine log lines from rank zero only
    cfg = restore(cfg, cfg.paths.output_dir)   # a resume: the run's saved settings
    # Values as resolved now (a secret arriving through ${oc.env:...}, a resume's saved config),
    # before the first thing that writes them: Hydra saved the config unresolved, but the run's
    # history, the CSV/TensorBoard hparams and the dashboards get resolved values.
    if secret := credentials_in([], cfg):
        sys.exit(f"config error: {secret}")
    record_attempt(cfg)                        # <run>/run_history.jsonl
    task = importlib.import_module(cfg.get("task_module") or f"toolkit.tasks.{cfg.task_name}")
    plan = importlib.import_module("toolkit.plan")   # with the task's imports: the collector is off until they end
    route_library_logs()
    imports_done()
    if rank_zero():
        for line in chosen_lines(cfg):   # what was chosen for the user, from the model
            log.info("chosen %s", line)
    try:
        if plan.at_start(cfg):   # memory.plan=only (--plan): the plan is all this run does
            return {"memory_plan": "printed"}
    except plan.PlanError as err:
        sys.exit(f"memory plan: {err}")
    launch_env = {k: os.environ.get(k) for k in DDP_ENV}
    try:
        return task.run(cfg)
    except signals.Stop as stop:   # what was saved is kept; requeued under SLURM, else exit 143
        signals.exit_for(stop)
    finally:
        finish_trackers()   # the next multirun cell starts its own dashboard run
        end_processes(launch_env)   # ... and its own DDP processes: this cell's are gone


# What Lightning's DDP launcher sets in the launching process (rank zero) for the ranks it starts.
DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE")


def end_processes(launch_env: dict[str, str | None]) -> None:
    """After a task: leave its process group and restore the DDP variables the cell started with,
    so the next cell of a multirun launches its own ranks (with LOCAL_RANK left set, Lightning
    would take this process for one it did not start, and wait for peers that never come)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for k, v in launch_env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def imports_done() -> None:
    """End of start-up (see ``entry``): what is alive now (the imported modules, the config)
    moves to the permanent generation, which later collections skip, and the collector runs
    again for what the task creates. Nothing when it was on already (a later multirun cell)."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def entry() -> None:
    """The console script ``toolkit`` (and ``python -m toolkit``, ``python run.py``).

    Python's cyclic collector walks every tracked object on each full collection. Importing
    torch, diffusers, transformers, peft and Lightning creates ~600 k of them, and the collections
    this triggers cost ~1.2 s of a ~6 s start-up, plus ~1.5 s more for the one at interpreter exit
    (py-spy, bench/README.md §11). So the collector is off until the task's imports are done
    (``imports_done``, the pattern of the ``gc.freeze`` docs); reference counting frees as usual."""
    if os.environ.get("TOOLKIT_LEAN_MALLOC") == "1":   # opt-in: halves CPU training speed (toolkit/allocator.py)
        fix_mmap_threshold()   # resident memory follows live tensors: the plan's CPU figures hold
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        _entry()
    finally:   # the caller's setting back (a refusal before the task; a test calling this in its process)
        if gc.isenabled() != was_enabled:
            (gc.enable if was_enabled else gc.disable)()


def _entry() -> None:
    previous = signals.install()   # from the first moment: a signal during start-up stops it (exit 143)
    try:
        _start()
    except signals.Stop as stop:
        signals.exit_for(stop)
    finally:
        signals.restore(previous)


class ArgsError(ValueError):
    """The command line cannot run: the message says what to change."""


def prepare_args(argv: list[str], notes: list[str] | None = None) -> list[str]:
    """The command line as Hydra receives it, from what the user typed: renamed keys, a misspelt key
    refused, the job's run dir (torchrun / srun), a restart or a resume's saved overrides, and the
    values left open filled from the model. Everything the entry does before Hydra composes, in one
    place (``tests/test_docs.py`` runs every documented command through it)."""
    argv = ["memory.plan=only" if a == "--plan" else a for a in argv]   # --plan: print the memory plan, stop
    try:
        args, renames = renamed_overrides(argv)
    except ValueError as err:   # a key whose meaning moved (REPLACED)
        raise ArgsError(str(err)) from None
    if notes is not None:
        notes.extend(renames)
    if problem := check_overrides(args):   # names the nearest valid key; Hydra does not
        raise ArgsError(problem)
    try:
        adopt_srun_layout()           # srun -n N: the tasks per node, or refused before any work
        args = shared_run_dir(args)   # torchrun / srun: one run dir from the job's id
        check_restartable()
        if (resumed := elastic_resume(args)) != args:   # torchrun restarted the group: continue the run
            if rank_zero():
                print(f"job {job_run_id()} started again: continuing its run from the last checkpoint",
                      file=sys.stderr)
            args = resumed
        args = launch_args(args)   # a resume: the run's saved overrides + these
        return model_overrides(args)   # what the user left open, from the model
    except (FileNotFoundError, ValueError) as err:   # RunDirError, ModelDefaultsError, LaunchError are
        # ValueErrors, and a model that cannot be read as given (a single file without model.config, ...)
        raise ArgsError(str(err)) from None


def _start() -> None:
    notes: list[str] = []
    try:
        sys.argv[1:] = prepare_args(sys.argv[1:], notes)
    except ArgsError as err:
        for note in notes:
            print(f"renamed: {note}", file=sys.stderr)
        sys.exit(f"config error: {err}")
    for note in notes:
        print(f"renamed: {note}", file=sys.stderr)
    try:
        main()
    except KeyboardInterrupt:   # Ctrl-C outside the training loop (inside it: a checkpoint, then 130 too)
        print("interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(130)
