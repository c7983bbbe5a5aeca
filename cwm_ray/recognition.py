"""Recognition weights: how much each latent / token position of a triplet matters to the loss.

The paper (§Strategy 1, recognition-weighted loss) weights each target token by the squared L2 distance
between the pre-quantization encoder features of o_s and o_t at that position, so the region the action
changes dominates the loss instead of the static background. The paper states no normalisation; ours
makes every image's map average exactly 1 (so the loss scale does not depend on how much changed) with a
floor, so unchanged positions still count and the model keeps learning to copy them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from cwm_ray.config import RecognitionConfig
from cwm_ray.schema import decode_image, weights_from_bytes, weights_to_bytes


class FeatureEncoder(Protocol):
    """What `RecognitionWeights` needs of a world model: its encoder (`WorldModel.encode_features`).

    Why a protocol here rather than `cwm_ray.world_model.WorldModel`: both backends import this module's weighting
    functions, so this module must not import the world model package back (that was an import circle); the
    caller loads the model and hands it in.
    """

    def encode_features(self, images: Sequence[Any]) -> torch.Tensor: ...


def recognition_weights(source_features: torch.Tensor, target_features: torch.Tensor, floor: float) -> torch.Tensor:
    """(B, C, h, w) encoder features of o_s and o_t → (B, h, w) weights, mean exactly 1, min ≥ `floor`.

    With d the squared L2 distance over channels at each position, w = floor + (1 − floor) · d / mean(d):
    a mix of the uniform map and the mean-1 distance map. Why the mix rather than clamp-then-renormalise:
    it keeps both promises at once (the mean is 1 and no weight falls below the floor), positions that did
    not change get exactly `floor`, and floor = 1 is the unweighted loss. Identical images (d = 0
    everywhere) carry no signal of what matters, so they get all ones.
    """
    if source_features.shape != target_features.shape or source_features.ndim != 4:
        raise ValueError(f"features must both be (B, C, h, w); got {tuple(source_features.shape)} "
                         f"and {tuple(target_features.shape)}")
    floor = float(min(max(floor, 0.0), 1.0))
    d = (target_features.float() - source_features.float()).pow(2).sum(dim=1)  # (B, h, w)
    mean = d.mean(dim=(1, 2), keepdim=True)
    changed = mean > 1e-12
    w = floor + (1.0 - floor) * d / torch.where(changed, mean, torch.ones_like(mean))
    return torch.where(changed, w, torch.ones_like(w))


def stored_weights(batch: dict[str, Any]) -> list[np.ndarray | None]:
    """Each row's map as the annotation job stored it (`weights`, `weights_shape`), None where a row has none: gold
    rows, and every row of a batch without the columns."""
    n = len(batch["source"])
    if batch.get("weights") is None:
        return [None] * n
    return [None if b is None or s is None else weights_from_bytes(b, s)
            for b, s in zip(batch["weights"], batch["weights_shape"], strict=True)]


def batch_weights(stored: Sequence[np.ndarray | None], grid: Sequence[int],
                  compute: Callable[[list[int]], torch.Tensor]) -> torch.Tensor:
    """(B, *grid) weights: the stored maps (area-averaged onto `grid` when annotation's grid differs, which keeps
    the mean), and `compute(rows)` for the rows without one (the world model's own encoder, as annotation did).

    Why: a map is computed once, when annotation has the encoder loaded anyway, and used as stored; only gold rows
    cost an encoder pass at training time.
    """
    missing = [i for i, m in enumerate(stored) if m is None]
    computed = dict(zip(missing, compute(missing), strict=True)) if missing else {}
    out = []
    for i, m in enumerate(stored):
        if m is None:
            out.append(computed[i].float().cpu())
            continue
        w = torch.from_numpy(m).float()[None, None]
        if tuple(w.shape[-2:]) != tuple(grid):
            w = torch.nn.functional.interpolate(w, size=tuple(grid), mode="area")
        out.append(w[0, 0])
    return torch.stack(out)


def fade_to_uniform(weights: torch.Tensor, cfg: RecognitionConfig, step: int, max_steps: int) -> torch.Tensor:
    """`weights` at training step `step` under `cfg.uniform_by`: 1 + s·(w − 1), s falling linearly from 1 at step 0
    to 0 at uniform_by · max_steps. The mix keeps each map's mean at 1, as `recognition_weights` makes it."""
    if cfg.uniform_by is None or not cfg.enabled:
        return weights
    s = max(0.0, 1.0 - step / max(1.0, cfg.uniform_by * max_steps))
    return 1.0 + s * (weights - 1.0)


class RecognitionWeights:
    """A batch callable (annotation's `RecognitionStage` runs it): adds `weights` (float16 bytes) and
    `weights_shape` ([h, w]) columns.

    The encoder is the world model's own (`encode_features`: the VAE encoder's latent mean, or pixels for
    the pixel-space toy; for the `token` backend the VQ encoder's features before quantization,
    `quant_conv(encoder(x))`, one per image token, as in the paper), so the map lives on exactly the grid
    the loss is computed on. With recognition disabled it writes all-ones maps, so the unweighted ablation
    runs through the same pipeline. The caller loads the world model (`load_world_model(cfg.world_model,
    cfg.recognition)`, as annotation's `RecognitionStage` does) and hands it in.
    """

    def __init__(self, world_model: FeatureEncoder, recognition_cfg: RecognitionConfig | None = None) -> None:
        self.cfg = recognition_cfg or RecognitionConfig()
        self.world_model = world_model

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        sources = [decode_image(b) for b in batch["source"]]
        targets = [decode_image(b) for b in batch["target"]]
        with torch.no_grad():
            src = self.world_model.encode_features(sources)
            tgt = self.world_model.encode_features(targets)
        if self.cfg.enabled:
            weights = recognition_weights(src, tgt, self.cfg.floor)
        else:
            weights = torch.ones(src.shape[0], *src.shape[2:])
        encoded = [weights_to_bytes(w) for w in weights.cpu().numpy()]
        out = dict(batch)
        out["weights"] = _object_array([b for b, _ in encoded])
        out["weights_shape"] = _object_array([s for _, s in encoded])  # list<int64> in Arrow, as schema.py says
        return out


def _object_array(items: list[object]) -> np.ndarray:
    """A 1-D object array (np.array would turn a list of equal-length lists into a 2-D array)."""
    arr = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        arr[i] = item
    return arr
