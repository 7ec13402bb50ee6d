"""``selfdistill ccopd eval | table | shard | show``: the CCOPD tools on the command line."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from selfdistill.methods.ccopd.table import CCOPDTableConfig
from selfdistill.config import DataConfig, ModelConfig
from selfdistill.config_io import add_flags, from_args
from selfdistill.evaluate import EvalConfig
from selfdistill.method_configs import CCOPDConfig


@dataclass
class CCOPDEvalConfig:
    """``selfdistill ccopd eval``: a model on tasks in the FULL / SHARDED / CONCAT settings."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ccopd: CCOPDConfig = field(default_factory=CCOPDConfig)
    settings: list[str] = field(default_factory=lambda: ["full", "sharded", "concat"], metadata={
        "help": "Settings to evaluate: full, sharded, concat."})
    json_out: str = field(default="", metadata={"help": "Also write the results as JSON here."})


@dataclass
class CCOPDShardConfig:
    """``selfdistill ccopd shard``: shard a task's prompts with a local model into a shards JSONL."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    split: str = field(default="train", metadata={"help": "Split whose items are sharded."})
    out: str = field(default="shards.jsonl", metadata={"help": "Output JSONL (use with --ccopd.shards_file)."})
    max_shards: int = field(default=4, metadata={"help": "Shards asked for per problem."})
    max_new_tokens: int = field(default=256, metadata={"help": "Longest sharding reply."})
    max_items: int = field(default=0, metadata={"help": "Shard at most this many items per task (0 = all)."})


def add_commands(sub) -> None:
    """The ``ccopd`` subcommand and its own subcommands."""
    p = sub.add_parser("ccopd", help="CCOPD tools: evaluation in FULL/SHARDED/CONCAT, the table, sharding.")
    csub = p.add_subparsers(dest="ccopd_command", required=True)
    ev = csub.add_parser("eval", help="Accuracy in the FULL, SHARDED and CONCAT settings.")
    ev.add_argument("--config", help="YAML file with settings (flags override it).")
    add_flags(ev, CCOPDEvalConfig)
    tab = csub.add_parser("table", help="Train on toy math, evaluate FULL/SHARDED/CONCAT on every domain.")
    add_flags(tab, CCOPDTableConfig)
    sh = csub.add_parser("shard", help="Shard prompts by prompting a local model; writes a shards JSONL.")
    sh.add_argument("--config", help="YAML file with settings (flags override it).")
    add_flags(sh, CCOPDShardConfig)
    show = csub.add_parser("show", help="Print a toy item's shards and its three conversation settings.")
    show.add_argument("--domain", default="math", choices=["math", "code", "mcqa"])
    show.add_argument("--split", default="train", choices=["train", "valid", "test_id", "test_ood"])
    show.add_argument("--n", type=int, default=1)




def run(ns) -> int:
    if ns.ccopd_command == "eval":
        from selfdistill.methods.ccopd.evaluate import evaluate_settings
        from selfdistill.evaluate import format_table, results_to_json
        from selfdistill.models import load_model
        from selfdistill.tasks.registry import build_tasks

        cfg = from_args(CCOPDEvalConfig, ns)
        model, tok = load_model(cfg.model)
        res = evaluate_settings(model, tok, build_tasks(cfg.data), cfg.eval, cfg.ccopd, cfg.settings,
                                cfg.model.system_prompt or None)
        print(format_table(res))
        if cfg.json_out:
            with open(cfg.json_out, "w") as f:
                json.dump(results_to_json(res), f, indent=2)
        return 0
    if ns.ccopd_command == "table":
        from selfdistill.methods.ccopd.table import run_ccopd_table

        run_ccopd_table(from_args(CCOPDTableConfig, ns))
        return 0
    if ns.ccopd_command == "shard":
        from selfdistill.methods.ccopd.shard import shard_with_model
        from selfdistill.models import load_model
        from selfdistill.rollout import SamplingConfig
        from selfdistill.tasks.registry import build_tasks

        cfg = from_args(CCOPDShardConfig, ns)
        model, tok = load_model(cfg.model)
        rows = []
        for task in build_tasks(cfg.data):
            items = task.items(cfg.split)
            items = items[: cfg.max_items] if cfg.max_items else items
            rows += shard_with_model(model, tok, items, SamplingConfig(max_new_tokens=cfg.max_new_tokens,
                                                                       temperature=0.0), cfg.max_shards,
                                     system=cfg.model.system_prompt or None)
        with open(cfg.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        fallback = sum(r["source"] == "fallback" for r in rows)
        print(f"wrote {len(rows)} rows to {cfg.out} ({fallback} fell back to sentence sharding)")
        return 0
    from selfdistill.methods.ccopd.conversation import SETTINGS, messages_for
    from selfdistill.methods.ccopd.shard import toy_shards
    from selfdistill.toy.tasks import make_item

    for i in range(ns.n):
        it = make_item(ns.domain, ns.split, i)
        shards = toy_shards(it)
        print(f"--- {it.id} (answer {it.answer})")
        for s in SETTINGS:
            replies = ["<reply>"] * (len(shards) - 1) if s == "sharded" else []
            print(f"[{s}]")
            for m in messages_for(s, it, shards, replies):
                print(f"  {m['role']}: {m['content']!r}")
    return 0
