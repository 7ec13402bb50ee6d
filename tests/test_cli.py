"""Issue 15, item 8: grouped ``train --help`` (one method's sections unless ``--help-all``), ``--version``,
and ``--help`` / ``methods`` fast because they import neither torch nor transformers."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import version

from selfdistill.catalog import COMMON_SECTIONS, catalog
from selfdistill.cli import _COMMANDS, _PACKAGE_COMMANDS, main


def _help(capsys, *argv: str) -> str:
    """What ``selfdistill ARGV`` prints (argparse's help and version exit 0 through main)."""
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def _sections(text: str) -> set[str]:
    """The group headers of an argparse help text (``name:`` alone on a line)."""
    return {line[:-1] for line in text.splitlines() if line.endswith(":") and " " not in line}


def test_train_help_shows_only_the_chosen_methods_sections(capsys):
    spd = _help(capsys, "train", "--help")
    assert {"settings", "model", "data", "optim", "rollout", "eval", "spd"} <= _sections(spd)
    assert not _sections(spd) & {"opsd", "distill", "teacher", "onpolicy", "sgsd"}
    assert "--spd.rank" in spd and "--opsd.template" not in spd
    opsd = _help(capsys, "train", "--method", "opsd", "--help")
    assert {"opsd", "distill", "teacher", "onpolicy"} <= _sections(opsd) and "spd" not in _sections(opsd)
    assert "--opsd.template" in opsd and "--spd.rank" not in opsd
    assert len(opsd.splitlines()) < 230  # not the 469-line list of every flag


def test_train_help_reads_the_method_from_the_config_file(capsys, tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("method: grpo\n")
    text = _help(capsys, "train", "--config", str(y), "--help")
    assert "grpo" in _sections(text) and "spd" not in _sections(text)


def test_help_all_lists_every_section(capsys):
    text = _help(capsys, "train", "--help-all")
    every = set(COMMON_SECTIONS) | {s for info in catalog().values() for s in info.sections}
    assert every <= _sections(text)
    assert "--spd.rank" in text and "--opsd.template" in text and "--sgsd.bank_path" in text


def test_hidden_sections_still_accept_their_flags(tiny_model_dir, tmp_path, capsys):
    """A flag not listed in the help of the chosen method is still a flag (here: rejected by its own check)."""
    rc = main(["train", "--model.path", tiny_model_dir, "--output_dir", str(tmp_path / "run"), "--method", "sft",
               "--distill.beta", "2"])
    assert rc == 2 and "distill.beta=2.0 is outside [0, 1]" in capsys.readouterr().err


def test_version(capsys):
    assert _help(capsys, "--version").strip() == f"selfdistill {version('selfdistill')}"


def test_methods_lists_the_registry(capsys):
    from selfdistill.methods.base import REGISTRY, get_method

    get_method("ssd")  # imports the registry
    lines = _help(capsys, "methods").splitlines()
    assert [l.split()[0] for l in lines] == sorted(REGISTRY)
    for name, cls in REGISTRY.items():  # the catalog read from the sources is the live registry
        info = catalog()[name]
        assert (info.paper, info.summary, info.sections) == (cls.paper, cls.summary, cls.sections)


def test_top_level_help_names_every_command_as_its_own_parser_does():
    """The one-line helps of the commands defined in method packages are repeated in cli.py (so that
    `selfdistill --help` need not import them); they must not drift."""
    import argparse
    import importlib

    for name, module in _PACKAGE_COMMANDS.items():
        sub = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(module).add_commands(sub)
        helps = {a.dest: a.help for a in sub._choices_actions}
        assert helps[name] == _COMMANDS[name]


PROBE = """
import contextlib, io, json, sys
from selfdistill.cli import main
out = {}
for argv in (["--help"], ["train", "--help"], ["train", "--method", "opsd", "--help"], ["methods"], ["--version"]):
    with contextlib.redirect_stdout(io.StringIO()):
        out[" ".join(argv)] = main(argv)
print(json.dumps({"rc": out, "torch": "torch" in sys.modules, "transformers": "transformers" in sys.modules}))
"""


def test_help_and_methods_import_no_torch():
    """What makes them answer in well under a second: torch and transformers are never imported."""
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(got["rc"].values()) == {0}
    assert got["torch"] is False and got["transformers"] is False


def test_every_command_and_subcommand_renders_its_help():
    """argparse %-formats help strings: a literal % in a field's help (e.g. "decay to 10%") once broke
    ``selfdistill toy pretrain --help`` with a traceback."""
    import argparse

    from selfdistill.cli import _parser

    def walk(parser: argparse.ArgumentParser, path: str) -> int:
        assert parser.format_help(), path
        n = 1
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    n += walk(child, f"{path} {name}")
        return n

    assert walk(_parser(None), "selfdistill") > len(_COMMANDS)


def test_eval_shows_and_writes_its_completions(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "c.jsonl"
    assert main(["eval", "--model.path", tiny_model_dir, "--data.tasks", "toy-math", "--data.test_size", "3",
                 "--eval.max_items", "3", "--eval.samples", "2", "--eval.max_new_tokens", "6", "--show", "1",
                 "--completions_out", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.count("--- toy-math/") == 2  # one per split (test_id, test_ood)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 * 3 * (1 + 2)  # splits x items x (greedy + 2 samples)
    assert {r["mode"] for r in rows} == {"greedy", "sampled"} and all(isinstance(r["correct"], bool) for r in rows)
