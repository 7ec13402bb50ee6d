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
        train(tiny(tiny_model_dir, tmp_path / "e", method="ssd", **over, eval_before=True,
                   **{"eval.splits": ["train"]}),
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


def test_lora_run_outputs_load_everywhere(tiny_model_dir, tmp_path):
    """#15 item 5: a LoRA run's model/ (the adapter, naming its base portably) and merged/ load through every
    --model.path, and give the same greedy completions."""
    import torch

    from selfdistill.config import ModelConfig
    from selfdistill.models import load_model
    from selfdistill.trainer import train
    from test_trainer import tiny_cfg

    out = tmp_path / "lora"
    cfg = tiny_cfg(tiny_model_dir, out, eval_before=False, eval_after=False, **{
        "model.lora.enabled": True, "model.lora.r": 4, "model.lora.save_merged": True, "optim.lr": 5e-2})
    train(cfg, log=lambda s: None)
    conf = json.loads((out / "model" / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == str(__import__("pathlib").Path(tiny_model_dir).resolve())
    assert not (out / "model" / "config.json").exists() and (out / "merged" / "config.json").exists()
    a, tok = load_model(ModelConfig(path=str(out / "model")))
    b, _ = load_model(ModelConfig(path=str(out / "merged")))
    base, _ = load_model(ModelConfig(path=tiny_model_dir))
    ids = torch.tensor([tok("Compute 12+3").input_ids])
    with torch.no_grad():
        la, lb, l0 = (m(input_ids=ids).logits for m in (a, b, base))
    torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(la, l0, atol=1e-4)  # the adapter did change the model
    # The adapter folder trains on (LoRA kept) and evaluates (merged) like a plain model folder.
    again = tiny_cfg(tiny_model_dir, tmp_path / "again", eval_before=True, eval_after=False,
                     **{"model.path": str(out / "model")})
    assert train(again, log=lambda s: None).steps == 2
