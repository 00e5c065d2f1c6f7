"""Cohort inference: case ids, shares, status files, restarts, and 2-process runs (torchrun / polling)."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from covidseg.errors import ConfigError, InputError
from covidseg.inference.cohort import (
    DONE,
    FAILED,
    STATUS_DIR,
    SUMMARY_COLUMNS,
    case_id,
    case_ids,
    read_status,
    run_cohort,
    shard,
    status_path,
)

N_CASES = 6
SUBPROCESS_TIMEOUT_S = 120

# the fake process_case of the multi-process tests: logs each call, writes a result, fails on names with "bad"
WORKER = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    from covidseg.inference.cohort import run_cohort

    cases_file, out, log, slow_rank = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])

    def process(src, dst):
        rank = int(os.environ.get("RANK", "0"))
        with open(log, "a") as fh:
            fh.write(f"{rank} {src.name}\\n")
        if rank == slow_rank:
            time.sleep(0.4)  # rank 0 must wait for this rank before summarising
        if "bad" in src.name:
            raise ValueError(f"cannot read {src.name}")
        dst.mkdir(parents=True, exist_ok=True)
        (dst / "result.txt").write_text(src.name)
        return {"volume_ml": 1.5 * len(src.name), "lungs": {"dice": 0.9}}

    cases = [Path(p) for p in Path(cases_file).read_text(encoding="utf-8").split()]
    result = run_cohort(cases, out, process, progress=False, poll_s=0.1, timeout_s=60)
    text = json.dumps({"rank": result.rank, "processed": result.processed, "skipped": result.skipped,
                       "wait_mode": result.wait_mode, "summary": str(result.summary) if result.summary else None})
    # torchrun merges the ranks' stdout (lines can interleave), so each rank also writes its own file
    results = Path(log).parent / "results"
    results.mkdir(exist_ok=True)
    (results / f"{result.rank}.json").write_text(text)
    print("RESULT " + text)
""")


def make_cases(root: Path, names=None) -> list[Path]:
    """Tiny stand-ins: NIfTI-named files and one DICOM folder (process_case never opens them)."""
    names = names or ["coronacases_org_001.nii.gz", "coronacases_org_002.nii.gz", "radiopaedia_4_85506_1.nii",
                      "case009.nii", "patient7", "radiopaedia_10_85902_3-dcm.nii.gz"]
    cases = []
    for name in names:
        path = root / "inputs" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if "." in name:
            path.write_bytes(b"x")
        else:
            path.mkdir()
            (path / "IM0001.dcm").write_bytes(b"x")
        cases.append(path)
    return cases


def read_calls(log: Path) -> list[str]:
    return sorted(line.split()[1] for line in log.read_text(encoding="utf-8").splitlines()) if log.exists() else []


def read_summary(out: Path) -> list[dict[str, str]]:
    with open(out / "summary.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                        "SLURM_JOB_ID", "COVIDSEG_JOB_ID")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def results_of(stdout: str) -> list[dict]:
    return sorted((json.loads(line[len("RESULT "):]) for line in stdout.splitlines() if line.startswith("RESULT ")),
                  key=lambda r: r["rank"])


# --------------------------------------------------------------------------------------------- unit tests


@pytest.mark.parametrize(("path", "expected"), [
    ("/data/coronacases_org_001.nii.gz", "coronacases_org_001"),
    ("/data/case009.nii", "case009"),
    ("/data/scan.NII.GZ", "scan"),
    ("/data/patient 7/", "patient_7"),
    ("/data/radiopaedia_org_covid-19-pneumonia-10_85902_1-dcm.nii.gz", "radiopaedia_org_covid-19-pneumonia-10_85902_1-dcm"),
    ("/data/1.2.840.113619.2.55", "1.2.840.113619.2.55"),
])
def test_case_id_from_file_and_folder_names(path, expected):
    assert case_id(path) == expected


def test_case_ids_disambiguate_dicom_folders_and_refuse_duplicates(tmp_path):
    a, b = tmp_path / "p1" / "DICOM", tmp_path / "p2" / "DICOM"
    ids = case_ids([a, b, tmp_path / "p3.nii.gz"])
    assert set(ids) == {"p1_DICOM", "p2_DICOM", "p3"} and ids["p1_DICOM"] == a
    with pytest.raises(InputError, match="listed twice"):
        case_ids([a, tmp_path / "p1" / "x" / ".." / "DICOM"])


def test_shares_are_disjoint_complete_and_independent_of_order():
    ids = [f"case{i:02d}" for i in range(11)]
    shares = [shard(ids, r, 3) for r in range(3)]
    assert sorted(sum(shares, [])) == ids
    assert all(not set(shares[i]) & set(shares[j]) for i in range(3) for j in range(i + 1, 3))
    assert shard(list(reversed(ids)), 1, 3) == shares[1]
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_single_process_run_records_status_retries_failures_and_summarises(tmp_path):
    cases = make_cases(tmp_path, ["a.nii.gz", "bad.nii.gz", "c.nii"])
    out = tmp_path / "out"
    calls: list[str] = []

    def process(src: Path, dst: Path) -> dict:
        calls.append(src.name)
        if "bad" in src.name:
            raise InputError(f"{src}: truncated file; download it again")
        dst.mkdir(parents=True)
        return {"dice": 0.75, "nested": {"ml": 12}, "note": "ok"}

    result = run_cohort(cases, out, process, rank=0, world_size=1, progress=False)
    assert sorted(calls) == ["a.nii.gz", "bad.nii.gz", "c.nii"]
    assert result.failed == ("bad",) and result.summary == out / "summary.csv"
    done = read_status(status_path(out, "a"))
    assert done["status"] == DONE and done["result"]["dice"] == 0.75 and done["seconds"] >= 0
    assert done["input"] == str(cases[0]) and done["rank"] == 0 and done["started"] <= done["finished"]
    bad = read_status(status_path(out, "bad"))
    assert bad["status"] == FAILED and bad["error"].endswith("truncated file; download it again")
    rows = read_summary(out)
    assert [r["case_id"] for r in rows] == ["a", "bad", "c"]
    assert list(rows[0])[: len(SUMMARY_COLUMNS)] == list(SUMMARY_COLUMNS)
    assert rows[0]["nested.ml"] == "12" and rows[0]["status"] == "done" and rows[1]["status"] == "failed"
    assert "truncated" in rows[1]["error"] and rows[1]["dice"] == ""

    calls.clear()  # a restart retries the failed case only
    again = run_cohort(cases, out, process, rank=0, world_size=1, progress=False)
    assert calls == ["bad.nii.gz"] and again.skipped == ("a", "c")
    calls.clear()
    run_cohort(cases, out, process, rank=0, world_size=1, progress=False, retry_failed=False)
    assert calls == []


def test_interrupted_case_is_recorded_and_redone(tmp_path):
    cases = make_cases(tmp_path, ["a.nii.gz"])
    out = tmp_path / "out"

    def interrupted(src: Path, dst: Path) -> dict:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_cohort(cases, out, interrupted, rank=0, world_size=1, progress=False)
    assert read_status(status_path(out, "a"))["error"] == "interrupted"
    result = run_cohort(cases, out, lambda s, d: {"ok": 1}, rank=0, world_size=1, progress=False)
    assert result.processed == ("a",) and read_status(status_path(out, "a"))["status"] == DONE


def test_bad_rank_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="rank 2 of world size 2"):
        run_cohort([], tmp_path, lambda s, d: {}, rank=2, world_size=2)


# --------------------------------------------------------------------------------------------- two processes


def _run_torchrun(tmp_path: Path, cases_file: Path, out: Path, log: Path) -> list[dict]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(script), str(cases_file), str(out), str(log), "1"]
    results = log.parent / "results"
    for old in results.glob("*.json"):
        old.unlink()
    proc = subprocess.run(cmd, env=base_env(), capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return sorted((json.loads(f.read_text(encoding="utf-8")) for f in results.glob("*.json")), key=lambda r: r["rank"])


def test_torchrun_two_processes_do_each_case_once_and_a_rerun_does_nothing(tmp_path):
    cases = make_cases(tmp_path)
    cases_file = tmp_path / "cases.txt"
    cases_file.write_text("\n".join(map(str, cases)))
    out, log = tmp_path / "out", tmp_path / "calls.log"

    first = _run_torchrun(tmp_path, cases_file, out, log)
    assert [r["rank"] for r in first] == [0, 1]
    assert {r["wait_mode"] for r in first} == {"gloo"}, "torchrun's variables give a gloo barrier"
    assert read_calls(log) == sorted(p.name for p in cases), "each case processed exactly once"
    assert sorted(first[0]["processed"] + first[1]["processed"]) == sorted(case_ids(cases))
    assert first[0]["summary"] == str(out / "summary.csv") and first[1]["summary"] is None
    rows = read_summary(out)
    assert len(rows) == N_CASES and {r["status"] for r in rows} == {"done"}
    assert {r["rank"] for r in rows} == {"0", "1"}
    for cid, path in case_ids(cases).items():
        assert (out / cid / "result.txt").read_text(encoding="utf-8") == path.name
    assert len(list((out / STATUS_DIR).glob("*.json"))) == N_CASES + 2  # + one marker per rank

    second = _run_torchrun(tmp_path, cases_file, out, log)
    assert len(log.read_text(encoding="utf-8").splitlines()) == N_CASES, "the rerun must not process anything"
    assert all(r["processed"] == [] for r in second)
    assert sorted(second[0]["skipped"] + second[1]["skipped"]) == sorted(case_ids(cases))
    assert len(read_summary(out)) == N_CASES


def test_two_processes_without_torch_distributed_poll_and_retry_only_what_is_left(tmp_path):
    cases = make_cases(tmp_path, [*[f"c{i}.nii.gz" for i in range(N_CASES - 1)], "bad.nii.gz"])
    cases_file = tmp_path / "cases.txt"
    cases_file.write_text("\n".join(map(str, cases)))
    out, log = tmp_path / "out", tmp_path / "calls.log"
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    # one case already done by an earlier job: it must not run again
    ids = case_ids(cases)
    status_path(out, "c0").parent.mkdir(parents=True)
    status_path(out, "c0").write_text(json.dumps({"status": "done", "case_id": "c0", "result": {"volume_ml": 1}}))

    procs = []
    for rank in range(2):
        env = {**base_env(), "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)}
        procs.append(subprocess.Popen([sys.executable, str(script), str(cases_file), str(out), str(log), "1"],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=SUBPROCESS_TIMEOUT_S) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outputs]
    assert [r["wait_mode"] for r in results_of(outputs[0][0] + outputs[1][0])] == ["polling", "polling"]
    assert read_calls(log) == sorted(p.name for p in cases if p.name != "c0.nii.gz")
    rows = {r["case_id"]: r for r in read_summary(out)}
    assert set(rows) == set(ids), "rank 0 waited for rank 1 before writing the summary"
    assert rows["bad"]["status"] == "failed" and "cannot read bad.nii.gz" in rows["bad"]["error"]
    assert all(rows[c]["status"] == "done" for c in ids if c != "bad")
