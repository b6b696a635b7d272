"""Deployment files (Dockerfile, docker-compose.yml, locustfile) and `lm loadtest`."""

from __future__ import annotations

import csv
import importlib.util
import json
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lm import cli
from lm.commands import loadtest as loadtest_command
from lm.commands._args import run_time
from lm.loadtest import default_locustfile

ROOT = Path(__file__).resolve().parents[1]
HEALTH_URL = "http://127.0.0.1:8000/health"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = dockerfile.read_text(encoding="utf-8").replace("\\\n", " ")
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            pairs.append((keyword.upper(), " ".join(rest.split())))
    return pairs


# -- docker-compose.yml ---------------------------------------------------------------------


def test_compose_has_the_three_services_with_their_profiles(compose):
    services = compose["services"]
    assert {"server", "server-gpu", "locust"} <= set(services)
    assert "profiles" not in services["server"]  # `docker compose up` starts it
    assert services["server-gpu"]["profiles"] == ["gpu"]
    assert services["locust"]["profiles"] == ["load"]


def test_compose_server_is_published_healthy_and_reachable(compose):
    server = compose["services"]["server"]
    assert server["build"] == "."
    assert "8000:8000" in server["ports"]
    assert server["environment"]["LM_HOST"] == "0.0.0.0"
    # Passed through from the host, never forced to "" (which would turn auth on).
    assert "LM_API_KEY" in server["environment"]
    assert server["environment"]["LM_API_KEY"] is None
    for name in ("server", "server-gpu"):
        test = compose["services"][name]["healthcheck"]["test"]
        assert test[0] == "CMD" and HEALTH_URL in " ".join(test)


def test_compose_gpu_server_reserves_an_nvidia_gpu_and_a_cuda_torch(compose):
    gpu = compose["services"]["server-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert gpu["environment"]["LM_DEVICE"] == "cuda"
    assert "download.pytorch.org/whl/cu" in gpu["build"]["args"]["TORCH_INDEX"]
    host_ports = {p.split(":")[0] for s in ("server", "server-gpu")
                  for p in compose["services"][s]["ports"]}
    assert len(host_ports) == 2  # both can run at once


def test_compose_locust_runs_the_locustfile_headless_against_a_healthy_server(compose):
    locust = compose["services"]["locust"]
    assert locust["depends_on"]["server"]["condition"] == "service_healthy"
    args = shlex.split(locust["command"])
    assert "--headless" in args
    assert args[args.index("--host") + 1] == "http://server:8000"
    locustfile = args[args.index("-f") + 1]
    mounts = dict(v.rsplit(":", 1)[0].split(":") for v in locust["volumes"])
    host_dir = next(h for h, c in mounts.items() if locustfile.startswith(c + "/"))
    assert (ROOT / host_dir / Path(locustfile).name).is_file()


# -- Dockerfile -----------------------------------------------------------------------------


def test_dockerfile_installs_the_project_and_serves_it_as_non_root():
    steps = _instructions(ROOT / "Dockerfile")
    keywords = [k for k, _ in steps]
    assert steps[0] == ("FROM", "python:3.11-slim")
    assert ("WORKDIR", "/app") in steps
    runs = " && ".join(arg for k, arg in steps if k == "RUN")
    assert "pip install --index-url \"${TORCH_INDEX}\" torch" in runs
    assert "pip install -e ." in runs
    assert any(k == "ARG" and arg.startswith("TORCH_INDEX=") for k, arg in steps)
    users = [arg for k, arg in steps if k == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert keywords.index("USER") < keywords.index("CMD")
    assert ("EXPOSE", "8000") in steps
    healthcheck = next(arg for k, arg in steps if k == "HEALTHCHECK")
    assert HEALTH_URL in healthcheck
    command = json.loads(next(arg for k, arg in steps if k == "CMD"))
    assert command[:2] == ["lm", "serve"]
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert command[command.index("--port") + 1] == "8000"


def test_dockerignore_keeps_environments_and_training_state_out():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for needed in (".venv/", ".git/", "runs/", "**/__pycache__/", "**/train_state.pt"):
        assert needed in patterns
    for kept in ("lm", "service", "checkpoints", "pyproject.toml", "README.md"):
        assert not any(p.rstrip("/") == kept for p in patterns)


# -- locustfile -----------------------------------------------------------------------------

_PROBE = r"""
import importlib.util, json, sys
import locust  # patches the standard library first, as the locust command does
spec = importlib.util.spec_from_file_location("locustfile", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
users = {name: {"tasks": len(obj.tasks), "wait": [obj.wait_time(None) for _ in range(20)]}
         for name, obj in vars(module).items()
         if isinstance(obj, type) and issubclass(obj, locust.HttpUser)
         and obj is not locust.HttpUser and not obj.abstract}
chunk = lambda text, finish=None: "data: " + json.dumps(
    {"choices": [{"text": text, "index": 0, "finish_reason": finish}]})
usage = "data: " + json.dumps({"choices": [], "usage": {"total_tokens": 3}})
streams = {
    "ok": [chunk("a"), "", chunk("b", "length"), "", usage, "", "data: [DONE]", ""],
    "no_done": [chunk("a"), "", chunk("b", "length"), "", usage, ""],
    "no_usage": [chunk("a", "stop"), "", "data: [DONE]"],
    "error": ["data: " + json.dumps({"error": {"message": "boom"}}), "data: [DONE]"],
    "garbage": ["data: {not json", "data: [DONE]"],
}
checks = {name: module.check_stream(iter(lines), want_usage=True)[0]
          for name, lines in streams.items()}
print(json.dumps({"users": users, "checks": checks}))
"""


@pytest.fixture(scope="module")
def locustfile_probe() -> dict:
    if importlib.util.find_spec("locust") is None:
        pytest.skip('locust is not installed (pip install -e ".[load]")')
    # A subprocess: importing locust monkey-patches sockets and threads for good.
    result = subprocess.run([sys.executable, "-c", _PROBE, str(default_locustfile())],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_locustfile_defines_an_http_user_with_weighted_tasks(locustfile_probe):
    users = locustfile_probe["users"]
    assert users
    for user in users.values():
        assert user["tasks"] >= 5  # weights expand into repeated entries
        assert all(0.1 <= w <= 0.5 for w in user["wait"])


def test_locustfile_fails_streams_without_done_or_with_errors(locustfile_probe):
    checks = locustfile_probe["checks"]
    assert checks["ok"] is None
    assert "[DONE]" in checks["no_done"]
    assert "usage" in checks["no_usage"]
    assert "boom" in checks["error"]
    assert "broken" in checks["garbage"]


def test_default_locustfile_is_the_one_in_service():
    assert default_locustfile() == ROOT / "service" / "locustfile.py"


# -- lm loadtest ----------------------------------------------------------------------------


@pytest.mark.parametrize("args, flag", [
    (["--run-time", "soon"], "--run-time"),
    (["--run-time", "0s"], "--run-time"),
    (["--run-time", "5x"], "--run-time"),
    (["--users", "0"], "--users"),
    (["--spawn-rate", "0"], "--spawn-rate"),
    (["--host", "127.0.0.1:8000"], "--host"),
])
def test_loadtest_bad_arguments_are_one_line_and_status_2(args, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["loadtest", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("lm loadtest: error:") and flag in err


@pytest.mark.parametrize("text", ["90", "60s", "5m", "1h30m", "2h"])
def test_loadtest_accepts_locust_durations(text):
    assert run_time(text) == text


def test_loadtest_without_locust_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setattr(loadtest_command, "_locust_available", lambda: False)
    assert cli.main(["loadtest"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'pip install -e ".[load]"' in err


def test_loadtest_without_a_server_is_one_line_and_status_2(monkeypatch, capsys):
    monkeypatch.setattr(loadtest_command, "_locust_available", lambda: True)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert cli.main(["loadtest", "--host", f"http://127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no server at" in err


_HEADER = ["Type", "Name", "Request Count", "Failure Count", "Median Response Time",
           "Average Response Time", "Min Response Time", "Max Response Time",
           "Average Content Size", "Requests/s", "Failures/s", "50%", "66%", "75%", "80%",
           "90%", "95%", "98%", "99%", "99.9%", "99.99%", "100%"]


@pytest.mark.parametrize("failures, status", [(0, 0), (3, 1)])
def test_loadtest_runs_locust_headless_and_summarises_its_csv(failures, status, tmp_path,
                                                              monkeypatch, capsys):
    calls = []

    def fake_run(command, env):
        calls.append((command, env))
        prefix = command[command.index("--csv") + 1]
        with open(f"{prefix}_stats.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(_HEADER)
            writer.writerow(["GET", "/health", 10, 0, 2, 2, 1, 5, 40, 1.0, 0.0, 2, *[3] * 6,
                             5, 5, 5, 5])
            writer.writerow(["POST", "/v1/completions short", 90, failures, 40, 45, 10, 300,
                             500, 9.0, 0.0, 40, *[50] * 6, 250, 300, 300, 300])
            writer.writerow(["", "Aggregated", 100, failures, 38, 40, 1, 300, 450, 10.0, 0.0,
                             38, *[50] * 6, 250, 300, 300, 300])
        return subprocess.CompletedProcess(command, 1 if failures else 0)

    monkeypatch.setattr(loadtest_command, "_locust_available", lambda: True)
    monkeypatch.setattr(loadtest_command, "_check_server", lambda host: None)
    monkeypatch.setattr(subprocess, "run", fake_run)
    out = tmp_path / "load"
    code = cli.main(["loadtest", "--host", "http://h:9/", "--users", "7", "--spawn-rate", "3",
                     "--run-time", "2m", "--out", str(out), "--model", "m1"])
    assert code == status
    command, env = calls[0]
    assert command[:3] == [sys.executable, "-m", "locust"]

    def value(flag: str) -> str:
        return command[command.index(flag) + 1]

    assert value("-f") == str(default_locustfile())
    assert [value(f) for f in ("-u", "-r", "-t", "--host")] == ["7", "3", "2m", "http://h:9"]
    assert value("--csv") == str(out / "locust")
    assert value("--html") == str(out / "report.html")
    assert "--headless" in command and "--only-summary" in command
    assert env["LM_MODEL"] == "m1"
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["endpoint", "requests", "failures"]
    assert lines[-2].split() == ["Aggregated", "100", str(failures), "10.0", "38", "250"]
    assert lines[1].startswith("GET /health")
