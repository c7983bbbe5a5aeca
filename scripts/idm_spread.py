"""How much the toy IDM's accuracy depends on the order of its data: one plain training loop per order.

The job (`jobs/train_idm.py`) gives a different model each run, because Ray Data's streaming split does not
fix the order in which the workers see the data, so one run of it says little about a setting. This trains
the job's model (`configs/train_idm.yaml` and any `key=value` overrides of it) in a plain loop, no Ray,
once per data order, with the job's optimizer, schedule, batch, CPU autocast and initialisation, and prints
one JSON line per order: the share of the bench's pairs whose generated action explains them
(`jobs/evaluate_idm.py`'s figure). The warm-up table in docs/experiments.md was made with this loop (six orders per
setting, on a lent GPU):

    python scripts/idm_spread.py orders=3 parallel=2 optim.warmup_steps=300     # 2 CPU cores: ~15 min
    python scripts/idm_spread.py orders=6 parallel=12 device=cuda optim.warmup_steps=20

Own keys: `orders` (how many, from 0), `parallel` (processes), `device`, `bench` (AURORA test JSON),
`out` (a JSONL file the lines are also appended to). The training set is the first of `data.sources`,
all of it (the job holds `data.val_fraction` out); the global batch is `optim.batch_size × num_workers`.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

OWN = {"orders": "3", "parallel": "1", "device": "cpu", "bench": "outputs/toy_corpus/gold/test.json", "out": ""}


def run_order(order: int, overrides: list[str], own: dict[str, str]) -> dict[str, Any]:
    """Train one IDM on data order `order` and score it on the bench."""
    import torch

    from cwm_ray import config
    from cwm_ray.data import read_aurora
    from cwm_ray.evaluate.idm import evaluate_idm
    from cwm_ray.idm import InverseDynamicsModel
    from cwm_ray.storage import read_bytes
    from cwm_ray.train import build_model, build_optimizer, build_scheduler

    torch.set_num_threads(1)
    cfg = config.load(config.TrainIDMConfig, "configs/train_idm.yaml", overrides)
    cfg.idm.device = own["device"]
    torch.manual_seed(cfg.optim.seed)  # as the job's rank 0; the toy's weights come from its own fixed seed
    idm: InverseDynamicsModel = build_model(cfg)
    rows = read_aurora(cfg.data.sources[0].uri)
    enc = idm.collate({"source": [read_bytes(r["input"]) for r in rows],
                       "target": [read_bytes(r["output"]) for r in rows], "action": [r["action"] for r in rows]})
    enc = {k: v.to(idm.device) for k, v in enc.items()}
    module = idm.training_module()
    params = [p for p in module.parameters() if p.requires_grad]
    opt = build_optimizer(cfg, params)
    o = cfg.optim
    sched = build_scheduler(cfg, opt)
    batch, n = o.batch_size * cfg.scaling.num_workers, len(rows)
    autocast = cfg.deepspeed.bf16_cpu and idm.device.type == "cpu"
    gen = torch.Generator().manual_seed(order)
    perm, pos, t0 = torch.randperm(n, generator=gen), 0, time.perf_counter()
    for _ in range(o.max_steps):
        if pos + batch > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos:pos + batch].to(idm.device)
        pos += batch
        rows_in = {k: v[idx] for k, v in enc.items()}
        width = int(rows_in["attention_mask"].sum(1).max())  # right padding beyond the batch's longest row
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):  # as the job's engine
            loss = module(**{k: v[:, :width] if v.dim() == 2 else v for k, v in rows_in.items()})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.deepspeed.gradient_clipping)
        opt.step()
        sched.step()
    seconds = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        idm.save(f"{tmp}/idm")
        summary = evaluate_idm(config.EvaluateIDMConfig(
            bench=own["bench"], idm=config.IDMConfig(model=f"{tmp}/idm", device=own["device"]), output=f"{tmp}/eval"))
    return {"order": order, "overrides": overrides, "explains": summary["explains"], "final_loss": loss.item(),
            "per_task": {t: v["explains"] for t, v in summary["per_task"].items()}, "train_s": round(seconds)}


def main(argv: list[str]) -> None:
    own = dict(OWN)
    overrides = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise SystemExit(f"expected key=value, got {arg!r}")
        if key in own:
            own[key] = value
        else:
            overrides.append(arg)
    orders = range(int(own["orders"]))
    with ProcessPoolExecutor(int(own["parallel"])) as pool:  # one process per run: each owns its threads
        for result in pool.map(run_order, orders, [overrides] * len(orders), [own] * len(orders)):
            line = json.dumps(result)
            print(line, flush=True)
            if own["out"]:
                with open(own["out"], "a") as f:
                    f.write(line + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
