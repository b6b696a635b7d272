"""deploy/nginx.conf rewritten to run unprivileged in a temporary prefix on loopback ports."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "deploy" / "nginx.conf"
_SERVER = re.compile(r"^(\s*)server\s+replica:8000\b([^;]*);", re.MULTILINE)


def nginx_binary() -> str | None:
    """Debian's nginx (`.ci/run` installs it), or None."""
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).is_file()), None
    )


def loopback_config(prefix: Path, listen_port: int, upstream_ports: list[int]) -> Path:
    """The shipped config with its upstream and listener on 127.0.0.1, every path in prefix."""
    text = SHIPPED.read_text(encoding="utf-8")
    match = _SERVER.search(text)
    assert match, "deploy/nginx.conf has no `server replica:8000 ...;` upstream line"
    indent, params = match.group(1), match.group(2).replace(" resolve", "")
    servers = "\n".join(f"{indent}server 127.0.0.1:{port}{params};" for port in upstream_ports)
    text = _SERVER.sub(lambda _: servers, text, count=1)
    text, listens = re.subn(r"listen\s+8080;", f"listen 127.0.0.1:{listen_port};", text)
    assert listens == 1, "deploy/nginx.conf should listen on 8080 exactly once"
    text = re.sub(r"worker_processes\s+\w+;", "worker_processes 1;", text)
    text = text.replace("/dev/stdout", str(prefix / "access.log"))
    temp_paths = "".join(
        f"\n    {kind}_temp_path {prefix / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    text = text.replace("http {", "http {" + temp_paths, 1)
    path = prefix / "nginx.conf"
    path.write_text(text, encoding="utf-8")
    return path


def nginx_command(binary: str, prefix: Path, config: Path, *extra: str) -> list[str]:
    """Arguments for nginx on that config: foreground, pid and error log in prefix."""
    return [
        binary,
        "-p",
        str(prefix),
        "-c",
        str(config),
        "-e",
        str(prefix / "error.log"),
        "-g",
        f"daemon off; pid {prefix / 'nginx.pid'};",
        *extra,
    ]


def check_config(binary: str, prefix: Path, config: Path) -> subprocess.CompletedProcess:
    """`nginx -t` on config: return code 0 and 'syntax is ok' when it parses."""
    return subprocess.run(
        nginx_command(binary, prefix, config, "-t"), capture_output=True, text=True, timeout=30
    )
