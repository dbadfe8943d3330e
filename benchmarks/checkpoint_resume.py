"""Ray Data's CheckpointConfig weighed against the project's own resume, with figures from one run.

Prints, for this machine (CPU model and its avx512_bf16/AMX/VNNI flags named first):
- resume at scale, for each N in --done: a manifest of N + K paths (K new, --new) whose N are
  done already by an earlier run, start to exit, with the peak RSS of the driver and of Ray's
  worker processes (sampled over the driver's process tree from /proc, every 0.25 s) and the rows
  the run processed:
    (a) CheckpointConfig: read_text(manifest) -> CheckpointFilter -> a cheap map (columns of an
        annotation row, no detection) -> write_parquet, with CheckpointConfig(id_column="text");
        the N were checkpointed by an earlier run of the same pipeline over the first N lines
        (its figures are printed too);
    (b) the project: the real `mtcnn-jobs annotate MANIFEST OUTPUT` over committed parts holding
        the N paths (4096 rows a part, as the job writes them); its K new paths are real tiny
        photos, so (b) also loads the detector and detects K images; and (b2) the project's
        bookkeeping alone in one process (scan_parts + path_digests of the manifest + the
        searchsorted filter the run-state actor applies), no Ray;
  and both over the K new paths alone with nothing done (the fixed cost of a run).
- exactly-once under a driver SIGKILL: a subprocess driver writing Parquet with CheckpointConfig
  over --kill-ids ids in many small blocks is killed with SIGKILL at a state, one trial per entry
  of --kill-at: once N data files exist, or once a pending checkpoint exists (inside a two-phase
  commit; 'pending-all' kills its whole process tree at once, a lost machine), then rerun at once
  to completion; DuckDB counts rows per id. The same for the project's annotate over
  --kill-images tiny photos (rows per path).
- what CheckpointConfig cannot express, checked on small inputs: error rows that must be redone
  by the next run, a manifest listing a path twice, two drivers on one output at once (the lease),
  a pipeline that ends on the driver (iter_batches, as annotate's does), and the default
  delete_checkpoint_on_success. The project's side of each is checked with jobs.output and
  jobs.pipelines.run_state in this process.

    python benchmarks/checkpoint_resume.py                     # --done 1000000,10000000
    python benchmarks/checkpoint_resume.py --quick             # small, for debugging
    python benchmarks/checkpoint_resume.py --sections resume --done 1000000

The host may be shared: the load average is printed with every figure. A run whose machine falls
under --min-available-gb of available memory is killed by this script and reported as such.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SCRIPT = Path(__file__).resolve()


# -- the host ---------------------------------------------------------------------------------

def host_line() -> str:
    """CPU model, its family/model numbers, core count and the AI-relevant flags."""
    info = Path("/proc/cpuinfo").read_text()

    def field(name: str) -> str:
        match = re.search(rf"^{name}\s*:\s*(.*)$", info, re.M)
        return match.group(1).strip() if match else "?"

    flags = set(field("flags").split())
    wanted = ["avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8"]
    marks = " ".join(f"{flag}={'yes' if flag in flags else 'no'}" for flag in wanted)
    memory = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) / 2**20
    import ray

    return (f"host: {field('model name')} (family {field('cpu family')}, model {field('model')}), "
            f"{os.cpu_count()} CPUs, {memory:.1f} GiB RAM; {marks}; Ray {ray.__version__}, "
            f"Python {sys.version.split()[0]}")


def load() -> str:
    return "load " + " ".join(Path("/proc/loadavg").read_text().split()[:3])


def available_gb() -> float:
    text = Path("/proc/meminfo").read_text()
    return int(re.search(r"MemAvailable:\s+(\d+)", text).group(1)) / 2**20


# -- memory of a process tree -----------------------------------------------------------------

def _status(pid: int) -> dict:
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            values[line[:5]] = int(line.split()[1]) / 1024
    return values


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(parent, []).append(int(entry))
    return tree


def descendants(pid: int) -> list[int]:
    tree, found, todo = _children(), [], [pid]
    while todo:
        current = todo.pop()
        for child in tree.get(current, []):
            found.append(child)
            todo.append(child)
    return found


class TreeSampler(threading.Thread):
    """Peak memory of a driver and everything under it (Ray's GCS, raylet, workers), from /proc.

    - driver: the driver's VmHWM (the kernel's own peak);
    - workers: processes titled ray::... or running default_worker.py; the largest one's VmHWM, and
      the largest sum of their VmRSS at one sample (object-store pages they mapped count in each);
    - system: Ray's other processes (gcs_server, raylet, agents), largest sum of VmRSS at one sample;
    - machine: the largest drop of MemAvailable below its value at the start (object store included;
      other users of a shared host show up here too).
    """

    def __init__(self, pid: int, min_available_gb: float, period: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.pid, self.period, self.min_available_gb = pid, period, min_available_gb
        self.driver = self.worker_max = self.workers_sum = self.system_sum = self.machine = 0.0
        self.start_available = available_gb()
        self.kinds: dict[int, str] = {}
        self.names: dict[str, int] = {}
        self.killed_for_memory: float | None = None
        self._halt = threading.Event()

    def kind(self, pid: int) -> str:
        if pid not in self.kinds:
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                title = ""
            worker = title.startswith("ray::") or "default_worker.py" in title
            self.kinds[pid] = "worker" if worker else "system"
            name = title.split(" ")[0].rsplit("/", 1)[-1][:40] or "?"
            self.names[name] = self.names.get(name, 0) + 1
        return self.kinds[pid]

    def sample(self) -> None:
        try:
            self.driver = max(self.driver, _status(self.pid).get("VmHWM", 0.0))
        except OSError:
            return
        workers = system = 0.0
        for pid in descendants(self.pid):
            try:
                status = _status(pid)
            except OSError:
                continue
            if self.kind(pid) == "worker":
                workers += status.get("VmRSS", 0.0)
                self.worker_max = max(self.worker_max, status.get("VmHWM", 0.0))
            else:
                system += status.get("VmRSS", 0.0)
        self.workers_sum = max(self.workers_sum, workers)
        self.system_sum = max(self.system_sum, system)
        available = available_gb()
        self.machine = max(self.machine, self.start_available - available)
        if available < self.min_available_gb and self.killed_for_memory is None:
            self.killed_for_memory = available
            for pid in [self.pid, *descendants(self.pid)]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.period)

    def stop(self) -> dict:
        self._halt.set()
        self.join()
        return {"driver_mb": self.driver, "worker_max_mb": self.worker_max,
                "workers_sum_mb": self.workers_sum, "system_sum_mb": self.system_sum,
                "machine_gb": self.machine, "killed_for_memory": self.killed_for_memory}


def clean_environment() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}


def measured(command: list[str], min_available_gb: float, timeout: float = 7200,
             stop_when=None, kill_tree: bool = False) -> dict:
    """Run a command in its own process, sampling its tree; wall time, memory, output, status.

    stop_when() is checked every 20 ms: once it holds, the driver gets SIGKILL, and the rest of the
    tree is left to die as it would; with kill_tree every process under it gets SIGKILL first (a
    lost machine)."""
    load_before = load()
    started = time.perf_counter()
    job = subprocess.Popen(command, cwd=REPO, env=clean_environment(), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    sampler = TreeSampler(job.pid, min_available_gb)
    sampler.start()
    out: list[str] = []
    err: list[tuple[float, str]] = []  # each line with the second it came, from the start

    def timed(stream, into):
        for text in stream:
            into.append((time.perf_counter() - started, text))

    readers = [threading.Thread(target=lambda: out.extend(job.stdout), daemon=True),
               threading.Thread(target=timed, args=(job.stderr, err), daemon=True)]
    for reader in readers:
        reader.start()
    killed_at, orphans = None, None
    while job.poll() is None and time.perf_counter() - started < timeout:
        if stop_when is not None and killed_at is None and stop_when():
            tree = descendants(job.pid)
            for pid in tree if kill_tree else []:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            job.send_signal(signal.SIGKILL)
            killed_at = time.perf_counter() - started
            job.wait()
            orphans = tree
            break
        time.sleep(0.02 if stop_when is not None else 0.1)
    if job.poll() is None:
        job.kill()
    job.wait()
    for reader in readers:
        reader.join(timeout=60)
    seconds = time.perf_counter() - started
    memory = sampler.stop()
    return {"seconds": seconds, **memory, "status": job.returncode, "out": "".join(out),
            "err": "".join(text for _, text in err), "err_lines": err, "killed_at": killed_at,
            "orphans": orphans, "load": load_before, "process_names": dict(sampler.names)}


def alive(pids: list[int] | None) -> int:
    return sum(1 for pid in pids or [] if Path(f"/proc/{pid}").exists())


class Survivors(threading.Thread):
    """Watches a killed driver's processes: how long the last of them lived on."""

    def __init__(self, pids: list[int] | None) -> None:
        super().__init__(daemon=True)
        self.pids, self.seconds = pids or [], None
        self.at_start = alive(self.pids)
        self.start()

    def run(self) -> None:
        started = time.perf_counter()
        while alive(self.pids) and time.perf_counter() - started < 600:
            time.sleep(0.05)
        self.seconds = time.perf_counter() - started

    def text(self) -> str:
        self.join(timeout=600)
        return (f"{self.at_start} of its {len(self.pids)} Ray processes lived on after the kill, "
                f"the last for {self.seconds:.1f} s")


def child_result(run: dict) -> dict:
    """The JSON line a child printed last, or {} (with its stderr tail kept in 'error')."""
    for line in reversed(run["out"].splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = [line for line in run["err"].splitlines() if line.strip()][-6:]
    return {"error": " | ".join(tail)}


def logged(run: dict, pattern: str) -> tuple[float, re.Match] | tuple[None, None]:
    """The first line of a run's stderr matching pattern: (seconds from the start, match)."""
    for at, text in run.get("err_lines", []):
        match = re.search(pattern, text)
        if match:
            return at, match
    return None, None


def checkpoint_load_text(run: dict) -> str:
    """When Ray Data's checkpoint was loaded, as its own log line says."""
    at, match = logged(run, r"Checkpoint loaded for \w+ in ([\d.]+) seconds\. SizeBytes = (\d+)")
    if match is None:
        return "no checkpoint-loaded line logged"
    return (f"checkpoint loaded in {float(match.group(1)):.1f} s (ids array {int(match.group(2)) / 1e6:.0f} MB "
            f"by Ray's estimate), {at:.1f} s after the start")


def resume_index_text(run: dict) -> str:
    """When annotate's resume index was ready, as its own log line says."""
    at, match = logged(run, r"resuming: (\d+) images already done")
    return f"resume index of {int(match.group(1)):,} paths ready {at:.1f} s after the start" if match else \
        "no resuming line logged"


def exit_text(run: dict) -> str:
    """'exit 0', or the status with the last lines of what the child said."""
    if run["status"] == 0:
        return "exit 0"
    why = run.get("result", {}).get("error") or " | ".join(
        [line for line in run["err"].splitlines() if line.strip()][-3:])
    return f"exit {run['status']}: {why[-300:]}"


def memory_text(run: dict) -> str:
    text = (f"driver {run['driver_mb']:.0f} MB | largest worker {run['worker_max_mb']:.0f} MB, workers "
            f"together {run['workers_sum_mb'] / 1024:.2f} GB, Ray's own processes "
            f"{run['system_sum_mb'] / 1024:.2f} GB | machine +{run['machine_gb']:.2f} GB")
    if run["killed_for_memory"] is not None:
        text += f" | KILLED by this script: {run['killed_for_memory']:.1f} GB available left"
    return text


# -- the CheckpointConfig side, in a child process --------------------------------------------

def cheap_rows(batch):
    """An annotation row per path without detection: (we measure bookkeeping, not detection)."""
    import pyarrow as pa

    rows = batch.num_rows
    return batch.append_column("width", pa.array([160] * rows, pa.int32())) \
        .append_column("height", pa.array([120] * rows, pa.int32())) \
        .append_column("faces", pa.array([[]] * rows, pa.list_(pa.float32()))) \
        .append_column("error", pa.nulls(rows, pa.string())) \
        .append_column("error_kind", pa.nulls(rows, pa.string()))


def child_pipeline(spec: dict) -> dict:
    """One Ray Data run as the spec says; what it did. Runs in its own process (own Ray)."""
    import logging

    import pyarrow as pa
    import pyarrow.compute as pc
    import ray
    from ray.data import DataContext
    from ray.data.checkpoint import CheckpointConfig

    started = time.perf_counter()
    ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    if spec.get("ckpt"):
        context.checkpoint_config = CheckpointConfig(
            id_column=spec["id_column"], checkpoint_path=spec["ckpt"],
            delete_checkpoint_on_success=spec.get("delete_on_success", False))
    if spec["input"] == "text":
        dataset = ray.data.read_text(spec["manifest"])
    else:
        dataset = ray.data.range(spec["n"], override_num_blocks=spec["blocks"])
    pause, every, ok = spec.get("sleep", 0.0), spec.get("transient_every"), spec.get("now_ok", False)
    drop = spec.get("drop_transient", False)

    def rows(batch):
        if pause:
            time.sleep(pause)
        table = cheap_rows(batch)
        if every and not ok:
            failed = pa.array(table.column(spec["id_column"]).to_numpy() % every == 0)
            table = table.set_column(table.column_names.index("error"), "error",
                                     pc.if_else(failed, pa.scalar("cannot read: ConnectionError: reset"),
                                                pa.nulls(table.num_rows, pa.string())))
            table = table.set_column(table.column_names.index("error_kind"), "error_kind",
                                     pc.if_else(failed, pa.scalar("transient"), pa.nulls(table.num_rows, pa.string())))
            if drop:
                table = table.filter(pc.invert(failed))
        return table

    dataset = dataset.map_batches(rows, batch_format="pyarrow", batch_size=None)
    result = {"setup_s": time.perf_counter() - started, "executes_at": time.time()}
    if spec.get("sink", "parquet") == "iter":
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            count = sum(batch.num_rows for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None))
        result["rows_iterated"] = count
        result["warnings"] = [str(w.message)[:160] for w in caught if "checkpoint" in str(w.message).lower()]
    else:
        dataset.write_parquet(spec["out"])
    result["seconds"] = time.perf_counter() - started
    result["ends_at"] = time.time()
    return result


def child_bookkeeping(spec: dict) -> dict:
    """The project's resume bookkeeping alone: scan the committed parts, digest the manifest's
    paths, keep those not done (what RunState.claim does per chunk)."""
    import numpy as np

    from jobs.inputs.sources import CHUNK_PATHS
    from jobs.output import committed_parts, path_digests, scan_parts

    started = time.perf_counter()
    parts = committed_parts(spec["out"])
    index = scan_parts(spec["out"], {}, parts)
    scanned = time.perf_counter() - started
    new = listed = 0
    with open(spec["manifest"]) as handle:
        while True:
            chunk = [line.rstrip("\n") for _, line in zip(range(CHUNK_PATHS), handle)]
            if not chunk:
                break
            digests = path_digests(chunk)
            at = np.minimum(np.searchsorted(index.done, digests), max(len(index.done) - 1, 0))
            keep = index.done[at] != digests if len(index.done) else np.ones(len(chunk), bool)
            new += int(keep.sum())
            listed += len(chunk)
    return {"parts": len(parts), "done": int(len(index.done)), "listed": listed, "new": new,
            "scan_s": scanned, "seconds": time.perf_counter() - started}


# -- inputs -----------------------------------------------------------------------------------

def lines_file(source: Path, target: Path, start: int, count: int) -> Path:
    """Lines [start, start + count) of source, as a file of their own."""
    with open(source) as handle, open(target, "w") as out:
        for index, line in enumerate(handle):
            if index >= start + count:
                break
            if index >= start:
                out.write(line)
    return target


def committed_parts_for(manifest: Path, count: int, output: Path, rows_per_part: int = 4096) -> float:
    """An OUTPUT with one committed row (no face, no error) for each of the manifest's first
    `count` paths, in parts of rows_per_part as the job writes them; seconds taken."""
    import numpy as np
    import pyarrow as pa

    from jobs.common.schema import annotation_table, run_metadata
    from jobs.inputs.decode import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
    from jobs.pipelines.annotate import commit_rows
    from mtcnn import Detections, DetectorConfig, load_weights

    started = time.perf_counter()
    weights = load_weights("reference")
    metadata = run_metadata(str(weights.source), weights.sha256, weights.provenance, DetectorConfig(),
                            DEFAULT_MAX_PIXELS, DEFAULT_MAX_BYTES)
    metadata["device"] = "cpu"
    metadata["max_side"] = None
    text = json.dumps(metadata, sort_keys=True)
    if output.exists():
        shutil.rmtree(output)
    output.mkdir(parents=True)
    empty = Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros((0, 5, 2), np.float32))
    template = annotation_table(["x"] * rows_per_part, [(160, 120)] * rows_per_part, [empty] * rows_per_part,
                                [None] * rows_per_part)
    with open(manifest) as handle:
        done = 0
        while done < count:
            chunk = [handle.readline().rstrip("\n") for _ in range(min(rows_per_part, count - done))]
            table = template.slice(0, len(chunk)).set_column(0, "path", pa.array(chunk, pa.string()))
            commit_rows(table, str(output), {}, text)
            done += len(chunk)
    return time.perf_counter() - started


def parquet_rows(files: list[Path]) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def data_files(folder: Path) -> set[Path]:
    return set(folder.glob("*.parquet")) if folder.exists() else set()


def folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6 if folder.exists() else 0.0


def run_child(kind: str, spec: dict, args, **kwargs) -> dict:
    command = [sys.executable, str(SCRIPT), "--child", json.dumps({"kind": kind, **spec})]
    return measured(command, args.min_available_gb, **kwargs)


def pipeline_run(spec: dict, args, **kwargs) -> dict:
    """A CheckpointConfig pipeline run in a child; rows it wrote (new data files) added."""
    out = Path(spec["out"])
    before = data_files(out)
    run = run_child("pipeline", spec, args, **kwargs)
    run["result"] = child_result(run)
    new = sorted(data_files(out) - before)
    try:
        run["rows_written"] = parquet_rows(new)
    except Exception as error:  # noqa: BLE001 - a killed run may leave a file cut short
        run["rows_written"] = f"unreadable ({type(error).__name__})"
    return run


def annotate_run(manifest: Path, output: Path, args, extra: list[str] | None = None, **kwargs) -> dict:
    command = [sys.executable, "-m", "jobs.cli", "annotate", str(manifest), str(output), *(extra or [])]
    return measured(command, args.min_available_gb, **kwargs)


# -- resume at scale --------------------------------------------------------------------------

def section_resume(root: Path, args) -> list[str]:
    from annotate_scale import make_folder, make_manifest

    rows = []
    images = make_folder(root, args.images)
    for done in args.done:
        total = done + args.new
        made = time.perf_counter()
        manifest = make_manifest(root, images, args.images, total)
        done_manifest = lines_file(manifest, root / f"done-{done}.txt", 0, done)
        new_manifest = lines_file(manifest, root / f"new-{done}.txt", done, args.new)
        print(f"manifests of {total:,} / {done:,} / {args.new:,} lines in {time.perf_counter() - made:.0f} s "
              f"({manifest.stat().st_size / 1e6:.0f} MB)", flush=True)

        # (a) CheckpointConfig: an earlier run checkpoints the N, then the resume over N + K.
        base = root / f"ckpt-{done}"
        shutil.rmtree(base, ignore_errors=True)
        spec = {"input": "text", "id_column": "text", "out": str(base / "out"), "ckpt": str(base / "ckpt")}
        first = pipeline_run({**spec, "manifest": str(done_manifest)}, args)
        line = (f"| CheckpointConfig, earlier run writing {done:,} | {first['seconds']:.1f} s | "
                f"{first['rows_written']:,} rows | {memory_text(first)} | exit {first['status']} | {first['load']}")
        print(line, flush=True)
        rows.append(line)
        if first["status"] != 0:
            print(f"   earlier run failed: {first['result'].get('error', '')[:600]}", flush=True)
            continue
        checkpoint_mb, output_mb = folder_mb(base / "ckpt"), folder_mb(base / "out")
        resume = pipeline_run({**spec, "manifest": str(manifest)}, args)
        line = (f"| (a) CheckpointConfig resume, {done:,} done + {args.new:,} new | {resume['seconds']:.1f} s | "
                f"{resume['rows_written']} rows written; {checkpoint_load_text(resume)} | {memory_text(resume)} | "
                f"exit {resume['status']} | checkpoint {checkpoint_mb:.1f} MB beside {output_mb:.1f} MB of data | "
                f"{resume['load']}")
        print(line, flush=True)
        rows.append(line)
        if done == args.done[0]:
            print(f"   processes sampled (first word of their command line: count): {resume['process_names']}",
                  flush=True)
        if resume["status"] != 0:
            print(f"   resume failed: {resume['result'].get('error', '')[:600]}", flush=True)
        shutil.rmtree(base, ignore_errors=True)

        # (b) the project: committed parts holding the N, then the real job over N + K.
        output = root / f"parts-{done}"
        seconds = committed_parts_for(manifest, done, output)
        print(f"committed parts for {done:,} paths written in {seconds:.0f} s ({folder_mb(output):.0f} MB)",
              flush=True)
        keep = root / f"parts-{done}-pristine"
        shutil.rmtree(keep, ignore_errors=True)
        shutil.copytree(output, keep, copy_function=os.link)  # the same parts for (b2)
        job = annotate_run(manifest, output, args)
        summary = next((l for l in job["out"].splitlines() if l.startswith("annotated")), job["out"].strip()[-200:])
        line = (f"| (b) mtcnn-jobs annotate resume, {done:,} done + {args.new:,} new | {job['seconds']:.1f} s | "
                f"{summary}; {resume_index_text(job)} | {memory_text(job)} | exit {job['status']} | {job['load']}")
        print(line, flush=True)
        rows.append(line)
        if job["status"] != 0:
            print(f"   annotate failed: {job['err'][-600:]}", flush=True)
        alone = run_child("bookkeeping", {"out": str(keep), "manifest": str(manifest)}, args)
        result = child_result(alone)
        line = (f"| (b2) project bookkeeping alone (scan + digests + filter), {done:,} done + {args.new:,} new | "
                f"{alone['seconds']:.1f} s (scan {result.get('scan_s', float('nan')):.1f} s) | "
                f"{result.get('new', '?')} of {result.get('listed', '?')} listed to do | "
                f"process {alone['driver_mb']:.0f} MB | exit {alone['status']} | {alone['load']}")
        print(line, flush=True)
        rows.append(line)
        shutil.rmtree(output, ignore_errors=True)
        shutil.rmtree(keep, ignore_errors=True)

        if done == args.done[0]:
            # The fixed cost of a run: both over the K new paths alone, nothing done.
            base = root / "ckpt-fresh"
            shutil.rmtree(base, ignore_errors=True)
            fresh = pipeline_run({"input": "text", "id_column": "text", "out": str(base / "out"),
                                  "ckpt": str(base / "ckpt"), "manifest": str(new_manifest)}, args)
            line = (f"| (a0) CheckpointConfig, {args.new:,} new, nothing done | {fresh['seconds']:.1f} s | "
                    f"{fresh['rows_written']} rows written | {memory_text(fresh)} | exit {fresh['status']} | "
                    f"{fresh['load']}")
            print(line, flush=True)
            rows.append(line)
            shutil.rmtree(base, ignore_errors=True)
            empty = root / "parts-fresh"
            shutil.rmtree(empty, ignore_errors=True)
            job = annotate_run(new_manifest, empty, args)
            summary = next((l for l in job["out"].splitlines() if l.startswith("annotated")), job["out"][-200:])
            line = (f"| (b0) mtcnn-jobs annotate, {args.new:,} new, nothing done | {job['seconds']:.1f} s | "
                    f"{summary} | {memory_text(job)} | exit {job['status']} | {job['load']}")
            print(line, flush=True)
            rows.append(line)
            shutil.rmtree(empty, ignore_errors=True)
        for path in (manifest, done_manifest, new_manifest):
            path.unlink(missing_ok=True)
    return rows


# -- exactly-once under a driver SIGKILL ------------------------------------------------------

def count_ids(out: Path, column: str, expected: list) -> dict:
    """Rows per id in every Parquet file of out: missing and duplicated ids."""
    import duckdb

    if not list(out.glob("*.parquet")):
        return {"rows": 0, "missing": len(expected), "duplicated": 0, "extra": 0}
    try:
        found = duckdb.sql(f"select {column}, count(*) from read_parquet('{out}/*.parquet') "
                           f"group by {column}").fetchall()
    except Exception as error:  # noqa: BLE001 - a file cut short is a finding
        return {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
    counts = dict(found)
    return {"rows": sum(counts.values()), "missing": len(set(expected) - set(counts)),
            "duplicated": sum(1 for v in counts.values() if v > 1),
            "extra": len(set(counts) - set(expected))}


def section_kill(root: Path, args) -> list[str]:
    rows = []
    ids = list(range(args.kill_ids))
    for threshold in args.kill_at:
        base = root / f"kill-{threshold}"
        shutil.rmtree(base, ignore_errors=True)
        out, ckpt = base / "out", base / "ckpt"
        spec = {"input": "range", "n": args.kill_ids, "blocks": args.kill_blocks, "sleep": 0.05,
                "id_column": "id", "out": str(out), "ckpt": str(ckpt), "delete_on_success": False}

        def pending() -> int:
            return len(list(ckpt.glob("*.pending.parquet"))) if ckpt.exists() else 0

        seen: list[int] = []
        if threshold.startswith("pending"):
            # Inside the two-phase commit: a pending checkpoint written, its data file not yet
            # committed (a window of milliseconds; polled every 20 ms). 'pending-all' kills every
            # process of the run at once, so no worker finishes the commit afterwards.
            what = "a pending checkpoint" + (", the whole tree" if threshold == "pending-all" else ", the driver")
            stop = lambda: seen.append(pending()) or seen[-1] > 0  # noqa: E731
        else:
            what, stop = f">= {threshold} data files", lambda: len(data_files(out)) >= int(threshold)
        killed = pipeline_run(spec, args, stop_when=stop, kill_tree=threshold == "pending-all")
        files_at_kill, pending_at_kill = len(data_files(out)), pending()
        if seen:
            pending_at_kill = f"{seen[-1]} pending checkpoints at the kill, {pending_at_kill} after"
        else:
            pending_at_kill = f"{pending_at_kill} pending checkpoints"
        survivors = Survivors(killed["orphans"])
        after = count_ids(out, "id", ids)
        rerun = pipeline_run(spec, args)  # at once, as a supervisor would
        final = count_ids(out, "id", ids)
        caught = "killed" if killed["killed_at"] is not None else "NOT killed (the state never came)"
        line = (f"| CheckpointConfig, SIGKILL at {what} | {caught} at {killed['killed_at'] or 0:.1f} s with "
                f"{files_at_kill} data files, {pending_at_kill}, "
                f"{after.get('rows', after.get('error'))} rows readable; {survivors.text()} | rerun "
                f"{exit_text(rerun)}, {rerun['rows_written']} rows written in {rerun['seconds']:.1f} s | "
                f"{args.kill_ids:,} ids: {final} | {killed['load']}")
        print(line, flush=True)
        rows.append(line)
        shutil.rmtree(base, ignore_errors=True)

    if args.kill_images:
        # The project's annotate: a real job over tiny photos, killed once parts are committed.
        from annotate_scale import make_folder

        from jobs.output import committed_parts

        (root / "kill-photos").mkdir(parents=True, exist_ok=True)
        images = make_folder(root / "kill-photos", args.kill_images, per_folder=100)
        paths = [str(p) for p in sorted(images.rglob("*.png"))]
        output = root / "kill-annotate"
        shutil.rmtree(output, ignore_errors=True)
        extra = ["--rows-per-file", "8", "--batch-size", "4"]
        killed = annotate_run(images, output, args, extra,
                              stop_when=lambda: len(committed_parts(str(output)) if output.exists() else []) >= 3)
        parts_at_kill = len(committed_parts(str(output)))
        survivors = Survivors(killed["orphans"])
        before = count_ids(output, "path", paths)
        rerun = annotate_run(images, output, args, extra)
        final = count_ids(output, "path", paths)
        summary = next((l for l in rerun["out"].splitlines() if l.startswith("annotated")), rerun["out"][-200:])
        line = (f"| mtcnn-jobs annotate, SIGKILL at >= 3 parts | killed at {killed['killed_at'] or 0:.1f} s with "
                f"{parts_at_kill} parts, {before.get('rows', before.get('error'))} rows; {survivors.text()} | "
                f"rerun {exit_text(rerun)}: {summary} | {len(paths):,} paths: {final} | {killed['load']}")
        print(line, flush=True)
        rows.append(line)
        shutil.rmtree(output, ignore_errors=True)
    return rows


# -- what it cannot express -------------------------------------------------------------------

def section_semantics(root: Path, args) -> list[str]:
    rows = []
    n = 2000
    ids = list(range(n))

    def fresh(name: str) -> dict:
        base = root / f"sem-{name}"
        shutil.rmtree(base, ignore_errors=True)
        return {"input": "range", "n": n, "blocks": 20, "id_column": "id", "out": str(base / "out"),
                "ckpt": str(base / "ckpt")}

    # 1. Error rows to be redone by the next run.
    spec = fresh("transient-kept") | {"transient_every": 10}
    one = pipeline_run(spec, args)
    two = pipeline_run(spec | {"now_ok": True}, args)
    import duckdb

    errors = duckdb.sql(f"select count(*) from read_parquet('{spec['out']}/*.parquet') "
                        "where error_kind = 'transient'").fetchall()[0][0]
    line = (f"| CheckpointConfig: run 1 writes {n} rows, {n // 10} of them transient error rows; run 2 "
            f"(the reads work now) | run 2 redid {two['rows_written']} rows; {errors} transient rows "
            f"stay in the output for good ({exit_text(one)}; {exit_text(two)}) |")
    print(line, flush=True)
    rows.append(line)
    spec = fresh("transient-dropped") | {"transient_every": 10, "drop_transient": True}
    one = pipeline_run(spec, args)
    two = pipeline_run(spec | {"now_ok": True}, args)
    line = (f"| CheckpointConfig, transient rows dropped before the write instead | run 1 wrote "
            f"{one['rows_written']} rows (the {n // 10} failures recorded nowhere), run 2 redid "
            f"{two['rows_written']} ({exit_text(one)}; {exit_text(two)}) |")
    print(line, flush=True)
    rows.append(line)
    rows.append(project_transient(root))
    print(rows[-1], flush=True)

    # 2. A manifest listing a path twice.
    base = root / "sem-dup"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    paths = [f"/data/photos/{i:05d}.jpg" for i in range(1000)]
    listed = paths + paths[:100]
    manifest = base / "list.txt"
    manifest.write_text("".join(p + "\n" for p in listed))
    spec = {"input": "text", "manifest": str(manifest), "id_column": "text", "out": str(base / "out"),
            "ckpt": str(base / "ckpt")}
    one = pipeline_run(spec, args)
    counts = count_ids(Path(spec["out"]), "text", paths)
    line = (f"| CheckpointConfig, manifest of {len(listed)} lines, {len(listed) - len(paths)} paths listed "
            f"twice, id_column=path | {one['rows_written']} rows written: {counts} ({exit_text(one)}) |")
    print(line, flush=True)
    rows.append(line)
    rows.append(project_duplicates(listed))
    print(rows[-1], flush=True)

    # 3. Two drivers on one output at once (the lease).
    base = root / "sem-two"
    shutil.rmtree(base, ignore_errors=True)
    # Slow blocks (0.3 s each), so that the second driver starts while the first still writes.
    spec = {"input": "range", "n": args.kill_ids, "blocks": args.kill_blocks // 2, "sleep": 0.3, "id_column": "id",
            "out": str(base / "out"), "ckpt": str(base / "ckpt")}
    results: dict[str, dict] = {}
    first = threading.Thread(target=lambda: results.setdefault("a", pipeline_run(spec, args)))
    first.start()
    deadline = time.monotonic() + 600
    while len(data_files(Path(spec["out"]))) < 10 and first.is_alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    second = pipeline_run(spec, args)
    first.join()
    counts = count_ids(Path(spec["out"]), "id", list(range(args.kill_ids)))
    a = results["a"]
    overlap = a["result"].get("ends_at", time.time()) - second["result"].get("executes_at", time.time())
    line = (f"| CheckpointConfig, a second driver started on the same output and checkpoint once the first "
            f"wrote 10 files | the second began executing {overlap:.1f} s before the first ended; first "
            f"{exit_text(a)}, second {exit_text(second)} | {args.kill_ids:,} ids: {counts} |")
    print(line, flush=True)
    rows.append(line)
    rows.append(project_lease(root))
    print(rows[-1], flush=True)

    # 4. A pipeline that ends on the driver (annotate commits from iter_batches), and the default
    #    delete_checkpoint_on_success.
    spec = fresh("iter")
    one = pipeline_run(spec, args)
    iterated = pipeline_run(spec | {"sink": "iter"}, args)
    result = iterated["result"]
    line = (f"| CheckpointConfig with every id checkpointed, the pipeline consumed by iter_batches | "
            f"{result.get('rows_iterated', result.get('error'))} of {n} rows came back (none filtered); "
            f"warning: {result.get('warnings')} ({exit_text(one)}; {exit_text(iterated)}) |")
    print(line, flush=True)
    rows.append(line)
    spec = fresh("default-delete") | {"delete_on_success": True}
    one = pipeline_run(spec, args)
    two = pipeline_run(spec, args)
    counts = count_ids(Path(spec["out"]), "id", ids)
    line = (f"| CheckpointConfig defaults (delete_checkpoint_on_success=True), the same job run twice | "
            f"run 2 wrote {two['rows_written']} rows; {n} ids: {counts} ({exit_text(one)}; {exit_text(two)}) |")
    print(line, flush=True)
    rows.append(line)
    return rows


def project_transient(root: Path) -> str:
    """scan_parts on a part holding transient, crashed and permanent error rows."""
    from jobs.common.schema import annotation_table
    from jobs.output import committed_parts, scan_parts
    from jobs.pipelines.annotate import commit_rows

    output = root / "sem-project-transient"
    shutil.rmtree(output, ignore_errors=True)
    paths = [f"/data/{i:04d}.jpg" for i in range(2000)]
    kinds = [("transient" if i % 10 == 0 else "crashed" if i % 10 == 1 else "permanent" if i % 10 == 2 else None)
             for i in range(2000)]
    errors = [None if kind is None else f"{kind} failure" for kind in kinds]
    table = annotation_table(paths, [None if e else (160, 120) for e in errors], [None] * 2000, errors, kinds)
    output.mkdir(parents=True)
    commit_rows(table, str(output), {}, "{}")
    index = scan_parts(str(output), {}, committed_parts(str(output)))
    again = scan_parts(str(output), {}, committed_parts(str(output)))
    shutil.rmtree(output, ignore_errors=True)
    return (f"| project: a part of 2000 rows, 200 transient + 200 crashed + 200 permanent errors, scanned | "
            f"{index.redo} rows taken out to redo, {len(index.done)} done ({len(index.crashed)} crashed, "
            f"tried alone); a second scan finds {len(again.done)} done, {again.redo} to redo "
            f"(--retry-errors redoes the permanent ones too) |")


def project_duplicates(listed: list[str]) -> str:
    """RunState.claim over the manifest's chunks, as the listing calls it."""
    from jobs.output import path_digests
    from jobs.pipelines.run_state import RunState

    state = RunState(dedupe=True)
    claimed = 0
    for number, start in enumerate(range(0, len(listed), 256)):
        claimed += int(state.claim(path_digests(listed[start:start + 256]), f"0:{number}").sum())
    counts = state.snapshot()
    return (f"| project: the same {len(listed)} lines through RunState.claim (256-line chunks) | "
            f"{claimed} paths annotated, {counts['repeated']} lines counted as repeats: one row per path |")


def project_lease(root: Path) -> str:
    from jobs.output import Lease, OutputError

    output = root / "sem-project-lease"
    shutil.rmtree(output, ignore_errors=True)
    output.mkdir(parents=True)
    holder = Lease(str(output), {}, "this-host:1:first-job")
    holder.acquire()
    try:
        Lease(str(output), {}, "this-host:2:second-job").acquire()
        text = "the second job took it (unexpected)"
    except OutputError as error:
        text = f"refused: {str(error)[:120]}"
    finally:
        holder.release()
    shutil.rmtree(output, ignore_errors=True)
    return f"| project: a second job on a held OUTPUT | {text} |"


# -- main -------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--done", default="1000000,10000000", help="paths done before the resumed run")
    parser.add_argument("--new", type=int, default=1000, help="paths new to the resumed run (K)")
    parser.add_argument("--images", type=int, default=10_000, help="distinct tiny photos behind the manifests")
    parser.add_argument("--kill-ids", type=int, default=20_000)
    parser.add_argument("--kill-blocks", type=int, default=400)
    parser.add_argument("--kill-at", default="1,100,250,pending,pending,pending-all,pending-all",
                        help="at each SIGKILL: data files present, or 'pending' (inside a two-phase commit)")
    parser.add_argument("--kill-images", type=int, default=400, help="photos for annotate's SIGKILL (0: skip)")
    parser.add_argument("--sections", default="resume,kill,semantics")
    parser.add_argument("--min-available-gb", type=float, default=3.0,
                        help="kill a measured run when the machine's available memory falls under this")
    parser.add_argument("--work", default=None, help="scratch folder (default: a new temporary one)")
    parser.add_argument("--quick", action="store_true", help="small sizes, for debugging")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        runner = {"pipeline": child_pipeline, "bookkeeping": child_bookkeeping}[spec["kind"]]
        print(json.dumps(runner(spec)), flush=True)
        return
    if args.quick:
        args.done, args.new, args.images = "20000", 200, 2000
        args.kill_ids, args.kill_blocks, args.kill_at, args.kill_images = 4000, 80, "1,pending,pending-all", 60
    args.done = [int(x) for x in args.done.split(",") if x]
    args.kill_at = [x for x in args.kill_at.split(",") if x]
    sys.path.insert(0, str(SCRIPT.parent))
    root = Path(args.work or tempfile.mkdtemp(prefix="checkpoint-resume-"))
    root.mkdir(parents=True, exist_ok=True)
    print(host_line(), flush=True)
    print(f"scratch: {root}; {load()}; {available_gb():.1f} GiB available", flush=True)
    sections = set(args.sections.split(","))
    table = []
    if "semantics" in sections:
        print("## what CheckpointConfig cannot express", flush=True)
        table += section_semantics(root, args)
    if "kill" in sections:
        print("## exactly-once under a driver SIGKILL", flush=True)
        table += section_kill(root, args)
    if "resume" in sections:
        print("## resume at scale", flush=True)
        table += section_resume(root, args)
    print("\n## all figures\n" + "\n".join(table), flush=True)


if __name__ == "__main__":
    main()
