"""The launch commands the documentation shows, read from README.md and the docs/ pages
themselves, and the README's CPU note.

Tests run these instead of commands of their own, so a launch line in the README or the docs that
does not work on a GPU node (as written) or on CPU (with only the README's CPU note applied)
fails a test. A line shown on several pages (the same text) is one command.

* :func:`readme_launches`: every ``accelerate launch --config_file accelerate_configs/...`` and
  every ``sbatch`` line of the pages' code blocks (backslash continuations joined); ``...`` is
  the docs' placeholder for recipe flags.
* :func:`single_gpu_launches`: the ``accelerate launch --num_processes 1 --mixed_precision ...``
  lines (no config file: one process on one GPU).
* :func:`cpu_note`: what the README tells a CPU user to change -- the ``accelerate launch`` flags,
  the one-GPU line's flags, the sbatch options and the sbatch script's environment, parsed from
  the "**Without a GPU**" paragraph.
* :func:`accelerate_args` / :func:`sbatch_command`: a line turned into a command for this
  machine, changing only what the CPU note says, with recipe flags in place of ``...``.
* :func:`launch_lines`: every ``accelerate launch`` and ``sbatch`` line the pages show, for the
  check that each has a test.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"


def pages() -> list[Path]:
    """README.md and the documentation site's hand-written pages (docs/*.md), in that order."""
    return [README, *sorted(DOCS.glob("*.md"))]
RECIPE_PATH = "recipes/mlm.py"
SBATCH_SCRIPT = "recipes/slurm/mlm.sbatch"


@dataclass(frozen=True)
class Launch:
    text: str                 # the line as the README shows it (continuations joined)
    env: dict                 # VAR=value prefixes
    argv: list                # the command, shell-split, without the env prefixes

    @property
    def kind(self) -> str:
        if self.argv[0] == "sbatch":
            return "sbatch"
        return "accelerate" if "--config_file" in self.argv else "single"

    @property
    def config(self) -> str:
        """The accelerate config's name: ``zero3`` for accelerate_configs/zero3.yaml."""
        if self.kind == "single":
            return "single_gpu"
        if self.kind == "accelerate":
            path = self.argv[self.argv.index("--config_file") + 1]
        else:
            path = self.env.get("ACCELERATE_CONFIG", "accelerate_configs/multi_node.yaml")
        return Path(path).stem

    @property
    def recipe_args(self) -> list:
        """The recipe flags written on the line (``...`` dropped)."""
        script = SBATCH_SCRIPT if self.kind == "sbatch" else RECIPE_PATH
        return [a for a in self.argv[self.argv.index(script) + 1:] if a != "..."]


def _code_blocks(text: str) -> list[str]:
    return re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S)


def _command_lines(where: list[Path] | None = None) -> list[str]:
    """Every command line of the pages' code blocks (continuations joined, comments and blank
    lines dropped), each distinct line once, in page order."""
    lines: list[str] = []
    for page in where or pages():
        for block in _code_blocks(page.read_text()):
            for line in re.sub(r"\\\n\s*", " ", block).splitlines():
                line = line.strip()
                if line and not line.startswith("#") and line not in lines:
                    lines.append(line)
    return lines


def _words(line: str) -> list[str]:
    """The line shell-split (comments dropped); [] for text that is not a command (a line of a
    plain code block with an unbalanced quote)."""
    try:
        return shlex.split(line, comments=True)
    except ValueError:
        return []


def _as_launch(line: str) -> Launch | None:
    """The line as a `Launch` when it is an ``accelerate launch`` or ``sbatch`` command."""
    words = _words(line)
    env = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    if words[:2] == ["accelerate", "launch"] or words[:1] == ["sbatch"]:
        return Launch(line, env, words)
    return None


def launch_lines() -> list[Launch]:
    """Every ``accelerate launch`` and ``sbatch`` line the README and the docs show."""
    return [launch for launch in map(_as_launch, _command_lines()) if launch is not None]


def readme_launches() -> list[Launch]:
    """The ``accelerate launch --config_file accelerate_configs/...`` and ``sbatch`` lines."""
    return [launch for launch in launch_lines() if launch.kind == "sbatch" or (
        launch.kind == "accelerate" and launch.argv[launch.argv.index("--config_file") + 1]
        .startswith("accelerate_configs/"))]


def single_gpu_launches() -> list[Launch]:
    """The one-GPU lines: ``accelerate launch`` with ``--mixed_precision`` and no config file."""
    return [launch for launch in launch_lines()
            if launch.kind == "single" and "--mixed_precision" in launch.argv]


class CpuNote(NamedTuple):
    accelerate: list  # flags added to `accelerate launch --config_file ...`
    single: list      # flags added to the one-GPU line (no config file)
    sbatch: list      # options added to `sbatch` (before the script: they override its #SBATCH)
    env: dict         # the sbatch script's environment


def cpu_note(readme: Path = README) -> CpuNote:
    """What the README's "**Without a GPU**" paragraph changes: `accelerate launch` flags for the
    lines with a config file (its first code span of flags), the one-GPU line's (its second),
    sbatch options (the span ``sbatch --opt ... ...``) and the sbatch script's environment
    (``VAR=value`` spans)."""
    text = readme.read_text()
    start = text.index("**Without a GPU**")
    paragraph = text[start:text.index("\n\n", start)]
    spans = re.findall(r"`([^`]+)`", paragraph.replace("\n", " "))
    flags, single = [shlex.split(s) for s in spans if s.startswith("--")][:2]
    sbatch = next(shlex.split(s)[1:] for s in spans if s.startswith("sbatch --"))
    env = dict(s.split("=", 1) for s in spans if re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S+", s))
    return CpuNote(flags, single, [a for a in sbatch if a != "..."], env)


def launches_of(kind: str) -> list[Launch]:
    return [launch for launch in readme_launches() if launch.kind == kind]


def accelerate_launch(config: str) -> Launch:
    """The README's ``accelerate launch`` line for accelerate_configs/<config>.yaml."""
    found = [launch for launch in launches_of("accelerate") if launch.config == config]
    assert len(found) == 1, f"README.md shows {len(found)} launch lines for {config}.yaml"
    return found[0]


def accelerate_args(launch: Launch, *, cpu: bool = True, replace: dict | None = None) -> list:
    """The ``accelerate launch`` options of a line, the config path made absolute; with ``cpu``
    the CPU note's flags for that kind of line are added after the line's own (the later flag
    wins). ``replace``: option -> value, for the placeholders of one machine (host, port, rank)."""
    args = list(launch.argv[2:launch.argv.index(RECIPE_PATH)])
    if "--config_file" in args:
        i = args.index("--config_file")
        args[i + 1] = str(ROOT / args[i + 1])
    for option, value in (replace or {}).items():
        args[args.index(option) + 1] = str(value)
    if not cpu or launch.config == "cpu":  # the CPU line is run as written
        return args
    return args + (cpu_note().accelerate if launch.kind == "accelerate" else cpu_note().single)


def sbatch_command(launch: Launch, *options: str) -> tuple[list, dict]:
    """(argv, env additions) for a README sbatch line on a CPU cluster: the CPU note's sbatch
    options (and then ``options``, e.g. ``--time=1``) right after ``sbatch``, where sbatch takes
    options that override the script's #SBATCH lines; the line's own environment plus the
    note's. ``...`` dropped: the caller appends recipe flags."""
    argv = [a for a in launch.argv if a != "..."]
    return [argv[0], *cpu_note().sbatch, *options, *argv[1:]], {**launch.env, **cpu_note().env}


def readme_lines(prefix: str) -> list[list[str]]:
    """Every command line of the README's and the docs' code blocks that starts with ``prefix``
    (words), continuations joined, shell-split, each distinct line once: e.g. the large-corpora
    page's ``python recipes/pretokenize.py`` and ``accelerate launch recipes/mlm.py
    --streaming`` lines."""
    want = shlex.split(prefix)
    return [words for words in map(_words, _command_lines()) if words[:len(want)] == want]


COLLATOR_PAGE = DOCS / "collator.md"
README_COLLATOR_SECTION = "## The collator in a Trainer"


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"^~~~python\n(.*?)^~~~$", text, flags=re.S | re.M)


def collator_examples(model: str) -> str:
    """The ``~~~python`` blocks of docs/collator.md, joined in order into one script, with only
    what the docs tell CPU users to change changed: the ``MODEL = ...`` line, set to ``model``.
    The README's Trainer example is the page's first block, word for word, so this runs it too."""
    text = COLLATOR_PAGE.read_text()
    blocks = _python_blocks(text)
    assert len(blocks) >= 3, "docs/collator.md lost its Python examples"
    readme = README.read_text()
    start = readme.index(README_COLLATOR_SECTION)
    section = readme[start:readme.find("\n## ", start + 1)]
    assert _python_blocks(section) == blocks[:1], \
        "the README's collator example is not docs/collator.md's first example"
    script = "\n".join(blocks)
    # The one change the docs allow: "On a CPU, set `MODEL` to a small masked LM".
    assert "**On a CPU**, set `MODEL`" in text and "**On a CPU**, set `MODEL`" in section
    script, n = re.subn(r"^MODEL = .*$", f"MODEL = {model!r}", script, flags=re.M)
    assert n == 1, f"the collator examples set MODEL {n} times, expected once"
    return script
