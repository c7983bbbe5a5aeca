from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cwm_ray import storage


def _roundtrip(base: str) -> None:
    uri = storage.join(base, "a", "b.json")
    assert not storage.exists(uri)
    storage.write_json(uri, {"x": [1, 2]})
    assert storage.exists(uri)
    assert storage.read_json(uri) == {"x": [1, 2]}
    storage.write_bytes(storage.join(base, "a", "c.bin"), b"\x00\x01")
    storage.write_text(storage.join(base, "d.txt"), "hi")
    assert storage.list_files(base) == [storage.join(base, "a", "b.json"), storage.join(base, "a", "c.bin"),
                                        storage.join(base, "d.txt")]
    assert storage.list_files(base, suffixes=(".TXT",)) == [storage.join(base, "d.txt")]
    # The same filesystem object serves pyarrow (and so Ray Data / Ray Train).
    fs, path = storage.filesystem(storage.join(base, "t.parquet"))
    pq.write_table(pa.table({"v": [1, 2, 3]}), path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs)["v"].to_pylist() == [1, 2, 3]
    storage.delete(storage.join(base, "a"))
    assert not storage.exists(uri)
    with pytest.raises(FileNotFoundError, match="b.json"):
        storage.read_bytes(uri)


def test_local_roundtrip(tmp_path: Path) -> None:
    _roundtrip(str(tmp_path))


def test_s3_roundtrip_on_moto_server(s3_bucket: str) -> None:
    _roundtrip(s3_bucket + "/prefix")


def test_dir_upload_download_and_local_cache(s3_bucket: str, tmp_path: Path) -> None:
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "sub" / "w.bin").write_bytes(b"w" * 1000)
    storage.upload_dir(src, s3_bucket + "/ckpt")
    local = Path(storage.local_dir(s3_bucket + "/ckpt", cache_root=tmp_path / "cache"))
    assert (local / "sub" / "w.bin").read_bytes() == b"w" * 1000
    assert (local / ".complete").exists()
    assert storage.local_dir(str(src)) == str(src)


def test_local_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "f.txt"
    storage.write_text(target, "old")

    class Boom(Exception):
        pass

    def explode(*_: object) -> None:
        raise Boom

    monkeypatch.setattr("os.replace", explode)
    with pytest.raises(Boom):
        storage.write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]  # no temporary left behind


def test_missing_bucket_is_a_clear_error(moto_server: str) -> None:
    from cwm_ray.config import StorageConfig

    cfg = StorageConfig(endpoint_url=moto_server)
    with pytest.raises(FileNotFoundError, match="no-such-bucket"):
        storage.read_bytes("s3://no-such-bucket/x", cfg)
