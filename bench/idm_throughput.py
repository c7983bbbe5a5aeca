"""IDM throughput: the annotation IDM's code path (`label`) against plain `model.generate`, tokens/s (issue 32).

    .venv/bin/python bench/idm_throughput.py [family=qwen2_vl hidden=256 layers=4 batch=16 new_tokens=24 ...]

`InverseDynamicsModel.label` is what each IDM actor runs on a batch of pairs: the frames arrive as PNG bytes (as
the pipeline stores them), the processor makes the prompt and pixel tensors, and `generate` returns every step's
logits, from which the label's log-likelihood is read (`compute_transition_scores`), so no second, teacher-forced
pass is needed. The baseline is plain greedy `model.generate(**inputs, max_new_tokens=...)` on the same inputs,
already processed (no logits kept): the least any caller of transformers can do for the same tokens. The ratio
is tokens/s of `label` ÷ tokens/s of plain generate, interleaved (ABBA), median of `repeats`; what it costs beyond
1 is the processor and the log-likelihoods. On a CPU the bench runs torch on one thread (`threads=1`) and times CPU
seconds, which other work on a shared machine barely moves; on a GPU, wall time. The IDM settings the actors read
are arguments: `dtype`, `attn` (`idm.attn_implementation`) and `cache` (`idm.cache_implementation`, `static` for
a GPU's compiled decoding).

The model is a random checkpoint of a real family (`cwm_ray.tiny.idm`: its config, processor, chat template and
model class) whose language model is resized to `hidden` x `layers`, sized for a CI machine's CPU; a random model
rarely emits EOS, so both sides generate `new_tokens` for every row. $BENCH_IDM replaces it (bench/real_size.py
passes a real-size checkpoint on a GPU, with BENCH_DEVICE=cuda).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from common import CACHE, DEVICE, emit, median, parse_args

DEFAULTS: dict[str, Any] = {"family": "qwen2_vl", "hidden": 256, "layers": 4, "batch": 16, "new_tokens": 24,
                            "image_size": 224, "repeats": 4, "dtype": "float32", "attn": "sdpa", "cache": "",
                            "threads": 1, "quick": False}
GOAL = 0.8


def checkpoint(args: dict[str, Any]) -> str:
    if os.environ.get("BENCH_IDM"):
        return os.environ["BENCH_IDM"]
    from cwm_ray.tiny.idm import build_tiny_idm

    path = CACHE / "models" / f"idm_{args['family']}_{args['hidden']}x{args['layers']}"
    if not (path / "config.json").exists():
        build_tiny_idm(args["family"], str(path), hidden_size=args["hidden"], num_layers=args["layers"])
    return str(path)


def frames(n: int, size: int, seed: int) -> list[bytes]:
    """PNG bytes of toy-world scenes at `size` px, as the pipeline hands the IDM its pairs."""
    import random

    from cwm_ray.config import ToyWorldConfig
    from cwm_ray.schema import encode_image
    from cwm_ray.toyworld.render import render
    from cwm_ray.toyworld.world import random_scene

    world = ToyWorldConfig(image_size=size)
    rng = random.Random(seed)
    return [encode_image(render(random_scene(rng, world), world)) for _ in range(n)]


def run(args: dict[str, Any]) -> dict[str, Any]:
    import torch

    from cwm_ray.config import IDMConfig
    from cwm_ray.idm import InverseDynamicsModel

    if args["quick"]:
        args |= {"repeats": 2, "batch": min(args["batch"], 8), "new_tokens": min(args["new_tokens"], 12)}
    if args["threads"]:
        torch.set_num_threads(args["threads"])
    # One CPU thread: CPU seconds (process_time), which other work on a shared machine barely moves; else wall time.
    clock = time.process_time if DEVICE == "cpu" and torch.get_num_threads() == 1 else time.perf_counter
    cfg = IDMConfig(model=checkpoint(args), max_new_tokens=args["new_tokens"], dtype=args["dtype"], device=DEVICE,
                    attn_implementation=args["attn"] or None, cache_implementation=args["cache"] or None)
    idm = InverseDynamicsModel.load(cfg)
    sources, targets = frames(args["batch"], args["image_size"], 0), frames(args["batch"], args["image_size"], 1)
    inputs = idm._to_device(idm._prompt_inputs(sources, targets))
    prompt = inputs["input_ids"].shape[1]
    tokens: dict[str, int] = {}
    sync = torch.cuda.synchronize if idm.device.type == "cuda" else (lambda: None)

    def plain() -> None:
        with torch.no_grad():
            out = idm.model.generate(**inputs, do_sample=False, max_new_tokens=cfg.max_new_tokens,
                                     eos_token_id=idm.eos_token_id, pad_token_id=idm.pad_token_id)
        sync()
        new = out[:, prompt:]
        is_eos = (new == idm.eos_token_id).long()
        tokens["plain"] = int(((is_eos.cumsum(dim=1) - is_eos) == 0).sum())

    def label() -> None:
        labels = idm.label(sources, targets)
        sync()
        tokens["label"] = sum(lab.num_tokens for lab in labels)

    plain(), label()  # warm-up
    base, cand = [], []
    for r in range(args["repeats"]):  # ABBA
        for fn, out in [(plain, base), (label, cand)][:: 1 if r % 2 == 0 else -1]:
            t0 = clock()
            fn()
            out.append(clock() - t0)
    t0 = clock()
    idm._prompt_inputs(sources, targets)
    processor_s = clock() - t0
    base_tps, cand_tps = tokens["plain"] / median(base), tokens["label"] / median(cand)
    ratio = cand_tps / base_tps
    inputs_line = {"idm": cfg.model, "family": args["family"], "batch": args["batch"], "prompt_tokens": prompt,
                   "new_tokens": cfg.max_new_tokens, "image_size": args["image_size"], "dtype": cfg.dtype,
                   "attn_implementation": cfg.attn_implementation, "cache_implementation": cfg.cache_implementation,
                   "device": str(idm.device), "repeats": args["repeats"], "torch_threads": torch.get_num_threads(),
                   "clock": clock.__name__,
                   "params_m": round(sum(p.numel() for p in idm.model.parameters()) / 1e6, 1)}
    return emit(
        "idm_throughput", inputs_line, median(base), median(cand), ratio,
        f"label tokens/s >= {GOAL}x plain generate's on the same inputs (processor and log-likelihoods included)",
        ratio >= GOAL, unit="seconds per batch; ratio = tokens/s(label) / tokens/s(plain generate)",
        tokens_per_s={"label": round(cand_tps, 1), "plain_generate": round(base_tps, 1)},
        pairs_per_s=round(args["batch"] / median(cand), 2), processor_s=round(processor_s, 4),
        tokens={"label": tokens["label"], "plain_generate": tokens["plain"]})


if __name__ == "__main__":
    run(parse_args(DEFAULTS))
    sys.exit(0)
