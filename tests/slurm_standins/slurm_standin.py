"""Stand-ins for Slurm's sbatch, srun, scontrol and scancel: one machine plays every node, for
the fast unit tests of recipes/slurm/mlm.sbatch's logic (tests/unit/test_slurm_standins.py). The
integration tests submit to a real Slurm cluster instead (tests/slurm_cluster.py).

Put this folder first on PATH and ``recipes/slurm/mlm.sbatch`` runs unchanged:

* ``sbatch [options] SCRIPT ARGS...`` runs SCRIPT with bash in the foreground, like ``sbatch
  --wait`` (the bash process *is* the batch shell: signal it to play ``--signal=B:TERM``), with
  SLURM_JOB_ID, SLURM_NNODES / SLURM_JOB_NUM_NODES (``--nodes`` on the command line, else the
  script's ``#SBATCH --nodes``, else 1), SLURM_JOB_NODELIST (``node[1-N]``: names that, as on
  many clusters, are not host names; `scontrol show node` gives their addresses),
  SLURM_GPUS_ON_NODE (``--gpus-per-node``, likewise, when above 0), SLURM_CPUS_PER_TASK
  (``--cpus-per-task``), SLURM_SUBMIT_DIR and SLURM_RESTART_COUNT. Other options are accepted
  and ignored. Exit status: the script's.
* ``srun [options] CMD...`` starts one task per node, each in a process group of its own, with
  SLURM_NODEID = SLURM_PROCID = node index, SLURM_LOCALID=0, SLURM_NNODES, SLURM_NTASKS,
  SLURM_JOB_NODELIST, SLURMD_NODENAME and SLURM_STEP_ID. Like srun: it exits with the highest
  task status (128 + N for a task killed by signal N); ``--kill-on-bad-exit`` (``-K``) SIGKILLs
  the other tasks when one exits non-zero; SIGTERM, SIGHUP or SIGQUIT to srun makes it print
  ``forcing job termination`` and SIGKILL every process of the step (what srun does); SIGINT,
  SIGUSR1, SIGUSR2 and SIGCONT are forwarded to every process of the step.
* ``scontrol show hostnames [LIST]`` prints the node names of LIST (default SLURM_JOB_NODELIST),
  one per line; ``scontrol show node NAME`` prints its NodeAddr (nodeK: 127.0.0.K);
  ``scontrol requeue JOBID`` appends ``requeue JOBID`` to ``$SLURM_STANDIN_STATE/requeue.log``.
* ``scancel --signal=SIG JOBID`` sends SIG to every process of every step of the job (all
  descendants of each srun, whatever their session, as Slurm's process tracking does) but not to
  the batch shell or srun itself (``--batch``/``--full`` are not simulated). Each call is logged
  to ``$SLURM_STANDIN_STATE/scancel.log``.

State (step records, logs) lives in ``$SLURM_STANDIN_STATE`` (created by sbatch when unset).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# sbatch/srun options that take a value when not written as --opt=value.
VALUED = {"-N", "--nodes", "-n", "--ntasks", "-t", "--time", "-J", "--job-name", "-o", "--output",
          "-e", "--error", "-p", "--partition", "--gpus-per-node", "--ntasks-per-node",
          "--cpus-per-task", "-c", "--signal", "-A", "--account", "-a", "--array", "-q", "--qos",
          "--mem", "--gres", "-w", "--nodelist", "-D", "--chdir", "--export", "--dependency",
          "-d", "--mpi", "--cpu-bind"}


def expand_hostlist(spec: str) -> list[str]:
    """Slurm hostlist syntax, enough of it: ``a,b``, ``node[1-3,7]``, ``127.0.0.[1-2]``."""
    names: list[str] = []
    for part in re.findall(r"[^,\[]*(?:\[[^\]]*\][^,\[]*)*", spec):
        if not part:
            continue
        m = re.fullmatch(r"(.*)\[([^\]]*)\](.*)", part)
        if not m:
            names.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for r in ranges.split(","):
            lo, _, hi = r.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                names.append(f"{prefix}{str(i).zfill(len(lo))}{suffix}")
    return names


def state_dir() -> Path:
    path = os.environ.get("SLURM_STANDIN_STATE")
    if not path:
        sys.exit("slurm stand-in: SLURM_STANDIN_STATE is not set (run under the sbatch stand-in)")
    Path(path).mkdir(parents=True, exist_ok=True)
    return Path(path)


def split_options(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """Options before the first non-option argument -> {name: value}; the rest is the command."""
    opts: dict[str, str] = {}
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        arg = argv[i]
        if "=" in arg and arg.startswith("--"):
            name, value = arg.split("=", 1)
        elif arg in VALUED:
            name, value = arg, argv[i + 1]
            i += 1
        else:
            name, value = arg, ""
        opts[name] = value
        i += 1
    return opts, argv[i:]


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (any session or process group), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def signal_all(pids, sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


# ------------------------------------------------------------------------------------ sbatch
def sbatch(argv: list[str]) -> int:
    opts, rest = split_options(argv)
    if not rest:
        sys.exit("sbatch: error: no batch script given")
    script, args = rest[0], rest[1:]
    directives: dict[str, str] = {}  # the script's #SBATCH lines, then the command line wins
    for line in Path(script).read_text().splitlines():
        m = re.match(r"#SBATCH\s+(--[\w-]+|-N)(?:[= ]\s*(\S+))?", line)
        if m:
            directives["--nodes" if m.group(1) == "-N" else m.group(1)] = m.group(2) or ""
    for name, value in opts.items():
        directives["--nodes" if name == "-N" else name] = value
    nodes = int(directives.get("--nodes", "1").split("-")[0])
    gpus = int(directives.get("--gpus-per-node", "0").split(":")[-1])
    state = os.environ.get("SLURM_STANDIN_STATE") or tempfile.mkdtemp(prefix="slurm-standin-")
    env = {**os.environ, "SLURM_STANDIN_STATE": state,
           "SLURM_JOB_ID": os.environ.get("SLURM_JOB_ID", str(1000 + os.getpid() % 100000)),
           "SLURM_JOB_NAME": opts.get("--job-name", opts.get("-J", Path(script).name)),
           "SLURM_NNODES": str(nodes), "SLURM_JOB_NUM_NODES": str(nodes),
           "SLURM_JOB_NODELIST": f"node[1-{nodes}]" if nodes > 1 else "node1",
           "SLURM_SUBMIT_DIR": os.getcwd(),
           "SLURM_RESTART_COUNT": os.environ.get("SLURM_RESTART_COUNT", "0")}
    env.pop("SLURM_GPUS_ON_NODE", None)
    env.pop("SLURM_CPUS_PER_TASK", None)
    if gpus > 0:
        env["SLURM_GPUS_ON_NODE"] = str(gpus)
    if "--cpus-per-task" in directives:
        env["SLURM_CPUS_PER_TASK"] = directives["--cpus-per-task"]
    os.execvpe("bash", ["bash", script, *args], env)  # this process becomes the batch shell


# ------------------------------------------------------------------------------------ srun
def srun(argv: list[str]) -> int:
    opts, cmd = split_options(argv)
    if not cmd:
        sys.exit("srun: error: no command given")
    kill_on_bad_exit = any(k in opts and opts[k] != "0" for k in ("--kill-on-bad-exit", "-K"))
    nodelist = os.environ.get("SLURM_JOB_NODELIST", "node1")
    names = expand_hostlist(nodelist)
    nnodes = int(os.environ.get("SLURM_NNODES", len(names)))
    state = state_dir()
    job = os.environ.get("SLURM_JOB_ID", "0")
    step = len(list(state.glob(f"step-{job}.*")))
    (state / f"step-{job}.{step}").write_text(str(os.getpid()))

    tasks = []
    for node in range(nnodes):
        env = {**os.environ, "SLURM_NODEID": str(node), "SLURM_PROCID": str(node),
               "SLURM_LOCALID": "0", "SLURM_NNODES": str(nnodes), "SLURM_NTASKS": str(nnodes),
               "SLURM_JOB_NODELIST": nodelist, "SLURMD_NODENAME": names[node % len(names)],
               "SLURM_STEP_ID": str(step), "SLURM_STEPID": str(step)}
        tasks.append(subprocess.Popen(cmd, env=env, start_new_session=True))

    def step_processes() -> list[int]:
        return descendants(os.getpid())

    def on_signal(signum, frame):
        if signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
            print("srun: forcing job termination", file=sys.stderr, flush=True)
            signal_all(step_processes(), signal.SIGKILL)
        else:
            signal_all(step_processes(), signum)

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGINT, signal.SIGUSR1,
                signal.SIGUSR2, signal.SIGCONT):
        signal.signal(sig, on_signal)

    statuses: dict[int, int] = {}
    killed = False
    while len(statuses) < len(tasks):
        for i, task in enumerate(tasks):
            if i in statuses or task.poll() is None:
                continue
            rc = task.returncode
            statuses[i] = 128 - rc if rc < 0 else rc
            if statuses[i] != 0:
                print(f"srun: error: task {i}: exited with status {statuses[i]}", file=sys.stderr,
                      flush=True)
                if kill_on_bad_exit and not killed:
                    killed = True
                    print("srun: Terminating job step (--kill-on-bad-exit)", file=sys.stderr,
                          flush=True)
                    signal_all(step_processes(), signal.SIGKILL)
        time.sleep(0.1)
    return max(statuses.values())


# ------------------------------------------------------------------------------------ scontrol
def scontrol(argv: list[str]) -> int:
    if argv[:2] == ["show", "hostnames"]:
        spec = argv[2] if len(argv) > 2 else os.environ.get("SLURM_JOB_NODELIST", "")
        sys.stdout.write("".join(f"{name}\n" for name in expand_hostlist(spec)))
        return 0
    if argv[:2] == ["show", "node"] and len(argv) == 3:
        m = re.fullmatch(r"node(\d+)", argv[2])
        if not m:
            print(f"Node {argv[2]} not found", file=sys.stderr)
            return 1
        print(f"NodeName={argv[2]} Arch=x86_64 CoresPerSocket=1\n"
              f"   NodeAddr=127.0.0.{m.group(1)} NodeHostName={argv[2]} Version=22.05.8")
        return 0
    if argv[:1] == ["requeue"] and len(argv) == 2:
        with open(state_dir() / "requeue.log", "a") as f:
            f.write(f"requeue {argv[1]}\n")
        return 0
    print(f"scontrol (stand-in): unsupported: {' '.join(argv)}", file=sys.stderr)
    return 1


# ------------------------------------------------------------------------------------ scancel
def scancel(argv: list[str]) -> int:
    opts, jobs = split_options(argv)
    name = opts.get("--signal", opts.get("-s", "KILL"))
    sig = getattr(signal, name if name.startswith("SIG") else f"SIG{name}") if not name.isdigit() \
        else signal.Signals(int(name))
    state = state_dir()
    with open(state / "scancel.log", "a") as f:
        f.write(f"{' '.join(argv)}\n")
    for job in jobs:
        job_id, _, step = job.partition(".")
        for record in state.glob(f"step-{job_id}.{step or '*'}"):
            signal_all(descendants(int(record.read_text())), sig)
        if {"--batch", "-b", "--full", "-f"} & opts.keys():
            print("scancel (stand-in): --batch/--full are not simulated", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    command = sys.argv[1]
    sys.exit({"sbatch": sbatch, "srun": srun, "scontrol": scontrol,
              "scancel": scancel}[command](sys.argv[2:]))
