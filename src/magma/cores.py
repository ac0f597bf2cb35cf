"""Cores a batch job's running tasks may borrow.

A batch job runs its tasks on up to `threads` worker processes. When it has fewer
tasks than cores (a stage of one big task) or fewer tasks left than workers (the
tail of a stage whose tasks are uneven), cores sit idle. Kernels whose work splits
into independent items borrow them: `fork_each` runs batches of items in forks of the
task's process (mesh simplification, skeleton tracing by label sets), `borrow`/`give_back`
lend cores to a kernel with its own workers.

The count is a semaphore created by the job before its workers fork, so every
process of the job shares it. Outside a batch job nothing is spare.
"""
from __future__ import annotations

import multiprocessing
import os
import pickle
import select
import signal
import tempfile
import traceback

_spare = None  # multiprocessing semaphore: idle cores of this job


def start(idle: int) -> None:
    """Called by the batch job before it forks workers: `idle` cores are spare from the start."""
    global _spare
    _spare = multiprocessing.get_context("fork").Semaphore(max(0, int(idle)))


def stop() -> None:
    global _spare
    _spare = None


def lend() -> None:
    """A worker has no task left: its core becomes spare."""
    if _spare is not None:
        _spare.release()


def borrow(most: int) -> int:
    """Take up to `most` spare cores without waiting; returns how many were taken."""
    got = 0
    while _spare is not None and got < most and _spare.acquire(block=False):
        got += 1
    return got


def spare(most: int) -> int:
    """How many cores are spare now (up to `most`), without taking them: a hint for how
    many pieces to cut work into before `fork_each` borrows them."""
    n = borrow(most)
    give_back(n)
    return n


def give_back(n: int) -> None:
    for _ in range(n):
        lend()


def fork_each(fn, batches: list, inline: bool = False) -> list:
    """[fn(b) for b in batches], each call in a fresh fork of this process.

    A fork starts from this process's state as it is now, so a kernel object that
    carries state from one call to the next (zmesh's simplifier) gives every batch the
    same start: results depend on the batch alone, never on which process or core ran
    it or what ran before. Forks see what this process has built (a mesher's surfaces)
    without copying or pickling it. One fork runs at a time on this task's own core,
    more while the job has spare ones. Put the biggest batches first. Results must pickle.

    `inline`: for kernels that carry no state between calls, this process runs the
    batches of its own core itself and forks only onto borrowed cores. It stays warm:
    a fresh fork faults in every page it allocates (about 20% slower simplifying).
    """
    results = [None] * len(batches)
    todo = list(range(len(batches)))[::-1]  # popped from the end: first batch first
    running = {}  # pipe's read end -> (pid, batch, borrowed core?, result file)
    try:
        while todo or running:
            own = 1 if todo and (inline or all(b for _, _, b, _ in running.values())) else 0
            extra = borrow(len(todo) - own) if todo else 0
            for borrowed in [False] * (0 if inline else own) + [True] * extra:
                i = todo.pop()
                fd, pid, out = _fork_one(fn, batches[i])
                running[fd] = (pid, i, borrowed, out)
            wait = None
            if inline and own and todo:
                i = todo.pop()
                results[i] = fn(batches[i])
                wait = 0
            if not running:
                continue
            ready, _, _ = select.select(list(running), [], [], wait)
            for fd in ready:  # a fork's pipe reads end-of-file when it exits
                pid, i, borrowed, out = running.pop(fd)
                os.close(fd)
                code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
                if borrowed:
                    give_back(1)
                out.seek(0)
                payload = out.read()
                out.close()
                kind, value = pickle.loads(payload) if payload else ("error", f"exit code {code}")
                if kind == "error" or code != 0:
                    raise RuntimeError(f"a forked worker failed (exit code {code}):\n{value}")
                results[i] = value
    finally:
        for fd, (pid, _, borrowed, out) in running.items():  # only after a failure
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(fd)
            out.close()
            if borrowed:
                give_back(1)
    return results


def spread(fn, batches: list) -> list:
    """`fork_each(fn, batches, inline=True)`: the `map_fn` a kernel takes to run its batches
    on this process's core and, while the job has spare cores, in forks beside it."""
    return fork_each(fn, batches, inline=True)


def _fork_one(fn, batch) -> tuple:
    """(pipe read end, pid, result file): the fork pickles fn(batch) into the file, which
    it shares with this process, so it never waits on this process to read a pipe."""
    out = tempfile.TemporaryFile()
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(w)
        return r, pid, out
    os.close(r)
    code = 0
    try:
        try:
            payload = pickle.dumps(("ok", fn(batch)), protocol=pickle.HIGHEST_PROTOCOL)
        except BaseException:
            payload = pickle.dumps(("error", traceback.format_exc()))
        out.write(payload)
        out.flush()
    except BaseException:
        code = 1
    finally:
        os._exit(code)
