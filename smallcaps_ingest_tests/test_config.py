"""config.py: every setting read once, validated, named in its error; the key never shown."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from smallcaps_ingest.config import OFFICIAL_BASE_URL, Config, ConfigError, variables
from smallcaps_ingest_tests.conftest import BIN, cli_env


def test_defaults_and_overrides(tmp_path: Path) -> None:
    c = Config.from_env({})
    got = (c.max_rps, c.workers, c.quotes_hz, c.max_overfetch, c.overfetch_rows)
    assert got == (90.0, None, 1.0, 4.0, None)
    assert c.base_url == OFFICIAL_BASE_URL and not c.is_simulator and not c.automation
    assert c.data_dir == str(Path("./data").resolve())
    c = Config.from_env(
        {"POLYGON_MAX_RPS": "20", "POLYGON_WORKERS": "7", "SMALLCAPS_OVERFETCH_ROWS": "1000",
         "POLYGON_BASE_URL": "Simulator", "SMALLCAPS_AUTOMATION": "on", "SMALLCAPS_DATA_DIR": str(tmp_path)},
        max_rps=5.0,
    )
    got = (c.max_rps, c.workers, c.overfetch_rows, c.is_simulator, c.automation)
    assert got == (5.0, 7, 1000, True, True)
    assert c.data_dir == str(tmp_path)
    assert {v for v, _, _ in variables()} >= {"POLYGON_MAX_RPS", "SMALLCAPS_DATA_DIR", "POLYGON_BUDGET_URL"}


@pytest.mark.parametrize(
    ("var", "value", "message"),
    [
        ("POLYGON_MAX_RPS", "fast", "POLYGON_MAX_RPS='fast' is not a valid float"),
        ("POLYGON_MAX_RPS", "0", "POLYGON_MAX_RPS='0' must be >= 0.001"),
        ("POLYGON_WORKERS", "0", "POLYGON_WORKERS='0' must be >= 1"),
        ("SMALLCAPS_MAX_OVERFETCH", "nan", "SMALLCAPS_MAX_OVERFETCH='nan' must be a finite number"),
        ("SMALLCAPS_AUTOMATION", "maybe", "SMALLCAPS_AUTOMATION='maybe': use on or off"),
        ("SMALLCAPS_DATA_DIR", "gs://bucket/prefix", "gs:// is not supported"),
        ("SMALLCAPS_DATA_DIR", "http://host/prefix", "http:// is not supported"),
        ("SMALLCAPS_DATA_DIR", "s3://", "use s3://bucket/prefix"),
        ("SMALLCAPS_DATA_DIR", "s3://key:secret@bucket/p", "holds credentials in its URL"),
    ],
)
def test_a_bad_value_is_named(var: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        Config.from_env({var: value})


def test_the_key_is_never_shown() -> None:
    c = Config.from_env({"POLYGON_API_KEY": "hunter2-secret"})
    assert c.api_key == "hunter2-secret"
    assert "hunter2" not in repr(c) and "hunter2" not in str(c)


def test_an_s3_url_is_kept_as_a_url() -> None:
    assert Config.from_env({"SMALLCAPS_DATA_DIR": "s3://bucket/a/prefix/"}).data_dir == "s3://bucket/a/prefix"


def test_a_credential_in_the_url_is_never_shown() -> None:
    with pytest.raises(ConfigError) as e:
        Config.from_env({"SMALLCAPS_DATA_DIR": "s3://AKIAXXX:hunter2@bucket/p"})
    assert "hunter2" not in str(e.value) and "AKIAXXX" not in str(e.value)


def test_an_unsupported_url_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    env = cli_env(tmp_path, SMALLCAPS_DATA_DIR="gs://bucket/prefix")
    out = subprocess.run([str(BIN / "smallcaps-ingest"), "status"], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 1
    assert "SMALLCAPS_DATA_DIR='gs://bucket/prefix': gs:// is not supported" in out.stderr
    assert not (tmp_path / "gs:").exists()
