"""Automatic metrics: L1, CLIP-I and DINO against the reference; the toy judge; the IDM's agreement.

CLIP-I and DINO load real transformers models by id or path (CLIP's projected image embedding; DINO's
pooled [CLS] feature) and compare by cosine. The paper's caveat holds: copying the source does well on
all three, which is why the report always shows the copy baseline beside them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from cwm_ray import storage
from cwm_ray.config import MetricsConfig, ToyWorldConfig
from cwm_ray.schema import decode_image


def l1(prediction: Image.Image, reference: Image.Image) -> float:
    """Mean absolute difference in [0, 1] per channel, at the reference's size (0 = identical)."""
    if prediction.size != reference.size:
        prediction = prediction.resize(reference.size, Image.Resampling.BICUBIC)
    a = np.asarray(prediction.convert("RGB"), np.float32) / 255
    b = np.asarray(reference.convert("RGB"), np.float32) / 255
    return float(np.abs(a - b).mean())


class Embedder:
    """Image → unit feature vector with a transformers model: `clip` (projected image embeds) or `dino` ([CLS])."""

    def __init__(self, model: str, kind: str, device: str = "auto") -> None:
        from transformers import AutoImageProcessor, AutoModel, CLIPVisionModelWithProjection

        path = storage.local_dir(model)
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available()
                                   else "cpu" if device == "auto" else device)
        self.kind = kind
        self.processor = AutoImageProcessor.from_pretrained(path)
        cls = CLIPVisionModelWithProjection if kind == "clip" else AutoModel
        self.model = cls.from_pretrained(path, use_safetensors=True).to(self.device).eval()

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
        out = []
        for i in range(0, len(images), batch_size):
            inputs = self.processor(images=list(images[i:i + batch_size]), return_tensors="pt").to(self.device)
            res = self.model(**inputs)
            if self.kind == "clip":
                feats = res.image_embeds
            else:
                pooled = getattr(res, "pooler_output", None)
                feats = pooled if pooled is not None else res.last_hidden_state[:, 0]
            out.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def cosine_pairs(embedder: Embedder, predictions: Sequence[Image.Image],
                 references: Sequence[Image.Image]) -> list[float]:
    """cos(embed(prediction_i), embed(reference_i)) for each i (1 = same features)."""
    if not predictions:
        return []
    feats = embedder([*predictions, *references])
    a, b = feats[: len(predictions)], feats[len(predictions):]
    return [float(x) for x in (a * b).sum(axis=1)]


def normalise_action(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".").split())


class Metrics:
    """Every configured metric over (source, action, prediction, reference) rows, batched where models run."""

    def __init__(self, cfg: MetricsConfig, toy: ToyWorldConfig | None = None, idm: Any = None) -> None:
        self.cfg, self.toy, self.idm = cfg, toy or ToyWorldConfig(), idm
        self.clip = Embedder(cfg.clip_model, "clip", cfg.device) if cfg.clip_model else None
        self.dino = Embedder(cfg.dino_model, "dino", cfg.device) if cfg.dino_model else None

    def __call__(self, sources: Sequence[bytes], actions: Sequence[str], predictions: Sequence[bytes],
                 references: Sequence[bytes | None]) -> list[dict[str, float | None]]:
        preds = [decode_image(p) for p in predictions]
        refs = [decode_image(r) if r is not None else None for r in references]
        rows: list[dict[str, float | None]] = [{} for _ in preds]
        have = [i for i, r in enumerate(refs) if r is not None]
        if self.cfg.l1:
            for i, row in enumerate(rows):
                row["l1"] = l1(preds[i], refs[i]) if refs[i] is not None else None
        for name, embedder in (("clip_i", self.clip), ("dino", self.dino)):
            if embedder is None:
                continue
            values = cosine_pairs(embedder, [preds[i] for i in have], [refs[i] for i in have])
            for row in rows:
                row[name] = None
            for i, v in zip(have, values, strict=True):
                rows[i][name] = v
        if self.cfg.toy_judge:
            from cwm_ray.toyworld.parser import judge

            for i, row in enumerate(rows):
                try:
                    v = judge(decode_image(sources[i]), actions[i], preds[i], self.toy)
                    row |= {"toy_edit_success": v.edit_success, "toy_minimal_edit": v.minimal_edit,
                            "toy_score": v.score}
                except ValueError:  # not a toy-world action on this source: the judge has no verdict
                    row |= {"toy_edit_success": None, "toy_minimal_edit": None, "toy_score": None}
        if self.cfg.idm_agreement and self.idm is not None:
            labels = self.idm.label(list(sources), list(predictions))
            for row, label, action in zip(rows, labels, actions, strict=True):
                row["idm_agreement"] = float(normalise_action(label.action) == normalise_action(action))
        return rows
