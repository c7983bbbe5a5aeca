"""The LLM judge: VIEScore-style two scores through any OpenAI-compatible chat-completions endpoint.

The judge sees the source frame, the predicted frame and the instruction and gives two 0–10 scores:
editing success (was the action carried out?) and minimal editing (is the rest of the scene intact?);
a sample's score is their minimum, as in the paper. Answers are cached on disk by a hash of (model,
prompt, images), the openai client retries with exponential backoff, a thread pool bounds
concurrency, and an answer that is not the asked-for JSON is recorded as malformed — never guessed
into a score.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cwm_ray.config import JudgeConfig

PROMPT = """You are grading a predicted next frame of a scene.
The first image is the scene before an action. The second image is a model's prediction of the scene
right after this action: "{instruction}".

Give two integer scores from 0 to 10.
- editing_success: how completely and correctly the prediction shows the action carried out
  (0 = the action did not happen at all, 10 = exactly what the action should produce).
- minimal_editing: how well everything the action should not touch is kept as it was
  (0 = a different scene, 10 = only the intended change, nothing else altered).

Reply with only a JSON object and nothing else, like:
{{"editing_success": 7, "minimal_editing": 9, "reasoning": "one short sentence"}}"""


@dataclass
class Judgement:
    status: str
    """`ok`, `malformed` (the answer was not the JSON asked for) or `error` (the request failed)."""
    editing_success: float | None = None
    minimal_editing: float | None = None
    score: float | None = None
    """min(editing_success, minimal_editing), the paper's per-sample score; None unless status is ok."""
    reasoning: str = ""
    raw: str = ""
    cached: bool = False


def parse_answer(text: str) -> Judgement:
    """The judge's reply → scores; anything but a JSON object with two numbers in [0, 10] is malformed."""
    match = re.search(r"\{.*\}", text or "", re.DOTALL)
    try:
        data = json.loads(match.group(0)) if match else None
        success, minimal = float(data["editing_success"]), float(data["minimal_editing"])
        if not (0 <= success <= 10 and 0 <= minimal <= 10):
            raise ValueError("score out of range")
    except (TypeError, KeyError, ValueError, json.JSONDecodeError):
        return Judgement("malformed", raw=text or "")
    return Judgement("ok", success, minimal, min(success, minimal), str(data.get("reasoning", "")), raw=text)


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


class LLMJudge:
    """Thread-safe: the openai client is shared; each cache entry is written atomically."""

    def __init__(self, cfg: JudgeConfig) -> None:
        from openai import OpenAI

        key = os.environ.get(cfg.api_key_env)
        if not key and cfg.base_url is None:
            raise ValueError(f"judge.enabled needs an API key in ${cfg.api_key_env} (or judge.base_url of a server "
                             "that takes none)")
        self.cfg = cfg
        self.client = OpenAI(base_url=cfg.base_url, api_key=key or "unused", max_retries=cfg.max_retries,
                             timeout=cfg.timeout_s)
        self.cache = Path(cfg.cache_dir)
        self.calls = 0

    def _key(self, prompt: str, source: bytes, prediction: bytes) -> str:
        h = hashlib.sha256()
        for part in (self.cfg.model.encode(), prompt.encode(), source, prediction):
            h.update(hashlib.sha256(part).digest())
        return h.hexdigest()

    def judge(self, source: bytes, prediction: bytes, instruction: str) -> Judgement:
        prompt = PROMPT.format(instruction=instruction)
        key = self._key(prompt, source, prediction)
        path = self.cache / key[:2] / f"{key}.json"
        if path.exists():
            return Judgement(**(json.loads(path.read_text()) | {"cached": True}))
        messages: Any = [{"role": "user", "content": [
            {"type": "text", "text": prompt},
            {"type": "image_url", "image_url": {"url": _data_url(source)}},
            {"type": "image_url", "image_url": {"url": _data_url(prediction)}},
        ]}]
        try:
            self.calls += 1
            reply = self.client.chat.completions.create(model=self.cfg.model, messages=messages,
                                                        temperature=self.cfg.temperature)
            text = reply.choices[0].message.content or ""
        except Exception as exc:  # noqa: BLE001 - after the client's retries: record, do not score
            return Judgement("error", raw=f"{type(exc).__name__}: {exc}")
        result = parse_answer(text)
        if result.status == "ok":  # only well-formed answers are cached: a re-run asks again for the rest
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(asdict(result)))
            os.replace(tmp, path)
        return result

    def judge_many(self, rows: Sequence[tuple[bytes, bytes, str]]) -> list[Judgement]:
        """(source, prediction, instruction) rows, at most `max_concurrency` requests in flight."""
        with ThreadPoolExecutor(max(1, self.cfg.max_concurrency)) as pool:
            return list(pool.map(lambda r: self.judge(*r), rows))
