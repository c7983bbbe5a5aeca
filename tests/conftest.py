"""Shared fixtures: a real moto S3 server over HTTP on 127.0.0.1, and small toy-world configs."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterator

import boto3
import pytest
import toy_gate_models

from cwm_ray import storage
from cwm_ray.config import StorageConfig

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Training and evaluation log to MLflow by default (outputs/mlruns); the suite's runs go to a store of their own
# instead of the checkout's outputs/ (subprocess jobs and Ray workers inherit it). Tests of tracking set their own.
os.environ.setdefault("MLFLOW_TRACKING_URI", tempfile.mkdtemp(prefix="cwm-test-mlruns-"))
os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # for the tests' own MlflowClient reading a file store


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """A moto S3 server on loopback; tests reach it through the production boto3 / pyarrow code."""
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(moto_server: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh bucket per test; returns its s3:// URI. $AWS_ENDPOINT_URL points at moto, as a user would."""
    name = "t-" + request.node.name.lower().replace("_", "-")[:40].strip("-[]")
    name = "".join(ch for ch in name if ch.isalnum() or ch == "-")
    boto3.client("s3", endpoint_url=moto_server).create_bucket(Bucket=name)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    yield f"s3://{name}"
    storage.configure(StorageConfig())


@pytest.fixture
def browser() -> Iterator[object]:
    """Debian's Chromium, headless, through selenium and Debian's chromedriver (no browser download)."""
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,1600"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService("/usr/bin/chromedriver"))
    yield driver
    driver.quit()


@pytest.hookimpl(trylast=True)  # after `-m` / `-k` deselected what they deselect
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """The toy gates run last, and their models train in the background from the start (tests/toy_gate_models.py
    says why): the suite keeps to CI's time budget without training them less."""
    toy_gate_models.schedule(config, items)


def pytest_unconfigure(config: pytest.Config) -> None:
    toy_gate_models.stop(config)


_FILE_SECONDS: dict[str, float] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Seconds per test file (setup, call and teardown), for the line below."""
    _FILE_SECONDS[report.fspath] = _FILE_SECONDS.get(report.fspath, 0.0) + report.duration


@pytest.hookimpl(trylast=True)  # after the slowest-durations list, so it is in the end CI shows
def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """One line of seconds per test file, largest first: CI shows only the end of its log, and the suite's time
    budget (about 40 minutes) is kept file by file."""
    ranked = sorted(_FILE_SECONDS.items(), key=lambda kv: -kv[1])
    terminalreporter.write_line("seconds per file: " + ", ".join(
        f"{os.path.basename(path).removeprefix('test_').removesuffix('.py')} {s:.0f}" for path, s in ranked))
