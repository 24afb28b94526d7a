"""A real InfluxDB 1.x (Debian's ``influxdb`` package) on free loopback ports, for tests.

Every directory lives under the test's temporary directory and every listener gets its
own free port (HTTP, the RPC/backup bind address), so parallel runs never collide. The
server is stopped by PID at teardown, like the other fixtures in ``servers.py``.
"""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tests.support.servers import ServerProcess, find_binary, free_port

CONFIG = """\
reporting-disabled = true
bind-address = "127.0.0.1:{rpc_port}"

[meta]
  dir = "{workdir}/meta"
  logging-enabled = false

[data]
  dir = "{workdir}/data"
  wal-dir = "{workdir}/wal"
  query-log-enabled = false
  wal-fsync-delay = "0s"
  index-version = "inmem"
  trace-logging-enabled = false

[coordinator]
  log-queries-after = "0s"

[retention]
  enabled = false

[monitor]
  store-enabled = false

[subscriber]
  enabled = false

[http]
  enabled = true
  bind-address = "127.0.0.1:{http_port}"
  auth-enabled = {auth}
  log-enabled = false
  max-body-size = 0
  flux-enabled = false

[logging]
  level = "warn"

[continuous_queries]
  enabled = false

[[graphite]]
  enabled = false
[[collectd]]
  enabled = false
[[opentsdb]]
  enabled = false
[[udp]]
  enabled = false
"""


@dataclass
class InfluxDBServer(ServerProcess):
    """``ServerProcess`` plus the HTTP URL and a small InfluxQL helper for assertions."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def influxql(self, statement: str, db: str | None = None) -> dict[str, object]:
        params = {"q": statement, "epoch": "ns"}
        if db:
            params["db"] = db
        req = urllib.request.Request(
            f"{self.url}/query", data=urllib.parse.urlencode(params).encode(), method="POST"
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())  # type: ignore[no-any-return]


def influxdb_available() -> bool:
    return find_binary("influxd") is not None


def influxdb_server(workdir: Path, port: int | None = None, auth: bool = False) -> InfluxDBServer:
    """An InfluxDB 1.x configured for tests in ``workdir``; not started."""
    binary = find_binary("influxd")
    if binary is None:
        raise RuntimeError("influxd not found: apt-get install influxdb")
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "influxdb.conf"
    conf.write_text(
        CONFIG.format(
            workdir=workdir, http_port=port, rpc_port=free_port(), auth="true" if auth else "false"
        )
    )
    return InfluxDBServer(
        [binary, "-config", str(conf)],
        port,
        workdir,
        workdir / "influxd.log",
        env={"INFLUXDB_DATA_QUERY_LOG_ENABLED": "false"},
    )
