"""The agent on the oldest Python it promises (``requires-python >= 3.9``), run for real.

The suite itself runs on the project's newer Python; a Raspberry Pi's may be older. So the
agent is started here by a Python 3.9 interpreter when the machine has one (on PATH as
``python3.9``, or under pyenv), with only its two required dependencies beside it:
paho-mqtt and PyYAML, both pure Python (PyYAML without its C speed-up, as on a Pi that
lacks libyaml). Every module of the agent must also compile there, the optional
collectors' too.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from pathlib import Path

import paho
import pytest
import yaml

from tests.agent.conftest import AgentProcess, Recorder, agent_config, wait_until
from tests.support.servers import ServerProcess

pytestmark = pytest.mark.integration

AGENT_SRC = Path(__file__).resolve().parents[2] / "edge-agent" / "src"


def python39() -> str | None:
    """A working Python 3.9: pyenv's, else ``python3.9`` on PATH (a pyenv shim there
    may name a version it will not run, so each is asked)."""
    root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates = sorted(glob.glob(f"{root}/versions/3.9.*/bin/python3.9"), reverse=True)
    candidates += [found] if (found := shutil.which("python3.9")) else []
    for exe in candidates:
        asked = subprocess.run(
            [exe, "-c", "import sys; print(sys.version_info[:2] == (3, 9))"],
            capture_output=True,
            text=True,
        )
        if asked.returncode == 0 and asked.stdout.strip() == "True":
            return exe
    return None


@pytest.fixture
def py39(tmp_path: Path) -> tuple[str, dict[str, str]]:
    """The interpreter and an environment whose path holds the agent and its two
    dependencies, nothing else of this suite's virtualenv."""
    exe = python39()
    if exe is None:
        pytest.skip("no Python 3.9 here (python3.9 on PATH or under pyenv)")
    deps = tmp_path / "deps"
    deps.mkdir()
    for module in (paho, yaml):
        package = Path(module.__path__[0])
        (deps / package.name).symlink_to(package)
    env = {**os.environ, "PYTHONPATH": f"{deps}{os.pathsep}{AGENT_SRC}", "PYTHONNOUSERSITE": "1"}
    return exe, env


def test_every_agent_module_compiles_on_python_39(py39: tuple[str, dict[str, str]]) -> None:
    exe, env = py39
    code = (
        "import compileall, sys; "
        f"sys.exit(0 if compileall.compile_dir({str(AGENT_SRC)!r}, quiet=1, legacy=False) "
        "else 1)"
    )
    # The byte code goes to a throwaway place, not beside the sources.
    env = {**env, "PYTHONPYCACHEPREFIX": env["PYTHONPATH"].split(os.pathsep)[0] + "-pycache"}
    done = subprocess.run([exe, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_agent_runs_and_streams_on_python_39(
    tmp_path: Path,
    py39: tuple[str, dict[str, str]],
    mosquitto: ServerProcess,
    recorder: Recorder,
    agents: list[AgentProcess],
) -> None:
    exe, env = py39
    version = subprocess.run(
        [exe, "-c", "import sys, yaml; print(sys.version_info[:2], yaml.__with_libyaml__)"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert version == "(3, 9) False"
    agent = AgentProcess(
        tmp_path, agent_config(tmp_path, f"mqtt://127.0.0.1:{mosquitto.port}"), env=env
    )
    agent.python = exe
    check = subprocess.run(
        [exe, "-m", "millstream_agent.cli", "check-config", str(agent.config_path)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    agents.append(agent.start())
    wait_until(lambda: len(recorder.telemetry().get("press-01", [])) >= 3, timeout=30)
    assert agent.stop() == 0, agent.log()
    readings = [r for m in recorder.telemetry()["press-01"] for r in m["readings"]]
    assert len({r["metric"] for r in readings}) == 10
    assert "Traceback" not in agent.log()
