"""The launch commands the README documents, read from README.md itself, and its CPU note.

Tests run these instead of commands of their own, so a launch line in the README that does not
work on a GPU node (as written) or on CPU (with only the README's CPU note applied) fails a test.

* :func:`readme_launches`: every ``accelerate launch --config_file accelerate_configs/...`` and
  every ``sbatch`` line of the README's code blocks (backslash continuations joined); ``...`` is
  the README's placeholder for recipe flags.
* :func:`cpu_note`: what the README tells a CPU user to change -- the ``accelerate launch`` flags,
  the sbatch options and the sbatch script's environment, parsed from the "**Without a GPU**"
  paragraph.
* :func:`accelerate_args` / :func:`sbatch_command`: a README line turned into a command for this
  machine, changing only what the CPU note says, with recipe flags in place of ``...``.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RECIPE_PATH = "recipes/mlm.py"
SBATCH_SCRIPT = "recipes/slurm/mlm.sbatch"


@dataclass(frozen=True)
class Launch:
    text: str                 # the line as the README shows it (continuations joined)
    env: dict                 # VAR=value prefixes
    argv: list                # the command, shell-split, without the env prefixes

    @property
    def kind(self) -> str:
        return "sbatch" if self.argv[0] == "sbatch" else "accelerate"

    @property
    def config(self) -> str:
        """The accelerate config's name: ``zero3`` for accelerate_configs/zero3.yaml."""
        if self.kind == "accelerate":
            path = self.argv[self.argv.index("--config_file") + 1]
        else:
            path = self.env.get("ACCELERATE_CONFIG", "accelerate_configs/multi_node.yaml")
        return Path(path).stem

    @property
    def recipe_args(self) -> list:
        """The recipe flags written on the line (``...`` dropped)."""
        script = RECIPE_PATH if self.kind == "accelerate" else SBATCH_SCRIPT
        return [a for a in self.argv[self.argv.index(script) + 1:] if a != "..."]


def _code_blocks(text: str) -> list[str]:
    return re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S)


def readme_launches(readme: Path = README) -> list[Launch]:
    launches = []
    for block in _code_blocks(readme.read_text()):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            words = shlex.split(line)
            env = {}
            while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
                key, value = words.pop(0).split("=", 1)
                env[key] = value
            if not words:
                continue
            is_accelerate = (words[:2] == ["accelerate", "launch"] and "--config_file" in words
                             and words[words.index("--config_file") + 1].startswith(
                                 "accelerate_configs/"))
            if is_accelerate or words[0] == "sbatch":
                launches.append(Launch(line, env, words))
    return launches


class CpuNote(NamedTuple):
    accelerate: list  # flags added to `accelerate launch`
    sbatch: list      # options added to `sbatch` (before the script: they override its #SBATCH)
    env: dict         # the sbatch script's environment


def cpu_note(readme: Path = README) -> CpuNote:
    """What the README's "**Without a GPU**" paragraph changes: `accelerate launch` flags (its
    first code span of flags), sbatch options (the span ``sbatch --opt ... ...``) and the sbatch
    script's environment (``VAR=value`` spans)."""
    text = readme.read_text()
    start = text.index("**Without a GPU**")
    paragraph = text[start:text.index("\n\n", start)]
    spans = re.findall(r"`([^`]+)`", paragraph.replace("\n", " "))
    flags = next(shlex.split(s) for s in spans if s.startswith("--"))
    sbatch = next(shlex.split(s)[1:] for s in spans if s.startswith("sbatch --"))
    env = dict(s.split("=", 1) for s in spans if re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S+", s))
    return CpuNote(flags, [a for a in sbatch if a != "..."], env)


def launches_of(kind: str) -> list[Launch]:
    return [launch for launch in readme_launches() if launch.kind == kind]


def accelerate_launch(config: str) -> Launch:
    """The README's ``accelerate launch`` line for accelerate_configs/<config>.yaml."""
    found = [launch for launch in launches_of("accelerate") if launch.config == config]
    assert len(found) == 1, f"README.md shows {len(found)} launch lines for {config}.yaml"
    return found[0]


def accelerate_args(launch: Launch, *, cpu: bool = True, replace: dict | None = None) -> list:
    """The ``accelerate launch`` options of a README line, the config path made absolute; with
    ``cpu`` the CPU note's flags are added after the README's own (the later flag wins).
    ``replace``: option -> value, for the placeholders of one machine (host, port, rank)."""
    args = list(launch.argv[2:launch.argv.index(RECIPE_PATH)])
    i = args.index("--config_file")
    args[i + 1] = str(ROOT / args[i + 1])
    for option, value in (replace or {}).items():
        args[args.index(option) + 1] = str(value)
    return args + (cpu_note().accelerate if cpu else [])


def sbatch_command(launch: Launch, *options: str) -> tuple[list, dict]:
    """(argv, env additions) for a README sbatch line on a CPU cluster: the CPU note's sbatch
    options (and then ``options``, e.g. ``--time=1``) right after ``sbatch``, where sbatch takes
    options that override the script's #SBATCH lines; the line's own environment plus the
    note's. ``...`` dropped: the caller appends recipe flags."""
    argv = [a for a in launch.argv if a != "..."]
    return [argv[0], *cpu_note().sbatch, *options, *argv[1:]], {**launch.env, **cpu_note().env}


def readme_lines(prefix: str, readme: Path = README) -> list[list[str]]:
    """Every command line of the README's code blocks that starts with ``prefix`` (words),
    continuations joined, shell-split: e.g. the data section's ``python recipes/pretokenize.py``
    and ``accelerate launch recipes/mlm.py --streaming`` lines."""
    want = shlex.split(prefix)
    found = []
    for block in _code_blocks(readme.read_text()):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = line.strip()
            if line and not line.startswith("#") and shlex.split(line)[:len(want)] == want:
                found.append(shlex.split(line))
    return found


COLLATOR_SECTION = "## MaskedLMCollator as a library"


def collator_examples(model: str, readme: Path = README) -> str:
    """The ``~~~python`` blocks of the README's section "MaskedLMCollator as a library", joined in
    order into one script, with only what the README tells CPU users to change changed: the
    ``MODEL = ...`` line, set to ``model``."""
    text = readme.read_text()
    start = text.index(COLLATOR_SECTION)
    end = text.find("\n## ", start + len(COLLATOR_SECTION))
    section = text[start:end if end > 0 else len(text)]
    blocks = re.findall(r"^~~~python\n(.*?)^~~~$", section, flags=re.S | re.M)
    assert len(blocks) >= 2, "the README's collator section lost its Python examples"
    script = "\n".join(blocks)
    # The one change the README allows: "On a CPU, set `MODEL` to a small masked LM".
    assert "**On a CPU**, set `MODEL`" in section
    script, n = re.subn(r"^MODEL = .*$", f"MODEL = {model!r}", script, flags=re.M)
    assert n == 1, f"the README's examples set MODEL {n} times, expected once"
    return script
