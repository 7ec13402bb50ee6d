"""A researcher's own data (#15 item 3): rows without answers for label-free runs, columns mapped from
the command line, clear one-line errors where an answer is needed, and an offline Hub dataset."""

from __future__ import annotations

import json

import pytest

from selfdistill.config_io import ConfigError
from test_grpo import tiny


def _rows(path, n=6, answers=False):
    rows = [{"question": f"Compute {10 + i}+{i}", **({"label": str(10 + 2 * i)} if answers else {})} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_label_free_method_trains_on_rows_without_answers(tiny_model_dir, tmp_path):
    from selfdistill.trainer import train

    data = _rows(tmp_path / "q.jsonl")
    cfg = tiny(tiny_model_dir, tmp_path / "ssd", method="ssd", **{"data.tasks": [f"jsonl:{data}"],
                                                                 "data.columns": ["prompt=question"]})
    assert train(cfg, log=lambda s: None).steps == 2


def test_answers_are_required_where_they_are_read(tiny_model_dir, tmp_path):
    from selfdistill.trainer import train

    data = _rows(tmp_path / "q.jsonl")
    over = {"data.tasks": [f"jsonl:{data}"], "data.columns": ["prompt=question"]}
    with pytest.raises(ConfigError, match=r"q.jsonl, row 1.*answer.*rewards its rollouts"):
        train(tiny(tiny_model_dir, tmp_path / "g", method="grpo", **over, **{"onpolicy.samples_per_prompt": 2}),
              log=lambda s: None)
    with pytest.raises(ConfigError, match="evaluation checks completions against the answer"):
        train(tiny(tiny_model_dir, tmp_path / "e", method="ssd", **over, eval_before=True, **{"eval.splits": ["train"]}),
              log=lambda s: None)
    assert not (tmp_path / "g").exists() and not (tmp_path / "e").exists()


def test_columns_map_fields_and_bad_names_are_one_line(tmp_path):
    from selfdistill.config import DataConfig
    from selfdistill.tasks.registry import build_task

    data = _rows(tmp_path / "q.jsonl", answers=True)
    t = build_task(f"jsonl:{data}", DataConfig(columns=["prompt=question", "answer=label"]))
    it = t.items("train")[1]
    assert (it.prompt, it.answer) == ("Compute 11+1", "12")
    with pytest.raises(ConfigError, match="unknown field"):
        build_task(f"jsonl:{data}", DataConfig(columns=["question=prompt"]))
    with pytest.raises(ValueError, match="not field=column"):
        DataConfig(columns=["prompt"])


def test_offline_hub_dataset_is_one_line(monkeypatch):
    import datasets

    from selfdistill.tasks.loaders import HFTask, TaskDataError

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(TaskDataError, match=r"cannot load it from the Hugging Face Hub.*hf:gsm8k@FILE"):
        HFTask("selfdistill-no-such-org/gsm8k", splits={"train": "train"}, format="gsm8k").items("train")
