"""Helpers shared by the tests -- the one place for them (fixtures live in conftest.py; the
README's and the docs' commands are read by readme_commands.py).

* tiny models: `tiny_model` (any masked-LM architecture, 2 layers, width 32) and
  `tiny_config_dir` (its config.json, for ``--config_name``)
* the recipe in this process: `run_recipe` (recipes/mlm.py's ``main(argv)``, Accelerate's
  singletons reset, global state restored), `run_cli` (an entry point's one-line error and exit
  status), `load_script` (a script under recipes/ as a module)
* the recipe launched for real: `launch_env`, `launch`, `start` (in the background) and
  `finish`, `kill_tree`, `free_port`, `recipe_pids`, `wait_gone`, `wait_for_checkpoint`,
  `complete_checkpoints`
* comparing runs: `train_losses`, `assert_same_run`, `exported_eval_loss`
* Slurm: `SLURM_CLUSTER` (the mark of tests on the test cluster, tests/slurm_cluster.py),
  `slurm_env` (a login shell's environment there), `slurm_attempts` and `assert_logged_once` (a
  job's output); `STANDINS` (tests/slurm_standins, for the unit tests of the script's logic)
* batches: `split_batch` (per-example views of a collated batch), `random_examples`,
  `word_level_tokenizer`
* fake checkpoints: `make_checkpoint`, `run_config`
* the architecture table of docs/encoders.md: `masked_lm_types`, `probe_architecture`, `architecture_row`
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib.util
import io
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:  # `python tests/architectures.py`
    sys.path.insert(0, str(ROOT / "src"))
RECIPE = ROOT / "recipes" / "mlm.py"
ACCELERATE = Path(sys.executable).with_name("accelerate")
CPU_CONFIG = ["--config_file", str(ROOT / "accelerate_configs" / "cpu.yaml")]
STANDINS = ROOT / "tests" / "slurm_standins"


# ================================================================================ tiny models
# Attributes shrunk when a config has them (names differ between architectures).
TINY = {
    "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
    "embedding_size": 32, "dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64,
    "d_model": 32, "encoder_layers": 2, "encoder_attention_heads": 2, "encoder_ffn_dim": 64,
    "num_key_value_heads": 2, "emb_dim": 32, "n_layer": 2, "n_head": 2,
    "max_position_embeddings": 512, "decoder_layers": 2, "decoder_attention_heads": 2,
    "decoder_ffn_dim": 64, "entity_vocab_size": 16, "entity_emb_size": 32,  # BART family, LUKE
    "d_latents": 32, "num_latents": 8, "num_blocks": 1, "num_self_attends_per_block": 1,
    "num_self_attention_heads": 2, "num_cross_attention_heads": 1,  # Perceiver
    "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "dropout": 0.0,
    "attention_dropout": 0.0, "embedding_dropout": 0.0, "mlp_dropout": 0.0,
}
BERT_VOCAB = 30522  # the embedded tokenizer's


def tiny_model(model_type: str = "bert", vocab_size: int = BERT_VOCAB, pad_token_id: int = 0,
               attn_implementation: str | None = None, **overrides):
    """A randomly initialised (seed 0) ``*ForMaskedLM`` of ``model_type`` with 2 layers of width
    32 and no dropout, in eval mode; ``overrides`` are set on its config (e.g.
    ``hidden_dropout_prob=0.1``). Raises where the architecture cannot be built from its config
    alone (multimodal configs, missing optional packages...)."""
    import torch
    from transformers import AutoConfig, AutoModelForMaskedLM

    config = AutoConfig.for_model(model_type)
    sub = getattr(config, "text_config", None)  # composite configs: shrink the text part
    for cfg in (config, sub) if sub is not None else (config,):
        for key, value in TINY.items():
            if hasattr(cfg, key):
                setattr(cfg, key, value)
        if hasattr(cfg, "vocab_size"):
            cfg.vocab_size = vocab_size
        if hasattr(cfg, "pad_token_id"):
            cfg.pad_token_id = pad_token_id
        if getattr(cfg, "layer_types", None):  # one entry per layer (ModernBERT, ...)
            cfg.layer_types = cfg.layer_types[:cfg.num_hidden_layers]
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForMaskedLM.from_config(config, **kwargs)
    return model.float().eval()


def tiny_config_dir(folder: Path, model_type: str = "bert", tokenizer=None, **overrides) -> str:
    """``folder`` holding the config.json of `tiny_model` (``--config_name`` for the recipe); the
    vocabulary and pad id are ``tokenizer``'s (default: the embedded BERT tokenizer's)."""
    vocab = (len(tokenizer), tokenizer.pad_token_id) if tokenizer is not None else (BERT_VOCAB, 0)
    tiny_model(model_type, *vocab, **overrides).config.save_pretrained(folder)
    return str(folder)



def save_tiny_model(folder: Path, tokenizer_path: str) -> str:
    """`tiny_model` (BERT) and the tokenizer at ``tokenizer_path`` saved in ``folder``, as a
    folder ``from_pretrained`` reads (the docs' collator examples take it as ``MODEL``)."""
    from transformers import AutoTokenizer
    tiny_model("bert").save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_path).save_pretrained(folder)
    return str(folder)

# ================================================================================ in this process
@functools.lru_cache(maxsize=None)
def load_script(path: Path):
    """A script (recipes/mlm.py, recipes/ablate_padding.py, ...) imported as a module."""
    spec = importlib.util.spec_from_file_location(f"script_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)  # and PartialState
    GradientState._reset_state()


@contextlib.contextmanager
def isolated_globals(threads: int | None = None):
    """Run a recipe in this process as a launched one runs: fresh Accelerate singletons and
    ``threads`` intra-op threads if given (1: as the launches run, OMP_NUM_THREADS=1, so results
    match theirs bit for bit); afterwards everything global a run changes is as it was: the RNGs
    it seeds, os.environ (W&B's settings), sys.path, the SIGTERM/SIGINT handlers, transformers'
    verbosity, the thread count, torch.compile's caches and Accelerate's singletons."""
    import numpy as np
    import torch
    from transformers.utils import logging as hf_logging

    saved = dict(threads=torch.get_num_threads(), torch_rng=torch.random.get_rng_state(),
                 np_rng=np.random.get_state(), py_rng=random.getstate(), env=dict(os.environ),
                 path=list(sys.path), verbosity=hf_logging.get_verbosity(),
                 handlers={s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)})
    _reset_accelerate()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        _reset_accelerate()
        torch.set_num_threads(saved["threads"])
        torch.random.set_rng_state(saved["torch_rng"])
        np.random.set_state(saved["np_rng"])
        random.setstate(saved["py_rng"])
        os.environ.clear()
        os.environ.update(saved["env"])
        sys.path[:] = saved["path"]
        hf_logging.set_verbosity(saved["verbosity"])
        for sig, handler in saved["handlers"].items():
            signal.signal(sig, handler)
        if "torch._dynamo" in sys.modules:
            torch._dynamo.reset()


@dataclass
class Run:
    """An in-process run: what ``main()`` returned (the summary, or ``{"stopped": True, ...}``)
    and what it printed."""
    result: dict
    stdout: str
    stderr: str


@contextlib.contextmanager
def _captured():
    """(stdout, stderr) StringIOs; what they caught is echoed afterwards, so a failing test
    shows it."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield out, err
    finally:
        sys.stdout.write(out.getvalue())
        sys.stderr.write(err.getvalue())


def run_recipe(args: list[str], *, threads: int | None = None) -> Run:
    """``recipes/mlm.py``'s ``main(args)`` in this process: one process, on CPU, as
    ``accelerate launch --config_file accelerate_configs/cpu.yaml`` runs it. ``threads=1`` where
    the result is compared with a launched run's (the launches run one thread each: same floats,
    bit for bit); else torch's default, every core. A ConfigError or DataError propagates
    (``pytest.raises``)."""
    main = load_script(RECIPE).main
    with isolated_globals(threads), _captured() as (out, err):
        result = main([str(a) for a in args])
    return Run(result, out.getvalue(), err.getvalue())


@dataclass
class Exit:
    """How an entry point ended: exit status (0: returned) and what it printed."""
    code: int
    stdout: str
    stderr: str

    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("mlmkit: error:")]


def run_cli(main, argv: list[str]) -> Exit:
    """An entry point (a script's ``main``) through `mlmkit.cli.run_cli`, in this process, as its
    ``__main__`` runs it: a ConfigError or DataError becomes one ``mlmkit: error:`` line and
    exit status 2; anything else propagates with its traceback."""
    from mlmkit.cli import run_cli as cli
    code = 0
    with isolated_globals(), _captured() as (out, err):
        try:
            cli(lambda: main([str(a) for a in argv]))
        except SystemExit as exit_:
            code = exit_.code
    return Exit(code, out.getvalue(), err.getvalue())


# ================================================================================ launched
def launch_env(**extra: str) -> dict:
    """The environment of every process the tests start: offline hub and datasets, one thread
    per process (2 cores are shared by several processes)."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", **extra}


def _command(args, accelerate_args) -> list[str]:
    return [str(ACCELERATE), "launch", *(accelerate_args or CPU_CONFIG), str(RECIPE),
            *map(str, args)]


def launch(args: list[str], *, accelerate_args: list[str] | None = None, cwd=None,
           timeout: int = 300, env: dict | None = None,
           check: bool = True) -> subprocess.CompletedProcess:
    """``accelerate launch [accelerate_args] recipes/mlm.py [args]`` (one CPU process by default,
    accelerate_configs/cpu.yaml); with ``check`` a failure raises with the output's tail. A launch
    still running after ``timeout`` is killed with every process it started (no orphaned ranks
    left holding a port) and raises."""
    cmd = _command(args, accelerate_args)
    proc = subprocess.Popen(cmd, cwd=cwd or ROOT, env=launch_env(**(env or {})),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        raise AssertionError(f"launch still running after {timeout} s, killed:\n{out[-3000:]}\n"
                             f"{err[-6000:]}") from None
    if check and proc.returncode != 0:
        raise AssertionError(f"launch failed ({proc.returncode}):\n{out[-3000:]}\n{err[-6000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def start(args: list[str], accelerate_args: list[str] | None = None, env: dict | None = None,
          *, stderr=subprocess.STDOUT) -> subprocess.Popen:
    """`launch` in the background, in a session of its own (stderr into stdout unless
    ``stderr=subprocess.PIPE``); end it with `kill_tree` or by reading it to the end."""
    return subprocess.Popen(_command(args, accelerate_args), cwd=ROOT,
                            env=launch_env(**(env or {})), stdout=subprocess.PIPE, stderr=stderr,
                            text=True, start_new_session=True)


def finish(proc, timeout: float = 300) -> str:
    """Wait for a `start`ed launch to end; its output. A failure or a timeout (every process
    killed) raises with the output's tail."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        raise AssertionError(f"launch still running after {timeout} s") from None
    if proc.returncode != 0:
        raise AssertionError(f"launch failed ({proc.returncode}):\n{(out or '')[-6000:]}")
    return out


def kill_tree(proc) -> None:
    """SIGKILL a process (a Popen or a pid) and every process below it, deepest first:
    torchrun and srun put their workers in sessions of their own, out of reach of a
    process-group kill. A Popen is then reaped (its output read)."""
    import psutil
    pid = proc if isinstance(proc, int) else proc.pid
    try:
        top = psutil.Process(pid)
        victims = top.children(recursive=True)[::-1] + [top]
    except psutil.NoSuchProcess:
        victims = []
    for p in victims:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(victims, timeout=30)
    if not isinstance(proc, int):
        proc.communicate(timeout=30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def recipe_pids(proc, count: int = 1) -> list[int]:
    """The ``count`` recipe processes under a launcher, once they have all started."""
    import psutil
    for _ in range(1200):
        kids = []
        for p in psutil.Process(proc.pid).children(recursive=True):
            try:
                if "mlm.py" in " ".join(p.cmdline()):
                    kids.append(p.pid)
            except psutil.NoSuchProcess:
                pass
        if len(kids) >= count:
            return kids
        time.sleep(0.05)
    kill_tree(proc)
    raise AssertionError(f"{count} recipe processes not found")


def wait_gone(pids: list[int], timeout: float = 120) -> None:
    import psutil
    _, alive = psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)],
                                 timeout=timeout)
    assert not alive, f"still running: {alive}"


def complete_checkpoints(out: Path) -> list[int]:
    """The steps of the complete checkpoints (with their marker) in a run folder, ascending."""
    from mlmkit.train.checkpoint import MARKER
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(p.name.split("-")[1]) for p in root.glob("checkpoint-*")
                  if (p / MARKER).exists())


def wait_for_checkpoint(proc, out: Path, min_step: int, timeout: float = 240) -> int:
    """Poll until a complete checkpoint-<step >= min_step> exists; return its step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = complete_checkpoints(out)
        if steps and steps[-1] >= min_step:
            return steps[-1]
        if proc.poll() is not None:
            raise AssertionError(f"run ended before checkpoint {min_step}:\n"
                                 f"{proc.stdout.read()[-4000:]}")
        time.sleep(0.01)
    kill_tree(proc)
    raise AssertionError(f"no checkpoint {min_step} after {timeout} s")


# ================================================================================ comparing runs
def train_losses(out: Path) -> list[float]:
    """train/loss of each log line of a run folder's metrics.jsonl."""
    from mlmkit.train import tracking as M
    return [r[M.TRAIN_LOSS] for r in M.read_metrics(out) if M.TRAIN_LOSS in r]


def _timing() -> tuple:
    from mlmkit.train import tracking as M
    return (M.TRAIN_TOKENS_PER_S, M.TRAIN_REAL_TOKENS_PER_S, M.SYS_PEAK_MEM_GB, M.TRAIN_TFLOPS,
            M.TRAIN_MFU, M.TRAIN_DATA_WAIT_FRACTION)  # depend on the clock


def assert_same_run(out: Path, ref: Path, *, tol: float = 0.0) -> None:
    """Same final eval, first eval, weights and metrics.jsonl (timings aside) as the reference:
    bit for bit with ``tol`` 0."""
    import pytest
    import torch
    from safetensors.torch import load_file

    from mlmkit.train import tracking as M
    got, want = (json.loads((d / "summary.json").read_text()) for d in (out, ref))
    for key in (M.EVAL_LOSS, "first/" + M.EVAL_LOSS, "first/" + M.EVAL_PERPLEXITY, M.STEP):
        assert got[key] == pytest.approx(want[key], rel=tol, abs=tol), key
    a, b = (load_file(d / "model" / "model.safetensors") for d in (out, ref))
    assert a.keys() == b.keys()
    for name in a:
        if tol == 0:
            assert torch.equal(a[name], b[name]), name
        else:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=tol)
    timing = _timing()
    records = [[{k: v for k, v in r.items() if k not in timing} for r in M.read_metrics(d)]
               for d in (out, ref)]
    assert [r[M.STEP] for r in records[0]] == [r[M.STEP] for r in records[1]]  # no duplicates
    if tol == 0:
        assert records[0] == records[1]
    else:
        for x, y in zip(*records, strict=True):
            assert x == pytest.approx(y, rel=tol, abs=tol)


def exported_eval_loss(out: Path, model_dir: str = "model") -> float:
    """Re-evaluate a run's exported model/ (or ``model_dir``, e.g. model_avg) in this process,
    exactly as the recipe's eval does."""
    import torch
    import yaml
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from mlmkit.config.fields import MLMConfig
    from mlmkit.data.corpus import IndexedExamples, load_raw_datasets, tokenize_datasets
    from mlmkit.model.loading import MaskedLMModule
    from mlmkit.train import tracking as M
    from mlmkit.train.evaluation import eval_collator, evaluate

    cfg = MLMConfig(**yaml.safe_load((out / "config.yaml").read_text()))
    tokenizer = AutoTokenizer.from_pretrained(out / model_dir)
    model = AutoModelForMaskedLM.from_pretrained(out / model_dir, dtype=torch.float32)
    examples = IndexedExamples(
        tokenize_datasets(load_raw_datasets(cfg), tokenizer, cfg)["validation"])
    with isolated_globals():
        from accelerate import Accelerator
        metrics = evaluate(Accelerator(cpu=True), MaskedLMModule(model), examples,
                           eval_collator(tokenizer, cfg),
                           batch_size=cfg.per_device_eval_batch_size,
                           max_seq_length=cfg.max_seq_length, with_unmasked=False,
                           with_pad_probe=False)
    return metrics[M.EVAL_LOSS]


# ================================================================================ Slurm
@functools.lru_cache(maxsize=None)
def venv_shims() -> Path:
    """A folder with `python`, `python3` and `accelerate` that run this interpreter's (the venv's)
    -- and nothing else of the venv's bin/, so that every other tool resolves as it does for the
    other tests. (Putting .venv/bin on PATH would switch DeepSpeed's JIT builds from the system's
    `ninja` to the venv's, whose different command hashes rebuild the cached ops every time.)"""
    folder = Path(tempfile.mkdtemp(prefix="mlmkit-venv-shims-"))
    atexit.register(shutil.rmtree, folder, True)
    targets = {"python": sys.executable, "python3": sys.executable, "accelerate": str(ACCELERATE)}
    for name, target in targets.items():
        (folder / name).write_text(f'#!/bin/sh\nexec "{target}" "$@"\n')
        (folder / name).chmod(0o755)
    return folder


# Tests that submit to the test cluster (the worker's session fixture slurm_cluster) carry this
# mark: `make test ARGS="-m slurm"` runs them alone.
SLURM_CLUSTER = pytest.mark.slurm


def slurm_env(cluster, **extra: str) -> dict:
    """The environment of a login shell on the test cluster (`SlurmCluster`, the
    ``slurm_cluster`` fixture): the venv's `python` and `accelerate` first on PATH
    (`venv_shims`; a job runs with the environment it was submitted from, as sbatch's default
    ``--export=ALL`` does), SLURM_CONF naming the cluster, no SLURM_* of this shell; offline,
    one thread per process (`launch_env`)."""
    env = {k: v for k, v in launch_env().items() if not k.startswith("SLURM_")}
    return {**env, "PATH": os.pathsep.join([str(venv_shims()), os.environ["PATH"]]),
            **cluster.env, **extra}


SLURM_HEADER = "mlmkit: ===== job "  # recipes/slurm/mlm.sbatch's first line of each attempt
RECIPE_LOG_LINES = ("data:", "isolation probe", "train:", "eval @ step", "resuming from",
                    "stopped by", "done:")


def slurm_attempts(log: str) -> list[str]:
    """A Slurm job's output cut into its attempts (each starts with the script's header line)."""
    return [part for part in re.split(f"(?m)^(?={re.escape(SLURM_HEADER)})", log)
            if part.startswith(SLURM_HEADER)]


def assert_logged_once(attempt: str) -> None:
    """The recipe's own lines in one attempt of a multi-node job: each there once (printed by
    the main process, not once per node), the data, probe and plan lines among them."""
    lines = [line for line in attempt.splitlines() if line.startswith(RECIPE_LOG_LINES)]
    repeated = sorted({line for line in lines if lines.count(line) > 1})
    assert not repeated, f"printed more than once: {repeated}"
    for prefix in ("data:", "isolation probe", "train:"):
        assert sum(line.startswith(prefix) for line in lines) == 1, (prefix, attempt[-3000:])


# ================================================================================ batches
CLS, SEP, PAD, MASK = 101, 102, 0, 103  # the embedded (BERT) tokenizer's ids

SENTENCES = [
    "The unbelievably transformational tokenization of multilingual paragraphs.",
    "Hyperparameters were tuned with gradient accumulation and warmup.",
    "A short one.",
    "Electroencephalography measurements are notoriously noisy and idiosyncratic.",
    "Packing concatenates examples; isolation keeps them apart.",
    "Quixotic lexicographers reorganised the encyclopaedia's appendices.",
    "Padding should never be attended.",
    "Unmasked arms measure what happens otherwise, reproducibly.",
]


def split_batch(collator, batch: dict, lengths: list[int]) -> list[dict]:
    """Per-example views of a collated batch, in input order, using the documented layout:
    dicts with ids (L,), labels (L,), row, slice and, packed, position_ids (L,)."""
    from mlmkit.batch.layout import pack_rows
    out: list[dict] = [{} for _ in lengths]
    if collator.padding == "packed":
        for r, row in enumerate(pack_rows(lengths, collator.max_length)):
            start = 0
            for i in row:
                sl = slice(start, start + lengths[i])
                out[i] = {"ids": batch["input_ids"][r, sl], "labels": batch["labels"][r, sl],
                          "position_ids": batch["position_ids"][r, sl], "row": r, "slice": sl}
                start += lengths[i]
        return out
    width = batch["input_ids"].shape[1]
    for i, n in enumerate(lengths):
        start = width - n if collator.padding_side == "left" else 0
        sl = slice(start, start + n)
        out[i] = {"ids": batch["input_ids"][i, sl], "labels": batch["labels"][i, sl], "row": i,
                  "slice": sl}
    return out


def random_examples(rng: random.Random, n: int, max_body: int = 40) -> list[list[int]]:
    """[CLS] body [SEP] with ordinary ids, plus literal [PAD] (id 0) tokens inside the body: the
    pad id occurring as a real token is exactly what a mask built from `ids == pad_id` gets
    wrong."""
    examples = []
    for _ in range(n):
        body = [rng.randrange(1000, 30000) for _ in range(rng.randint(0, max_body))]
        for _ in range(rng.randint(0, 2)):
            body.insert(rng.randint(0, len(body)), PAD)
        examples.append([CLS, *body, SEP])
    return examples


def word_level_tokenizer():
    """A 5-id tokenizer, 3 of them special, and no '##' pieces: marks no word boundaries."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[MASK]": 2, "hello": 3, "world": 4}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                   mask_token="[MASK]")


# ================================================================================ fake checkpoints
def make_checkpoint(out: Path, step: int, *, complete: bool = True, **state) -> Path:
    """A checkpoint folder as save_checkpoint leaves it (weights faked by a few bytes)."""
    from mlmkit.train import checkpoint as C
    folder = out / C.CHECKPOINTS / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"w" * (100 + step))
    (folder / "random_states_0.pkl").write_bytes(b"r" * 10)
    (folder / C.STATE_FILE).write_text(json.dumps(C.TrainState(step=step, **state).to_dict()))
    if complete:
        C.write_marker(folder, step)
    return folder


def run_config(out: Path, **kw):
    """The MLMConfig of a run into ``out`` (no trackers)."""
    from mlmkit.config.fields import MLMConfig
    return MLMConfig(output_dir=str(out), report_to="none", **kw)


# ================================================================================ architectures
def masked_lm_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES
    return sorted(MODEL_FOR_MASKED_LM_MAPPING_NAMES)


def probe_architecture(model_type: str, tokenizer):
    """(tiny model, IsolationResult) of the start-up probe on a tiny ``model_type``, or
    (None, None) where it cannot be built tiny."""
    from mlmkit.model.checks import position_offset
    from mlmkit.model.loading import MaskedLMModule, attn_implementation
    from mlmkit.model.packed import use_packed_path
    from mlmkit.model.probe import probe_isolation

    try:
        model = tiny_model(model_type, len(tokenizer), tokenizer.pad_token_id)
    except Exception:
        return None, None
    use_packed_path(model)  # as load_model does: the attention training runs
    module = MaskedLMModule(model)
    result = probe_isolation(model, tokenizer, attn_implementation=attn_implementation(model),
                             position_offset=position_offset(model), max_length=128,
                             head_logits=module.head_logits if module.sparse_prediction else None)
    return model, result


def architecture_row(model_type: str, result) -> str:
    """The row of docs/encoders.md's architecture table for one architecture."""
    def cell(ok: bool, leak, error) -> str:
        if error:
            return "no (crashes)"
        return "yes" if ok else f"no (leaks {leak:.2g})"
    return (f"| {model_type} | {result.attn_implementation} | "
            f"{cell(result.padded_isolated, result.padded_leak, result.padded_error)} | "
            f"{cell(result.packed_isolated, result.packed_leak, result.packed_error)} | "
            f"{'yes' if result.sparse_head else 'no'} |")


def wandb_records(run_dir: Path) -> dict[str, list]:
    """What an offline W&B run wrote to its transaction log (``<run_dir>/run-*.wandb``, the file
    `wandb sync` uploads), by record type: ``{"run": [...], "metric": [...], "summary": [...],
    ...}``, each a list of `wandb_internal_pb2` messages in the order written. The log is
    LevelDB's log format: 32 KiB blocks of chunks, each ``crc32 (4) length (2) type (1) data``
    (type 1 a whole record, 2/3/4 its first, middle, last chunk), after a 7-byte file header."""
    import struct

    from wandb.proto import wandb_internal_pb2

    (path,) = Path(run_dir).glob("run-*.wandb")
    data, block, header = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    found: dict[str, list] = {}
    pos, record = header, b""
    while pos + header <= len(data):
        if block - pos % block < header:  # a block's tail too short for a chunk: padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + header])
        if kind == 0:  # zeros: the rest of the block is padding
            pos += block - pos % block
            continue
        chunk, pos = data[pos + header:pos + header + length], pos + header + length
        record = chunk if kind in (1, 2) else record + chunk
        if kind in (1, 4):
            message = wandb_internal_pb2.Record.FromString(record)
            kind_name = message.WhichOneof("record_type")
            found.setdefault(kind_name, []).append(getattr(message, kind_name))
    return found
