"""Deployment files (Dockerfile, docker-compose.yml, locustfile) and `lm loadtest`."""

from __future__ import annotations

import csv
import importlib.util
import json
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from loopback_nginx import check_config, loopback_config, nginx_binary

from lm import cli
from lm.commands import loadtest as loadtest_command
from lm.commands._args import run_time
from lm.loadtest import default_locustfile
from service.settings import Settings

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


def test_compose_has_the_services_with_their_profiles(compose):
    services = compose["services"]
    assert {"server", "server-gpu", "locust", "replica", "lb", "prometheus", "grafana"} <= set(
        services
    )
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
    host_ports = {
        p.split(":")[0] for s in ("server", "server-gpu") for p in compose["services"][s]["ports"]
    }
    assert len(host_ports) == 2  # both can run at once


def _duration_seconds(text: str) -> float:
    """A compose duration ('40s', '1m30s') in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, text
    return sum(float(n) * units[u] for n, u in parts)


def _mounts(service: dict) -> dict[str, str]:
    """Container path -> host path of a service's bind mounts (named volumes included)."""
    mounts = {}
    for volume in service.get("volumes", []):
        host, container = re.match(r"^(\$\{[^}]*\}|[^:]+):([^:]+)(?::ro|:rw)?$", volume).groups()
        mounts[container] = host
    return mounts


@pytest.mark.parametrize(
    "name, host", [("locust", "http://server:8000"), ("locust-lb", "http://lb:8080")]
)
def test_compose_locust_runs_headless_and_writes_its_report_to_a_mounted_folder(
    compose, name, host
):
    locust = compose["services"][name]
    assert locust["profiles"] == ["load"]
    target = host.split("//")[1].split(":")[0]
    assert locust["depends_on"][target]["condition"] == "service_healthy"
    args = shlex.split(locust["command"])
    assert "--headless" in args
    assert args[args.index("--host") + 1] == host
    mounts = _mounts(locust)
    locustfile = Path(args[args.index("-f") + 1])
    assert (ROOT / mounts[str(locustfile.parent)] / locustfile.name).is_file()
    for flag in ("--html", "--csv"):  # the report outlives the container
        assert str(Path(args[args.index(flag) + 1]).parent) in mounts


def test_compose_replicas_profile_runs_replicas_behind_nginx_with_prometheus_and_grafana(compose):
    services = compose["services"]
    for name in ("replica", "lb", "prometheus", "grafana"):
        assert services[name]["profiles"] == ["replicas"]
    replica = services["replica"]
    assert replica["deploy"]["replicas"] >= 2
    assert "ports" not in replica  # reached only through nginx (and scaled without clashes)
    assert replica["expose"] == ["8000"]
    assert HEALTH_URL in " ".join(replica["healthcheck"]["test"])
    lb = services["lb"]
    assert lb["depends_on"]["replica"]["condition"] == "service_healthy"
    assert "8080:8080" in lb["ports"]
    assert _mounts(lb)["/etc/nginx/nginx.conf"] == "./deploy/nginx.conf"
    assert "http://127.0.0.1:8080/health" in lb["healthcheck"]["test"]
    assert (
        _mounts(services["prometheus"])["/etc/prometheus/prometheus.yml"]
        == "./deploy/prometheus.yml"
    )
    grafana = _mounts(services["grafana"])
    assert grafana["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    assert grafana["/etc/grafana/dashboards"] == "./deploy/grafana/dashboards"
    for named in ("prometheus-data", "grafana-data"):
        assert named in compose["volumes"]


@pytest.mark.parametrize("name", ["server", "server-gpu", "replica"])
def test_compose_servers_mount_user_checkpoints_and_outlast_their_drain(compose, name):
    server = compose["services"][name]
    environment = server["environment"]
    assert _mounts(server)["/checkpoints"].startswith("${LM_CHECKPOINTS_DIR:-")
    assert environment["LM_CHECKPOINTS"].startswith("${LM_CHECKPOINTS:-")  # e.g. /checkpoints/x
    assert environment["LM_API_KEY"] is None
    drain = float(environment["LM_SHUTDOWN_TIMEOUT"])
    assert drain == Settings().shutdown_timeout  # the server's default, stated
    assert _duration_seconds(server["stop_grace_period"]) >= drain + 5


def test_compose_images_are_pinned_to_real_version_tags(compose):
    pulled = {name: s["image"] for name, s in compose["services"].items() if "build" not in s}
    assert {"lb", "prometheus", "grafana", "locust", "locust-lb"} <= set(pulled)
    for name, image in pulled.items():
        repository, _, tag = image.partition(":")
        assert re.fullmatch(r"v?\d+\.\d+\.\d+(-alpine)?", tag), f"{name}: {image} is not pinned"
    assert {image.split(":")[0] for image in pulled.values()} == {
        "nginx",
        "prom/prometheus",
        "grafana/grafana",
        "locustio/locust",
    }


# -- deploy/ --------------------------------------------------------------------------------


def test_nginx_config_parses_with_the_upstream_on_loopback(tmp_path):
    binary = nginx_binary()
    if binary is None:
        pytest.skip("nginx is not installed (apt-get install nginx; .ci/run does it)")
    config = loopback_config(tmp_path, 18080, [18001, 18002])
    result = check_config(binary, tmp_path, config)
    assert result.returncode == 0, result.stderr
    assert "syntax is ok" in result.stderr


def _directives(text: str) -> list[str]:
    lines = (line.split("#")[0].strip() for line in text.splitlines())
    return [" ".join(line.rstrip(";").split()) for line in lines if line]


def test_nginx_config_balances_streams_unbuffered_and_retries_only_unsent_requests():
    directives = _directives((ROOT / "deploy" / "nginx.conf").read_text(encoding="utf-8"))
    assert "least_conn" in directives
    server = next(d for d in directives if d.startswith("server replica:8000"))
    assert "max_fails=" in server and "fail_timeout=" in server
    for needed in (
        "proxy_buffering off",
        "proxy_request_buffering off",
        "proxy_cache off",
        "proxy_http_version 1.1",
        'proxy_set_header Connection ""',
        "proxy_next_upstream error timeout",
    ):
        assert needed in directives
    assert not any("non_idempotent" in d for d in directives)  # a POST is never re-sent
    read_timeout = next(d for d in directives if d.startswith("proxy_read_timeout"))
    assert read_timeout.split()[1] in ("1h", "3600s", "3600")


def test_prometheus_scrapes_every_replica_by_dns():
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text(encoding="utf-8"))
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "lm")
    assert job["metrics_path"] == "/metrics"
    assert job["dns_sd_configs"] == [
        {"names": ["replica"], "type": "A", "port": 8000, "refresh_interval": "10s"}
    ]
    assert job["authorization"]["credentials_file"]  # works with LM_API_KEY set


def test_grafana_provisions_prometheus_and_a_dashboard_of_the_vllm_metrics():
    grafana = ROOT / "deploy" / "grafana"
    source = yaml.safe_load((grafana / "provisioning/datasources/prometheus.yml").read_text())
    datasource = source["datasources"][0]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((grafana / "provisioning/dashboards/lm.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/etc/grafana/dashboards"
    dashboard = json.loads((grafana / "dashboards" / "lm.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for metric in (
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:inter_token_latency_seconds_bucket",
        "vllm:e2e_request_latency_seconds_bucket",
        "vllm:request_queue_time_seconds_bucket",
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:generation_tokens_total",
        "vllm:prompt_tokens_total",
        "vllm:request_success_total",
        "vllm:prefix_cache_hits_total",
        "vllm:prefix_cache_queries_total",
        'up{job="lm"}',
    ):
        assert metric in exprs
    assert all(p["datasource"]["uid"] == datasource["uid"] for p in dashboard["panels"])
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for word in ("first token", "inter-token", "tokens/s", "running", "waiting", "errors"):
        assert word in titles


# -- Dockerfile -----------------------------------------------------------------------------


def test_dockerfile_installs_the_project_and_serves_it_as_non_root():
    steps = _instructions(ROOT / "Dockerfile")
    keywords = [k for k, _ in steps]
    assert steps[0] == ("FROM", "python:3.11-slim")
    assert ("WORKDIR", "/app") in steps
    runs = [arg for k, arg in steps if k == "RUN"]
    # The README's install: torch==2.13.0, then the project.
    torch_step = next(i for i, arg in enumerate(runs) if "torch==" in arg)
    assert 'pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"' in runs[torch_step]
    assert ("ARG", "TORCH_VERSION=2.13.0") in steps
    assert runs[-1] == "pip install -e ."
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


def test_dockerfile_installs_dependencies_before_copying_the_source():
    steps = _instructions(ROOT / "Dockerfile")
    copies = [i for i, (k, _) in enumerate(steps) if k == "COPY"]
    source = next(i for i in copies if steps[i][1] == ". .")
    assert steps[copies[0]][1] == "pyproject.toml ./"  # only the dependency list first
    before = " ".join(arg for k, arg in steps[:source] if k == "RUN")
    assert "torch==" in before and "pip install -r" in before and "project" in before
    after = [arg for k, arg in steps[source:] if k == "RUN"]
    assert after == ["pip install -e ."]  # a code change rebuilds only this layer


def test_dockerignore_keeps_environments_and_training_state_out():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
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
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, str(default_locustfile())],
        capture_output=True,
        text=True,
        timeout=60,
    )
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


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--run-time", "soon"], "--run-time"),
        (["--run-time", "0s"], "--run-time"),
        (["--run-time", "5x"], "--run-time"),
        (["--users", "0"], "--users"),
        (["--spawn-rate", "0"], "--spawn-rate"),
        (["--host", "127.0.0.1:8000"], "--host"),
    ],
)
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


_HEADER = [
    "Type",
    "Name",
    "Request Count",
    "Failure Count",
    "Median Response Time",
    "Average Response Time",
    "Min Response Time",
    "Max Response Time",
    "Average Content Size",
    "Requests/s",
    "Failures/s",
    "50%",
    "66%",
    "75%",
    "80%",
    "90%",
    "95%",
    "98%",
    "99%",
    "99.9%",
    "99.99%",
    "100%",
]


@pytest.mark.parametrize("failures, status", [(0, 0), (3, 1)])
def test_loadtest_runs_locust_headless_and_summarises_its_csv(
    failures, status, tmp_path, monkeypatch, capsys
):
    calls = []

    def fake_run(command, env):
        calls.append((command, env))
        prefix = command[command.index("--csv") + 1]
        with open(f"{prefix}_stats.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(_HEADER)
            writer.writerow(
                ["GET", "/health", 10, 0, 2, 2, 1, 5, 40, 1.0, 0.0, 2, *[3] * 6, 5, 5, 5, 5]
            )
            writer.writerow(
                [
                    "POST",
                    "/v1/completions short",
                    90,
                    failures,
                    40,
                    45,
                    10,
                    300,
                    500,
                    9.0,
                    0.0,
                    40,
                    *[50] * 6,
                    250,
                    300,
                    300,
                    300,
                ]
            )
            writer.writerow(
                [
                    "",
                    "Aggregated",
                    100,
                    failures,
                    38,
                    40,
                    1,
                    300,
                    450,
                    10.0,
                    0.0,
                    38,
                    *[50] * 6,
                    250,
                    300,
                    300,
                    300,
                ]
            )
        return subprocess.CompletedProcess(command, 1 if failures else 0)

    monkeypatch.setattr(loadtest_command, "_locust_available", lambda: True)
    monkeypatch.setattr(loadtest_command, "_check_server", lambda host: None)
    monkeypatch.setattr(subprocess, "run", fake_run)
    out = tmp_path / "load"
    code = cli.main(
        [
            "loadtest",
            "--host",
            "http://h:9/",
            "--users",
            "7",
            "--spawn-rate",
            "3",
            "--run-time",
            "2m",
            "--out",
            str(out),
            "--model",
            "m1",
        ]
    )
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
