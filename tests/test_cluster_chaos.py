"""The jobs on a real multi-node Ray cluster on one machine, losing and gaining nodes mid-job.

ray.cluster_utils.Cluster starts a head and two worker nodes, each its own raylet (with its own
object store and worker processes), one CPU each. Removing a node kills its raylet with SIGKILL
(no drain, no notice: a crashed host or a preempted VM), and with it every worker process and
object on that node; the GCS finds it dead by its missed health checks (tightened here to about
2 s). The jobs run as `mtcnn-jobs ... --address` processes of their own, as on a real cluster, and
every test ends with exactly one row per input and exit status 0. Tests wait for states (a part
committed, a process on a node, a node dead in the GCS, the job's exit), never for a guessed time.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from jobs.output import LEASE_NAME, committed_parts

from test_annotate_faults import REPO, output_rows, photo_folder, wait_for
from shared_data import needs_shared_data
from test_train import write_tiny_shards

pytestmark = [pytest.mark.slow, pytest.mark.chaos]

#: The GCS declares a node dead after 3 missed health checks 0.5 s apart (defaults: 5 x 3 s).
FAST_NODE_DEATH = {"health_check_initial_delay_ms": 1000, "health_check_period_ms": 500,
                   "health_check_timeout_ms": 1000, "health_check_failure_threshold": 3}
#: A job's own limit: a job that hangs fails its test instead of the session.
JOB_SECONDS = 240


# -- the cluster ------------------------------------------------------------------------------

class LocalCluster:
    """A head (where the jobs' drivers connect) and worker nodes, each a raylet of its own."""

    def __init__(self, cluster) -> None:
        self.cluster = cluster

    @property
    def address(self) -> str:
        return self.cluster.address

    @property
    def head(self):
        return self.cluster.head_node

    @property
    def workers(self) -> list:
        return sorted(self.cluster.worker_nodes, key=lambda node: node.node_id)

    def add(self):
        """A new worker node of one CPU, alive in the GCS when this returns."""
        node = self.cluster.add_node(num_cpus=1)
        self.wait_alive(node)
        return node

    def remove(self, node) -> None:
        """A worker node crashes: its raylet and every process it started (workers, agents) are
        killed with SIGKILL at once, as when a host dies; return once the GCS holds it dead."""
        raylet = self.raylet_pid(node)
        started = [pid for pid, parent in processes().items() if parent == raylet]
        self.cluster.remove_node(node, allow_graceful=False)
        for pid in started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_for(lambda: node.node_id not in self.alive(), 60, f"node {node.node_id[:8]} dead in the GCS")

    def alive(self) -> set[str]:
        """Node ids the GCS holds alive."""
        return {entry["NodeID"] for entry in self.cluster.global_state.node_table() if entry["Alive"]}

    def wait_alive(self, node) -> None:
        wait_for(lambda: node.node_id in self.alive(), 60, f"node {node.node_id[:8]} alive in the GCS")

    @staticmethod
    def raylet_pid(node) -> int:
        from ray._private import ray_constants

        return node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid


@pytest.fixture(scope="module")
def cluster():
    """One cluster for the file: a head and worker nodes of one CPU each, shut down at the end.
    Each test takes it with the worker nodes it needs (ray_cluster, head_alone), as tests remove
    nodes; a whole cluster started anew for each test would cost several seconds more each.

    cluster_utils records its address in /tmp/ray/ray_current_cluster, where any `ray.init()`
    without an address on this machine (tests of other sessions running beside these) would find
    it and join it: it is kept out of there.
    """
    import ray._common.utils
    import ray._private.utils
    from ray.cluster_utils import Cluster

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ray._private.utils, "write_ray_address", lambda *args, **kwargs: None)
        patch.setattr(ray._common.utils, "reset_ray_address", lambda *args, **kwargs: None)
        made = Cluster(initialize_head=True, shutdown_at_exit=True,
                       head_node_args={"num_cpus": 1, "_system_config": FAST_NODE_DEATH})
        try:
            yield LocalCluster(made)
        finally:
            made.shutdown()


def with_workers(cluster: LocalCluster, count: int) -> LocalCluster:
    """The cluster with exactly count worker nodes alive, and every CPU free (the actors of the
    earlier tests' jobs gone with their drivers)."""
    while len(cluster.workers) > count:
        cluster.remove(cluster.workers[-1])
    while len(cluster.workers) < count:
        cluster.add()
    wanted = float(count + 1)
    wait_for(lambda: cluster.cluster.global_state.available_resources().get("CPU", 0.0) == wanted,
             60, f"{wanted:g} CPUs free")
    return cluster


@pytest.fixture
def ray_cluster(cluster) -> LocalCluster:
    """A head and two worker nodes of one CPU each: three CPUs in all."""
    return with_workers(cluster, 2)


@pytest.fixture
def head_alone(cluster) -> LocalCluster:
    """The head alone: one CPU."""
    return with_workers(cluster, 0)


# -- processes --------------------------------------------------------------------------------

def _job_environment() -> dict:
    """This process's environment less Ray's own settings, but with its authentication ones: a Ray
    started earlier in this process (the session's) turned token authentication on here, and the
    cluster started from here then asks its clients for the token too."""
    return {k: v for k, v in os.environ.items() if not k.startswith("RAY_") or k.startswith("RAY_AUTH")}


class Job:
    """An `mtcnn-jobs` command in its own process, its output in a log file (a pipe nobody reads
    would fill and stop it), its driver joined to the cluster by --address."""

    def __init__(self, args: list[str], log: Path, env: dict | None = None) -> None:
        environment = _job_environment()
        environment.update(env or {})
        self.log = log
        self.started = time.monotonic()
        with open(log, "wb") as handle:
            self.process = subprocess.Popen([sys.executable, "-m", "jobs.cli", *args], cwd=REPO,
                                            env=environment, stdout=handle, stderr=subprocess.STDOUT)

    def running(self) -> bool:
        return self.process.poll() is None

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def finish(self, seconds: float = JOB_SECONDS) -> str:
        """Wait for the exit; the log. A job still running after seconds is killed (and fails)."""
        try:
            self.process.wait(timeout=max(1.0, seconds - (time.monotonic() - self.started)))
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"the job did not end within {seconds} s:\n{self.text()[-6000:]}")
        return self.text()

    def kill(self) -> None:
        if self.running():
            self.process.kill()
            self.process.wait()


@pytest.fixture
def jobs():
    """Start jobs with jobs(args, log); any still running at the end of the test is killed."""
    started: list[Job] = []

    def start(args: list[str], log: Path, env: dict | None = None) -> Job:
        job = Job(args, log, env)
        started.append(job)
        return job

    yield start
    for job in started:
        job.kill()


def processes() -> dict[int, int]:
    """Every process of this machine: {pid: parent pid}."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                found[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return found


def ray_workers(title: bytes, ray_cluster: LocalCluster) -> dict[int, tuple[object, bytes]]:
    """The cluster's Ray worker processes whose title holds title: {pid: (node, title)}.

    Ray titles an actor's process ray::<class> while idle and ray::<class>.<method> while it runs a
    call. A worker process is started by its node's raylet, so its parent names its node; only the
    cluster's own count (other Ray instances may run jobs on this machine at the same time)."""
    nodes = {ray_cluster.raylet_pid(node): node for node in [ray_cluster.head, *ray_cluster.workers]}
    found = {}
    for pid, parent in processes().items():
        if parent not in nodes:
            continue
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if cmdline.startswith(b"ray::") and title in cmdline:
                found[pid] = (nodes[parent], cmdline.rstrip(b"\0"))
    return found


def busy(title: bytes, ray_cluster: LocalCluster, nodes) -> dict[int, object]:
    """The cluster's actors titled title that are running a call, on one of nodes: {pid: node}."""
    return {pid: node for pid, (node, name) in ray_workers(title, ray_cluster).items()
            if any(node is n for n in nodes) and b").submit" in name}


def on_node(title: bytes, ray_cluster: LocalCluster, node) -> list[int]:
    """Processes of Ray workers titled title that run on node."""
    return [pid for pid, (where, _) in ray_workers(title, ray_cluster).items() if where is node]


@contextlib.contextmanager
def frozen(pids):
    """SIGSTOP the processes for the block, then SIGCONT those still there: a job held at a state."""
    pids = list(pids)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


@contextlib.contextmanager
def held_mid_batch(title: bytes, ray_cluster: LocalCluster, nodes, job: Job, output: Path):
    """Wait until parts are committed and an actor titled title on one of nodes is in the middle of a
    batch; hold every actor so titled (SIGSTOP) for the block, and yield those mid-batch on nodes.

    Held, none of them finishes its batch, whatever the speed of this machine: the job is left
    with work in flight on the node a test takes away, and work not yet committed."""
    deadline = time.monotonic() + 180
    while True:
        # Looked for every few ms: a batch of a quick job lasts well under a second.
        while not (committed_parts(str(output)) and busy(title, ray_cluster, nodes)) and job.running():
            assert time.monotonic() < deadline, f"no part committed with an actor mid-batch:\n{job.text()[-4000:]}"
            time.sleep(0.01)
        assert job.running(), f"the job ended before a state to take a node from:\n{job.text()[-4000:]}"
        with frozen(ray_workers(title, ray_cluster)):
            caught = busy(title, ray_cluster, nodes)
            if caught:
                yield caught
                return
        # The batch ended between the look and the hold: look again.


#: A driver of its own that holds one CPU of a node with an idle actor until its stdin closes.
HOLD_CPU = """
import sys, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
ray.init(address=sys.argv[1], log_to_driver=False)

@ray.remote(num_cpus=1)
class HoldCPU:
    def ready(self):
        return True

held = HoldCPU.options(scheduling_strategy=NodeAffinitySchedulingStrategy(sys.argv[2], soft=False)).remote()
ray.get(held.ready.remote())
print("held", flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def cpu_held(ray_cluster: LocalCluster, node):
    """The node's CPU taken for the block, so that actors started meanwhile go to other nodes."""
    environment = _job_environment()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_CPU, ray_cluster.address, node.node_id], cwd=REPO,
                              env=environment, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    try:
        assert "held" in (line.strip() for line in holder.stdout), "could not hold the node's CPU"
        yield
    finally:
        holder.stdin.close()  # its driver exits, and Ray ends its actor: the CPU is free again
        holder.wait(timeout=60)


def annotate_args(images: Path, output: Path, address: str, *extra: str) -> list[str]:
    return ["annotate", str(images), str(output), "--address", address, "--batch-size", "1",
            "--rows-per-file", "2", "--commit-seconds", "2", *extra]


def assert_one_row_each(output: Path, paths: list[str]) -> None:
    rows = output_rows(str(output))
    assert sorted(path for path, *_ in rows) == sorted(paths)  # each once, none lost
    assert all(faces == 1 and error is None for _, faces, error, _ in rows), rows
    assert not (output / LEASE_NAME).exists()  # released at the end, node lost or not


# -- annotate ---------------------------------------------------------------------------------

def test_annotate_survives_a_worker_node_lost_mid_job(ray_cluster, jobs, tmp_path):
    """A node is lost with a detector actor in the middle of a batch: Ray restarts the actor on a
    CPU the pool frees and retries its batches; the crash journal sends their images one at a time."""
    paths = photo_folder(tmp_path / "images", 32)
    output = tmp_path / "out"
    job = jobs(annotate_args(tmp_path / "images", output, ray_cluster.address), tmp_path / "job.log")
    with held_mid_batch(b"FaceAnnotator", ray_cluster, ray_cluster.workers, job, output) as caught:
        assert len(output_rows(str(output))) < len(paths)
        ray_cluster.remove(next(iter(caught.values())))  # with the actor and its batch on it
    log = job.finish()
    assert job.process.returncode == 0, log
    assert_one_row_each(output, paths)


def test_annotate_survives_a_node_lost_after_the_job_sized_its_pool_before_actors_are_placed(
        ray_cluster, jobs, tmp_path):
    """The job sized its pool for 3 CPUs, then a node goes before any actor is placed: the third
    actor stays pending (Ray Data places actors asynchronously) and the other two do the work."""
    paths = photo_folder(tmp_path / "images", 24)
    output = tmp_path / "out"
    # No --concurrency: the job sizes its pool from the cluster it joins (3 CPUs: 3 to 6 actors).
    job = jobs(annotate_args(tmp_path / "images", output, ray_cluster.address), tmp_path / "job.log")
    # The lease is taken: the driver has joined the cluster and read its resources, and has yet to
    # start its run state and its pipeline. Held there (SIGSTOP), it places nothing while a node goes.
    lease = output / LEASE_NAME
    while not lease.exists() and job.running():
        time.sleep(0.01)
    with frozen([job.process.pid]):
        assert job.running(), job.text()
        assert not ray_workers(b"FaceAnnotator", ray_cluster) and not ray_workers(b"RunState", ray_cluster)
        ray_cluster.remove(ray_cluster.workers[0])
    log = job.finish()
    assert job.process.returncode == 0, log
    assert_one_row_each(output, paths)


def test_annotate_pool_grows_onto_a_node_added_mid_job(head_alone, jobs, tmp_path):
    """A node joins mid-job: the pool (1 to 3 actors) grows onto it and an actor there detects."""
    ray_cluster = head_alone  # 1 CPU, so the pool of 1 to 3 actors has 1
    paths = photo_folder(tmp_path / "images", 32)
    output = tmp_path / "out"
    job = jobs(annotate_args(tmp_path / "images", output, ray_cluster.address, "--concurrency", "1,3"),
               tmp_path / "job.log")
    wait_for(lambda: committed_parts(str(output)) or not job.running(), 180, "a first part")
    assert job.running(), job.text()
    first = ray_workers(b"FaceAnnotator", ray_cluster)
    assert len(first) == 1, first
    # The actor is held (SIGSTOP) with its batches in flight, so that work is still queued when
    # the new node is up, however fast this machine detects faces: the pool must grow to do it.
    with frozen(list(first)):
        added = ray_cluster.add()
        working: list[bytes] = []

        def working_on_new_node() -> bool:
            working.extend(title for node, title in ray_workers(b"FaceAnnotator", ray_cluster).values()
                           if node is added and b").submit" in title)
            return bool(working) or not job.running()

        # A detector actor is placed on the new node and runs a batch there (its title names the call).
        wait_for(working_on_new_node, 120, "a detector actor working on the added node")
    assert working, f"no detector actor ran on the added node:\n{job.text()[-4000:]}"
    log = job.finish()
    assert job.process.returncode == 0, log
    assert_one_row_each(output, paths)


def test_annotate_run_state_is_on_the_driver_node_and_outlives_every_worker_node(ray_cluster, jobs, tmp_path):
    """The run state is pinned to the driver's node: losing every worker node leaves it untouched."""
    paths = photo_folder(tmp_path / "images", 32)
    output = tmp_path / "out"
    job = jobs(annotate_args(tmp_path / "images", output, ray_cluster.address), tmp_path / "job.log")
    with held_mid_batch(b"FaceAnnotator", ray_cluster, ray_cluster.workers, job, output):
        # The run state is on the driver's node (the head), none of it on a worker node.
        state = ray_workers(b"RunState", ray_cluster)
        assert len(state) == 1 and on_node(b"RunState", ray_cluster, ray_cluster.head) == list(state), state
        assert len(output_rows(str(output))) < len(paths)
        for node in ray_cluster.workers:
            ray_cluster.remove(node)
        assert job.running(), job.text()
        # The same process: never lost, so never rebuilt from OUTPUT.
        assert list(ray_workers(b"RunState", ray_cluster)) == list(state)
        ray_cluster.add()  # somewhere for the lost actors to come back
    log = job.finish()
    assert job.process.returncode == 0, log
    assert_one_row_each(output, paths)


# -- crops ------------------------------------------------------------------------------------

def test_crops_survives_a_worker_node_lost_mid_job(ray_cluster, jobs, tmp_path):
    """A cropper is lost with its work half committed: the retried call commits the same parts again
    (named by their paths), so no chip is lost and none is there twice."""
    paths = photo_folder(tmp_path / "images", 40)
    annotations = tmp_path / "faces"
    made = jobs(["annotate", str(tmp_path / "images"), str(annotations), "--address", ray_cluster.address,
                 "--batch-size", "4"], tmp_path / "annotate.log")
    log = made.finish()
    assert made.process.returncode == 0, log
    assert_one_row_each(annotations, paths)  # one face chosen per image
    output = tmp_path / "chips"
    # The croppers are started while the head's CPU is taken, so both run on worker nodes (on
    # the head, the one cropper that gets the job's work could not be taken away with a node).
    with cpu_held(ray_cluster, ray_cluster.head):
        job = jobs(["crops", str(annotations), str(output), "--address", ray_cluster.address, "--batch-size", "2"],
                   tmp_path / "crops.log")
        wait_for(lambda: all(on_node(b"FaceCropper", ray_cluster, node) for node in ray_cluster.workers)
                 or not job.running(), 180, "a cropper on each worker node")
    # Each cropper call commits its own part; the node goes with a cropper in the middle of its work.
    with held_mid_batch(b"FaceCropper", ray_cluster, ray_cluster.workers, job, output) as caught:
        assert len(crop_rows(output)) < len(paths)
        ray_cluster.remove(next(iter(caught.values())))
    log = job.finish()
    assert job.process.returncode == 0, log
    rows = crop_rows(output)
    assert sorted(path for path, _, _ in rows) == sorted(paths)  # one chip per chosen face, none twice
    assert all(face == 0 and error is None for _, face, error in rows), rows
    assert not (output / LEASE_NAME).exists()


def crop_rows(output: Path) -> list[tuple]:
    if not committed_parts(str(output)):
        return []
    return duckdb.sql(f"select path, face, error from '{output}/part-*.parquet'").fetchall()


# -- train ------------------------------------------------------------------------------------

@needs_shared_data("wider_face_train_small", "cnn_facepoint_5pt/trainImageList.txt")
def test_train_resumes_from_its_checkpoint_when_a_worker_node_is_lost_mid_epoch(ray_cluster, jobs, tmp_path):
    """A training worker's node is lost in the middle of epoch 2: Ray Train restarts the worker group
    from epoch 1's checkpoint and the run ends with the 3 epochs asked for."""
    from mtcnn.weights import load_weights

    write_tiny_shards(tmp_path / "shards")
    run = tmp_path / "run"
    # Two workers of one CPU each on the three nodes (at least one on a worker node), the third
    # CPU reading and decoding the samples; 56 steps an epoch, a progress line every 10.
    job = jobs(["train", "--stage", "pnet", "--data", str(tmp_path / "shards"), "--output", str(run),
                "--address", ray_cluster.address, "--workers", "2", "--cpus-per-worker", "1", "--epochs", "3",
                "--batch-size", "16", "--log-every", "10"], tmp_path / "train.log")
    wait_for(lambda: "epoch 2/3 batch 10/" in job.text() or not job.running(), 240, "the second epoch under way")
    assert job.running(), job.text()
    trainers = ray_workers(b"RayTrainWorker", ray_cluster)
    with frozen(trainers):  # held mid-epoch: none reaches the end of the epoch meanwhile
        # Epoch 1 is checkpointed, epoch 2 is not: the node goes in the middle of epoch 2.
        assert len([p for p in (run / "checkpoints" / "pnet").glob("checkpoint_*") if p.is_dir()]) == 1
        on_workers = [node for node, _ in trainers.values() if node is not ray_cluster.head]
        assert len(trainers) == 2 and on_workers, trainers
        # With a training worker on it, and no node to replace it: the new worker group takes the
        # two CPUs left, and the samples are read and decoded with none of their own.
        ray_cluster.remove(on_workers[0])
    log = job.finish()
    assert job.process.returncode == 0, log
    assert "[pnet] resuming after epoch 0 from its checkpoint" in log, log
    provenance = load_weights(run).provenance
    assert provenance["epochs"] == 3 and len(provenance["loss_history"]) == 3
    assert provenance["final_metrics"]["epoch"] == 2
    assert provenance["final_metrics"]["resumed_from_epoch"] == 1
