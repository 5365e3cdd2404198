"""Every ```python block of the README runs as written (in a scratch folder), and the shell commands it
shows name things that exist: bundled configs, CLI commands and options."""
import os
import re
import shlex

import pytest

from adapmtl.cli import build_parser
from adapmtl.train.config import bundled_configs

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
TEXT = open(README).read()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, re.S)
BASH_BLOCKS = re.findall(r"```bash\n(.*?)```", TEXT, re.S)


def test_readme_has_snippets():
    assert len(PYTHON_BLOCKS) >= 2 and BASH_BLOCKS


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_python_snippet_runs(index, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(PYTHON_BLOCKS[index], f"README.md python block {index + 1}", "exec"), {"__name__": "__readme__"})


def _adapmtl_commands():
    for block in BASH_BLOCKS:
        for line in block.splitlines():
            line = line.split("#", 1)[0].strip()
            for part in line.split("&&"):
                words = shlex.split(part.strip())
                if words[:3] == ["python3", "-m", "adapmtl"]:
                    words = words[2:]
                if words and words[0] == "adapmtl":
                    yield words[1:]


def test_every_cli_line_parses_and_names_a_bundled_config():
    commands = list(_adapmtl_commands())
    assert len(commands) >= 6
    parser = build_parser()
    for argv in commands:
        if argv[0] == "bench":
            continue  # its arguments belong to the benchmark script
        args = parser.parse_args(argv)  # an unknown command or option exits here
        if getattr(args, "config", None):
            assert args.config in bundled_configs(), argv


def test_the_plain_loop_recipe_prints_what_it_says(tmp_path, monkeypatch, capsys):
    """The "Your own model and training loop" snippet reaches the sparsity its comment states."""
    block = next(b for b in PYTHON_BLOCKS if "TargetSparsity(model" in b)
    claimed = re.search(r"overall:\.2f}\"\)\s+# (\d\.\d\d)", block).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md TargetSparsity block", "exec"), {"__name__": "__readme__"})
    assert capsys.readouterr().out.strip().splitlines()[-1] == claimed
