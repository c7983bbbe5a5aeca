"""S3 faults, injected by a proxy in front of the moto server: throttling and errors are retried, a lasting
failure is a clear error, and nothing half-written is ever marked complete."""

from __future__ import annotations

import http.client
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

import boto3
import pytest

from cwm_ray import storage
from cwm_ray.config import StorageConfig

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")

pytestmark = pytest.mark.fault


class FaultProxy:
    """Forwards S3 requests to moto; answers 503 SlowDown to the next `fail_next` requests, to every request
    whose method is in `fail_methods`, and to the next `fail_gets[s]` GETs of a key containing `s`, counting
    what it injected."""

    def __init__(self, upstream: str) -> None:
        self.upstream = urlparse(upstream)
        self.fail_next = 0
        self.fail_methods: set[str] = set()
        self.fail_gets: dict[str, int] = {}
        self.injected = 0
        self.forwarded = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _handle(self) -> None:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    body = b""
                    while True:  # HTTP/1.1 chunked upload (pyarrow's S3 client streams parts this way)
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        chunk = self.rfile.read(size) if size else b""
                        self.rfile.readline()
                        if not size:
                            break
                        body += chunk
                else:
                    length = int(self.headers.get("Content-Length") or 0)
                    body = self.rfile.read(length) if length else b""
                with proxy.lock:
                    fail = proxy.fail_next > 0 or self.command in proxy.fail_methods
                    if proxy.fail_next > 0:
                        proxy.fail_next -= 1
                    burst = next((k for k, n in proxy.fail_gets.items() if n > 0 and k in self.path), None)
                    if self.command == "GET" and burst is not None:
                        proxy.fail_gets[burst] -= 1
                        fail = True
                    proxy.injected += fail
                    proxy.forwarded += not fail
                if fail:
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    self.wfile.write(SLOW_DOWN if self.command != "HEAD" else b"")
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=30)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("connection", "keep-alive", "transfer-encoding", "content-length")}
                headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                # HEAD has no body but must still say the object's size
                self.send_header("Content-Length", resp.getheader("Content-Length", "0") if self.command == "HEAD"
                                 else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def proxy(moto_server: str) -> Iterator[FaultProxy]:
    p = FaultProxy(moto_server)
    yield p
    p.close()
    storage.configure(StorageConfig())


@pytest.fixture
def bucket(moto_server: str, request: pytest.FixtureRequest) -> str:
    name = "faults-" + request.node.name.lower().replace("_", "-")[:40].strip("-")
    boto3.client("s3", endpoint_url=moto_server).create_bucket(Bucket=name)
    return name


def test_throttling_is_retried(proxy: FaultProxy, bucket: str) -> None:
    cfg = StorageConfig(endpoint_url=proxy.url, retries=5)
    proxy.fail_next = 3
    storage.write_json(f"s3://{bucket}/a/summary.json", {"ok": 1}, cfg)
    assert proxy.injected == 3
    proxy.fail_next = 2
    assert storage.read_json(f"s3://{bucket}/a/summary.json", cfg) == {"ok": 1}
    assert proxy.injected == 5


def test_a_lasting_failure_is_a_clear_error_and_writes_nothing(proxy: FaultProxy, bucket: str) -> None:
    cfg = StorageConfig(endpoint_url=proxy.url, retries=2)
    proxy.fail_methods = {"PUT", "POST"}
    with pytest.raises(OSError, match="SlowDown|503|reduce your request rate"):
        storage.write_bytes(f"s3://{bucket}/out/triplets.parquet", b"x" * 1000, cfg)
    proxy.fail_methods = set()
    assert not storage.exists(f"s3://{bucket}/out/triplets.parquet", cfg)


def test_an_interrupted_model_download_is_never_marked_complete(proxy: FaultProxy, bucket: str, moto_server: str,
                                                                 tmp_path: Path) -> None:
    good = StorageConfig(endpoint_url=moto_server)
    model = tmp_path / "model"
    model.mkdir()
    for i in range(4):
        (model / f"part{i}.safetensors").write_bytes(bytes([i]) * 50_000)
    storage.upload_dir(str(model), f"s3://{bucket}/models/m", good)

    cache = tmp_path / "cache"
    flaky = StorageConfig(endpoint_url=proxy.url, retries=1)
    proxy.fail_methods = {"GET"}
    with pytest.raises(OSError):
        storage.local_dir(f"s3://{bucket}/models/m", cache_root=cache, cfg=flaky)
    assert proxy.injected > 0
    assert not list(cache.rglob(".complete")) and not list(cache.glob(".dl-*"))  # nothing left that looks done

    proxy.fail_methods = set()
    proxy.fail_next = 2  # and a little throttling on the way: retried
    local = Path(storage.local_dir(f"s3://{bucket}/models/m", cache_root=cache, cfg=StorageConfig(
        endpoint_url=proxy.url, retries=5)))
    assert (local / ".complete").exists()
    assert sorted(p.name for p in local.glob("*.safetensors")) == [f"part{i}.safetensors" for i in range(4)]
    assert (local / "part3.safetensors").read_bytes() == bytes([3]) * 50_000


def _staging_file(uri: str, video: str, pairs: int) -> None:
    """A complete staging file: `pairs` rows of one video, as the annotation pipeline writes them."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from cwm_ray.annotate import STAGING_SCHEMA

    rows = [{"id": f"{video}-{i}", "video_uri": video, "dataset": "d", "video_pairs": pairs} for i in range(pairs)]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=STAGING_SCHEMA), buf)
    storage.write_bytes(uri, buf.getvalue())


def test_a_staging_file_is_never_dropped_on_a_read_error_only_set_aside_when_incomplete(
        proxy: FaultProxy, bucket: str, moto_server: str) -> None:
    """Before, any OSError deleted the file: a 503 burst on a good staging file shrank the output for good."""
    from cwm_ray.annotate import INDEX_COLUMNS, read_staging
    from cwm_ray.config import AnnotateConfig

    storage.configure(StorageConfig(endpoint_url=moto_server))
    out = f"s3://{bucket}/annotated"
    _staging_file(f"{out}/staging/a.parquet", "a.mp4", 2)
    _staging_file(f"{out}/staging/b.parquet", "b.mp4", 3)
    cfg = AnnotateConfig(output=out, storage=StorageConfig(endpoint_url=proxy.url, retries=1), read_attempts=3,
                         retry_backoff_s=0.01)
    storage.configure(cfg.storage)

    proxy.fail_gets = {"b.parquet": 2}  # a burst the retries outlast: read, nothing lost
    index, files = read_staging(cfg, INDEX_COLUMNS)
    assert proxy.injected == 2 and index.num_rows == 5 and len(files) == 2

    proxy.fail_gets = {"b.parquet": 1000}  # a lasting failure: a loud error, and the file is kept
    with pytest.raises(OSError, match=r"staging/b\.parquet could not be read.*kept"):
        read_staging(cfg, INDEX_COLUMNS)
    proxy.fail_gets = {}
    assert storage.exists(f"{out}/staging/b.parquet")
    assert read_staging(cfg, INDEX_COLUMNS)[0].num_rows == 5

    # Proven incomplete (no footer: a write that never finished): renamed aside with its bytes, never deleted.
    data = storage.read_bytes(f"{out}/staging/b.parquet")
    storage.write_bytes(f"{out}/staging/b.parquet", data[: len(data) // 2])
    index, files = read_staging(cfg, INDEX_COLUMNS)
    assert index.num_rows == 2 and files == [f"{out}/staging/a.parquet"]
    assert not storage.exists(f"{out}/staging/b.parquet")
    assert storage.read_bytes(f"{out}/staging/b.parquet.incomplete") == data[: len(data) // 2]
    assert read_staging(cfg, INDEX_COLUMNS)[0].num_rows == 2  # and the next run ignores it
