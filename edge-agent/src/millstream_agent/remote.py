"""Remote configuration (``config/desired`` → ``config/reported``) and commands.

``config/desired`` carries ``{"v":1,"revision":N,"config":{...}}`` where ``config`` is the
whole *remote layer*: the sections in :data:`~millstream_agent.config.REMOTE_SECTIONS`
(``batch``, ``collectors``, ``self_monitoring``) laid over the local file. A valid revision
newer than the applied one is applied, persisted (so it survives restarts) and reported
``accepted``; an invalid one is reported ``rejected`` with the reason and changes nothing.

Commands arrive on ``cmd/<name>`` as ``{"v":1,"id":..,"args"?}`` and are answered on
``cmd/<name>/result`` with ``{"v":1,"id":..,"ok":..,"result"?|"error"?}``.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from typing import Any, Callable, Optional

from millstream_agent import protocol
from millstream_agent.config import AgentConfig, ConfigError, merge_remote

log = logging.getLogger("millstream.remote")

Handler = Callable[[dict[str, Any]], tuple[bool, Any]]


class RemoteState:
    """The accepted remote layer on disk (JSON, replaced atomically)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def load(self) -> Optional[dict[str, Any]]:
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable remote config %s: %s", self.path, exc)
            return None
        if not isinstance(data, dict) or not isinstance(data.get("revision"), int):
            return None
        return data

    def save(self, revision: int, config: dict[str, Any]) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".remote-config.", dir=directory)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"revision": revision, "config": config}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


class Remote:
    """Handles one device's config/desired and cmd/<name> messages."""

    def __init__(
        self,
        base: AgentConfig,
        state: RemoteState,
        apply: Callable[[AgentConfig], None],
        publish: Callable[[str, bytes, bool], None],
        commands: dict[str, Handler],
    ) -> None:
        self.base = base
        self.state = state
        self.apply = apply
        self.publish = publish
        self.commands = commands
        self.revision = 0
        self.remote_config: Optional[dict[str, Any]] = None
        self._last_report: Optional[bytes] = None

    def restore(self) -> AgentConfig:
        """The configuration to start with: the file, plus the persisted remote layer."""
        saved = self.state.load()
        if saved is None:
            return self.base
        try:
            merged = merge_remote(self.base, saved.get("config") or {})
        except ConfigError as exc:
            log.warning(
                "persisted remote config revision %s no longer valid, ignored: %s",
                saved.get("revision"),
                exc,
            )
            return self.base
        self.revision = int(saved["revision"])
        self.remote_config = saved.get("config") or {}
        log.info("applying persisted remote config revision %d", self.revision)
        return merged

    def on_message(self, channel: str, payload: bytes) -> None:
        if channel == "config/desired":
            self._desired(payload)
        elif channel.startswith("cmd/") and not channel.endswith("/result"):
            self._command(channel[4:], payload)

    # config ---------------------------------------------------------------
    def _report(
        self,
        revision: int,
        status: str,
        reason: Optional[str] = None,
        config: Optional[dict[str, Any]] = None,
    ) -> None:
        payload = protocol.encode_config_reported(revision, status, reason, config, ts=time.time())
        self.publish("config/reported", payload, True)

    def _desired(self, payload: bytes) -> None:
        if not payload:
            return  # retained message cleared
        try:
            doc = json.loads(payload)
        except ValueError as exc:
            log.warning("config/desired is not JSON: %s", exc)
            self._report(self.revision, "rejected", f"not JSON: {exc}")
            return
        revision = doc.get("revision") if isinstance(doc, dict) else None
        if (
            not isinstance(doc, dict)
            or doc.get("v") != protocol.VERSION
            or not isinstance(revision, int)
            or isinstance(revision, bool)
            or revision < 1
            or not isinstance(doc.get("config"), dict)
        ):
            reason = 'expected {"v":1,"revision":N>=1,"config":{...}}'
            log.warning("config/desired rejected: %s", reason)
            self._report(
                revision if isinstance(revision, int) and revision >= 0 else 0, "rejected", reason
            )
            return
        if revision == self.revision and doc["config"] == self.remote_config:
            self._report(revision, "accepted", config=self.remote_config)
            return  # retained copy delivered again after a reconnect
        if revision <= self.revision:
            log.info(
                "config/desired revision %d ignored: revision %d is applied",
                revision,
                self.revision,
            )
            self._report(revision, "rejected", f"stale revision; {self.revision} is applied")
            return
        try:
            merged = merge_remote(self.base, doc["config"])
        except ConfigError as exc:
            reason = "; ".join(exc.errors)
            log.warning("config/desired revision %d rejected: %s", revision, reason)
            self._report(revision, "rejected", reason)
            return
        try:
            self.apply(merged)
        except Exception as exc:
            log.exception("applying config/desired revision %d failed", revision)
            self._report(revision, "rejected", f"apply failed: {exc}")
            return
        self.revision = revision
        self.remote_config = doc["config"]
        try:
            self.state.save(revision, doc["config"])
        except OSError as exc:
            log.error("could not persist remote config to %s: %s", self.state.path, exc)
        log.info("config/desired revision %d applied", revision)
        self._report(revision, "accepted", config=doc["config"])

    # commands ---------------------------------------------------------------
    def _command(self, name: str, payload: bytes) -> None:
        try:
            doc = json.loads(payload)
        except ValueError:
            log.warning("cmd/%s: payload is not JSON; ignored", name)
            return
        cid = doc.get("id") if isinstance(doc, dict) else None
        if not isinstance(cid, str) or not cid or len(cid) > 64:
            log.warning("cmd/%s: no valid id; ignored", name)
            return
        args = doc.get("args") or {}
        ok: bool
        result: Any = None
        error: Optional[str] = None
        if doc.get("v") != protocol.VERSION or not isinstance(args, dict):
            ok, error = False, 'expected {"v":1,"id":"...","args":{...}}'
        elif name not in self.commands:
            ok, error = (
                False,
                f"unknown command {name!r}; known: {', '.join(sorted(self.commands))}",
            )
        else:
            try:
                ok, out = self.commands[name](args)
            except Exception as exc:
                log.exception("cmd/%s failed", name)
                ok, out = False, f"failed: {exc}"
            if ok:
                result = out
            else:
                error = str(out)
        log.info("cmd/%s id=%s ok=%s%s", name, cid, ok, f" error={error}" if error else "")
        self.publish(
            f"cmd/{name}/result", protocol.encode_command_result(cid, ok, result, error), False
        )
