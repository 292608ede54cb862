"""A real multi-node Ray cluster on one machine, made of `ray start` processes.

Each node is a `ray start --block` process (the head with `--head`, the
others with `--address`) that stays the parent of its raylet and helpers, so
a node is stopped, or killed to simulate a machine failure, by signalling
its own process tree: never `ray stop`, which would stop every Ray process
on the machine. A node can be pinned to some cores (`taskset`), so that two
nodes on one machine do not share CPUs. Token authentication is turned off
for this cluster and its clients only (`RAY_AUTH_MODE=disabled` in their
environment). Used by tests/test_cluster.py and benchmarks/bench_cluster.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))


_HOLDER = """
import sys, ray
ray.init(address=sys.argv[1])

@ray.remote(num_cpus=float(sys.argv[2]), resources={"node:__internal_head__": 0.001})
class Holder:
    def ready(self):
        return True

h = Holder.remote()
ray.get(h.ready.remote())
print("holding", flush=True)
sys.stdin.read()  # until the parent closes stdin
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        # the command name (field 2) may hold spaces: the parent pid follows its ")"
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants, parents first."""
    kids, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def _levels(pid: int) -> list[list[int]]:
    """`pid`'s process tree by depth: [[pid], [children], [grandchildren], ...]."""
    kids, levels = _children(), [[pid]]
    while True:
        nxt = [c for p in levels[-1] for c in kids.get(p, [])]
        if not nxt:
            return levels
        levels.append(nxt)


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _signal(pids: list[int], sig: int) -> None:
    for p in pids:
        try:
            os.kill(p, sig)
        except (ProcessLookupError, PermissionError):
            pass


@dataclass
class Node:
    name: str
    proc: subprocess.Popen
    node_manager_port: int
    log: Path
    cores: str | None = None
    killed: bool = False

    def pids(self) -> list[int]:
        return process_tree(self.proc.pid) if self.proc.poll() is None else []


@dataclass
class LocalCluster:
    """Start with `start_head`, then `add_node`; `stop()` ends every process it started."""

    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="rc", dir="/tmp")))
    nodes: list[Node] = field(default_factory=list)
    gcs_port: int = 0
    dashboard_port: int = 0

    @property
    def env(self) -> dict[str, str]:
        """The environment for the cluster's processes and its clients (`ray job submit`)."""
        env = dict(os.environ)
        env.pop("RAY_ADDRESS", None)
        env["RAY_AUTH_MODE"] = "disabled"
        env["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
        env.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
        # the `python` of a submitted job is this interpreter's
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        return env

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, name: str, args: list[str], cores: str | None, wait_nodes: int) -> Node:
        port = free_port()
        log = self.root / f"{name}.log"
        cmd = [RAY, "start", "--block", "--disable-usage-stats", f"--node-manager-port={port}"]
        # The agent's HTTP port (which serves job submission on the head) is
        # fixed by default (52365): another Ray on the machine, or another node
        # of this cluster, holding it leaves the head's agent without HTTP and
        # every job refused ("No available agent to submit job").
        cmd += [f"--dashboard-agent-listen-port={free_port()}", *args]
        if cores is not None:
            cmd = ["taskset", "-c", cores, *cmd]
        with open(log, "w") as fh:
            proc = subprocess.Popen(
                cmd, stdout=fh, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        node = Node(name, proc, port, log, cores)
        self.nodes.append(node)
        self.wait_for_nodes(wait_nodes, timeout=90, starting=node)
        return node

    def start_head(self, num_cpus: int, resources: dict | None = None, cores=None) -> Node:
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        args = [
            "--head",
            f"--port={self.gcs_port}",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={num_cpus}",
            "--num-gpus=0",
            f"--resources={json.dumps(resources or {})}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={free_port()}",
            f"--temp-dir={self.root / 'ray'}",
        ]
        return self._start("head", args, cores, wait_nodes=1)

    def add_node(self, num_cpus: int, resources: dict | None = None, cores=None) -> Node:
        name = f"node{len(self.nodes)}"
        args = [
            f"--address={self.address}",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={num_cpus}",
            "--num-gpus=0",
            f"--resources={json.dumps(resources or {})}",
            # A node of its own on this machine: its own session files (runtime
            # environments included), as on a separate machine. Sharing the
            # head's, this node's runtime-env agent removes the job's
            # working_dir from under the head's job driver.
            f"--temp-dir={self.root / name}",
        ]
        return self._start(name, args, cores, wait_nodes=self.alive() + 1)

    # ------------------------------------------------------------------ #

    def ray_cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            [RAY, *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )

    # The cluster's state is read from the dashboard's REST API, the one the
    # `ray list` and `ray job` commands call: each such command is a Python
    # process that imports Ray, seconds of CPU on a 2-core machine, and a
    # polling loop of them slowed the training it waited for.

    def _get(self, path: str, params: dict | None = None, timeout: float = 30):
        """GET `path` of the dashboard as JSON; None where the dashboard does not answer yet."""
        url = self.dashboard + path
        if params:
            url += "?" + urllib.parse.urlencode(params, doseq=True)
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                return json.loads(resp.read())
        except (OSError, json.JSONDecodeError):  # urllib's errors are OSErrors
            return None

    def _state(self, resource: str, filters: dict | None = None) -> list[dict] | None:
        """The state API's `resource` list (as `ray list RESOURCE --detail`), None on error."""
        params: dict = {"detail": "true", "limit": 10000}
        if filters:
            params["filter_keys"] = list(filters)
            params["filter_predicates"] = ["="] * len(filters)
            params["filter_values"] = list(filters.values())
        out = self._get(f"/api/v0/{resource}", params)
        if not out or not out.get("result"):
            return None
        return out["data"]["result"]["result"]

    def node_table(self) -> list[dict]:
        """`ray list nodes --detail` as dicts (node_id, state, resources_total, ...)."""
        return self._state("nodes") or []

    def alive(self) -> int:
        return sum(n.get("state") == "ALIVE" for n in self.node_table())

    def wait_for_nodes(self, n: int, timeout: float, starting: Node | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if starting is not None and starting.proc.poll() is not None:
                raise RuntimeError(
                    f"ray start for {starting.name} exited {starting.proc.returncode}:\n"
                    + starting.log.read_text()[-3000:]
                )
            if self.alive() == n:
                return
            time.sleep(0.25)
        raise TimeoutError(f"the cluster did not reach {n} alive nodes in {timeout:.0f} s")

    def actors(self, class_name: str) -> list[dict]:
        """`ray list actors --detail` of one class, dead ones included."""
        out = self._state("actors", {"class_name": class_name})
        if out is None:
            raise RuntimeError(f"the dashboard at {self.dashboard} did not list the actors")
        return out

    def submit(self, entrypoint: list[str], working_dir: str, wait: bool = True, timeout=900):
        """`ray job submit` (waits for the job and returns its exit; no wait: the job id).

        A head whose job agent has not registered yet refuses the job ("No
        available agent ... try again later"), which a loaded machine shows
        for some seconds after the head starts: the submission is repeated."""
        deadline = time.monotonic() + 60
        while True:
            job_id = f"test-{os.getpid()}-{int(time.time() * 1000)}"
            cmd = [
                RAY,
                "job",
                "submit",
                "--address",
                self.dashboard,
                "--submission-id",
                job_id,
                "--working-dir",
                working_dir,
            ]
            if not wait:
                cmd.append("--no-wait")
            cmd += ["--", *entrypoint]
            proc = subprocess.run(
                cmd, env=self.env, capture_output=True, text=True, timeout=timeout
            )
            refused = "No available agent to submit job" in proc.stdout + proc.stderr
            if not (proc.returncode != 0 and refused and time.monotonic() < deadline):
                return job_id, proc
            time.sleep(2.0)

    def job_status(self, job_id: str) -> str:
        """PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED; UNKNOWN where the dashboard did not say."""
        out = self._get(f"/api/jobs/{job_id}")
        return out.get("status", "UNKNOWN") if isinstance(out, dict) else "UNKNOWN"

    def job_logs(self, job_id: str) -> str:
        out = self._get(f"/api/jobs/{job_id}/logs", timeout=120)
        if not isinstance(out, dict):
            # the CLI says why the dashboard did not answer
            out = self.ray_cli("job", "logs", "--address", self.dashboard, job_id, timeout=120)
            return out.stdout + out.stderr
        return out.get("logs", "")

    def wait_job(self, job_id: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.job_status(job_id)
            if state in ("SUCCEEDED", "FAILED", "STOPPED"):
                return state
            time.sleep(0.5)
        return "TIMEOUT"

    # ------------------------------------------------------------------ #

    def freeze(self, node: Node) -> float:
        """SIGSTOP a node's whole process tree: from this instant it does no more work (a
        training step in flight does not finish), as when a machine hangs; returns the
        time. `kill` ends it afterwards (SIGKILL ends stopped processes too)."""
        t = time.time()
        _signal(node.pids(), signal.SIGSTOP)
        return t

    def kill(self, node: Node) -> float:
        """SIGKILL a node's whole process tree, as a machine failure would; returns the time.

        Deepest processes first, each level given a moment to be reaped by its
        parent, so that no zombie is left to an init that does not reap."""
        levels = _levels(node.proc.pid)
        t = time.time()
        for pids in reversed(levels):
            _signal(pids, signal.SIGKILL)
            time.sleep(0.2)
        node.proc.wait(timeout=30)
        node.killed = True
        return t

    def stop(self) -> None:
        """End every process of this cluster, then remove its files. `ray start --block`
        stops its own processes on SIGTERM; what is left after a few seconds is killed
        (a head that ran jobs was measured not to be done in 15 s: nothing is gained
        by waiting long for processes that are killed next)."""
        marker = str(self.root)
        for node in reversed(self.nodes):
            if node.proc.poll() is None:
                node.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        for node in self.nodes:
            try:
                node.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        # whatever is left: our nodes' trees, and processes that outlived their
        # parents but name this cluster's directory
        left = [p for node in self.nodes for p in node.pids()]
        left += [
            int(p)
            for p in os.listdir("/proc")
            if p.isdigit() and int(p) != os.getpid() and marker in _cmdline(int(p))
        ]
        _signal(left, signal.SIGKILL)
        for node in self.nodes:
            try:
                node.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        time.sleep(0.5)
        shutil.rmtree(self.root, ignore_errors=True)

    @contextmanager
    def hold_head_cpus(self, cpus: float):
        """Hold `cpus` of the head's CPUs (an actor of a client driver) until the block ends."""
        holder = subprocess.Popen(
            [sys.executable, "-c", _HOLDER, self.address, str(cpus)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=self.env,
        )
        try:
            line = holder.stdout.readline().strip()
            if line != "holding":
                raise RuntimeError(f"could not hold {cpus} head CPUs: {line!r}")
            yield
        finally:
            holder.stdin.close()
            holder.wait(timeout=60)

    def leftovers(self) -> list[int]:
        marker = str(self.root)
        return [
            int(p)
            for p in os.listdir("/proc")
            if p.isdigit() and marker in _cmdline(int(p)) and _alive(int(p))
        ]


def failover_entrypoint(
    *,
    steps: int,
    eval_every: int,
    eval_batches: int,
    storage,
    worker_cpus: float,
    cache=None,
    config: str = "markov-tiny",
) -> list[str]:
    """`pipelines/train.py` on `config`, checkpointing at every evaluation, restarts allowed."""
    return [
        "python",
        "pipelines/train.py",
        config,
        f"optim.steps={steps}",
        "train.pretrain_steps=20",
        f"train.eval_every={eval_every}",
        f"train.eval_batches={eval_batches}",
        "checkpoint.max_failures=3",
        f"scaling.cpus_per_worker={worker_cpus}",
        *([f"data.cache={cache}"] if cache is not None else []),
        "--storage",
        str(storage),
        "--name",
        "failover",
    ]


def resumed_steps(logs: str) -> list[int]:
    """The steps a run's log says it resumed at ("[deqray] resumed at step N ...")."""
    return [
        int(line.split("resumed at step ")[1].split()[0])
        for line in logs.splitlines()
        if "resumed at step " in line
    ]
