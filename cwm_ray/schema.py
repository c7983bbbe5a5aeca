"""Arrow schemas of pairs, triplets and errors, and the image / weight-map <-> bytes helpers.

Every stage passes images as encoded bytes (PNG by default) so rows stay small and Parquet-friendly;
weight maps travel as float16 bytes plus their (h, w) shape.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pyarrow as pa
from PIL import Image

PAIR_FIELDS = [
    pa.field("id", pa.string()),
    pa.field("dataset", pa.string()),
    pa.field("video_uri", pa.string()),
    pa.field("src_index", pa.int64()),
    pa.field("tgt_index", pa.int64()),
    pa.field("src_time", pa.float64()),
    pa.field("tgt_time", pa.float64()),
    pa.field("motion", pa.float64()),
    pa.field("source", pa.binary()),
    pa.field("target", pa.binary()),
    pa.field("width", pa.int64()),
    pa.field("height", pa.int64()),
]
LABEL_FIELDS = [
    pa.field("action", pa.string()),
    pa.field("logprob", pa.float64()),
    pa.field("num_tokens", pa.int64()),
    pa.field("action_class", pa.string()),
]
WEIGHT_FIELDS = [pa.field("weights", pa.binary()), pa.field("weights_shape", pa.list_(pa.int64()))]
PAIR_SCHEMA = pa.schema(PAIR_FIELDS)
TRIPLET_SCHEMA = pa.schema(PAIR_FIELDS + LABEL_FIELDS + WEIGHT_FIELDS)
ERROR_SCHEMA = pa.schema([
    pa.field("video_uri", pa.string()),
    pa.field("stage", pa.string()),
    pa.field("error_type", pa.string()),
    pa.field("message", pa.string()),
])


def pair_id(video_uri: str, src_index: int, tgt_index: int) -> str:
    """Deterministic id: the same pair from the same video always gets the same id (exactly-once output)."""
    return hashlib.sha1(f"{video_uri}#{src_index}-{tgt_index}".encode()).hexdigest()[:20]


def encode_image(image: np.ndarray | Image.Image, fmt: str = "PNG", quality: int = 95) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format=fmt, **({"quality": quality} if fmt.upper() == "JPEG" else {}))
    return buf.getvalue()


def decode_image(data: bytes | Image.Image | np.ndarray) -> Image.Image:
    """Bytes (PNG/JPEG/...) or an array → an RGB PIL image; a bad payload raises ValueError."""
    if isinstance(data, Image.Image):
        return data.convert("RGB")
    if isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 3:
        return Image.fromarray(data).convert("RGB")
    try:
        img = Image.open(io.BytesIO(bytes(data)))
        img.load()
    except Exception as exc:  # PIL raises several types for bad data
        raise ValueError(f"not a decodable image: {exc}") from None
    return img.convert("RGB")


def weights_to_bytes(weights: np.ndarray) -> tuple[bytes, list[int]]:
    w = np.asarray(weights, dtype=np.float16)
    return w.tobytes(), list(w.shape)


def weights_from_bytes(data: bytes, shape: list[int] | np.ndarray) -> np.ndarray:
    return np.frombuffer(bytes(data), dtype=np.float16).reshape([int(s) for s in shape]).astype(np.float32)
