"""profiles/kubernetes without a cluster: the profile plans, the image installs what the README
installs, and the job specs the kubernetes plugin builds ask for what the plan says.

There is no Kubernetes here. `snakemake -n` needs none. For the job specs, tests/fake_kubernetes.py
replaces the kubernetes client with a recorder: the plugin (0.5.1, unmodified) builds its real
V1Job bodies, which are recorded; every job then reports `failed`, so nothing runs in a pod.
Markers, logs and the workflow sources go to the default storage provider (S3) on a moto server.
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cloudvolume import CloudVolume

from conftest import REPO, image_data, seg_data
from s3server import S3Server, running_server

from magma import workflow
from magma.errors import MagmaError

PROFILE_DIR = REPO / "profiles" / "kubernetes"
PROFILE = yaml.safe_load((PROFILE_DIR / "config.yaml").read_text())
BUCKET = "magma-k8s"
PREFIX = f"s3://{BUCKET}/magma"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    yield from running_server(tmp_path_factory.mktemp("s3"), (BUCKET,))


def k8s_env(s3: S3Server, tmp_path: Path) -> dict:
    """What a user exports before `snakemake --profile profiles/kubernetes` (the profile's envvars),
    pointed at the moto server; KUBECONFIG points nowhere: no cluster configuration exists."""
    env = s3.env()
    env.update(AWS_ACCESS_KEY_ID=s3.access_key, AWS_SECRET_ACCESS_KEY=s3.secret_key, AWS_SESSION_TOKEN="",
               KUBECONFIG=str(tmp_path / "no-kubeconfig"))
    assert set(PROFILE["envvars"]) <= set(env)
    return env


def checkout(tmp_path: Path, cfg: dict) -> Path:
    """A directory laid out like the repository (workflow/ and config/), which is where snakemake
    must be started for Kubernetes: the plugin ships only sources below the working directory."""
    root = tmp_path / "checkout"
    shutil.copytree(REPO / "workflow", root / "workflow", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "config").mkdir()
    (root / "config" / "k.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return root


def make_s3_layers(s3: S3Server, shape=(128, 128, 64)) -> dict:
    paths = {"img": f"s3://{BUCKET}/layers/img", "seg": f"s3://{BUCKET}/layers/seg",
             "seg_copy": f"s3://{BUCKET}/layers/seg_copy"}
    infos = {}
    with s3.in_process():
        for name, data, kind in (("img", image_data(shape, 1), "image"), ("seg", seg_data(shape, 2), "segmentation")):
            info = CloudVolume.create_new_info(1, kind, str(data.dtype), "raw", [8, 8, 40], [0, 0, 0], list(shape),
                                               chunk_size=[64, 64, 32])
            vol = CloudVolume(paths[name], info=info, progress=False, secrets=s3.secrets_dict())
            vol.commit_info()
            vol[:, :, :] = data
            infos[name] = info
    return paths, infos


def small_config(paths: dict) -> dict:
    # two independent steps with different threads and memory
    return {
        "layers": paths,
        "steps": {
            "pyr": {"op": "downsample", "layer": "img", "num_mips": 1, "memory_target": 1.0e6},
            "copy": {"op": "transfer", "src": "seg", "dest": "seg_copy", "chunk_size": [64, 64, 16],
                     "memory_target": 4.0e6},
        },
        "execution": {"threads": 3, "retries": 1, "steps": {"copy": {"threads": 1, "mem_mb": 1500}}},
    }


# ---- the profile --------------------------------------------------------------------------------
def test_profile_settings():
    assert PROFILE["executor"] == "kubernetes"
    assert PROFILE["default-storage-provider"] == "s3"
    assert re.fullmatch(r"s3://[A-Z]+/magma", PROFILE["default-storage-prefix"]), "placeholder bucket"
    assert PROFILE["container-image"].split(":")[0].endswith("/magma")
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"} <= set(PROFILE["envvars"])
    # resources come from the rules, not from the profile
    assert not {"default-resources", "set-resources", "set-threads"} & set(PROFILE)


def test_profile_plans_without_a_cluster(s3, tmp_path):
    paths, _ = make_s3_layers(s3)
    root = checkout(tmp_path, small_config(paths))
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--profile", str(PROFILE_DIR), "--configfile", "config/k.yaml",
         "--default-storage-prefix", PREFIX],
        cwd=root, capture_output=True, text=True, env=k8s_env(s3, tmp_path), timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert re.search(rf"Using profiles? {re.escape(str(PROFILE_DIR))}\b", out), out[:2000]
    assert "magma plan (results/k)" in out
    assert f"{PREFIX}/results/k/markers/pyr/jobs/mip0-1/0.json" in out, "markers go to the default storage"
    stats = dict(re.findall(r"^(\w+)\s+(\d+)$", proc.stdout, re.M))
    assert stats["downsample"] == "1" and stats["transfer"] == "1" and stats["setup"] == "2"
    assert s3.secret_key not in out
    assert not s3.keys(BUCKET, "magma/"), "a dry run stores nothing"


def test_profile_requires_its_envvars(s3, tmp_path):
    """Without the credentials the pods will need, even a dry run stops and names them."""
    paths, _ = make_s3_layers(s3)
    root = checkout(tmp_path, small_config(paths))
    env = {k: v for k, v in k8s_env(s3, tmp_path).items() if k not in PROFILE["envvars"]}
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--profile", str(PROFILE_DIR), "--configfile", "config/k.yaml",
         "--default-storage-prefix", PREFIX],
        cwd=root, capture_output=True, text=True, env=env, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "environment variables are requested by the workflow but undefined" in out, out[-3000:]
    for var in PROFILE["envvars"]:
        assert var in out


# ---- the image ----------------------------------------------------------------------------------
def _commands(shell: str) -> list[str]:
    return [c.strip() for c in shell.split("&&") if c.strip()]


def _readme_install_commands() -> dict:
    """The README's demo and test one-liners, each split into its commands (all but the last run
    the installation)."""
    text = (REPO / "README.md").read_text()
    lines = [line.strip() for line in text.splitlines() if "pip install -r requirements.lock" in line]
    out = {}
    for line in lines:
        cmds = _commands(line)
        out[cmds[-1]] = cmds[:-1]
    return out


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = (PROFILE_DIR / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_installs_the_readme_environment():
    readme = _readme_install_commands()
    assert set(readme) == {"snakemake --cores all", "python -m pytest -q -n 2 tests"}, readme
    install = readme["snakemake --cores all"]
    # demo and tests: one Python environment (the tests also install their servers: SLURM)
    servers = "bash scripts/install-test-servers.sh"
    assert readme["python -m pytest -q -n 2 tests"] == [servers] + install

    instr = _dockerfile_instructions()
    run_cmds = [c for kind, arg in instr if kind == "RUN" for c in _commands(arg)]
    activate = ". .venv/bin/activate"
    # the same commands, in the same order (activating the venv again in a later RUN is a no-op)
    assert [c for c in run_cmds if c != activate] == [c for c in install if c != activate]
    for kind, arg in instr:  # every pip runs inside the venv
        if kind == "RUN" and "pip " in arg:
            assert _commands(arg)[0] in (activate, "python3 -m venv .venv") and activate in _commands(arg)

    base = next(arg for kind, arg in instr if kind == "FROM")
    assert base.startswith(f"python:{sys.version_info.major}.{sys.version_info.minor}-"), \
        "the base image's Python must be the one requirements.lock was resolved with"
    workdir = next(arg for kind, arg in instr if kind == "WORKDIR")
    copies = [arg.split() for kind, arg in instr if kind == "COPY"]
    assert ["requirements.lock", "./"] in copies and [".", "."] in copies
    assert copies.index(["requirements.lock", "./"]) < copies.index([".", "."])
    env = " ".join(arg for kind, arg in instr if kind == "ENV")
    assert f"PATH={workdir}/.venv/bin:$PATH" in env, "pods run `python -m snakemake` and `pip` from PATH"

    ignore = (PROFILE_DIR / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", ".git", "results", ".snakemake"} <= set(ignore)
    lock = (REPO / "requirements.lock").read_text()
    for pkg in ("snakemake-executor-plugin-kubernetes==", "snakemake-storage-plugin-s3==", "cloud_volume=="):
        assert pkg in lock.replace("cloud-volume==", "cloud_volume==")


# ---- the job specs ------------------------------------------------------------------------------
def test_job_specs_request_plan_resources(s3, tmp_path):
    paths, infos = make_s3_layers(s3)
    cfg = small_config(paths)
    root = checkout(tmp_path, cfg)
    record = tmp_path / "k8s.jsonl"
    env = k8s_env(s3, tmp_path)
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("fake_kubernetes.py")), str(record),
         "--profile", str(PROFILE_DIR), "--configfile", "config/k.yaml", "--default-storage-prefix", PREFIX,
         "--seconds-between-status-checks", "1", "--keep-going"],
        cwd=root, capture_output=True, text=True, env=env, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, "every fake pod fails, so the run must fail"
    assert record.exists(), out[-5000:]
    events = [json.loads(line) for line in record.read_text().splitlines()]
    jobs = [e["object"]["body"] for e in events if e["kind"] == "Job"]

    def read_info(name, path):  # the infos as they were when the run planned (seg_copy not made yet)
        if name not in infos:
            raise MagmaError(f"layer '{name}': no info file")
        return infos[name]

    plan = workflow.plan(cfg, read_info=read_info)
    scalar = float(PROFILE["kubernetes-cpu-scalar"])
    seen = set()
    for body in jobs:
        container = body["spec"]["template"]["spec"]["containers"][0]
        script = container["args"][1]
        target = re.search(r"--target-jobs '(\w+):step=(\w+),stage=([\w-]+),job=(\d+)'", script)
        attempt = int(re.search(r"--attempt (\d+)", script).group(1))
        rule, step = target.group(1), target.group(2)
        sp = plan.steps[step]
        assert rule == sp.op, "only batch jobs go to pods"
        requests = container["resources"]["requests"]
        assert requests["cpu"] == f"{int(sp.threads * scalar * 1000)}m"
        if scalar == 1.0:
            assert requests["cpu"] == f"{sp.threads * 1000}m"
        assert requests["memory"] == f"{sp.mem_mb * attempt}M", "mem_mb, times the attempt"
        assert container["image"] == PROFILE["container-image"]
        # the pod runs the deployed sources from the repository layout, with the config
        assert "--snakefile 'workflow/Snakefile'" in script and "--configfiles 'config/k.yaml'" in script
        assert f"--default-storage-prefix '{PREFIX}'" in script
        seen.add((step, attempt))
    assert plan.steps["pyr"].threads == 3 and plan.steps["copy"].threads == 1
    assert plan.steps["copy"].mem_mb == 1500
    assert seen == {("pyr", 1), ("pyr", 2), ("copy", 1), ("copy", 2)}, out[-5000:]

    # credentials: in the Secret the plugin creates, referenced by the pods, never written out
    secret = next(e["object"] for e in events if e["kind"] == "Secret")
    assert {"aws_access_key_id", "aws_secret_access_key", "aws_session_token"} <= set(secret["keys"])
    for body in jobs:
        env_refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in body["spec"]["template"]["spec"]
                    ["containers"][0]["env"]}
        assert env_refs["AWS_SECRET_ACCESS_KEY"] == {"key": "aws_secret_access_key", "name": secret["name"]}
    assert any(e["kind"] == "DeleteSecret" for e in events), "the run's Secret is removed at the end"
    for value in (s3.access_key, s3.secret_key):
        assert value not in record.read_text() and value not in out
        for f in root.rglob("*"):
            if f.is_file():
                assert value.encode() not in f.read_bytes(), f"credential found in {f}"

    # the local rules ran here and stored their markers and logs in the default storage
    stored = s3.keys(BUCKET, "magma/")
    assert {"magma/results/k/markers/pyr/setup.json", "magma/results/k/markers/copy/setup.json",
            "magma/results/k/logs/pyr/setup.log"} <= set(stored)
    # the workflow sources the pods deploy: everything the workflow needs, nothing left out
    assert "Ignoring source file" not in out
    sources = [e["object"] for e in events if e["kind"] == "Sources"]
    assert sources and all(src["sha256_ok"] for src in sources)
    names = set(sources[0]["names"])
    assert {"workflow/Snakefile", "workflow/rules/common.smk", "workflow/rules/steps.smk",
            "workflow/rules/report.smk", "config/k.yaml"} <= names, names
    assert not [k for k in stored if "workflow-sources" in k], "Snakemake removes the archive at the end"
    # plugin 0.5.1 pip-installs the storage plugin in every pod before anything else (docs/kubernetes.md:
    # pods need PyPI); the image's pinned copy stays first on sys.path
    for body in jobs:
        first = body["spec"]["template"]["spec"]["containers"][0]["args"][1].split(" && ")[0]
        assert shlex.split(first) == ["pip", "install", "--target", ".snakemake/pip-deployments",
                                      "snakemake-storage-plugin-s3"]
