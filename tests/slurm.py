"""A one-host SLURM cluster for the tests (and bench/slurm_sweep.py): munged, slurmctld and slurmd
started as root from Debian's ``slurm-wlm`` and ``munge``, with this host as the one node (its real
CPU count), one partition, no accounting, every file (key, state, spool, logs, sockets) in a temp
folder and ports of its own, so nothing of a system SLURM is touched. ``python -m tests.slurm``
starts one and prints the ``SLURM_CONF`` to export (Ctrl-C stops it).

A second node cannot exist on one host: the two-node paths are tested with two torchrun agents
(tests/test_multinode.py); here every job has one node and 1-2 tasks of one CPU each.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "squeue", "sinfo", "scancel")


class Unavailable(RuntimeError):
    """SLURM cannot run here (the reason says why: not root, a package missing, a daemon that died)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """A running one-node cluster: its ``env`` (``SLURM_CONF``) goes to every client command."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.daemons: dict[str, int] = {}

    # ---------------------------------------------------------------- clients
    def run(self, *cmd: str, timeout: float = 60, check: bool = True, **kw) -> subprocess.CompletedProcess:
        res = subprocess.run(list(cmd), env={**self.env, **kw.pop("env", {})}, capture_output=True, text=True,
                             timeout=timeout, **kw)
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: exit {res.returncode}\n{res.stdout}\n{res.stderr}\n{self.logs()}")
        return res

    def sbatch(self, script: Path | str | None, *args: str, options: tuple[str, ...] | list[str] = (), cwd: Path,
               env: dict | None = None) -> str:
        """``sbatch OPTIONS SCRIPT ARGS`` from ``cwd`` (no script: ``--wrap`` in the options); returns the job id."""
        out = self.run("sbatch", "--parsable", *options, *([str(script)] if script else []), *args, cwd=cwd,
                       env=env or {}).stdout
        return out.strip().split(";")[0]

    def job(self, job: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...); {} once forgotten."""
        res = self.run("scontrol", "-o", "show", "job", job, check=False)
        fields = {}
        for part in res.stdout.split():
            key, _, value = part.partition("=")
            fields.setdefault(key, value)
        return fields

    def wait(self, job: str, states: tuple[str, ...] = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"),
             timeout: float = 600, release: bool = True) -> dict[str, str]:
        """Wait until ``job`` is in one of ``states``. ``release``: a requeued job's 2-minute hold
        (SLURM keeps it pending until the old credential expires) is cut short (``scontrol update
        StartTime=now``): the requeue itself is the job's; only the wait is shortened."""
        end = time.time() + timeout
        while time.time() < end:
            info = self.job(job)
            if info.get("JobState") in states:
                return info
            if release and info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime":
                self.run("scontrol", "update", f"jobid={job}", "StartTime=now", check=False)
            time.sleep(0.5)
        raise TimeoutError(f"job {job} not in {states} after {timeout} s: {self.job(job)}\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {f.name}\n" + f.read_text()[-2000:] for f in sorted((self.root / "log").glob("*.log")))

    # ---------------------------------------------------------------- daemons
    def stop(self) -> None:
        for name in ("slurmd", "slurmctld", "munged"):
            pid = self.daemons.pop(name, None)
            if pid is None:
                continue
            try:
                os.kill(pid, 15)
            except ProcessLookupError:
                continue
            end = time.time() + 20
            while time.time() < end and Path(f"/proc/{pid}").exists() and "zombie" not in _status(pid):
                time.sleep(0.1)


def _status(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return "zombie"


def why_unavailable() -> str | None:
    """The reason SLURM cannot be started here, or None."""
    if os.geteuid() != 0:
        return "not root: slurmd must start job steps as their users"
    missing = [b for b in (*DAEMONS, *CLIENTS) if not (shutil.which(b) or Path(f"/usr/sbin/{b}").exists())]
    if missing:
        return f"{', '.join(missing)} not installed (Debian: apt-get install slurm-wlm munge)"
    return None


def _daemon(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def start_cluster(root: Path) -> Cluster:
    """Start munged, slurmctld and slurmd under ``root``; raises ``Unavailable`` with the reason."""
    if (reason := why_unavailable()) is not None:
        raise Unavailable(reason)
    root = Path(root)
    for d in ("state", "spool", "log", "run"):
        (root / d).mkdir(parents=True, exist_ok=True)
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    host = socket.gethostname().split(".")[0]
    sock = root / "run" / "munge.socket"
    cluster = Cluster(root)
    cluster.conf.write_text(f"""# tests/slurm.py: a one-host cluster in {root}
ClusterName=toolkit{os.getpid()}
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={sock},cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
KillWait=5
MinJobAge=3600
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")
    env = cluster.env
    logs = root / "log"
    try:
        subprocess.run([_daemon("munged"), f"--socket={sock}", f"--key-file={key}", f"--pid-file={root}/run/munged.pid",
                        f"--log-file={logs}/munged.log", f"--seed-file={root}/run/munge.seed", "--force"],
                       env=env, check=True, capture_output=True, text=True, timeout=30)
        cluster.daemons["munged"] = int((root / "run" / "munged.pid").read_text())
        for name, args in (("slurmctld", ["-c"]), ("slurmd", [])):
            subprocess.run([_daemon(name), *args], env=env, check=True, capture_output=True, text=True, timeout=60)
            cluster.daemons[name] = _wait_pid(root / "run" / f"{name}.pid")
        end = time.time() + 60
        while cluster.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip() not in ("idle",):
            if time.time() > end:
                raise Unavailable(f"the node did not come up in 60 s (sinfo: "
                                  f"{cluster.run('sinfo', check=False).stdout.strip()})\n{cluster.logs()}")
            time.sleep(0.3)
    except (subprocess.CalledProcessError, FileNotFoundError, TimeoutError) as err:
        cluster.stop()
        detail = getattr(err, "stderr", "") or ""
        raise Unavailable(f"starting the cluster failed: {err}\n{detail}\n{cluster.logs()}") from None
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _wait_pid(path: Path, timeout: float = 30) -> int:
    end = time.time() + timeout
    while time.time() < end:
        if path.is_file() and path.read_text().strip():
            return int(path.read_text())
        time.sleep(0.1)
    raise TimeoutError(f"no pid file {path} after {timeout} s")


if __name__ == "__main__":
    import signal
    import tempfile

    c = start_cluster(Path(tempfile.mkdtemp(prefix="slurm-")))
    print(f"export SLURM_CONF={c.conf}  # Ctrl-C or SIGTERM stops the cluster", flush=True)
    for sig in (signal.SIGINT, signal.SIGTERM):   # also when started in the background (SIGINT ignored there)
        signal.signal(sig, lambda *_: None)
    signal.pause()
    c.stop()
