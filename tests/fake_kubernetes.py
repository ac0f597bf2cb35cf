"""Run the snakemake CLI with the Kubernetes client replaced by a recorder (there is no cluster).

    python tests/fake_kubernetes.py RECORD.jsonl <snakemake arguments...>

snakemake-executor-plugin-kubernetes builds the real `V1Job` body and calls
`BatchV1Api.create_namespaced_job`; here that call appends the body, serialized exactly as the
client would send it to the API server, as one JSON line to RECORD.jsonl. Every job then reports
`failed`, so Snakemake retries it (with the memory of the next attempt) and finally stops: nothing
runs in a pod. The Secret the plugin creates for `envvars` is recorded by its key names only, and
the workflow source archive a pod would deploy by its member names (fetched from the default
storage with boto3's usual configuration, i.e. AWS_* variables).
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import sys
import tarfile
from types import SimpleNamespace

import boto3
import kubernetes.client
import kubernetes.config

RECORD = sys.argv[1]


def _record(kind: str, obj: dict) -> None:
    with open(RECORD, "a") as f:
        f.write(json.dumps({"kind": kind, "object": obj}) + "\n")


def _record_sources(script: str) -> None:
    """What a pod's `snakemake --deploy-sources QUERY CHECKSUM` would unpack: the member names of
    the source archive (Snakemake deletes it from storage when the run ends)."""
    m = re.search(r"--deploy-sources s3://([^/\s]+)/(\S+) (\w+)", script)
    if not m:
        return
    data = boto3.client("s3").get_object(Bucket=m.group(1), Key=m.group(2))["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:xz") as tar:
        names = sorted(tar.getnames())
    _record("Sources", {"query": f"s3://{m.group(1)}/{m.group(2)}", "sha256_ok":
                        hashlib.sha256(data).hexdigest() == m.group(3), "names": names})


class FakeCoreV1Api:
    def __init__(self, *args, **kwargs):
        pass

    def create_namespaced_secret(self, namespace, body):
        _record("Secret", {"namespace": namespace, "name": body.metadata.name, "keys": sorted(body.data)})
        return body

    def delete_namespaced_secret(self, name, namespace, body=None):
        _record("DeleteSecret", {"namespace": namespace, "name": name})

    def list_namespaced_pod(self, namespace, label_selector=None):
        return SimpleNamespace(items=[])

    def delete_namespaced_pod(self, *args, **kwargs):
        pass

    def read_namespaced_pod_log(self, *args, **kwargs):
        return ""


class FakeBatchV1Api:
    def __init__(self, *args, **kwargs):
        pass

    def create_namespaced_job(self, namespace, body):
        api = kubernetes.client.ApiClient()
        _record("Job", {"namespace": namespace, "body": api.sanitize_for_serialization(body)})
        _record_sources(body.spec.template.spec.containers[0].args[-1])
        return SimpleNamespace(metadata=body.metadata)

    def read_namespaced_job_status(self, name, namespace):
        return SimpleNamespace(status=SimpleNamespace(failed=1, succeeded=None))

    def delete_namespaced_job(self, *args, **kwargs):
        pass


kubernetes.config.load_kube_config = lambda *args, **kwargs: None
kubernetes.config.load_incluster_config = lambda *args, **kwargs: None
kubernetes.client.CoreV1Api = FakeCoreV1Api
kubernetes.client.BatchV1Api = FakeBatchV1Api

if __name__ == "__main__":
    from snakemake.cli import main

    sys.argv = ["snakemake"] + sys.argv[2:]
    main()
