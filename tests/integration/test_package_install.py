"""mlmkit installs as a normal wheel: `pip install .` (not editable) into a fresh virtual
environment, then `from mlmkit import MaskedLMCollator` and the README's collator examples run
from a folder outside the checkout, importing the installed copy.

The new environment sees the dependencies already installed (torch, transformers, ...) through a
.pth file naming this interpreter's site-packages, found with `sysconfig`, so nothing is
downloaded; mlmkit itself is built from a copy of the checkout (`pip install --no-deps
--no-build-isolation .`, which builds a wheel) so the build leaves nothing in the checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from helpers import save_tiny_model
from readme_commands import collator_examples

ROOT = Path(__file__).resolve().parents[2]
# What a build or a run leaves in a checkout (as .gitignore has it): not part of the source.
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "__pycache__", "build", "dist", "*.egg-info",
                                    "outputs", "runs", "wandb", ".pytest_cache", ".cache")


def run(cmd: list[str], cwd: Path, timeout: int = 120) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INDEX="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def test_pip_install_then_the_readme_example_outside_the_checkout(tmp_path, tokenizer_path):
    source = tmp_path / "mlmkit-src"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE)
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
    assert (installed / "collator.py").is_file() and (installed / "__init__.py").is_file()
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
    assert module == "mlmkit.collator"

    # The README's examples, as written but for the model the README's CPU note lets you choose.
    script = collator_examples(save_tiny_model(tmp_path / "tiny", tokenizer_path))
    (outside / "readme_example.py").write_text(
        "import mlmkit\n" + script + "\nprint('mlmkit from', mlmkit.__file__)\n"
        "print('steps', trainer.state.global_step)\n")
    out = run([str(python), "readme_example.py"], outside, timeout=300)
    assert f"mlmkit from {installed / '__init__.py'}" in out, out[-2000:]
    assert "steps 3" in out
