"""Every benchmark's ``--help`` runs and shows the default of each option that has one
(``benchmarks/bench_help.py``'s formatter): the defaults are read from the script's own
``add_argument`` calls, the help from a real ``python benchmarks/<script> --help``."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (REPO / "benchmarks").glob("*.py") if "argparse.ArgumentParser(" in p.read_text())


def defaulted_options(source: str) -> dict[str, str | None]:
    """option -> how its default prints (None: an expression, known only when it runs) of every
    ``add_argument`` whose default a user should see: not None, not a flag's, not a hidden option's."""
    found = {}
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument"):
            continue
        keywords = {k.arg: k.value for k in node.keywords}
        default, action, help_ = keywords.get("default"), keywords.get("action"), keywords.get("help")
        if default is None or (isinstance(default, ast.Constant) and default.value is None):
            continue
        if isinstance(action, ast.Constant) and action.value in ("store_true", "store_false"):
            continue
        if help_ is not None and ast.unparse(help_) == "argparse.SUPPRESS":
            continue
        option = next(a.value for a in node.args if isinstance(a, ast.Constant) and a.value.startswith("--"))
        found[option] = str(default.value) if isinstance(default, ast.Constant) else None
    return found


def option_help(text: str) -> dict[str, str]:
    """option -> its help in ``--help``'s output, lines joined (a default may wrap onto the next)."""
    blocks, current = {}, None
    for line in text.splitlines():
        stripped = line.strip()
        if line.startswith("  -") and stripped.startswith("-"):
            current = [stripped]
            for option in stripped.split("  ")[0].replace(",", " ").split():
                if option.startswith("-"):
                    blocks[option] = current
        elif current is not None and line.startswith("    ") and stripped:
            current.append(stripped)
        else:
            current = None
    return {option: " ".join(" ".join(lines).split()) for option, lines in blocks.items()}


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_help_shows_the_default_of_every_option_that_has_one(script):
    expected = defaulted_options(script.read_text())
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    shown = option_help(done.stdout)
    for option, default in expected.items():
        assert option in shown, f"{script.name}: {option} is not in --help:\n{done.stdout}"
        assert "(default: " in shown[option], f"{script.name} {option}: no default in {shown[option]!r}"
        if default is not None:
            assert f"(default: {default})" in shown[option], f"{script.name} {option}: {shown[option]!r}"


def test_every_benchmark_parser_uses_the_one_formatter():
    for script in SCRIPTS:
        source = script.read_text()
        assert source.count("argparse.ArgumentParser(") == source.count("formatter_class=HelpFormatter"), script.name
