"""Security: no config value reaches a shell, magma writes only where the user said (the working
directory and the layers), and credentials never appear in anything magma writes or prints."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from cloudfiles import CloudFiles
from cloudvolume import CloudVolume

from conftest import REPO, SNAKEFILE, image_data, make_layer, read, snakemake, write_config
from flaky_proxy import FlakyProxy
from s3server import running_server

BUCKET = "magma-secrets"


# ---- no shell -----------------------------------------------------------------------------------
def test_no_rule_or_module_uses_a_shell():
    """Audit: no `shell:` rule or shell() call in the workflow; no shell=True, os.system or
    os.popen in magma. (The one gate rule that used `touch {output}` is Python now.)"""
    for f in [REPO / "workflow" / "Snakefile", *sorted((REPO / "workflow").rglob("*.smk"))]:
        code = "\n".join(line.split("#", 1)[0] for line in f.read_text().splitlines())
        assert not re.search(r"^\s*shell\s*:", code, re.M), f"{f}: a shell rule"
        assert "shell(" not in code, f"{f}: a shell() call"
    for f in sorted((REPO / "src" / "magma").rglob("*.py")) + sorted((REPO / "workflow").rglob("*.py")):
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = ast.unparse(node.func)
                assert name not in ("os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput"), \
                    f"{f}:{node.lineno}: {name}"
                for kw in node.keywords:
                    assert not (kw.arg == "shell" and ast.unparse(kw.value) != "False"), f"{f}:{node.lineno}: shell=True"


def test_shell_characters_in_config_values_are_just_characters(tmp_path, workdir):
    """Layer paths with quotes, `$(...)`, backticks and `;` are used as paths, never run."""
    weird = tmp_path / "it's $(touch PWNED); `touch PWNED2` & touch PWNED3"
    img = image_data((64, 64, 16), 4)
    src = make_layer(tmp_path / "src", img, "image", chunk=(32, 32, 16))
    cfg = {"layers": {"src": src, "dest": f"file://{weird}"},
           "steps": {"copy": {"op": "transfer", "src": "src", "dest": "dest", "chunk_size": [32, 32, 16]}},
           "execution": {"threads": 1}}
    snakemake(workdir, write_config(tmp_path / "x.yaml", cfg))
    assert np.array_equal(read(f"file://{weird}"), img)
    pwned = [p for p in Path(tmp_path).rglob("PWNED*")] + [p for p in Path.cwd().glob("PWNED*")]
    assert not pwned, pwned


# ---- writes stay where they were asked for ------------------------------------------------------
def test_run_writes_only_the_workdir_and_the_layers(tmp_path):
    """A run writes files only in its working directory (markers, logs, Snakemake's metadata) and
    its layers: none in the home directory, the current directory or beside them."""
    home, work, elsewhere = tmp_path / "home", tmp_path / "work", tmp_path / "cwd"
    for d in (home, work, elsewhere):
        d.mkdir()
    make_layer(tmp_path / "img", image_data((64, 64, 16), 2), "image", chunk=(32, 32, 16))
    cfg = {"layers": {"img": f"file://{tmp_path}/img", "copy": f"file://{tmp_path}/copy"},
           "steps": {"pyr": {"op": "downsample", "layer": "img", "num_mips": 1},
                     "copy": {"op": "transfer", "src": "img", "dest": "copy"}},
           "execution": {"threads": 1, "report": False}}
    cfgfile = write_config(tmp_path / "w.yaml", cfg)
    before = {p for p in tmp_path.rglob("*")}
    env = dict(os.environ, HOME=str(home), PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "-d", str(work), "--cores", "2",
                           "--configfile", str(cfgfile)], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    new = {p for p in tmp_path.rglob("*")} - before
    outside = [p for p in new if not any(p.is_relative_to(tmp_path / d) for d in ("work", "img", "copy"))]
    assert not [p for p in outside if p.is_file()], sorted(map(str, outside))
    # only the empty folders the libraries make in HOME: CloudVolume's and Snakemake's source cache
    assert all(p == home / ".cloudvolume" or p.is_relative_to(home / ".cache") for p in outside), outside
    assert (work / "results" / "w" / "markers" / "copy" / "done.json").exists()


# ---- credentials ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    yield from running_server(tmp_path_factory.mktemp("s3"), (BUCKET,))


def test_credentials_appear_nowhere(s3, tmp_path):
    """A run on S3 with a known fake secret in the CloudVolume secrets of a temporary HOME (the
    credentials used) and other fake AWS_* keys in the environment: a pipeline that succeeds, a
    step that fails on a missing chunk, one that fails on a storage error, the report and
    `magma plan`. Every file in the working directory, every object in the bucket and everything
    printed is searched for both secrets."""
    img = image_data((64, 64, 32), 9)
    with s3.in_process():
        for name in ("img", "holey", "flaky"):
            info = CloudVolume.create_new_info(1, "image", "uint8", "raw", [8, 8, 40], [0, 0, 0], [64, 64, 32],
                                               chunk_size=[32, 32, 16])
            vol = CloudVolume(f"s3://{BUCKET}/{name}", info=info, progress=False, secrets=s3.secrets_dict())
            vol.commit_info()
            vol[:, :, :] = img
        CloudFiles(f"s3://{BUCKET}/holey", secrets=s3.secrets_dict()).delete("8_8_40/32-64_0-32_0-16")
    env_secret = "magma-env-secret-" + os.urandom(9).hex()
    env_key = "AKIAMAGMAENV" + os.urandom(4).hex().upper()
    proxy = FlakyProxy(s3.url, always=f"/{BUCKET}/flaky/8_8_40/0-32_0-32_16-32").start()
    env = s3.env()
    env.update(AWS_ACCESS_KEY_ID=env_key, AWS_SECRET_ACCESS_KEY=env_secret, AWS_SESSION_TOKEN=env_secret + "-token",
               AWS_ENDPOINT_URL_S3=proxy.url, AWS_MAX_ATTEMPTS="1")
    layers = {n: f"s3://{BUCKET}/{n}" for n in ("img", "holey", "flaky", "copy", "copy2")}
    cfg = {"layers": layers,
           "steps": {"pyr": {"op": "downsample", "layer": "img", "num_mips": 1},
                     "copy": {"op": "transfer", "src": "img", "dest": "copy", "encoding": "raw"},
                     "holes": {"op": "downsample", "layer": "holey", "num_mips": 1},
                     "broken": {"op": "transfer", "src": "flaky", "dest": "copy2"}},
           "execution": {"threads": 1, "retries": 0, "storage_attempts": 2, "storage_first_wait": 0.01}}
    work = tmp_path / "work"
    work.mkdir()
    cfgfile = tmp_path / "s.yaml"
    cfgfile.write_text(yaml.safe_dump(cfg, sort_keys=False))
    base = [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "-d", str(work), "--cores", "2",
            "--configfile", str(cfgfile)]
    printed = []
    try:
        run = subprocess.run(base + ["--keep-going"], env=env, capture_output=True, text=True, timeout=600)
        printed += [run.stdout, run.stderr]
        assert run.returncode != 0, "the two broken steps fail"
        logs = "".join(p.read_text() for p in (work / "results").rglob("*.log"))
        assert "missing 1 chunk(s)" in logs and "still failing after 2 attempts" in logs, logs[-3000:]
        assert (work / "results" / "s" / "markers" / "copy" / "done.json").exists()
        rep = subprocess.run(base + ["--report", str(work / "report.zip")], env=env, capture_output=True, text=True,
                             timeout=600)
        printed += [rep.stdout, rep.stderr]
        plan = subprocess.run([sys.executable, "-m", "magma.cli", "plan", "--configfile", str(cfgfile)], env=env,
                              capture_output=True, text=True, timeout=120, cwd=work)
        printed += [plan.stdout, plan.stderr]
    finally:
        proxy.stop()

    secrets = [s3.secret_key, s3.access_key, env_secret, env_key]
    files = [p for p in work.rglob("*") if p.is_file()]
    assert len(files) > 20
    for value in secrets:
        needle = value.encode()
        for text in printed:
            assert value not in text, "a credential was printed"
        for f in files:
            data = f.read_bytes()
            assert needle not in data, f"a credential is in {f}"
            if f.suffix == ".zip":
                import zipfile

                with zipfile.ZipFile(f) as z:
                    for n in z.namelist():
                        assert needle not in z.read(n), f"a credential is in {f}:{n}"
        for key in s3.keys(BUCKET):
            body = s3.client().get_object(Bucket=BUCKET, Key=key)["Body"].read()
            assert needle not in body, f"a credential is in s3://{BUCKET}/{key}"
    with s3.in_process():  # provenance was written, so it was searched too
        prov = CloudFiles(layers["copy"], secrets=s3.secrets_dict()).get_json("provenance")
        assert prov["processing"][-1]["method"]["step"] == "copy"
