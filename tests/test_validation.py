"""Bad input: one clear line naming the file, row and field or the setting; nothing written.

Every case goes through the command line (``selfdistill.cli.main``): exit code
2, one ``selfdistill...: error: ...`` line on stderr, no traceback, and the
run's output folder does not exist afterwards.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from selfdistill.cli import main
from selfdistill.config import TrainConfig
from selfdistill.config_io import ConfigError
from selfdistill.trainer import prepare_run, train

import tinyrun  # tests/tinyrun.py


def _toy_vocab_size() -> int:
    """The toy tokenizer's size (it changes when the toy world's words do)."""
    from selfdistill.toy.tokenizer import build_toy_tokenizer

    return len(build_toy_tokenizer())


def _jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _row(i: int = 0, **over) -> dict:
    return {"prompt": f"What is {i} + 1?", "solution": f"{i} + 1 = {i + 1}\n#### {i + 1}", "answer": str(i + 1),
            **over}


def _no_eval() -> list[str]:
    return ["--eval_before", "false", "--eval_after", "false"]


def _model_with(tmp: Path, name: str, **cfg_over) -> str:
    """A tiny Qwen3 (toy tokenizer) with config overrides, e.g. another vocabulary size."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from selfdistill.toy.tokenizer import build_toy_tokenizer

    torch.manual_seed(1)
    tok = build_toy_tokenizer()
    kw = dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
              num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=512,
              tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    kw.update(cfg_over)
    path = tmp / name
    Qwen3ForCausalLM(Qwen3Config(**kw)).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _t5_dir(tmp: Path) -> str:
    """An encoder-decoder (T5) config: not something AutoModelForCausalLM loads."""
    d = tmp / "t5"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "t5", "vocab_size": 100, "d_model": 8,
                                              "num_layers": 1, "num_heads": 1, "d_ff": 8, "d_kv": 8}))
    return str(d)


def _weightless_dir(tmp: Path, model_dir: str) -> str:
    d = tmp / "weightless"
    d.mkdir()
    (d / "config.json").write_text((Path(model_dir) / "config.json").read_text())
    return str(d)


def _yaml(tmp: Path, text: str) -> list[str]:
    p = tmp / "c.yaml"
    p.write_text(text)
    return ["--config", str(p)]


def _yaml_bytes(tmp: Path, data: bytes) -> list[str]:
    p = tmp / "c.yaml"
    p.write_bytes(data)
    return ["--config", str(p)]


def _file(tmp: Path, name: str, text: str) -> str:
    (tmp / name).write_text(text)
    return str(tmp / name)


def _edited_model(tmp: Path, model_dir: str, edit) -> str:
    """A copy of the tiny model folder with ``edit(folder)`` applied."""
    d = tmp / "edited"
    shutil.copytree(model_dir, d)
    edit(d)
    return str(d)


def _truncate_weights(d: Path) -> None:
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])


def _widen_config(d: Path) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(hidden_size=64, intermediate_size=128, head_dim=16)
    (d / "config.json").write_text(json.dumps(cfg))


def _drop_tokenizer(d: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (d / name).unlink(missing_ok=True)


def _no_pad_no_eos(d: Path) -> None:
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.update(pad_token=None, eos_token=None)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))


def _empty_split(tmp: Path, split: str) -> list[str]:
    """A JSONL folder whose ``split`` file has no rows (the other of train / test_id has one)."""
    d = tmp / "data"
    for name in ("train", "test_id"):
        _jsonl(d / f"{name}.jsonl", [] if name == split else [_row(0)])
    return ["--data.tasks", f"jsonl:{d}", "--eval.splits", "test_id"]


def _mpt_dir(tmp: Path) -> str:
    """A tiny MPT: fused q/k/v in ``Wqkv``, which SPD's K/V adapter does not handle."""
    from transformers import MptConfig, MptForCausalLM

    from selfdistill.toy.tokenizer import build_toy_tokenizer

    tok = build_toy_tokenizer()
    cfg = MptConfig(vocab_size=len(tok), d_model=16, n_layers=1, n_heads=2, expansion_ratio=2, max_seq_len=512,
                    pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    path = tmp / "mpt"
    MptForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _no_solutions(tmp: Path, method: str) -> list[str]:
    d = tmp / "nosol"
    _jsonl(d / "train.jsonl", [_row(0), _row(1, solution=None), _row(2)])
    _jsonl(d / "test_id.jsonl", [_row(3)])
    return ["--method", method, "--data.tasks", f"jsonl:{d}", "--eval.splits", "test_id"]


# (id, builder(tmp, tiny_model_dir) -> extra args [, env], expected text in the error line)
CASES = [
    ("unknown-method", lambda t, m: ["--method", "nope"], "unknown method 'nope'; known:"),
    ("unknown-flag", lambda t, m: ["--spd.rnak", "3"], "unknown flag --spd.rnak (did you mean --spd.rank?)"),
    ("unknown-flag-no-match", lambda t, m: ["--zzz", "1"], "unknown flag --zzz; see selfdistill train --help"),
    ("flag-without-value", lambda t, m: ["--steps"], "argument --steps: expected one argument"),
    ("sdpo-with-default-samples", lambda t, m: ["--method", "sdpo"],
     "no sample ever gets a teacher signal: set it >= 2"),
    ("not-an-int", lambda t, m: ["--steps", "abc"], "steps: cannot read 'abc' as int"),
    ("steps-zero", lambda t, m: ["--steps", "0"], "steps must be >= 1, got 0"),
    ("save-every-negative", lambda t, m: ["--save_every", "-1"], "save_every must be >= 0"),
    ("max-bad-steps-zero", lambda t, m: ["--max_bad_steps", "0"], "max_bad_steps must be >= 1"),
    ("negative-lr", lambda t, m: ["--optim.lr", "-0.1"], "optim.lr must be >= 0, got -0.1"),
    ("bad-betas", lambda t, m: ["--optim.betas", "0.9"], "optim.betas must be two numbers in [0, 1)"),
    ("bad-choice", lambda t, m: ["--optim.schedule", "wavy"], "optim.schedule: 'wavy' is not one of"),
    ("bad-dtype", lambda t, m: ["--model.dtype", "float8"], "model.dtype: 'float8' is not one of"),
    ("nothing-to-measure", lambda t, m: ["--eval.greedy", "false", "--eval.samples", "0"],
     "eval.greedy is false and eval.samples is 0: nothing to measure"),
    ("spd-rank-and-energy-zero", lambda t, m: ["--spd.rank", "0", "--spd.energy", "0"],
     "spd.rank is 0 and spd.energy is 0: set one of them"),
    ("negative-temperature", lambda t, m: ["--rollout.temperature", "-1"],
     "rollout.temperature must be a finite number >= 0, got -1.0"),
    ("yaml-missing", lambda t, m: ["--config", str(t / "nope.yaml")], "nope.yaml does not exist"),
    ("yaml-unreadable", lambda t, m: _yaml(t, "steps: [1, 2\n"), "c.yaml is not readable YAML"),
    ("yaml-not-a-mapping", lambda t, m: _yaml(t, "- 1\n- 2\n"), "c.yaml must hold a mapping at the top level"),
    ("yaml-unknown-key", lambda t, m: _yaml(t, "spd:\n  rnak: 3\n"), "unknown setting spd.rnak"),
    ("model-missing", lambda t, m: ["--model.path", str(t / "no_model")], "no_model: no such folder"),
    ("model-without-config", lambda t, m: ["--model.path", str(t)], "no config.json there"),
    ("model-not-causal-lm", lambda t, m: ["--model.path", _t5_dir(t)], "model type 't5' is not a causal LM"),
    ("model-without-weights", lambda t, m: ["--model.path", _weightless_dir(t, m)],
     "weightless: no weights there (model.safetensors"),
    ("tasks-empty", lambda t, m: ["--data.tasks", ""], "data.tasks is empty"),
    ("unknown-toy-task", lambda t, m: ["--data.tasks", "toy-poetry"], "unknown toy task 'toy-poetry'"),
    ("data-file-missing", lambda t, m: ["--data.tasks", f"jsonl:{t / 'none.jsonl'}"], "none.jsonl does not exist"),
    ("jsonl-missing-column", lambda t, m: ["--data.tasks", f"jsonl:{_jsonl(t / 'd.jsonl', [_row(0), {'answer': '1'}])}",
                                           *_no_eval()], "d.jsonl, row 2, field 'prompt': missing"),
    ("jsonl-empty-prompt", lambda t, m: ["--data.tasks", f"jsonl:{_jsonl(t / 'd.jsonl', [_row(0, prompt='  ')])}",
                                         *_no_eval()], "d.jsonl, row 1, field 'prompt': is empty"),
    ("jsonl-prompt-not-a-string", lambda t, m: ["--data.tasks", f"jsonl:{_jsonl(t / 'd.jsonl', [_row(0, prompt=7)])}",
                                                *_no_eval()], "d.jsonl, row 1, field 'prompt': must be a string, got int"),
    ("jsonl-invalid-json", lambda t, m: ["--data.tasks", f"jsonl:{_jsonl(t / 'd.jsonl', [_row(0), '{oops'])}",
                                         *_no_eval()], "d.jsonl, row 2: invalid JSON"),
    ("jsonl-without-eval-splits", lambda t, m: ["--data.tasks", f"jsonl:{_jsonl(t / 'd.jsonl', [_row(0)])}"],
     "has no split 'test_id'"),
    ("opsd-without-solutions", lambda t, m: _no_solutions(t, "opsd"),
     "train.jsonl, row 2, field 'solution': is null; method opsd needs a reference solution in every train row"),
    ("sdft-without-solutions", lambda t, m: _no_solutions(t, "sdft"), "field 'solution': is null; method sdft needs"),
    ("sft-without-solutions", lambda t, m: _no_solutions(t, "sft"), "field 'solution': is null; method sft needs"),
    ("prompt-longer-than-context", lambda t, m: [
        "--data.tasks", f"jsonl:{_jsonl(t / 'long.jsonl', [_row(0), _row(1, id='big', prompt='x' * 600)])}",
        *_no_eval()],
     "long.jsonl, item 'big', field 'prompt': the prompt has 6"),
    ("completion-fills-context", lambda t, m: ["--rollout.max_new_tokens", "600"],
     "rollout.max_new_tokens=600 leaves no room for a prompt in the 512-token context"),
    ("teacher-vocab-mismatch", lambda t, m: ["--method", "opsd", "--teacher.path",
                                             _model_with(t, "big_vocab", vocab_size=160)],
     "big_vocab has a vocabulary of 160 tokens but the student"),
    ("teacher-not-causal-lm", lambda t, m: ["--method", "opsd", "--teacher.path", _t5_dir(t)],
     "teacher.path {t}/t5: model type 't5' is not a causal LM"),
    ("teacher-path-with-ema", lambda t, m: ["--method", "opsd", "--teacher.path", m, "--teacher.kind", "ema"],
     "teacher.path is set, so the teacher is a separate frozen model: teacher.kind must be initial"),
    ("teacher-path-without-teacher", lambda t, m: ["--method", "ssd", "--teacher.path", m],
     "teacher.path is set but method ssd has no teacher model"),
    ("batch-not-divisible", lambda t, m: (["--batch_size", "4"], {"WORLD_SIZE": "3"}),
     "batch_size 4 is not divisible by the 3 processes"),
    ("resume-without-checkpoint", lambda t, m: ["--resume", "true"], "--resume: no checkpoint in"),
    # Issue 14, item 4: found before anything is written, one line naming the setting, file, row or field.
    ("yaml-not-utf8", lambda t, m: _yaml_bytes(t, b"model:\n  system_prompt: caf\xe9\n"),
     "c.yaml is not UTF-8 text (byte 0xe9 at offset 27)"),
    ("yaml-duplicate-key", lambda t, m: _yaml(t, "steps: 1\noptim:\n  lr: 0.1\nsteps: 2\n"),
     "c.yaml, line 4: duplicate key 'steps' (first given on line 1)"),
    ("lr-nan", lambda t, m: ["--optim.lr", "nan"], "optim.lr: must be a finite number, got 'nan'"),
    ("lr-inf", lambda t, m: ["--optim.lr", "inf"], "optim.lr: must be a finite number, got 'inf'"),
    ("rollout-batch-size-zero", lambda t, m: ["--rollout.batch_size", "0"], "rollout.batch_size must be >= 1, got 0"),
    ("spd-layers-unreadable", lambda t, m: ["--method", "spd", "--spd.layers", "abc"], "spd.layers: cannot read 'abc'"),
    ("spd-layers-out-of-range", lambda t, m: ["--method", "spd", "--spd.layers", "99"],
     "spd.layers 99: model.path {m} has layers 0..1"),
    ("template-unknown-placeholder", lambda t, m: ["--method", "opsd", "--opsd.template", "{problem} {answer}"],
     "opsd.template: unknown placeholder {{answer}}; known: {{problem}}, {{solution}}"),
    ("sgsd-template-unknown-placeholder", lambda t, m: ["--method", "sgsd", "--sgsd.template", "{problem} {skill}"],
     "sgsd.template: unknown placeholder {{skill}}; known: {{problem}}, {{guidance}}"),
    ("teacher-prompt-over-limit", lambda t, m: ["--method", "opsd", "--onpolicy.max_teacher_prompt_tokens", "20"],
     "onpolicy.max_teacher_prompt_tokens=20: the teacher prompt of train item"),
    ("spd-subspace-path-missing", lambda t, m: ["--method", "spd", "--spd.subspace_path", str(t / "none.safetensors")],
     "spd.subspace_path {t}/none.safetensors: no such file"),
    ("spd-subspace-path-not-a-subspace", lambda t, m: ["--method", "spd", "--spd.subspace_path",
                                                       _file(t, "s.safetensors", "junk")],
     "spd.subspace_path {t}/s.safetensors: not a readable subspace file"),
    ("sgsd-bank-not-json", lambda t, m: ["--method", "sgsd", "--sgsd.bank_path", _file(t, "bank.json", "not json")],
     "sgsd.bank_path {t}/bank.json: not JSON"),
    ("seed-negative", lambda t, m: ["--seed", "-1"], "seed must be in [0, 2**32), got -1"),
    ("train-jsonl-empty", lambda t, m: _empty_split(t, "train"),
     "train.jsonl has no rows; training needs at least one"),
    ("train-size-zero", lambda t, m: ["--data.train_size", "0"], "data.train_size must be >= 1, got 0"),
    ("weights-truncated", lambda t, m: ["--model.path", _edited_model(t, m, _truncate_weights)],
     "edited: model.safetensors is truncated"),
    ("weights-empty", lambda t, m: ["--model.path", _edited_model(t, m, lambda d: (d / "model.safetensors")
                                                                    .write_bytes(b""))],
     "edited: model.safetensors is 0 bytes: empty or truncated"),
    ("config-shapes-differ-from-weights", lambda t, m: ["--model.path", _edited_model(t, m, _widen_config)],
     f"edited: weight model.embed_tokens.weight has shape [{_toy_vocab_size()}, 32] but config.json builds "
     f"[{_toy_vocab_size()}, 64]"),
    ("no-tokenizer-files", lambda t, m: ["--model.path", _edited_model(t, m, _drop_tokenizer)],
     "edited: no working tokenizer there"),
    ("tokenizer-without-pad-or-eos", lambda t, m: ["--model.path", _edited_model(t, m, _no_pad_no_eos)],
     "edited: the tokenizer has neither a pad nor an eos token"),
    ("report-to-unknown", lambda t, m: ["--report_to", "foo"],
     "report_to[0]: 'foo' is not one of ['tensorboard', 'wandb']"),
    ("eval-split-without-items", lambda t, m: _empty_split(t, "test_id"),
     "test_id.jsonl has no rows, so evaluation would measure nothing"),
    ("eval-toy-split-without-items", lambda t, m: ["--data.test_size", "0"],
     "data.tasks 'toy-math': split 'test_id' has no items, so evaluation would measure nothing"),
    ("flag-name-rollout", lambda t, m: ["--rollout.top_p", "2"], "rollout.top_p must be in (0, 1], got 2.0"),
    ("flag-name-distill", lambda t, m: ["--distill.beta", "2"], "distill.beta=2.0 is outside [0, 1]"),
    # Issue 15, item 1: SPD's own errors arrive before the evaluation before training (and write nothing).
    ("spd-selector-finds-no-answer", lambda t, m: ["--method", "spd", "--spd.probe_size", "1",
                                                   "--spd.probe_samples", "1"],
     "spd.selector=answer: none of the 1 probe completions had correctness-defining tokens"),
    ("spd-unsupported-architecture", lambda t, m: ["--method", "spd", "--model.path", _mpt_dir(t)],
     "method spd: model.path {t}/mpt: MptForCausalLM: no K/V projections found"),
]


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# Refused up front instead of accepted silently; each depends on what this machine has.
if not _installed("wandb"):
    CASES.append(("report-to-not-installed", lambda t, m: ["--report_to", "wandb"],
                  "report_to wandb: wandb is not installed"))
if not _installed("vllm"):
    CASES.append(("vllm-not-installed", lambda t, m: ["--rollout.backend", "vllm"],
                  "rollout.backend vllm: vLLM is not installed"))
CASES.append(("fp16", lambda t, m: ["--mixed_precision", "fp16"],  # refused everywhere, GPU or not
              "mixed_precision fp16 is not supported: its gradients need loss scaling"))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(case, tiny_model_dir, tmp_path, capsys, monkeypatch):
    _, builder, expected = case
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    got = builder(inputs, tiny_model_dir)
    extra, env = got if isinstance(got, tuple) else (got, {})
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "run"
    argv = ["train", "--model.path", tiny_model_dir, "--output_dir", str(out), "--steps", "1", "--batch_size", "2",
            "--data.train_size", "6", "--data.test_size", "2", "--eval.max_items", "2",
            "--rollout.max_new_tokens", "12", "--eval.max_new_tokens", "12", *extra]
    capsys.readouterr()  # drop what building the inputs printed
    rc = main(argv)
    captured = capsys.readouterr()
    err = captured.err
    lines = [l for l in err.splitlines() if l.strip()]
    assert rc == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("selfdistill"), err
    assert expected.format(t=inputs, m=tiny_model_dir) in lines[0], lines[0]
    assert not out.exists(), f"a rejected run wrote {sorted(p.name for p in out.iterdir())}"
    assert "evaluating before training" not in captured.out  # found before the first evaluation


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("selfdistill: error: ") and "Traceback" not in err, err
    return lines[0]


def _train_argv(model_dir: str, out: Path) -> list[str]:
    return ["train", "--model.path", model_dir, "--output_dir", str(out), "--method", "sft", "--steps", "1",
            "--batch_size", "2", "--data.train_size", "6", "--data.test_size", "2", *_no_eval()]


def test_read_only_output_folder_is_refused_before_anything(tiny_model_dir, tmp_path, capsys, monkeypatch):
    parent = tmp_path / "read-only"
    parent.mkdir()
    parent.chmod(0o555)
    if os.geteuid() == 0:  # root may write anywhere: make the write probe meet what any other user would
        def denied(*args, **kwargs):
            raise PermissionError(errno.EACCES, "Permission denied")

        monkeypatch.setattr(tempfile, "TemporaryFile", denied)
    try:
        rc = main(_train_argv(tiny_model_dir, parent / "run"))
        line = _one_error_line(capsys)
    finally:
        parent.chmod(0o755)
    assert rc == 2
    assert f"output_dir {parent / 'run'}: cannot write in {parent} (Permission denied)" in line
    assert list(parent.iterdir()) == []


def test_full_disk_is_one_line_and_leaves_no_partial_record(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """The disk fills while the run's record is written (simulated: every fsync fails with ENOSPC)."""
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    out = tmp_path / "run"
    rc = main(_train_argv(tiny_model_dir, out))
    line = _one_error_line(capsys)
    assert rc == 2
    assert f"output_dir {out}: cannot write the run's files (No space left on device)" in line
    assert not out.exists()  # no truncated run_config.yaml, no temporary file, no empty folder
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_eval_command_refuses_a_split_without_items(tiny_model_dir, tmp_path, capsys):
    d = tmp_path / "data"
    _jsonl(d / "train.jsonl", [_row(0)])
    _jsonl(d / "test_id.jsonl", [])
    rc = main(["eval", "--model.path", tiny_model_dir, "--data.tasks", f"jsonl:{d}", "--eval.splits", "test_id"])
    assert rc == 2
    assert "test_id.jsonl has no rows, so evaluation would measure nothing" in _one_error_line(capsys)


def _cfg(model_dir: str, out: Path, **over) -> TrainConfig:
    base = {"method": "sft", "output_dir": str(out), "steps": 1, "batch_size": 2,
            "model": {"path": model_dir}, "data": {"train_size": 6, "test_size": 2},
            "rollout": {"max_new_tokens": 12}, "eval": {"max_items": 2, "max_new_tokens": 12, "samples": 1}}
    return tinyrun.config(base, **over)


def test_python_api_raises_config_error_before_writing(tiny_model_dir, tmp_path):
    d = tmp_path / "data"
    _jsonl(d / "train.jsonl", [_row(0), {"prompt": "no solution here", "answer": "1"}])
    out = tmp_path / "run"
    cfg = _cfg(tiny_model_dir, out, method="opsd", **{"data.tasks": [f"jsonl:{d}"]}, eval_before=False,
               eval_after=False)
    with pytest.raises(ConfigError, match=r"train.jsonl, row 2, field 'solution': missing; method opsd"):
        train(cfg, log=lambda s: None)
    assert not out.exists()
    # A ConfigError is a ValueError: callers catching ValueError keep working.
    with pytest.raises(ValueError, match="unknown method"):
        train(_cfg(tiny_model_dir, out, method="nope"), log=lambda s: None)
    assert not out.exists()


def test_existing_run_is_not_overwritten(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run_config.yaml").write_text("method: sft\n")
    rc = main(["train", "--model.path", tiny_model_dir, "--output_dir", str(out), "--data.train_size", "6"])
    assert rc == 2
    assert "already holds a run; pass --resume true to continue it, --overwrite true to replace it" in (
        capsys.readouterr().err)
    assert sorted(p.name for p in out.iterdir()) == ["run_config.yaml"]


@pytest.mark.parametrize("over", [
    {"micro_batch_size": 8},  # larger than batch_size: allowed, no accumulation
    {"method": "opsd", "teacher.kind": "initial"},  # no LoRA: the initial teacher is a frozen copy
    {"eval.greedy": False, "eval.samples": 1},
    {"spd.rank": 0, "spd.energy": 0.9},
    {"save_every": 0, "keep_checkpoints": 0},
])
def test_settings_that_look_odd_but_are_valid(tiny_model_dir, tmp_path, over):
    method_cls, tasks = prepare_run(_cfg(tiny_model_dir, tmp_path / "run", **over))
    assert tasks and method_cls.name == over.get("method", "sft")
    assert not (tmp_path / "run").exists()


def test_separate_teacher_with_the_same_vocabulary_trains(tiny_model_dir, tmp_path):
    """teacher.path: a different (frozen) model with the student's tokenizer scores the teacher view."""
    import torch
    from safetensors.torch import load_file

    teacher = _model_with(tmp_path, "teacher", hidden_size=24, intermediate_size=48, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=6)
    before = load_file(str(Path(teacher) / "model.safetensors"))
    out = tmp_path / "run"
    cfg = _cfg(tiny_model_dir, out, method="opsd", **{"teacher.path": teacher}, eval_before=False,
               eval_after=False, **{"data.tasks": ["toy-math"]})
    res = train(cfg, log=lambda s: None)
    assert res.steps == 1
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert row["loss"] == row["loss"] and row["loss"] != 0 and not row["skipped"]
    after = load_file(str(Path(teacher) / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)  # the teacher folder is only read


def test_eval_command_names_a_missing_split(tiny_model_dir, tmp_path, capsys):
    data = _jsonl(tmp_path / "d.jsonl", [_row(0)])
    rc = main(["eval", "--model.path", tiny_model_dir, "--data.tasks", f"jsonl:{data}"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert f"data.tasks 'jsonl:{data}': task 'd' has no split 'test_id' (splits: train)" in err


def test_fill_template_names_the_setting_of_an_unknown_placeholder():
    from selfdistill.sequences import fill_template

    assert fill_template("{problem} / {solution}", "opsd.template", problem="p", solution="s") == "p / s"
    with pytest.raises(ValueError, match=r"sgsd\.template has unknown placeholder 'skill'; known: problem, guidance"):
        fill_template("{skill}", "sgsd.template", problem="p", guidance="g")
