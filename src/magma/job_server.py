"""Local jobs start as forks of a server that has magma imported already.

Importing Python, NumPy and CloudVolume takes a second or two, and a local run has
many short jobs. The Snakemake process starts this server once per run with the
modules of the ops the plan runs; the server listens on a Unix socket and forks one
child per job, which runs the job and sends back its exit code. The server leaves
when the Snakemake process does (its stdin, a pipe from that process, closes).

(multiprocessing's forkserver does almost this, but every child it forks re-runs the
parent's __main__ first: Snakemake's command line.)
"""
from __future__ import annotations

import atexit
import importlib
import logging
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback

_server: subprocess.Popen | None = None
_name = ""
_lock = threading.Lock()
_used = False  # whether a job was sent: a server nobody used is killed at exit, not waited for


def modules_for(config: dict) -> list:
    """What the jobs of a run of `config` import: the job runner, the modules of its ops
    (with the demo synthesis when the config has `demo:`, as magma.workflow plans it) and,
    when the report is on, its plotting. Read from the config as written, before
    validation, so the server can start before planning: an op name that is not one is
    left out (planning reports it), and anything else malformed gives the base list."""
    from .ops import OPS

    base = ["magma.jobs"]
    try:
        ops = {s.get("op") for s in (config.get("steps") or {}).values() if isinstance(s, dict)}
        if "demo" in config:
            ops.add("demo")
        report = (config.get("execution") or {}).get("report", True) is not False  # the schema's default
    except AttributeError:
        return base
    pictures = ["magma.report", "matplotlib.pyplot"] if report else []
    return base + [f"magma.ops.{op}" for op in sorted(o for o in ops if o in OPS)] + pictures


def start(modules: list) -> None:
    """Start the server (once per process); it imports `modules` while jobs queue up."""
    global _server, _name
    with _lock:
        if running():
            return
        _name = f"magma-jobs-{os.getpid()}-{os.urandom(6).hex()}"  # abstract socket: nothing to clean up
        _server = subprocess.Popen([sys.executable, "-c", "from magma.job_server import serve; serve()", _name,
                                    *modules], stdin=subprocess.PIPE)
        atexit.register(_stop)


def _stop() -> None:
    """At exit: let the server wait for its children and wait for it, so that their CPU time
    counts in this process's (and a benchmark's) resource usage. A server no job used (a dry
    run, a plan that failed) may still be importing: it is killed."""
    if running() and not _used:
        _server.kill()
        _server.wait()
    elif running():
        _server.stdin.close()
        try:
            _server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass


def running() -> bool:
    return _server is not None and _server.poll() is None


def submit(args) -> int | None:
    """Run a job (a picklable magma.jobs.JobArgs) in a child of the server and wait for it.
    Returns its exit code, or None when the child died without reporting (killed)."""
    global _used
    _used = True
    data = pickle.dumps(args)
    with _connect() as conn:
        conn.sendall(struct.pack("!Q", len(data)) + data)
        reply = _recv(conn, 4)
    return struct.unpack("!i", reply)[0] if reply else None


def _connect(wait: float = 300.0) -> socket.socket:
    """A connection to the server, waiting while it starts (its socket appears at once,
    but Python takes a moment to get there)."""
    t0 = time.time()
    while True:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect("\0" + _name)
            return conn
        except (ConnectionRefusedError, FileNotFoundError):
            conn.close()
            if not running():
                raise RuntimeError(f"the magma job server exited (code {_server.returncode})") from None
            if time.time() - t0 > wait:
                raise
            time.sleep(0.01)


def _recv(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        part = conn.recv(n - len(buf))
        if not part:
            return b""
        buf += part
    return buf


# ---- the server process -------------------------------------------------------------
def serve() -> None:
    name, *modules = sys.argv[1:]
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind("\0" + name)
    listener.listen(128)  # listening before the imports: early jobs wait in the backlog
    for module in modules:
        importlib.import_module(module)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the jobs; Snakemake's exit stops the server
    children = set()
    while True:
        ready, _, _ = select.select([listener, sys.stdin], [], [], 1.0)
        children -= _reap(children, block=False)
        if sys.stdin in ready and not os.read(sys.stdin.fileno(), 1):
            _reap(children, block=True)  # the Snakemake process is gone or done
            os._exit(0)  # nothing to flush; skips tearing down every imported library
        if listener in ready:
            conn, _ = listener.accept()
            pid = os.fork()
            if pid == 0:
                listener.close()
                os._exit(_child(conn))
            children.add(pid)
            conn.close()


def _reap(children: set, block: bool) -> set:
    """Wait for finished children (their CPU time then counts as this process's children's)."""
    done = set()
    for pid in children:
        try:
            if os.waitpid(pid, 0 if block else os.WNOHANG)[0]:
                done.add(pid)
        except ChildProcessError:
            done.add(pid)
    return done


def _child(conn: socket.socket) -> int:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    code = 1
    try:
        size = struct.unpack("!Q", _recv(conn, 8))[0]
        args = pickle.loads(_recv(conn, size))
        from .jobs import JobFailed, run_here

        try:
            run_here(args)
            code = 0
        except JobFailed:
            pass  # already logged
    except BaseException:  # noqa: BLE001 - a job's crash must reach its log and the parent
        traceback.print_exc()
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            conn.sendall(struct.pack("!i", code))
        except OSError:
            pass
    return code
