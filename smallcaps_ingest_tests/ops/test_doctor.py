"""``smallcaps-ingest doctor`` against the simulator on loopback: each outcome (all ok, 403 per
endpoint naming the plan, 401, no key, host down, instance missing, budget backend unusable, data
dir not writable or from another source), the exit code, the key never printed, and the two
requests taking budget grants."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from smallcaps_ingest.simulator import SimConfig, Simulator

CLI = Path(sys.executable).with_name("smallcaps-ingest")
ROOT = Path(__file__).resolve().parents[2]
KEYS = {"good-key-5ec2e7": "advanced", "dev-key-77a1f0": "developer", "basic-key-9c0d3e": "basic"}


@pytest.fixture(scope="module")
def sim():
    with Simulator(SimConfig(keys=dict(KEYS))) as s:
        yield s


def _doctor(tmp: Path, base_url: str, key: str | None, **env_over: str | None) -> tuple[int, str, dict]:
    home = tmp / "home"
    if not home.exists():
        home.mkdir()
        shutil.copy(ROOT / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POLYGON_", "SMALLCAPS_", "DAGSTER_"))}
    env.update(
        POLYGON_BASE_URL=base_url,
        DAGSTER_HOME=str(home),
        SMALLCAPS_DATA_DIR=str(tmp / "data"),
        POLYGON_BUDGET_PATH=str(tmp / "budget.sqlite"),
        POLYGON_MAX_RPS="50",
    )
    if key is not None:
        env["POLYGON_API_KEY"] = key
    for k, v in env_over.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    text = subprocess.run([str(CLI), "doctor"], env=env, capture_output=True, text=True, timeout=120)
    js = subprocess.run([str(CLI), "doctor", "--json"], env=env, capture_output=True, text=True, timeout=120)
    assert text.returncode == js.returncode
    for k in KEYS:
        assert k not in text.stdout + text.stderr + js.stdout + js.stderr
    checks = {c["name"]: c for c in json.loads(js.stdout)["checks"]}
    return text.returncode, text.stdout, checks


def test_all_checks_pass_and_requests_take_budget_grants(sim: Simulator, tmp_path: Path) -> None:
    sim.reset_counters()
    rc, out, checks = _doctor(tmp_path, sim.base_url, "good-key-5ec2e7", POLYGON_MAX_RPS="0.5")
    assert rc == 0, out
    assert all(c["ok"] for c in checks.values()), checks
    assert list(checks) == ["key", "host", "budget", "trades", "quotes", "instance", "data dir"]
    assert (
        "HTTP 200, 1 row for AAPL" in checks["trades"]["detail"] and "entitled" in checks["quotes"]["detail"]
    )
    assert "plain HTTP" in checks["host"]["detail"] and " ms" in checks["host"]["detail"]
    assert "no _source.json yet" in checks["data dir"]["detail"]
    assert out.strip().endswith("all checks passed")
    log = sim.request_log()
    # two runs (text and --json), each one 1-row trades and one 1-row quotes request
    assert [(r.endpoint, r.status) for r in log] == [("trades", 200), ("quotes", 200)] * 2
    assert all(r.rows == 1 for r in log)
    # at 0.5 req/s every request waits for its grant: two seconds apart at the server
    assert all(b.t - a.t >= 1.9 for a, b in zip(log, log[1:], strict=False))


def test_quotes_not_entitled_names_the_plan_and_other_failures(sim: Simulator, tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    # a tree of the bundled simulator; the doctor is pointed at a URL, so the API is "polygon"
    (tmp_path / "data" / "_source.json").write_text('{"source": "simulator"}')
    rc, out, checks = _doctor(tmp_path, sim.base_url, "dev-key-77a1f0", DAGSTER_HOME=None)
    assert rc == 1
    assert checks["trades"]["ok"] and "HTTP 200" in checks["trades"]["detail"]
    assert not checks["quotes"]["ok"]
    assert "HTTP 403" in checks["quotes"]["detail"] and "Stocks Advanced" in checks["quotes"]["detail"]
    assert not checks["instance"]["ok"] and "DAGSTER_HOME is not set" in checks["instance"]["detail"]
    assert not checks["data dir"]["ok"]
    assert "holds data from 'simulator' but the API is 'polygon'" in checks["data dir"]["detail"]
    assert "FAIL  quotes" in out and "3 check(s) failed: quotes, instance, data dir" in out


def test_no_entitlement_unwritable_data_dir_and_bad_budget(sim: Simulator, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    rc, _, checks = _doctor(
        tmp_path, sim.base_url, "basic-key-9c0d3e", SMALLCAPS_DATA_DIR=str(blocker / "data")
    )
    assert rc == 1
    assert "HTTP 403" in checks["trades"]["detail"] and "Stocks Developer" in checks["trades"]["detail"]
    assert "HTTP 403" in checks["quotes"]["detail"] and "Stocks Advanced" in checks["quotes"]["detail"]
    assert not checks["data dir"]["ok"] and "is not writable" in checks["data dir"]["detail"]
    assert checks["instance"]["ok"] and checks["budget"]["ok"]

    sim.reset_counters()
    rc, _, checks = _doctor(
        tmp_path, sim.base_url, "good-key-5ec2e7", POLYGON_BUDGET_PATH=str(blocker / "b.sqlite")
    )
    assert rc == 1
    assert not checks["budget"]["ok"] and "budget backend unusable" in checks["budget"]["detail"]
    assert checks["trades"]["detail"] == "not tried (no request budget)"
    assert sim.request_log() == []  # no grant, no request


def test_bad_key_no_key_and_host_down(sim: Simulator, tmp_path: Path) -> None:
    rc, _, checks = _doctor(tmp_path, sim.base_url, "wrong-key-0000")
    assert rc == 1
    assert "HTTP 401" in checks["trades"]["detail"] and "rejected the API key" in checks["trades"]["detail"]
    assert "wrong-key-0000" not in json.dumps(checks)

    sim.reset_counters()
    rc, _, checks = _doctor(tmp_path, sim.base_url, None)
    assert rc == 1 and not checks["key"]["ok"] and "POLYGON_API_KEY is not set" in checks["key"]["detail"]
    assert sim.request_log() == []  # nothing sent without a key

    with Simulator(SimConfig()) as gone:
        url = gone.base_url
    rc, _, checks = _doctor(tmp_path, url, "good-key-5ec2e7")
    assert rc == 1 and not checks["host"]["ok"] and "cannot reach 127.0.0.1" in checks["host"]["detail"]
    assert checks["trades"]["detail"].startswith("not tried")
