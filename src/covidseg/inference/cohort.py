"""Cohort inference across processes and nodes: shard, skip what is done, record a status per case, summarise.

No scheduler of our own: start one process per GPU (or per a few CPU cores) with ``torchrun``, a SLURM array or
by hand with ``RANK``/``WORLD_SIZE`` set, and every process calls :func:`run_cohort` with the same case list::

    torchrun --nproc_per_node 4 -m covidseg segment cases.txt -o OUT            # one node, 4 GPUs
    torchrun --nnodes 2 --nproc_per_node 4 --rdzv-backend c10d \\
             --rdzv-endpoint HOST:29500 --rdzv-id cohort1 -m covidseg segment cases.txt -o OUT

Rules (docs/interop.md):

- **Shares.** Cases are sorted by case id; rank ``r`` of ``W`` takes positions ``r, r + W, r + 2W, ...``. The
  share depends only on the list and ``W``, never on timing, so ranks need not talk to each other to split work.
- **Status.** Each case has ``OUT/cohort_status/<case_id>.json`` (written atomically): ``running`` when started,
  then ``done`` (with the dict ``process_case`` returned) or ``failed`` (with the error message); both with the
  rank, host, start/end times and seconds. A case whose status is ``done`` is skipped, so a restarted job only does
  what is left (``failed`` and stale ``running`` cases are tried again unless ``retry_failed=False``).
- **Summary.** When every rank has finished, rank 0 writes ``OUT/summary.csv`` (one row per case). It waits with a
  ``gloo`` barrier when ``torch.distributed`` is initialised or torchrun's rendezvous variables are set, otherwise
  by polling the status files and the per-rank markers ``OUT/cohort_status/rank-R-of-W.json`` (up to
  ``timeout_s``).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import io
import json
import os
import socket
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from covidseg.errors import ConfigError, InputError, UserError
from covidseg.inference.inputs import case_name
from covidseg.io.atomic import atomic_write_text
from covidseg.io.formats import UNSAFE_NAME_CHARACTERS, safe_file_name
from covidseg.runtime import DistInfo, process_rank

ProcessCase = Callable[[Path, Path], Mapping[str, Any] | None]
"""``process_case(input_path, case_output_dir) -> dict`` of plain values (volumes, Dice...), raising on failure."""

STATUS_DIR = "cohort_status"
"""Folder of ``OUT`` holding one status JSON per case and one marker per rank."""
SUMMARY_NAME = "summary.csv"
"""The cohort summary rank 0 writes into ``OUT``."""
RUNNING, DONE, FAILED = "running", "done", "failed"
"""Case states (``status`` field of the status JSON)."""
TERMINAL = (DONE, FAILED)
"""States in which no process is working on a case."""
SUMMARY_COLUMNS = ("case_id", "status", "input", "output", "rank", "host", "started", "finished", "seconds", "error")
"""Fixed leading columns of ``summary.csv``; the scalar values ``process_case`` returned follow, sorted by name."""

DEFAULT_TIMEOUT_S = 7 * 24 * 3600.0
"""How long rank 0 waits for the other ranks (barrier or polling) before summarising what it has."""
POLL_INTERVAL_S = 2.0
"""Seconds between two looks at the status files when waiting without torch.distributed."""
JOB_ID_VARIABLES = ("COVIDSEG_JOB_ID", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID")
"""Environment variables naming the launch; ranks of one launch share it (``none`` and empty are ignored)."""


# --------------------------------------------------------------------------------------------- case ids


def case_id(path: Path | str) -> str:
    """The case id of an input: its case name (:func:`covidseg.inference.inputs.case_name`: the file name without
    its image suffix, or a DICOM series' ``PatientID_seriesN``) as a safe folder name.

    ``.../coronacases_org_001.nii.gz`` -> ``coronacases_org_001``; ``.../patient7/`` (a DICOM folder whose files
    name no patient) -> ``patient7``. Characters other than letters, digits, ``.``, ``_`` and ``-`` become ``_``.
    """
    return safe_file_name(case_name(Path(path)))


def case_ids(cases: Sequence[Path | str]) -> dict[str, Path]:
    """Case id -> path for a cohort, unique: where two inputs share a name (``scan.nii.gz`` in every patient's
    folder), their parent folders' names are prepended (``patient7_scan``) until they differ.

    Raises:
        InputError: the same input listed twice, or ids that stay equal.
    """
    paths = [Path(c) for c in cases]
    seen: dict[Path, Path] = {}
    for p in paths:
        key = p.resolve()
        if key in seen:
            raise InputError(f"{p}: listed twice in the cohort; remove the duplicate")
        seen[key] = p
    depth = {p: 0 for p in paths}
    base = {p: case_id(p) for p in paths}

    def make(p: Path) -> str:
        parts = [base[p]] + [UNSAFE_NAME_CHARACTERS.sub("_", a.name) for a in p.resolve().parents][: depth[p]]
        return "_".join(reversed(parts)) if depth[p] else parts[0]

    for _ in range(max((len(p.resolve().parents) for p in paths), default=0) + 1):
        ids: dict[str, list[Path]] = {}
        for p in paths:
            ids.setdefault(make(p), []).append(p)
        clashes = [group for group in ids.values() if len(group) > 1]
        if not clashes:
            return {i: group[0] for i, group in ids.items()}
        for group in clashes:
            for p in group:
                depth[p] += 1
    first = clashes[0]
    raise InputError(f"{first[0]} and {first[1]} give the same case id; rename one of them")


def shard(ids: Sequence[str], rank: int, world_size: int) -> list[str]:
    """This rank's share of the sorted case ids (round robin: positions ``rank, rank + W, ...``)."""
    return sorted(ids)[rank::world_size]


# --------------------------------------------------------------------------------------------- ranks


def resolve_rank(rank: int | None = None, world_size: int | None = None) -> DistInfo:
    """Rank and world size from the arguments, else from torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``
    (:func:`covidseg.runtime.process_rank`); the local rank (this process's GPU on its node) always from there.

    Raises:
        ConfigError: a rank outside ``[0, world_size)``.
    """
    env = process_rank()
    r = env.rank if rank is None else int(rank)
    w = env.world_size if world_size is None else int(world_size)
    if w < 1 or not 0 <= r < w:
        raise ConfigError(f"cohort rank {r} of world size {w}: need world_size >= 1 and 0 <= rank < world_size "
                          "(check RANK and WORLD_SIZE)")
    return DistInfo(rank=r, local_rank=env.local_rank, world_size=w)


def _job_id() -> str | None:
    for name in JOB_ID_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value and value.lower() != "none":
            return value
    return None


# --------------------------------------------------------------------------------------------- status files


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def status_path(out_dir: Path, cid: str) -> Path:
    """``OUT/cohort_status/<case_id>.json``."""
    return Path(out_dir) / STATUS_DIR / f"{cid}.json"


def read_status(path: Path) -> dict[str, Any] | None:
    """A status or marker JSON, or ``None`` when absent or unreadable (a half-copied file counts as absent)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _plain(value: Any) -> Any:
    """JSON-safe copy (numpy scalars -> numbers, paths -> text)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    atomic_write_text(path, json.dumps(_plain(data), indent=2, sort_keys=True) + "\n")


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, UserError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


# --------------------------------------------------------------------------------------------- the run


@dataclasses.dataclass(frozen=True)
class CohortResult:
    """What one rank did."""

    rank: int
    world_size: int
    assigned: tuple[str, ...]
    """Case ids of this rank's share."""
    processed: tuple[str, ...]
    """Case ids this call ran (done or failed)."""
    skipped: tuple[str, ...]
    """Case ids of the share already done before this call."""
    failed: tuple[str, ...]
    """Case ids this call ran that failed."""
    summary: Path | None
    """``summary.csv`` (rank 0 only)."""
    wait_mode: str = "single"
    """How the ranks met at the end: ``single`` (one process), ``gloo`` (a torch.distributed barrier) or
    ``polling`` (status files)."""


def run_cohort(cases: Sequence[Path | str], out_dir: Path | str, process_case: ProcessCase,
               rank: int | None = None, world_size: int | None = None, *, retry_failed: bool = True,
               timeout_s: float = DEFAULT_TIMEOUT_S, poll_s: float = POLL_INTERVAL_S,
               progress: bool = True) -> CohortResult:
    """Run ``process_case`` on this rank's share of a cohort; rank 0 writes the summary when all ranks are done.

    Every rank must be called with the same ``cases`` (any order) and ``out_dir``.

    Args:
        cases: inputs (NIfTI files or DICOM folders); the case id comes from the name (:func:`case_ids`).
        out_dir: cohort output folder; case ``c`` gets ``out_dir/c/``, its status ``out_dir/cohort_status/c.json``.
        process_case: ``(input_path, case_output_dir) -> dict`` of plain values for the summary; raise on
            failure (a :class:`UserError`'s message is recorded as is, other exceptions with their type).
        rank: this process's rank; default ``RANK`` from the environment (0 without it).
        world_size: number of processes; default ``WORLD_SIZE`` (1 without it).
        retry_failed: run cases whose last status is ``failed`` again.
        timeout_s: how long rank 0 waits for the other ranks before writing the summary of what is there.
        poll_s: seconds between looks at the status files (waiting without torch.distributed).
        progress: show a progress bar (stderr) over this rank's share, on local rank 0 of each node only (the
            other ranks' bars would interleave with it).

    Returns:
        A :class:`CohortResult`.
    """
    from covidseg.progress import progress_bar

    me = resolve_rank(rank, world_size)
    out = Path(out_dir)
    ids = case_ids(cases)
    mine = shard(list(ids), me.rank, me.world_size)
    (out / STATUS_DIR).mkdir(parents=True, exist_ok=True)
    job = _job_id()
    group = _barrier_group(me, timeout_s)
    marker = out / STATUS_DIR / f"rank-{me.rank}-of-{me.world_size}.json"
    started = _now()
    _write_json(marker, {"rank": me.rank, "world_size": me.world_size, "job": job, "state": RUNNING,
                         "started": started, "host": socket.gethostname(), "pid": os.getpid()})

    processed, skipped, failed, attempts = [], [], [], {}
    bar = progress_bar(mine, desc=f"cohort rank {me.rank}/{me.world_size}", unit="case",
                       disable=not progress or me.local_rank != 0)
    for cid in bar:
        previous = read_status(status_path(out, cid)) or {}
        if previous.get("status") == DONE or (previous.get("status") == FAILED and not retry_failed):
            skipped.append(cid)
            attempts[cid] = previous.get("attempt")
            continue
        state = _run_one(cid, ids[cid], out, process_case, me, job)
        attempts[cid] = state["attempt"]
        processed.append(cid)
        if state["status"] == FAILED:
            failed.append(cid)
            bar.write(f"covidseg: case {cid} failed: {state['error']}")
    bar.close()
    _write_json(marker, {"rank": me.rank, "world_size": me.world_size, "job": job, "state": DONE,
                         "started": started, "finished": _now(), "host": socket.gethostname(), "pid": os.getpid(),
                         "attempts": attempts})

    summary = None
    complete = _wait_for_all(me, group, out, ids, job, timeout_s, poll_s)
    if me.rank == 0:
        summary = write_summary(out, ids)
        if not complete:
            import sys

            sys.stderr.write(f"covidseg: not every rank finished within {timeout_s:.0f} s; {summary} lists the "
                             "cases still running as such; run the same command again to finish them\n")
    _leave(group)
    return CohortResult(rank=me.rank, world_size=me.world_size, assigned=tuple(mine), processed=tuple(processed),
                        skipped=tuple(skipped), failed=tuple(failed), summary=summary,
                        wait_mode="single" if me.world_size == 1 else ("gloo" if group is not None else "polling"))


def _run_one(cid: str, source: Path, out: Path, process_case: ProcessCase, me: DistInfo,
             job: str | None) -> dict[str, Any]:
    """Run one case with its status written before (running) and after (done/failed)."""
    state: dict[str, Any] = {
        "case_id": cid, "input": str(source), "output": str(out / cid), "status": RUNNING,
        "attempt": uuid.uuid4().hex, "job": job, "rank": me.rank, "world_size": me.world_size,
        "host": socket.gethostname(), "pid": os.getpid(), "started": _now(),
    }
    path = status_path(out, cid)
    _write_json(path, state)
    t0 = time.perf_counter()
    try:
        result = process_case(source, out / cid)
        state.update(status=DONE, result=dict(result or {}))
    except (Exception, KeyboardInterrupt) as exc:
        state.update(status=FAILED, error=_error_text(exc))
        if not isinstance(exc, UserError):
            state["traceback"] = traceback.format_exc(limit=8)
        if isinstance(exc, KeyboardInterrupt):
            state["error"] = "interrupted"
            state.update(finished=_now(), seconds=round(time.perf_counter() - t0, 3))
            _write_json(path, state)
            raise
    state.update(finished=_now(), seconds=round(time.perf_counter() - t0, 3))
    _write_json(path, state)
    return state


# --------------------------------------------------------------------------------------------- waiting


def _rendezvous_env() -> bool:
    return all(os.environ.get(v) for v in ("MASTER_ADDR", "MASTER_PORT"))


def _barrier_group(me: DistInfo, timeout_s: float) -> tuple[Any, bool] | None:
    """A gloo process group for the final barrier, or ``None`` to poll the status files.

    When the default group exists (e.g. NCCL set up by the caller) a separate gloo group with a long timeout is
    made, so the barrier neither needs a GPU nor times out while a slow rank still works. Without a group, one is
    created from torchrun's variables (``MASTER_ADDR``/``MASTER_PORT``). Returns ``(group, created_default)``.
    """
    if me.world_size == 1:
        return None
    import torch.distributed as dist

    if not dist.is_available():
        return None
    timeout = datetime.timedelta(seconds=timeout_s)
    if dist.is_initialized():
        if dist.get_world_size() != me.world_size or dist.get_rank() != me.rank:
            return None  # the caller's group is not this cohort's
        return dist.new_group(backend="gloo", timeout=timeout), False
    if not _rendezvous_env():
        return None
    dist.init_process_group(backend="gloo", init_method="env://", rank=me.rank, world_size=me.world_size,
                            timeout=timeout)
    return dist.group.WORLD, True


def _leave(group: tuple[Any, bool] | None) -> None:
    if group is None:
        return
    import torch.distributed as dist

    handle, created_default = group
    if created_default:
        dist.destroy_process_group()
    else:
        dist.destroy_process_group(handle)


def _wait_for_all(me: DistInfo, group: tuple[Any, bool] | None, out: Path, ids: Mapping[str, Path],
                  job: str | None, timeout_s: float, poll_s: float) -> bool:
    """Block until every rank finished its share (rank 0 only, when polling). True when all finished in time."""
    if me.world_size == 1:
        return True
    if group is not None:
        import torch.distributed as dist

        dist.barrier(group=group[0])
        return True
    if me.rank != 0:
        return True
    deadline = time.monotonic() + timeout_s
    while True:
        if _all_finished(out, ids, me.world_size, job):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)


def _all_finished(out: Path, ids: Mapping[str, Path], world_size: int, job: str | None) -> bool:
    """Every rank's marker says done (for this job, when one is known) and matches the status files."""
    for r in range(world_size):
        marker = read_status(out / STATUS_DIR / f"rank-{r}-of-{world_size}.json")
        if marker is None or marker.get("state") != DONE or (job is not None and marker.get("job") != job):
            return False
        for cid in shard(list(ids), r, world_size):
            status = read_status(status_path(out, cid)) or {}
            if status.get("status") not in TERMINAL or status.get("attempt") != marker.get("attempts", {}).get(cid):
                return False
    return True


# --------------------------------------------------------------------------------------------- summary


def _scalars(result: Any) -> dict[str, Any]:
    """The scalar values of a result dict, nested keys joined by ``.``."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif value is None or isinstance(value, (bool, int, float, str)):
            flat[prefix] = value

    walk("", result if isinstance(result, Mapping) else {})
    return flat


def summary_rows(out_dir: Path | str, ids: Iterable[str]) -> list[dict[str, Any]]:
    """One row per case (sorted by id) from the status files; a case without one is ``pending``."""
    rows = []
    for cid in sorted(ids):
        status = read_status(status_path(Path(out_dir), cid)) or {"status": "pending"}
        row = {c: status.get(c, "") for c in SUMMARY_COLUMNS}
        row["case_id"] = cid
        row.update({k: v for k, v in _scalars(status.get("result")).items() if k not in SUMMARY_COLUMNS})
        rows.append(row)
    return rows


def write_summary(out_dir: Path | str, ids: Iterable[str]) -> Path:
    """Write ``OUT/summary.csv`` atomically: the fixed :data:`SUMMARY_COLUMNS`, then each result key."""
    rows = summary_rows(out_dir, ids)
    extra = sorted({k for row in rows for k in row} - set(SUMMARY_COLUMNS))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*SUMMARY_COLUMNS, *extra], restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path = Path(out_dir) / SUMMARY_NAME
    atomic_write_text(path, buffer.getvalue())
    return path
