"""The HTTP API: a FastAPI ingress that fans a request out to the world model and the verifier.

Endpoints (DESIGN.md §HTTP API): OpenAI's `POST /v1/images/edits` (multipart; `best_of` and `seed` are
extensions a client passes as extra fields), `POST /v1/predict`, `POST /v1/rollout`, `GET /v1/models`,
`GET /healthz`, and the playground at `GET /`. Every error has OpenAI's shape
`{"error": {"message", "type", "param", "code"}}` and a 4xx code when the request is at fault; input
is checked against `ServeLimits` here, before any replica does work, so a bad request costs nothing.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import io
import logging
import os
import secrets
import time
import uuid
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from cwm_ray.config import ServeConfig, ServeLimits
from cwm_ray.schema import encode_image
from cwm_ray.serve.deployments import SampleRequest, ScoreRequest
from cwm_ray.verify import rank

logger = logging.getLogger("ray.serve")
MAX_SEED = 2**63 - 1


class APIError(Exception):
    """An error the client caused (or may retry): rendered in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(body, status_code=self.status, headers=headers)


# -- request bodies ---------------------------------------------------------------------------------------
class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: str = Field(description="The source frame: base64 PNG/JPEG, or a data: URL.")
    action: str = Field(description="What happens next, in words.")
    best_of: int | None = Field(None, description="Candidates to sample and verify (default: the server's).")
    seed: int | None = Field(None, description="Seeds the candidates' noise; random when absent.")
    return_candidates: bool = False


class RolloutRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: str
    actions: list[str]
    best_of: int | None = None
    seed: int | None = Field(None, description="Step k uses seed + k.")
    return_candidates: bool = False


# -- input checks -----------------------------------------------------------------------------------------
def check_image(data: bytes, limits: ServeLimits, param: str) -> Image.Image:
    """Bytes → RGB image, refusing oversize uploads and decompression bombs before decoding pixels."""
    if not data:
        raise APIError(400, f"'{param}' is empty", param, "invalid_image")
    if len(data) > limits.max_image_bytes:
        raise APIError(413, f"'{param}' is {len(data)} bytes; the limit is {limits.max_image_bytes}", param,
                       "image_too_large")
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
    except (UnidentifiedImageError, OSError, ValueError):
        raise APIError(400, f"'{param}' is not an image PIL can read (PNG, JPEG, WebP, ...)", param,
                       "invalid_image") from None
    w, h = img.size
    if w < 1 or h < 1 or w * h > limits.max_pixels:
        raise APIError(400, f"'{param}' is {w}x{h}; the limit is {limits.max_pixels} pixels", param,
                       "image_too_large")
    try:
        return img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        raise APIError(400, f"'{param}' is truncated or corrupt", param, "invalid_image") from None


def b64_image(value: str, limits: ServeLimits, param: str) -> Image.Image:
    if value.startswith("data:"):
        value = value.partition(",")[2]
    if len(value) > 4 * (limits.max_image_bytes // 3 + 1):  # refuse before decoding a huge string
        raise APIError(413, f"'{param}' is over {limits.max_image_bytes} bytes", param, "image_too_large")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"'{param}' is not valid base64", param, "invalid_base64") from None
    return check_image(data, limits, param)


def check_text(value: Any, limits: ServeLimits, param: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise APIError(400, f"'{param}' must be a non-empty string", param, "invalid_value")
    if len(value) > limits.max_prompt_chars:
        raise APIError(400, f"'{param}' is {len(value)} characters; the limit is {limits.max_prompt_chars}",
                       param, "prompt_too_long")
    return value.strip()


def check_int(value: Any, param: str, low: int, high: int) -> int:
    try:
        number = int(value)
        if isinstance(value, float | bool) or (isinstance(value, str) and str(number) != value.strip()):
            raise ValueError
    except (TypeError, ValueError):
        raise APIError(400, f"'{param}' must be an integer, got {value!r}", param, "invalid_value") from None
    if not low <= number <= high:
        raise APIError(400, f"'{param}' must be between {low} and {high}, got {number}", param, "invalid_value")
    return number


def parse_size(value: str | None, source: Image.Image, limits: ServeLimits) -> tuple[int, int]:
    """OpenAI's `size` ("256x256"; "auto" or absent = the source's size)."""
    if value in (None, "", "auto"):
        return source.size
    try:
        w, h = (int(x) for x in str(value).lower().split("x"))
    except ValueError:
        raise APIError(400, f"'size' must look like 256x256 or be 'auto', got {value!r}", "size",
                       "invalid_value") from None
    if w < 1 or h < 1 or w * h > limits.max_pixels:
        raise APIError(400, f"'size' {w}x{h} is outside 1..{limits.max_pixels} pixels", "size", "invalid_value")
    return w, h


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _resized(png: bytes, size: tuple[int, int]) -> bytes:
    img = Image.open(io.BytesIO(png))
    return png if img.size == size else encode_image(img.resize(size, Image.Resampling.BICUBIC))


# -- the app ----------------------------------------------------------------------------------------------
def load_api_keys(env: str) -> frozenset[str]:
    keys = frozenset(k.strip() for k in os.environ.get(env, "").split(",") if k.strip())
    if not keys:
        logger.warning("no API keys in $%s: the endpoint is OPEN to anyone who can reach it", env)
    return keys


class Service:
    """The ingress's logic, with the two deployment handles: best-of-N search and the endpoints."""

    def __init__(self, world_model: Any, verifier: Any, cfg: ServeConfig) -> None:
        self.world_model, self.verifier, self.cfg = world_model, verifier, cfg
        self.limits = cfg.limits
        self.api_keys = load_api_keys(cfg.api_keys_env)
        self.model_name = cfg.served_model_name
        self.created = int(time.time())

    # -- auth -----------------------------------------------------------------------------------------------
    def authorize(self, request: Request) -> None:
        if not self.api_keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", None, "invalid_api_key")
        if not any(hmac.compare_digest(token.strip(), k) for k in self.api_keys):
            raise APIError(401, "incorrect API key", None, "invalid_api_key")

    # -- the search -----------------------------------------------------------------------------------------
    async def _call(self, method: Any, request: Any) -> Any:
        """A replica call, re-sent when its replica died under it (sampling is seeded: same answer)."""
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        for attempt in range(self.cfg.retries + 1):
            try:
                return await method.remote(request)
            except (ActorDiedError, ActorUnavailableError, RayActorError) as exc:
                logger.warning("replica lost (%s); attempt %d of %d", type(exc).__name__, attempt + 1,
                               self.cfg.retries + 1)
        raise APIError(503, "a model replica was lost and retries ran out; try again", None, "replica_unavailable",
                       type="server_error")

    async def search(self, image: Image.Image, action: str, best_of: int, seed: int) -> dict[str, Any]:
        source = encode_image(image)
        candidates = await self._call(self.world_model.sample, SampleRequest(source, action, best_of, seed))
        scores = await self._call(self.verifier.score, ScoreRequest(source, candidates, action))
        return {"candidates": candidates, "scores": scores, "order": rank(scores)}

    def _width(self, best_of: Any, n: int = 1) -> int:
        limit = self.limits.max_best_of
        if best_of is None:
            return min(max(self.cfg.best_of, n), limit)
        width = check_int(best_of, "best_of", 1, limit)
        if width < n:
            raise APIError(400, f"'best_of' ({width}) must be at least 'n' ({n})", "best_of", "invalid_value")
        return width

    @staticmethod
    def _seed(seed: Any) -> int:
        return secrets.randbelow(2**31) if seed is None else check_int(seed, "seed", 0, MAX_SEED)

    # -- endpoints --------------------------------------------------------------------------------------------
    async def images_edits(self, request: Request) -> dict[str, Any]:
        """OpenAI's images.edit: the n best of `best_of` verified candidates."""
        limits = self.limits
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limits.max_image_bytes + 64 * 1024:
            raise APIError(413, f"request body is {length} bytes; the image limit is {limits.max_image_bytes}",
                           "image", "request_too_large")
        if not request.headers.get("content-type", "").startswith(("multipart/form-data",
                                                                   "application/x-www-form-urlencoded")):
            raise APIError(400, "send multipart/form-data with 'image' and 'prompt' (as the openai client does)",
                           None, "invalid_content_type")
        form = await request.form(max_files=4, max_fields=32, max_part_size=64 * 1024)
        try:
            upload = form.get("image") or form.get("image[]")
            if upload is None or isinstance(upload, str):
                raise APIError(400, "'image' is required and must be a file", "image", "missing_required_parameter")
            image = check_image(await upload.read(limits.max_image_bytes + 1), limits, "image")
            if form.get("mask") is not None:
                raise APIError(400, "'mask' is not supported: the world model edits the whole frame", "mask",
                               "unsupported_parameter")
            prompt = check_text(form.get("prompt"), limits, "prompt")
            model = form.get("model")
            if model not in (None, "", self.model_name):
                raise APIError(404, f"model {model!r} does not exist; this server has {self.model_name!r}", "model",
                               "model_not_found")
            n = check_int(form.get("n", "1"), "n", 1, limits.max_n)
            best_of = self._width(form.get("best_of"), n)
            seed = self._seed(form.get("seed"))
            size = parse_size(form.get("size"), image, limits)  # type: ignore[arg-type]
            response_format = form.get("response_format") or "b64_json"
            if response_format not in ("b64_json", "url"):
                raise APIError(400, "'response_format' must be 'b64_json' or 'url'", "response_format",
                               "invalid_value")
        finally:
            await form.close()
        found = await self.search(image, prompt, best_of, seed)
        data = []
        for i in found["order"][:n]:
            b64 = _b64(_resized(found["candidates"][i], size))
            data.append({"b64_json": b64} if response_format == "b64_json" else {"url": f"data:image/png;base64,{b64}"})
            data[-1]["revised_prompt"] = None
        return {"created": int(time.time()), "data": data}

    async def predict(self, body: PredictRequest) -> dict[str, Any]:
        image = b64_image(body.image, self.limits, "image")
        action = check_text(body.action, self.limits, "action")
        best_of, seed = self._width(body.best_of), self._seed(body.seed)
        return self._prediction(await self.search(image, action, best_of, seed), action, best_of, seed,
                                body.return_candidates)

    async def rollout(self, body: RolloutRequest) -> dict[str, Any]:
        """Each step's chosen frame is the next step's source: an open-loop imagined trajectory."""
        image = b64_image(body.image, self.limits, "image")
        if not body.actions or len(body.actions) > self.limits.max_rollout_actions:
            raise APIError(400, f"'actions' must hold 1 to {self.limits.max_rollout_actions} actions", "actions",
                           "invalid_value")
        actions = [check_text(a, self.limits, f"actions[{i}]") for i, a in enumerate(body.actions)]
        best_of, seed = self._width(body.best_of), self._seed(body.seed)
        if seed + len(actions) > MAX_SEED:
            raise APIError(400, "'seed' is too large for this many steps", "seed", "invalid_value")
        frames = []
        for k, action in enumerate(actions):
            found = await self.search(image, action, best_of, seed + k)
            frames.append(self._prediction(found, action, best_of, seed + k, body.return_candidates))
            image = Image.open(io.BytesIO(found["candidates"][found["order"][0]])).convert("RGB")
        return {"id": f"rollout-{uuid.uuid4().hex[:16]}", "object": "rollout", "created": int(time.time()),
                "model": self.model_name, "seed": seed, "best_of": best_of, "frames": frames}

    def _prediction(self, found: dict[str, Any], action: str, best_of: int, seed: int,
                    with_candidates: bool) -> dict[str, Any]:
        best = found["order"][0]
        out: dict[str, Any] = {
            "id": f"pred-{uuid.uuid4().hex[:16]}", "object": "prediction", "created": int(time.time()),
            "model": self.model_name, "action": action, "seed": seed, "best_of": best_of, "chosen": best,
            "image": _b64(found["candidates"][best]), "score": found["scores"][best],
        }
        if with_candidates:
            out["candidates"] = [{"index": i, "image": _b64(c), "score": s}
                                 for i, (c, s) in enumerate(zip(found["candidates"], found["scores"], strict=True))]
        return out

    def models(self) -> dict[str, Any]:
        def card(name: str, root: str, role: str) -> dict[str, Any]:
            return {"id": name, "object": "model", "created": self.created, "owned_by": "cwm_ray", "root": root,
                    "role": role}

        return {"object": "list", "data": [
            card(self.model_name, self.cfg.world_model.model, "world_model"),
            card(f"{self.model_name}-verifier", self.cfg.idm.model, "verifier"),
        ]}

    async def health(self) -> dict[str, Any]:
        import asyncio

        try:
            wm, idm = await asyncio.wait_for(asyncio.gather(self.world_model.info.remote(),
                                                            self.verifier.info.remote()), timeout=10)
        except Exception as exc:  # noqa: BLE001 - any failure to reach a replica means "not healthy"
            raise APIError(503, f"model replicas not reachable: {type(exc).__name__}", None, "unhealthy",
                           type="server_error") from None
        return {"status": "ok", "world_model": wm, "verifier": idm}


def create_app() -> FastAPI:
    """The FastAPI app with OpenAI-shaped errors; routes are added by the ingress deployment."""
    app = FastAPI(title="cwm_ray", description="World model + IDM verifier: best-of-N future prediction.",
                  version="0.1.0")

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        msg = err.get("msg", "invalid request")
        code = "missing_required_parameter" if err.get("type") == "missing" else "invalid_value"
        return APIError(400, f"{param}: {msg}" if param else msg, param, code).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, str(exc.detail), None, code).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return APIError(500, f"internal error ({type(exc).__name__})", None, None, type="server_error").response()

    return app


def playground_html() -> str:
    return resources.files("cwm_ray.serve").joinpath("playground.html").read_text(encoding="utf-8")
