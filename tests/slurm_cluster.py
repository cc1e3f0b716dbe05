"""A real Slurm cluster on this one machine, for the tests: munged, slurmctld and one
``slurmd -N nodeK`` per node, every node on 127.0.0.1 with a port of its own; configuration, munge
key, state, spool and logs all in one temporary folder.

    with SlurmCluster(folder) as cluster:          # started, nodes idle
        job = cluster.sbatch(["sbatch", "recipes/slurm/mlm.sbatch", ...], env)
        cluster.wait(job)                          # -> its final state (COMPLETED, FAILED, ...)

Nothing is installed or changed outside ``folder``: the daemons read ``SLURM_CONF`` (every
client command the tests run gets it too), munged has its own socket and key. Node names
(node1, node2, ...) do not resolve as host names, as on many real clusters: whatever must reach
a node uses its NodeAddr. `SlurmCluster.stop` cancels every job, stops the daemons and then
SIGKILLs whatever of the cluster remains (`leftovers`: step daemons, job processes), so nothing
outlives the fixture.

Debian's packages (Slurm 22.05): ``apt-get install -y slurm-wlm munge`` (`make test` runs it as
root when ``slurmctld`` is missing). `missing` says what is not installed.

Run it by hand to get a cluster to try commands on (Ctrl-C stops it):

    python tests/slurm_cluster.py [NODES]
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

INSTALL = "apt-get install -y slurm-wlm munge"
ROOT = Path(__file__).resolve().parents[1]
TIME_CHECK_S = 30  # slurmctld tests time limits (and sends --signal warnings) this often
SBIN = os.pathsep.join(["/usr/sbin", "/sbin", "/usr/local/sbin"])
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "sinfo", "squeue", "scancel", "srun")


def which(name: str) -> str | None:
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), SBIN]))


def missing() -> list[str]:
    """The Slurm and munge programs the cluster needs that are not installed."""
    return [name for name in (*DAEMONS, *CLIENTS) if which(name) is None]


def _free_ports(count: int) -> list[int]:
    """``count`` distinct ports free right now, below Linux's ephemeral range (so no outgoing
    connection takes one meanwhile) and away from the job ports the script derives
    (10000 + job id % 20000)."""
    ports: list[int] = []
    while len(ports) < count:
        port = random.randint(31000, 32700)
        if port in ports:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
    return ports


class SlurmCluster:
    """``nodes`` nodes of ``cpus`` CPUs each, in one partition (``debug``, the default)."""

    def __init__(self, folder: Path, nodes: int = 2, cpus: int = 2):
        self.folder = Path(folder)
        self.nodes = [f"node{i}" for i in range(1, nodes + 1)]
        self.cpus = cpus
        self.conf = self.folder / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self.outputs: dict[str, Path] = {}  # job id -> its output file
        self.started = 0.0  # when slurmctld started (its time checks count from there)

    # ------------------------------------------------------------------------------ config
    def write_config(self) -> None:
        f = self.folder
        for sub in ("state", "spool", "log", "run", "munge"):
            (f / sub).mkdir(parents=True, exist_ok=True)
        (f / "munge").chmod(0o700)
        key = f / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        ctld_port, *node_ports = _free_ports(1 + len(self.nodes))
        nodes = "\n".join(
            f"NodeName={name} NodeAddr=127.0.0.1 NodeHostname={socket.gethostname()} "
            f"Port={port} CPUs={self.cpus} State=UNKNOWN"
            for name, port in zip(self.nodes, node_ports))
        self.conf.write_text(f"""\
# A test cluster on one machine (tests/slurm_cluster.py): every node on 127.0.0.1, own port.
ClusterName=mlmkit-test
SlurmctldHost={socket.gethostname()}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser={_user()}
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: also how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket={f / "munge" / "munge.sock"},cred_expire=5
StateSaveLocation={f / "state"}
SlurmdSpoolDir={f / "spool"}/%n
SlurmctldPidFile={f / "run" / "slurmctld.pid"}
SlurmdPidFile={f / "run"}/slurmd-%n.pid
SlurmctldLogFile={f / "log" / "slurmctld.log"}
SlurmdLogFile={f / "log"}/slurmd-%n.log
# debug2: slurmctld logs its time-limit checks (SlurmCluster.time_checks reads them)
SlurmctldDebug=debug2
SlurmdDebug=info
# no cgroups in a container: processes tracked by parentage, no binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
# a requeued job starts as soon as it may (every 30 s by default)
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmdParameters=config_overrides
# job ids of their own: an output file left in the repository by an earlier session is never
# appended to
FirstJobId={random.randint(100_000, 9_000_000)}
# finished jobs stay in `scontrol show job` for 10 minutes (the tests read their end)
MinJobAge=600
# SIGTERM to SIGKILL at a time limit or a cancel (30 s by default)
KillWait=5
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    # ------------------------------------------------------------------------------ lifecycle
    @property
    def env(self) -> dict:
        """The environment additions every Slurm command of this cluster needs."""
        return {"SLURM_CONF": str(self.conf)}

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.folder / "log" / f"{name}.stdout", "ab")
        self.procs[name] = subprocess.Popen(
            cmd, env={**os.environ, **self.env}, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()

    def start(self, timeout: float = 60) -> "SlurmCluster":
        self.write_config()
        m = self.folder / "munge"
        self._spawn("munged", [which("munged"), "--foreground", "--force",
                               f"--key-file={m / 'munge.key'}", f"--socket={m / 'munge.sock'}",
                               f"--pid-file={m / 'munged.pid'}", f"--log-file={m / 'munged.log'}",
                               f"--seed-file={m / 'munged.seed'}"])
        self._wait_for(lambda: (m / "munge.sock").exists(), timeout, "munged's socket")
        self.started = time.time()
        self._spawn("slurmctld", [which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        for node in self.nodes:
            self._spawn(f"slurmd-{node}", [which("slurmd"), "-D", "-N", node,
                                            "-f", str(self.conf)])
        self._wait_for(self._idle, timeout, "every node idle in sinfo")
        return self

    def _idle(self) -> bool:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with status {proc.returncode}:\n"
                                   f"{self.logs()}")
        done = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False)
        states = dict(line.split() for line in done.stdout.splitlines() if line.strip())
        return done.returncode == 0 and all(states.get(n) == "idle" for n in self.nodes)

    def _wait_for(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                raise RuntimeError(f"test Slurm cluster: no {what} after {timeout:.0f} s\n"
                                   f"{self.logs()}")
            time.sleep(0.2)

    def logs(self, tail: int = 3000) -> str:
        parts = []
        for path in sorted((self.folder / "log").glob("*")) + [self.folder / "munge" /
                                                                "munged.log"]:
            if path.is_file():
                parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel every job, stop the daemons, and SIGKILL whatever of this cluster remains
        (`leftovers`); the jobs' output files move out of the repository, into the folder."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run(["scancel", "--full", "--signal=KILL", "--user", _user()], check=False)
            self.run(["scancel", "--user", _user()], check=False)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and self.run(
                    ["squeue", "-h", "-o", "%i"], check=False).stdout.strip():
                time.sleep(0.3)
        for name in sorted(self.procs, key=lambda n: n == "munged"):  # munged last
            proc = self.procs[name]
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pid in self.leftovers():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        kept = self.folder / "job-outputs"  # out of the repository, kept for a look
        for job_id, path in self.outputs.items():
            if path.exists():
                kept.mkdir(exist_ok=True)
                shutil.move(str(path), kept / path.name)

    def leftovers(self) -> list[int]:
        """This cluster's processes: its daemons and step daemons, and every process of its jobs
        (all carry this cluster's SLURM_CONF in their environment; a shell that merely exported
        it, running no job, is not one of them)."""
        marker = f"SLURM_CONF={self.conf}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
                name = (entry / "comm").read_text().strip()
            except OSError:
                continue
            if marker in environ and (name in (*DAEMONS, "slurmstepd") or any(
                    item.startswith(b"SLURM_JOB_ID=") for item in environ)):
                found.append(int(entry.name))
        return found

    def __enter__(self) -> "SlurmCluster":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------------------ commands
    def run(self, cmd: list[str], *, env: dict | None = None, check: bool = True,
            timeout: float = 60, cwd=None) -> subprocess.CompletedProcess:
        """A Slurm client command against this cluster."""
        full = {**(env if env is not None else os.environ), **self.env}
        done = subprocess.run([which(cmd[0]) or cmd[0], *cmd[1:]], env=full, cwd=cwd,
                              capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}\n"
                                 f"{done.stderr}")
        return done

    def sbatch(self, argv: list[str], env: dict, *, cwd=None) -> str:
        """Submit ``argv`` (``sbatch ...`` as a user types it) from ``cwd`` (the repository root
        by default); the job id. The job's output file is moved into this cluster's folder when
        the cluster stops (it is written where the job runs: the submit directory)."""
        assert argv[0] == "sbatch", argv
        done = self.run(argv, env=env, cwd=cwd or ROOT, check=False)
        found = re.search(r"Submitted batch job (\d+)", done.stdout)
        if done.returncode != 0 or not found:
            raise AssertionError(f"sbatch refused the job ({done.returncode}):\n{done.stdout}\n"
                                 f"{done.stderr}")
        job_id = found.group(1)
        self.outputs[job_id] = Path(self.job(job_id)["StdOut"])
        return job_id

    def output(self, job_id: str) -> str:
        """What the job wrote to its output file so far."""
        path = self.outputs.get(job_id) or Path(self.job(job_id)["StdOut"])
        return path.read_text(errors="replace") if path.exists() else ""

    def job_processes(self, job_id: str, node: str) -> list[int]:
        """The processes of the job's steps on ``node`` (its tasks and everything they started,
        whatever their session), not Slurm's own."""
        want = {f"SLURM_JOB_ID={job_id}".encode(), f"SLURMD_NODENAME={node}".encode()}
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    environ = set((entry / "environ").read_bytes().split(b"\0"))
                except OSError:
                    continue
                in_step = any(item.startswith(b"SLURM_STEP_ID=") for item in environ)
                if want <= environ and in_step:  # not the batch shell, nor srun itself
                    found.append(int(entry.name))
        return found

    def time_checks(self) -> list[float]:
        """When slurmctld checked the jobs' time limits (it does every 30 s: only then does a
        job get its --signal warning or its time-limit kill), as epoch seconds."""
        log = (self.folder / "log" / "slurmctld.log").read_text(errors="replace")
        return [datetime.fromisoformat(stamp).timestamp() for stamp in re.findall(
            r"^\[([0-9T:.-]+)\] debug2: Testing job time limits", log, flags=re.M)]

    def wait_for_time_check(self, within: tuple[float, float]) -> float:
        """Sleep until slurmctld's next time-limit check is ``within[0]`` to ``within[1]``
        seconds away (a job submitted now gets its warning signal then); that many seconds."""
        low, high = within
        while True:
            checks = self.time_checks()
            last = checks[-1] if checks else self.started
            ahead = last + TIME_CHECK_S - time.time()
            while ahead < 0:
                ahead += TIME_CHECK_S
            if low <= ahead <= high:
                return ahead
            time.sleep(max(0.2, ahead - high if ahead > high else ahead + 1))

    def job(self, job_id: str) -> dict:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, NodeList, ...)."""
        out = self.run(["scontrol", "-o", "show", "job", str(job_id)]).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
             "PREEMPTED", "BOOT_FAIL", "DEADLINE")

    def wait(self, job_id: str, until=None, *, timeout: float = 300) -> dict:
        """Wait until ``until(record)`` holds for the job's `job` record (default: the job has
        ended, in one of `FINAL`); that record."""
        until = until or (lambda record: record.get("JobState") in self.FINAL)
        deadline = time.monotonic() + timeout
        while True:
            record = self.job(job_id)
            if until(record):
                return record
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id}: still {record.get('JobState')} after "
                                     f"{timeout} s: {record}\n{self.output(job_id)[-4000:]}")
            time.sleep(0.2)


def _user() -> str:
    import pwd
    return pwd.getpwuid(os.getuid()).pw_name


if __name__ == "__main__":
    import tempfile
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))  # stop() runs on SIGTERM and Ctrl-C
    signal.signal(signal.SIGINT, lambda *a: sys.exit(0))
    folder = Path(tempfile.mkdtemp(prefix="mlmkit-slurm-"))
    with SlurmCluster(folder, nodes=int(sys.argv[1]) if len(sys.argv) > 1 else 2) as cluster:
        print(f"export SLURM_CONF={cluster.conf}", flush=True)
        while True:
            signal.pause()
