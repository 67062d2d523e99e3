"""Batch inference on Ray Data: ``hematoscope predict ... --engine ray [--address ADDR]``.

A manifest of images (folders, globs and zips expanded as local ``predict`` does, or a CSV /
Parquet list of paths or URIs that pyarrow's filesystems read) is cut into shards of
``shard_rows`` rows. Ray Data reads the shards' rows in tasks, and a pool of actors, each holding
one loaded bundle (one ONNX Runtime session with as many intra-op threads as CPUs the actor was
given), classifies them with the local pipeline's own code
(:func:`hematoscope.predict.pipeline.predict_sources`: the same decoding, preprocessing,
calibration and abstain rules, so the same answers as ``hematoscope predict``). Files are read
inside the actors, never on the driver.

The driver receives the result rows in manifest order and writes each finished shard as
``shards/part-NNNNN.parquet`` (atomically): a restarted job skips the shards already written.
The usual CSV / JSON report and the differential count are then built from the shards, one at a
time, so the driver's memory stays flat however long the manifest. Unreadable files are result
rows with an ``error``; they never stop the job.

Needs the optional extra: ``pip install 'hematoscope[distributed]'`` (ray[data], pyarrow).

    >>> from hematoscope.predict.distributed import predict_dataset, run_job
    >>> result = run_job(["slides/"], "job_dir", report="preds.csv")  # doctest: +SKIP
    >>> results = predict_dataset(ray.data.read_parquet("paths.parquet"))  # doctest: +SKIP
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

import numpy as np

from hematoscope import _io
from hematoscope._extras import MissingExtraError, require  # noqa: F401 - MissingExtraError: public here too
from hematoscope.bundle.prediction import DifferentialCount, Prediction, SkippedFile
from hematoscope.predict.options import InferenceOptions
from hematoscope.predict.pipeline import load_for_inference  # noqa: F401 - the actors' loader, public here too

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data

    from hematoscope.bundle.base import Bundle

log = logging.getLogger("hematoscope")

#: Rows per shard (one Parquet file of results each; the unit a restarted job skips).
SHARD_ROWS = 10_000
MANIFEST_FILE = "manifest.parquet"
JOB_FILE = "job.json"
SHARD_DIR = "shards"
#: Inputs read as manifests (lists of paths), not as images, by the Ray engine.
MANIFEST_SUFFIXES = (".csv", ".parquet", ".pq")
#: Result columns added to each input row.
RESULT_COLUMNS = ("error", "prediction", "confidence", "abstain", "abstain_reason", "ood_score", "ood_flag", "views",
                  "framing", "recolour", "probs")
_FORMAT = 2  # 2: job.json records the inputs' and the model's content


class RayJobError(ValueError):
    """A job directory that belongs to another job, or an unusable manifest."""


def require_distributed() -> None:
    """Raise :class:`MissingExtraError` naming the extra when ray[data] or pyarrow is missing."""
    require("pyarrow", "ray", "ray.data", extra="distributed", purpose="the Ray engine")


# --- running one table of rows through a bundle (inside an actor) --------------------------------
def _result_schema() -> "pa.Schema":
    import pyarrow as pa

    return pa.schema([("error", pa.string()), ("prediction", pa.string()), ("confidence", pa.float64()),
                      ("abstain", pa.bool_()), ("abstain_reason", pa.string()), ("ood_score", pa.float64()),
                      ("ood_flag", pa.bool_()), ("views", pa.int32()), ("framing", pa.float64()),
                      ("recolour", pa.string()),
                      ("probs", pa.list_(pa.float64()))])


class _Inputs:
    """Turns manifest rows into the local pipeline's items: files, zip members, URIs (fetched into
    a temporary folder with pyarrow's filesystems, then read like files)."""

    #: zip files whose member lists are kept (the most recently opened).
    MAX_ZIPS = 16

    def __init__(self) -> None:
        self._zips: dict[str, dict | Exception] = {}
        self._tmp: Path | None = None

    def items(self, sources: Sequence[str], paths: Sequence[str | None], members: Sequence[str | None],
              reasons: Sequence[str | None]) -> list:
        from concurrent.futures import ThreadPoolExecutor

        from hematoscope.data.sources import ImageSource

        out: list = []
        remote: list[int] = []
        for i, (source, path, member, reason) in enumerate(zip(sources, paths, members, reasons)):
            if reason or not path:
                out.append(SkippedFile(source, reason or "no path"))
            elif member:
                out.append(self._member(source, path, member))
            elif "://" in path and not path.startswith("file://"):
                out.append(None)
                remote.append(i)
            else:
                out.append(ImageSource(source, Path(path.removeprefix("file://"))))
        if remote:  # object stores answer slowly but in parallel
            with ThreadPoolExecutor(max_workers=min(16, len(remote))) as pool:
                for i, item in zip(remote, pool.map(lambda i: self._fetch(sources[i], paths[i], i), remote)):
                    out[i] = item
        return out

    def _member(self, source: str, path: str, member: str):
        from hematoscope.data.archive import UnsafeArchiveError, open_zip, safe_members
        from hematoscope.data.sources import ImageSource

        if path not in self._zips:
            if len(self._zips) >= self.MAX_ZIPS:
                self._zips.pop(next(iter(self._zips)))
            try:
                with open_zip(path) as zf:
                    self._zips[path] = {m.name: m for m in safe_members(zf)}
            except UnsafeArchiveError as exc:
                self._zips[path] = exc
        members = self._zips[path]
        if isinstance(members, Exception):
            return SkippedFile(source, f"unsafe zip, not read: {members}")
        if member not in members:
            return SkippedFile(source, "not in the zip file")
        return ImageSource(source, Path(path), members[member])

    def _fetch(self, source: str, uri: str, i: int):
        from pyarrow import fs

        from hematoscope.data.sources import ImageSource

        try:
            filesystem, path = fs.FileSystem.from_uri(uri)
            with filesystem.open_input_stream(path) as f:
                data = f.read()
        except (OSError, ValueError) as exc:
            return SkippedFile(source, f"cannot read ({exc})")
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="hematoscope-ray-"))
        local = self._tmp / f"{i}{Path(path).suffix}"
        local.write_bytes(data)
        return ImageSource(source, local)

    def cleanup(self) -> None:
        """Remove the fetched copies of this batch."""
        if self._tmp is not None:
            import shutil

            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def classify_table(bundle: "Bundle", table: "pa.Table", *, batch_size: int = 64, workers: int | None = None,
                   inputs: _Inputs | None = None) -> "pa.Table":
    """Classify the images a table of rows names; returns the table with the result columns.

    Args:
        bundle: a loaded bundle (with its TTA / abstain settings applied).
        table: rows with ``path`` (file, ``file://`` or pyarrow-filesystem URI) and optionally
            ``source`` (the name in the outputs; default: the path), ``member`` (a zip member
            of the zip at ``path``) and ``reason`` (a known skip reason: the row is not read).
        batch_size: images per model call (the local pipeline's batches).
        workers: decoding threads.

    Returns:
        The input columns plus ``error`` (the reason a file was not classified, else null),
        ``prediction``, ``confidence``, ``abstain``, ``abstain_reason``, ``ood_score``,
        ``ood_flag`` and ``probs`` (calibrated probabilities in the bundle's label order).
    """
    import pyarrow as pa

    from hematoscope.predict.pipeline import predict_sources

    n = table.num_rows
    paths = table.column("path").to_pylist()
    members = table.column("member").to_pylist() if "member" in table.column_names else [None] * n
    reasons = table.column("reason").to_pylist() if "reason" in table.column_names else [None] * n
    # The pipeline names its answers and skipped files by the items' names: it is given each
    # row's index as the name (several rows may share a source name), the sources are put back after.
    inputs = inputs or _Inputs()
    try:
        items = inputs.items([str(i) for i in range(n)], paths, members, reasons)
        parts = list(predict_sources(bundle, items, batch_size=batch_size, workers=workers))
    finally:
        inputs.cleanup()
    pred = Prediction.concat(parts, bundle.labels)
    labels = bundle.labels
    views = getattr(pred, "views", None)  # test-time views per answer, where the bundle records them
    cols: dict[str, list] = {c: [None] * n for c in RESULT_COLUMNS}
    for s in pred.skipped:
        cols["error"][int(s.source)] = s.reason
    for k, name in enumerate(pred.sources):
        i, probs = int(name), pred.probs[k]
        top = int(np.argmax(probs))
        cols["prediction"][i] = labels[top]
        cols["confidence"][i] = float(probs[top])
        cols["abstain"][i] = bool(pred.abstain[k])
        cols["abstain_reason"][i] = pred.abstain_reason[k]
        cols["ood_score"][i] = float(pred.ood_score[k])
        cols["ood_flag"][i] = bool(pred.ood_flag[k])
        cols["views"][i] = None if views is None else int(views[k])
        cols["framing"][i] = None if pred.framing is None else float(pred.framing[k])
        cols["recolour"][i] = None if pred.recolour is None else str(pred.recolour[k])
        cols["probs"][i] = [float(p) for p in probs]
    answered = len(pred) + len(pred.skipped)
    if answered != n or any(e is None and p is None for e, p in zip(cols["error"], cols["prediction"])):
        raise RuntimeError(f"{len(pred)} answers and {len(pred.skipped)} skipped files for {n} rows")
    schema = _result_schema()
    out = table.drop_columns([c for c in RESULT_COLUMNS if c in table.column_names])
    if "source" not in out.column_names:  # the name local predict gives: the path, or zip!member
        out = out.append_column("source", pa.array([p if not m else f"{p}!{m}" for p, m in zip(paths, members)],
                                                   type=pa.string()))
    for f in schema:
        out = out.append_column(f, pa.array(cols[f.name], type=f.type))
    return out


def _assigned_cpus() -> int:
    import ray

    try:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    except Exception:  # not inside a Ray worker
        cpus = 1
    return max(1, int(round(cpus)))


class BundlePredictor:
    """A Ray Data actor: one loaded bundle, called on batches of manifest rows (pyarrow tables).

    Its model session gets the CPUs Ray assigned to the actor; decoding uses ``decode_threads``
    threads (default: one more than those CPUs, so a thread decodes while the model runs).
    """

    def __init__(self, model: str | None = None, options: InferenceOptions | None = None, *, batch_size: int = 64,
                 decode_threads: int | None = None):
        cpus = _assigned_cpus()
        self.bundle = load_for_inference(model, options, threads=cpus)
        self.batch_size = batch_size
        self.workers = decode_threads or cpus + 1
        self.inputs = _Inputs()

    def __call__(self, batch: "pa.Table") -> "pa.Table":
        return classify_table(self.bundle, batch, batch_size=self.batch_size, workers=self.workers, inputs=self.inputs)


def predict_dataset(ds: "ray.data.Dataset", model: str | Path | None = None, options: InferenceOptions | None = None,
                    *, batch_size: int = 64, actors: int | None = None, cpus_per_actor: float = 1,
                    decode_threads: int | None = None) -> "ray.data.Dataset":
    """Classify the images a Ray Dataset names; lazy, like every Ray Data transform.

    Args:
        ds: rows with a ``path`` column (local path visible on every node, ``file://`` or a URI
            pyarrow's filesystems read: ``s3://``, ``gs://``, ``hdfs://``), optionally
            ``source`` (the name in outputs), ``member`` (zip member) and ``reason``.
        model: bundle directory or zip, readable on every node (default: the shipped model).
        options: how the bundle is run (:class:`InferenceOptions`, as ``hematoscope predict``'s
            options; default: as saved).
        batch_size: images per model call.
        actors: size of the actor pool (default: the cluster's CPUs / ``cpus_per_actor``).
        cpus_per_actor: CPUs reserved per actor (its model session's threads).
        decode_threads: decoding threads per actor.

    Returns:
        The rows with the result columns of :func:`classify_table`.
    """
    require_distributed()
    import ray

    if actors is None:
        actors = max(1, int(ray.cluster_resources().get("CPU", 1) // cpus_per_actor))
    return ds.map_batches(
        BundlePredictor, batch_format="pyarrow", batch_size=4 * batch_size, num_cpus=cpus_per_actor,
        compute=ray.data.ActorPoolStrategy(size=actors),
        fn_constructor_kwargs=dict(model=None if model is None else str(model), options=options,
                                   batch_size=batch_size, decode_threads=decode_threads),
    )


# --- the manifest ----------------------------------------------------------------------------------
def is_manifest(path: str | Path) -> bool:
    """A CSV or Parquet list of paths (the Ray engine reads it as such, not as an image)."""
    return str(path).lower().endswith(MANIFEST_SUFFIXES)


def _absolute(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


def _manifest_chunks(inputs: Sequence[str | Path], chunk: int,
                     left_out: list[str] | None = None) -> Iterator[dict[str, list]]:
    """Rows (source, path, member, reason) of the inputs, ``chunk`` at a time (``left_out``: as
    :func:`~hematoscope.data.sources.expand_paths`)."""
    if len(inputs) == 1 and is_manifest(inputs[0]):
        yield from _list_chunks(str(inputs[0]), chunk)
        return
    from hematoscope.data.sources import expand_paths

    rows: dict[str, list] = {"source": [], "path": [], "member": [], "reason": []}
    for item in expand_paths(inputs, left_out=left_out):
        if isinstance(item, SkippedFile):
            rows["source"].append(item.source)
            rows["path"].append(None)
            rows["member"].append(None)
            rows["reason"].append(item.reason)
        else:
            rows["source"].append(item.name)
            rows["path"].append(os.path.abspath(item.path))
            rows["member"].append(item.member.name if item.member else None)
            rows["reason"].append(None)
        if len(rows["source"]) == chunk:
            yield rows
            rows = {k: [] for k in rows}
    if rows["source"]:
        yield rows


def _list_chunks(manifest: str, chunk: int) -> Iterator[dict[str, list]]:
    """A CSV / Parquet list of paths (column ``path``, else the first column; optional
    ``source``), streamed in record batches."""
    import pyarrow.dataset as pads

    fmt = "csv" if manifest.lower().endswith(".csv") else "parquet"
    try:
        data = pads.dataset(manifest, format=fmt)
    except (OSError, ValueError) as exc:
        raise RayJobError(f"cannot read the manifest {manifest}: {exc}") from None
    names = data.schema.names
    path_col = "path" if "path" in names else names[0]
    columns = [path_col] + (["source"] if "source" in names else [])
    for batch in data.to_batches(columns=columns, batch_size=chunk):
        paths = [None if p is None else str(p) for p in batch.column(0).to_pylist()]
        sources = batch.column(1).to_pylist() if len(columns) == 2 else paths
        yield {"source": [s if s is not None else "" for s in sources],
               "path": [None if p is None else _absolute(p) for p in paths],
               "member": [None] * len(paths),
               "reason": [None if p else "no path in the manifest row" for p in paths]}


def _digest_rows(digest, rows: dict[str, list]) -> None:
    """Add manifest rows to ``digest``, with each local file's size and modification time, so
    that a job folder is not resumed after files were added, removed or replaced."""
    # not the source names: the same job named by a relative path from elsewhere is the same job
    for path, member, reason in zip(rows["path"], rows["member"], rows["reason"]):
        stamp = ""
        if path and "://" not in path:
            try:
                st = os.stat(path)
                stamp = f"{st.st_size}:{st.st_mtime_ns}"
            except OSError:
                stamp = "missing"
        digest.update(json.dumps([path, member, reason, stamp]).encode("utf-8", "surrogateescape"))


def inputs_digest(inputs: Sequence[str | Path], chunk: int = SHARD_ROWS) -> str:
    """Fingerprint of what ``inputs`` list now: each row of the manifest they give, with each
    local file's size and modification time (as recorded in ``job.json`` when the job started)."""
    digest = hashlib.sha256()
    for rows in _manifest_chunks(inputs, chunk):
        _digest_rows(digest, rows)
    return digest.hexdigest()[:16]


def bundle_digest(bundle) -> str:
    """Fingerprint of a loaded bundle's files (config, weights, OOD reference, metrics): the
    same path holding another model, or the shipped model after an upgrade, differs."""
    digest = hashlib.sha256()
    directory = getattr(bundle, "directory", None)
    if directory is None:
        digest.update(bundle.config.model_dump_json().encode())
    else:
        for f in sorted(Path(directory).iterdir()):
            if f.is_file() and f.suffix in (".json", ".safetensors"):
                digest.update(f"{f.name}:{_io.file_sha256(f)}".encode())
    return digest.hexdigest()[:16]


def write_manifest(inputs: Sequence[str | Path], path: Path, shard_rows: int = SHARD_ROWS, *,
                   left_out: list[str] | None = None, digest=None) -> int:
    """Write the job's manifest: one row group per shard, with each row's index. Returns rows.
    ``digest`` (a hashlib object), when given, is fed the rows as :func:`inputs_digest` does."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("row", pa.int64()), ("source", pa.string()), ("path", pa.string()),
                        ("member", pa.string()), ("reason", pa.string())])
    n = 0
    with _io.atomic_path(path, ".parquet") as tmp:
        with pq.ParquetWriter(tmp, schema) as writer:
            buffer: dict[str, list] = {"source": [], "path": [], "member": [], "reason": []}

            def flush(rows: dict[str, list]) -> None:
                nonlocal n
                m = len(rows["source"])
                writer.write_table(pa.table({"row": np.arange(n, n + m, dtype=np.int64), **rows}, schema=schema),
                                   row_group_size=shard_rows)
                n += m

            for rows in _manifest_chunks(inputs, shard_rows, left_out):
                if digest is not None:
                    _digest_rows(digest, rows)
                for k in buffer:
                    buffer[k].extend(rows[k])
                while len(buffer["source"]) >= shard_rows:
                    flush({k: v[:shard_rows] for k, v in buffer.items()})
                    buffer = {k: v[shard_rows:] for k, v in buffer.items()}
            if buffer["source"]:
                flush(buffer)
    return n


def _read_pieces(batch: dict[str, np.ndarray], manifest: str) -> "pa.Table":
    """Ray task: the manifest rows of the pieces (shard, start, stop) in ``batch``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = pq.ParquetFile(manifest)
    return pa.concat_tables([f.read_row_group(int(shard)).slice(int(start), int(stop - start))
                             for shard, start, stop in zip(batch["shard"], batch["start"], batch["stop"])])


# --- the job -------------------------------------------------------------------------------------
@dataclass
class JobResult:
    """What :func:`run_job` did."""

    out_dir: Path
    rows: int
    shards: int
    shards_written: int
    shards_skipped: int
    differential: DifferentialCount
    model: str = ""  # the bundle's name
    skipped: list[SkippedFile] = field(default_factory=list)  # the first 1,000 unreadable files
    seconds: float = 0.0
    report: Path | None = None
    #: files in the inputs' folders and zips passed over for their extension, in one line
    left_out: str | None = None

    @property
    def classified(self) -> int:
        return self.differential.classified + self.differential.abstained


def _reachable(address: str, timeout: float = 5.0) -> None:
    """Refuse a ``host:port`` cluster address nothing answers at: Ray itself retries for minutes,
    printing "Failed to connect to GCS" (``auto`` and ``ray://`` addresses are left to Ray).

    Raises:
        RayJobError: the port is closed or the host cannot be reached.
    """
    import socket

    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise RayJobError(f"no Ray cluster answers at {address} ({exc.strerror or exc}); start one with "
                          "`ray start --head` there, or leave --address out for a local instance") from None


def connect(address: str | None = None, *, num_cpus: int | None = None) -> bool:
    """Join the Ray cluster at ``address``, or start a local instance: bound to 127.0.0.1 only,
    no dashboard, no usage reports, its workers at normal priority (Ray lowers them to nice 15
    by default, which starves them on a busy machine). Does nothing when Ray is already
    initialised in this process. Returns True when it started or joined (then the caller shuts
    it down)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reports leave the machine
    if not address:
        # On Linux Ray replaces 127.0.0.1 by the machine's routable address and listens on every
        # interface, unless cluster mode is off: a local instance stays on the loopback.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # for the processes Ray starts
    require_distributed()
    import ray

    if address:
        _reachable(address)
    if ray.is_initialized():
        return False
    import signal
    import threading

    # Ray's core worker installs a native SIGTERM handler that dumps a stack and aborts (exit
    # 134), skipping Python's clean-up; the caller's handler (the CLI's) is put back after init
    main = threading.current_thread() is threading.main_thread()
    on_term = signal.getsignal(signal.SIGTERM) if main else None
    if address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    else:
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False  # read at call time; the variable above was read at import
        ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 _system_config={"worker_niceness": 0}, logging_level=logging.WARNING, log_to_driver=False)
    if callable(on_term):
        signal.signal(signal.SIGTERM, on_term)
    return True


def local_session_dir() -> Path | None:
    """The folder (logs, sockets, spilled objects) of the Ray instance this process started, or
    None when it cannot be told."""
    try:
        from ray._private import worker  # no public accessor for it in Ray 2.x

        return Path(worker._global_node.get_session_dir_path())
    except Exception:  # another Ray version: leave the folder, as Ray itself does
        return None


def remove_session_dir(session: Path) -> None:
    """Remove a stopped local instance's session folder (Ray keeps one per start under its temp
    folder, /tmp/ray, for good) and the ``session_latest`` link when it pointed there."""
    shutil.rmtree(session, ignore_errors=True)
    latest = session.parent / "session_latest"
    if latest.is_symlink() and not latest.exists():
        latest.unlink(missing_ok=True)


def shard_path(out_dir: Path, shard: int) -> Path:
    return Path(out_dir) / SHARD_DIR / f"part-{shard:05d}.parquet"


#: How a refusal names what changed since the job started.
NAMED = {"inputs_sha256": "input files (added, removed or replaced)", "model_sha256": "model files",
         "format": "job format (an earlier version's job)"}


def _prepare(inputs: Sequence[str | Path], out_dir: Path, job: dict, shard_rows: int) -> dict:
    """Write the manifest and job.json, or check that ``out_dir`` holds this same job."""
    job_file, manifest = out_dir / JOB_FILE, out_dir / MANIFEST_FILE
    if job_file.is_file() and manifest.is_file():
        old = json.loads(job_file.read_text(encoding="utf-8"))
        job = {**job, "inputs_sha256": inputs_digest(inputs, shard_rows)}
        differs = [NAMED.get(k, k) for k in job if k not in ("rows", "shards") and old.get(k) != job[k]]
        if differs:
            raise RayJobError(f"{out_dir} holds another job (its {', '.join(differs)} differ); choose another "
                              "directory for the shards or remove it")
        return old
    if out_dir.exists() and any(out_dir.iterdir()):
        raise RayJobError(f"{out_dir} is not empty and holds no job; choose another directory for the shards")
    out_dir.mkdir(parents=True, exist_ok=True)
    left_out: list[str] = []
    digest = hashlib.sha256()
    rows = write_manifest(inputs, manifest, shard_rows, left_out=left_out, digest=digest)
    job = {**job, "inputs_sha256": digest.hexdigest()[:16], "rows": rows, "shards": -(-rows // shard_rows)}
    if left_out:  # told again when the job resumes: the manifest is not rebuilt then
        from hematoscope.data.sources import left_out_summary

        job["left_out"] = left_out_summary(left_out)
    _io.write_json(job_file, job)
    return job


def run_job(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    model: str | Path | None = None,
    address: str | None = None,
    shard_rows: int = SHARD_ROWS,
    batch_size: int = 64,
    actors: int | None = None,
    cpus_per_actor: float = 1,
    decode_threads: int | None = None,
    options: InferenceOptions | None = None,
    report: str | Path | None = None,
    top_k: int = 3,
    num_cpus: int | None = None,
    on_shard: Callable[[int, int], None] | None = None,
) -> JobResult:
    """Classify files, folders, globs, zips or a CSV / Parquet manifest on Ray, into Parquet
    shards in ``out_dir`` (plus an optional CSV / JSON ``report`` like ``hematoscope predict``).

    Args:
        inputs: what ``hematoscope predict`` takes, or one ``.csv`` / ``.parquet`` list of
            paths or URIs (column ``path``, else the first; optional ``source``).
        out_dir: the job directory: ``manifest.parquet``, ``job.json``, ``shards/``. Must be on a
            filesystem every node of the cluster sees. Run again to resume: written shards are
            kept and skipped.
        model: bundle readable on every node (default: the shipped model).
        address: Ray cluster to join (``ray start --head`` prints it); None: a local instance.
        shard_rows: rows per shard (fixed when the job is created).
        batch_size, actors, cpus_per_actor, decode_threads: see :func:`predict_dataset`.
        options: how the bundle is run (:class:`InferenceOptions`, as ``hematoscope predict``'s
            options); kept in ``job.json``: a resumed job must be given the same.
        top_k: classes listed per image in the report.
        report: write the per-image ``.csv`` / ``.json`` report (as local predict) here.
        num_cpus: CPUs of a local instance (default: all).
        on_shard: called as ``on_shard(shard, rows)`` after each shard is written.

    Raises:
        MissingExtraError: ray[data] / pyarrow not installed.
        RayJobError: ``out_dir`` holds another job; unreadable manifest.
        BundleError: the model cannot be loaded.
    """
    require_distributed()
    import ray

    start = time.perf_counter()
    out_dir = Path(out_dir)
    options = options or InferenceOptions()
    bundle = load_for_inference(model, options)
    # inputs as absolute paths: the same job resumed from another working directory is still the same job
    spec = {"format": _FORMAT, "inputs": [os.path.abspath(i) if Path(i).exists() else str(i) for i in inputs],
            "model": str(model) if model else "default", "model_sha256": bundle_digest(bundle),
            "shard_rows": shard_rows, "labels": bundle.labels, **options.spec()}
    job = _prepare(inputs, out_dir, spec, shard_rows)
    pending = [i for i in range(job["shards"]) if not shard_path(out_dir, i).is_file()]
    done_before = job["shards"] - len(pending)
    if done_before:
        log.info("%s: %d of %d shards already written, skipped", out_dir, done_before, job["shards"])
    if pending:
        started = connect(address, num_cpus=num_cpus)
        session = local_session_dir() if started and not address else None
        done = False
        try:
            _run_shards(out_dir, pending, job, model=model, options=options, batch_size=batch_size, actors=actors,
                        cpus_per_actor=cpus_per_actor, decode_threads=decode_threads, on_shard=on_shard)
            done = True
        finally:
            if started:
                ray.shutdown()
            if session is not None:
                if done:
                    remove_session_dir(session)
                else:  # its logs may say why the job stopped
                    log.warning("Ray's logs of this run are kept in %s", session / "logs")
    diff, skipped = _report(out_dir, job, bundle, report=report, top_k=top_k, batch_size=batch_size)
    return JobResult(out_dir, job["rows"], job["shards"], len(pending), done_before, diff, bundle.name, skipped,
                     time.perf_counter() - start, Path(report) if report else None, job.get("left_out"))


def _run_shards(out_dir: Path, pending: list[int], job: dict, *, on_shard, **options) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # rows come back in manifest order: shards close in turn
    ctx.enable_progress_bars = False
    shard_rows, rows = job["shard_rows"], job["rows"]
    manifest = str((out_dir / MANIFEST_FILE).resolve())

    def expected(shard: int) -> int:
        return min(shard_rows, rows - shard * shard_rows)

    # Each shard is read in pieces of a few model batches, each its own block: the actors share
    # the work of one shard, and memory in flight stays small.
    piece = 8 * options["batch_size"]
    pieces = [{"shard": i, "start": a, "stop": min(a + piece, expected(i))}
              for i in pending for a in range(0, expected(i), piece)]
    blocks = min(len(pieces), 2000)
    ds = ray.data.from_items(pieces, override_num_blocks=blocks)
    ds = ds.map_batches(_read_pieces, fn_kwargs={"manifest": manifest}, batch_size=1, num_cpus=0,
                        batch_format="numpy")
    if options.get("actors") is None:
        options["actors"] = max(1, int(ray.cluster_resources().get("CPU", 1) // options["cpus_per_actor"]))
    options["actors"] = min(options["actors"], blocks)  # a small job: no idle actors to start
    results = predict_dataset(ds, **options)
    queue = list(pending)
    buffer: list[pa.Table] = []
    have = 0

    for batch in results.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1):
        buffer.append(batch)
        have += batch.num_rows
        while queue and have >= expected(queue[0]):
            shard, n = queue[0], expected(queue[0])
            table = pa.concat_tables(buffer)
            part, rest = table.slice(0, n), table.slice(n)
            first = part.column("row")[0].as_py()
            if first != shard * shard_rows:  # the order Ray promised with preserve_order
                raise RuntimeError(f"shard {shard}: rows arrived out of order (first row {first})")
            with _io.atomic_path(shard_path(out_dir, shard), ".parquet") as tmp:
                pq.write_table(part.drop_columns([c for c in ("path", "member", "reason") if c in part.column_names]),
                               tmp)
            queue.pop(0)
            buffer, have = ([rest] if rest.num_rows else []), rest.num_rows
            if on_shard:
                on_shard(shard, n)
    if queue:
        raise RuntimeError(f"the job ended with shards {queue} incomplete")


def iter_shard_predictions(out_dir: str | Path, labels: Sequence[str], *, batch_size: int = 64,
                           shards: int | None = None) -> Iterator[Prediction]:
    """The written shards as :class:`Prediction` objects of ``batch_size`` rows, in manifest
    order (unreadable files of each stretch in its ``skipped``, as the local pipeline yields)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out_dir = Path(out_dir)
    if shards is None:
        shards = json.loads((out_dir / JOB_FILE).read_text(encoding="utf-8"))["shards"]
    carry: pa.Table | None = None
    for i in range(shards):
        table = pq.read_table(shard_path(out_dir, i))
        if carry is not None and carry.num_rows:
            table = pa.concat_tables([carry, table], promote_options="default")  # shards of an older version
        full = table.num_rows - table.num_rows % batch_size if i < shards - 1 else table.num_rows
        for s in range(0, full, batch_size):
            yield _prediction(table.slice(s, min(batch_size, full - s)), labels)
        carry = table.slice(full)


def _prediction(table: "pa.Table", labels: Sequence[str]) -> Prediction:
    d = table.to_pydict()
    ok = [i for i, e in enumerate(d["error"]) if e is None]
    probs = np.array([d["probs"][i] for i in ok], dtype=np.float64).reshape(len(ok), len(labels))
    extra = {}
    for column, dtype in (("views", np.int64), ("framing", np.float64), ("recolour", object)):
        values = d.get(column)  # absent from shards written before the column existed
        if ok and values is not None and all(values[i] is not None for i in ok):
            extra[column] = np.array([values[i] for i in ok], dtype=dtype)
    return Prediction(
        labels=list(labels), probs=probs, sources=[d["source"][i] for i in ok],
        ood_score=np.array([d["ood_score"][i] for i in ok], dtype=np.float64),
        ood_flag=np.array([d["ood_flag"][i] for i in ok], dtype=bool),
        abstain=np.array([d["abstain"][i] for i in ok], dtype=bool),
        abstain_reason=[d["abstain_reason"][i] for i in ok],
        skipped=[SkippedFile(d["source"][i], d["error"][i]) for i, e in enumerate(d["error"]) if e is not None],
        **extra,
    )


def _report(out_dir: Path, job: dict, bundle: "Bundle", *, report, top_k: int, batch_size: int
            ) -> tuple[DifferentialCount, list[SkippedFile]]:
    """Differential count (also ``differential.json`` in the job directory), the first
    unreadable files, and the optional CSV / JSON report, from the shards one at a time."""
    from hematoscope.predict.report import ReportWriter, empty_differential, merge_differentials

    writer = ReportWriter(report, bundle.labels, top_k=top_k, model=bundle.describe()) if report else None
    diff, skipped = empty_differential(bundle.labels), []
    try:
        for pred in iter_shard_predictions(out_dir, bundle.labels, batch_size=batch_size, shards=job["shards"]):
            diff = merge_differentials(diff, pred.differential())
            skipped.extend(pred.skipped[:max(0, 1000 - len(skipped))])
            if writer:
                writer.add(pred)
    except BaseException:
        if writer:
            writer.abort()
        raise
    if writer:
        writer.close()
    _io.write_json(out_dir / "differential.json", diff.to_dict())
    return diff, skipped


def read_results(out_dir: str | Path, columns: Iterable[str] | None = None) -> "pa.Table":
    """All written shards of a job as one table (small jobs and tests; large ones: read the
    ``shards/`` folder with any Parquet reader)."""
    import pyarrow.parquet as pq

    import pyarrow as pa

    files = sorted((Path(out_dir) / SHARD_DIR).glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(f, columns=list(columns) if columns else None) for f in files])
