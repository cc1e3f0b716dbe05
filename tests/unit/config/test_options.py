"""docs/options.md is generated from `config.MLMConfig`'s fields (`python -m mlmkit.config.options`):
the committed page is what the generator writes now, it names every field with its type, default
and help, and the README's table of the most used options names only real flags."""

from __future__ import annotations

import dataclasses
import re

from helpers import ROOT

from mlmkit.config import options
from mlmkit.config.fields import MLMConfig

PAGE = ROOT / "docs" / "options.md"


def test_the_committed_options_page_is_what_the_generator_writes():
    assert options.PAGE == PAGE
    assert PAGE.read_text() == options.render(), \
        "docs/options.md is stale: run `python -m mlmkit.config.options` and commit the page"


def test_the_page_lists_every_field_with_type_default_and_help():
    text = PAGE.read_text()
    listed = re.findall(r"^\| `--(\w+)` \|", text, flags=re.M)
    fields = [f.name for f in dataclasses.fields(MLMConfig)]
    assert listed == fields
    for f in dataclasses.fields(MLMConfig):
        assert f.metadata.get("help"), f"MLMConfig.{f.name} has no help text"
        row = next(line for line in text.splitlines() if line.startswith(f"| `--{f.name}` |"))
        assert " ".join(f.metadata["help"].split()).replace("|", "\\|") in row


def test_the_check_mode_fails_on_a_stale_page(tmp_path):
    stale = tmp_path / "options.md"
    stale.write_text(options.render().replace("--seed", "--sed"))
    assert options.main(["--check", "--output", str(stale)]) == 1
    assert options.main(["--output", str(stale)]) == 0
    assert options.main(["--check", "--output", str(stale)]) == 0


def test_the_readme_option_table_names_real_flags_with_their_defaults():
    readme = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| `--(\w+)` \| ([^|]+) \|", readme, flags=re.M)
    assert len(rows) == 15, rows
    defaults = {f.name: options.default_of(f) for f in dataclasses.fields(MLMConfig)}
    for name, default in rows:
        assert name in defaults, f"README names --{name}, which is no option"
        value = defaults[name]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            assert float(default) == value, (name, default, value)
        elif value is not None:  # an unset default is described in words
            assert default.strip() == str(value), (name, default, value)
