"""One URI layer for local paths and s3://, built on pyarrow.fs.

Why pyarrow.fs: Ray Data (`read_parquet(filesystem=...)`) and Ray Train
(`RunConfig(storage_filesystem=...)`) take the same filesystem objects, so one configured S3 client
(endpoint override, region, retries) serves every stage. Writes of single files are atomic: local
files go through a temporary name and `rename`; an S3 PUT is atomic by itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import pyarrow.fs as pafs

from cwm_ray.config import StorageConfig

_default = StorageConfig()
T = TypeVar("T")


def configure(cfg: StorageConfig) -> None:
    """Make `cfg` the default for calls that pass none (a job calls this once with its config)."""
    global _default
    _default = cfg
    _s3_cache.clear()


def is_s3(uri: str | os.PathLike[str]) -> bool:
    return str(uri).startswith("s3://")


def join(base: str | os.PathLike[str], *parts: str) -> str:
    base = str(base)
    if is_s3(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(base, *parts))


def endpoint_url(cfg: StorageConfig | None = None) -> str | None:
    cfg = cfg or _default
    return cfg.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


_s3_cache: dict[tuple[Any, ...], pafs.S3FileSystem] = {}


def s3_filesystem(cfg: StorageConfig | None = None) -> pafs.S3FileSystem:
    """A pyarrow S3 filesystem honouring the endpoint override; credentials come from AWS's usual chain."""
    cfg = cfg or _default
    endpoint = endpoint_url(cfg)
    region = cfg.region or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
    key = (endpoint, region, cfg.retries)
    if key not in _s3_cache:
        kwargs: dict[str, Any] = {
            "region": region,
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=cfg.retries),
            "allow_bucket_creation": True,
        }
        if endpoint:
            parsed = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
            kwargs["endpoint_override"] = parsed.netloc
            kwargs["scheme"] = parsed.scheme
        _s3_cache[key] = pafs.S3FileSystem(**kwargs)
    return _s3_cache[key]


def filesystem(uri: str | os.PathLike[str], cfg: StorageConfig | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for `uri`, ready for pyarrow, Ray Data and Ray Train."""
    uri = str(uri)
    if is_s3(uri):
        return s3_filesystem(cfg), uri[len("s3://") :].rstrip("/")
    return pafs.LocalFileSystem(), str(Path(uri).resolve())


def exists(uri: str | os.PathLike[str], cfg: StorageConfig | None = None) -> bool:
    fs, path = filesystem(uri, cfg)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str | os.PathLike[str], cfg: StorageConfig | None = None) -> bool:
    fs, path = filesystem(uri, cfg)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def makedirs(uri: str | os.PathLike[str], cfg: StorageConfig | None = None) -> None:
    fs, path = filesystem(uri, cfg)
    fs.create_dir(path, recursive=True)


def read_bytes(uri: str | os.PathLike[str], cfg: StorageConfig | None = None) -> bytes:
    fs, path = filesystem(uri, cfg)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {uri}") from None


def write_bytes(uri: str | os.PathLike[str], data: bytes, cfg: StorageConfig | None = None) -> None:
    """Write a whole file; readers never see a half-written one."""
    uri = str(uri)
    if not is_s3(uri):
        path = Path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return
    fs, path_in_fs = filesystem(uri, cfg)
    with fs.open_output_stream(path_in_fs) as f:
        f.write(data)


def read_text(uri: str | os.PathLike[str], cfg: StorageConfig | None = None) -> str:
    return read_bytes(uri, cfg).decode("utf-8")


def write_text(uri: str | os.PathLike[str], text: str, cfg: StorageConfig | None = None) -> None:
    write_bytes(uri, text.encode("utf-8"), cfg)


def read_json(uri: str | os.PathLike[str], cfg: StorageConfig | None = None) -> Any:
    text = read_text(uri, cfg)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{uri} is not valid JSON: {exc}") from None


def write_json(uri: str | os.PathLike[str], obj: Any, cfg: StorageConfig | None = None) -> None:
    write_text(uri, json.dumps(obj, indent=1) + "\n", cfg)


def list_files(
    uri: str | os.PathLike[str], suffixes: tuple[str, ...] | None = None, cfg: StorageConfig | None = None
) -> list[str]:
    """Every file under `uri` (recursive), as URIs of the same kind, sorted for determinism."""
    uri = str(uri)
    fs, path = filesystem(uri, cfg)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except FileNotFoundError:
        raise FileNotFoundError(f"no such directory: {uri}") from None
    out = []
    for info in infos:
        if info.type != pafs.FileType.File or Path(info.path).name.startswith("."):
            continue
        if suffixes and not info.path.lower().endswith(tuple(s.lower() for s in suffixes)):
            continue
        out.append(f"s3://{info.path}" if is_s3(uri) else info.path)
    return sorted(out)


def delete(uri: str | os.PathLike[str], cfg: StorageConfig | None = None) -> None:
    """Remove a file or a whole directory; a missing one is fine."""
    fs, path = filesystem(uri, cfg)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def upload_dir(local_dir: str | os.PathLike[str], uri: str, cfg: StorageConfig | None = None) -> None:
    src_fs = pafs.LocalFileSystem()
    dst_fs, dst = filesystem(uri, cfg)
    pafs.copy_files(str(Path(local_dir).resolve()), dst, source_filesystem=src_fs, destination_filesystem=dst_fs)


def download_dir(uri: str, local_dir: str | os.PathLike[str], cfg: StorageConfig | None = None) -> None:
    src_fs, src = filesystem(uri, cfg)
    Path(local_dir).mkdir(parents=True, exist_ok=True)
    pafs.copy_files(src, str(Path(local_dir).resolve()), source_filesystem=src_fs,
                    destination_filesystem=pafs.LocalFileSystem())


def local_dir(uri: str, cache_root: str | os.PathLike[str] | None = None, cfg: StorageConfig | None = None) -> str:
    """A local directory holding `uri`'s files: the path itself when local, else a cached download.

    Hugging Face `from_pretrained` needs a local directory or a hub id; this is how s3:// model
    checkpoints reach it. The cache key is the URI, and a finished download is marked complete so an
    interrupted one is never mistaken for a model.
    """
    if not is_s3(uri):
        # A path, not a hub id: say so plainly (from_pretrained would read it as a malformed repo id).
        if uri.startswith(("/", ".")) and not Path(uri).is_dir():
            raise FileNotFoundError(f"no model directory at {uri}")
        return uri
    root = Path(cache_root or os.environ.get("CWM_RAY_CACHE", Path.home() / ".cache" / "cwm_ray"))
    target = root / hashlib.sha256(uri.encode()).hexdigest()[:16]
    done = target / ".complete"
    if not done.exists():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".dl-"))
        try:
            download_dir(uri, tmp, cfg)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # a failed download leaves nothing that looks like a model
            raise
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        done.write_text(uri)
    return str(target)


def resolve_local(uri: str | None) -> str | None:
    """An existing local relative path made absolute; anything else (hub id, s3://, None) unchanged.

    Ray workers need not share the driver's working directory (Ray Train's run in their run
    directory), where a relative `outputs/models/...` would be misread as a Hugging Face hub id.
    """
    if uri is None or is_s3(uri) or os.path.isabs(uri) or not os.path.exists(uri):
        return uri
    return os.path.abspath(uri)


def with_local_paths(model_cfg: T) -> T:
    """A model config (`model`, `adapter`) with both passed through `resolve_local`, for sending to workers."""
    return dataclasses.replace(model_cfg, model=resolve_local(model_cfg.model),
                               adapter=resolve_local(model_cfg.adapter))


def move(src: str, dst: str, cfg: StorageConfig | None = None) -> None:
    """Rename a file (on S3, pyarrow copies then deletes: the source is gone only once the copy exists)."""
    fs, src_path = filesystem(src, cfg)
    fs.move(src_path, filesystem(dst, cfg)[1])
