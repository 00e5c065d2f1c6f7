"""No run or file is ever lost: kill -9 / Ctrl-C / SIGTERM of `segment` and `train`, full disks, and fuzzing.

Rows of docs/reliability.md that need real processes and signals, plus property-based tests (hypothesis, fixed
``max_examples``, a deadline and ``derandomize`` so CI stays fast and deterministic) of the metrics and of the
NIfTI and DICOM readers' headers.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from covidseg.checkpoint import load_checkpoint, save_checkpoint
from covidseg.cli.main import run as cli
from covidseg.config import Config
from covidseg.errors import EXIT_INTERRUPTED, EXIT_USER, InputError
from covidseg.io.atomic import atomic_write_bytes
from covidseg.io.image import read_image, read_mask
from covidseg.io.volume import MAX_VOXELS_ENV
from covidseg.metrics import binary_metrics
from covidseg.models import create_model, variant_config
from covidseg.phantom import make_phantom

SCALE = 0.1
"""Phantom scale of the `segment` processes (51x51x25 voxels: about 3 s per process, most of it start-up)."""
WINDOW = "inference.window=8x32x32"
KILL_SEED = 8
"""Seed of the kill delays: the same moments every run (up to the machine's speed)."""
N_KILLS = 4
PROCESS_TIMEOUT_S = 60.0
FUZZ = settings(deadline=5000, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
"""Bounded fuzzing: a fixed number of examples (below), 5 s each at most, the same examples every run."""
NIFTI_FUZZ_EXAMPLES = 150
"""About 5 ms each: a header is tiny."""
DICOM_FUZZ_EXAMPLES = 40
"""About 40 ms each (three slices written with pydicom, read with SimpleITK)."""
PROPERTY = settings(max_examples=60, deadline=5000, derandomize=True)


# ------------------------------------------------------------------------------------------ segment: processes


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reliability")
    ph = make_phantom("coronacases", seed=1, scale=SCALE)
    ct = root / "case_a.nii.gz"
    nib.save(nib.Nifti1Image(ph.stored_ct(), ph.affine), str(ct))
    torch.manual_seed(0)
    cfg = Config(model=variant_config("unet", base_width=4, depth=2))
    ckpt = save_checkpoint(root / "tiny.pt", create_model(cfg.model), cfg, target="infection")
    return {"root": root, "ct": ct, "ckpt": ckpt}


def segment_cmd(world: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "covidseg", "segment", str(world["ct"]), "-o", str(out), "--checkpoint",
            str(world["ckpt"]), "--set", WINDOW, "--threads", "1", *extra]


def _default_sigint() -> None:
    # a child inherits an ignored SIGINT (pytest started in the background of a script), and Python then leaves
    # Ctrl+C ignored, as a shell's `&` asks; the tests send it to a process that should take it as a user's Ctrl+C
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log.open("wb"),
                            preexec_fn=_default_sigint)


def partial_folders(out: Path) -> list[Path]:
    """The hidden work folders `segment` writes into before renaming them onto OUT."""
    return sorted(out.parent.glob(f".{out.name}.partial-*"))


def wait_for(condition, proc: subprocess.Popen[bytes], timeout: float = PROCESS_TIMEOUT_S) -> bool:
    """Poll ``condition()`` every 5 ms while ``proc`` runs; True once it holds."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return bool(condition())


def assert_complete(folder: Path) -> None:
    """Every output file present and loadable in full, and nothing else (no temporaries)."""
    from PIL import Image

    from covidseg.inference.outputs import OUTPUT_FILES

    names = sorted(p.name for p in folder.iterdir())
    assert set(OUTPUT_FILES) <= set(names), f"{folder}: missing {set(OUTPUT_FILES) - set(names)}"
    assert not [n for n in names if n.startswith(".") or ".part" in n], names
    for path in folder.iterdir():
        name = path.name
        if name.endswith((".nii", ".nii.gz")):
            img = nib.load(str(path))
            assert isinstance(img, nib.Nifti1Image) and np.isfinite(img.get_fdata()).all()
        elif name.endswith(".nrrd"):
            import nrrd

            nrrd.read(str(path))
        elif name.endswith(".json"):
            assert json.loads(path.read_text(encoding="utf-8"))["case"]
        elif name.endswith(".csv"):
            assert len(list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"))))) >= 2
        elif name.endswith(".png"):
            with Image.open(path) as im:
                im.load()
        elif name.endswith(".html"):
            assert path.read_text(encoding="utf-8").rstrip().endswith("</html>")
        else:
            raise AssertionError(f"{path}: unexpected output file")


def test_complete_check_tells_a_partial_folder_from_a_complete_one(world, tmp_path):
    """The checker the kill test relies on must be able to fail."""
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        cli(["segment", str(world["ct"]), "-o", str(out), "--checkpoint", str(world["ckpt"]), "--set", WINDOW])
    assert info.value.code == 0
    assert_complete(out)
    (out / "report.json").unlink()
    with pytest.raises(AssertionError, match="missing"):
        assert_complete(out)
    (out / "report.json").write_text("{}")
    lungs = out / "lungs.nii.gz"
    lungs.write_bytes(lungs.read_bytes()[: lungs.stat().st_size // 2])
    with pytest.raises(Exception):  # noqa: B017 - a truncated file fails whichever way the reader notices
        assert_complete(out)


def test_kill9_of_segment_at_random_moments_never_leaves_a_complete_looking_output(world, tmp_path):
    """SIGKILL at seeded random delays: half from the start (any phase), half once the hidden work folder exists
    (the writing phase); the odd runs replace an earlier result with --force. OUT must be absent or complete."""
    rng = random.Random(KILL_SEED)
    killed_while_writing = 0
    for k in range(N_KILLS):
        out = tmp_path / f"out{k}"
        extra: list[str] = []
        if k % 2:
            assert cli_code(segment_cmd(world, out)[3:]) == 0  # an earlier result, made in-process (fast)
            extra = ["--force"]
        proc = start(segment_cmd(world, out, *extra), tmp_path / f"log{k}.txt")
        if k % 2 == 0:
            time.sleep(rng.uniform(0.5, 4.0))
        else:
            assert wait_for(lambda out=out: bool(partial_folders(out)), proc)
            time.sleep(rng.uniform(0.0, 0.4))
        writing = proc.poll() is None and bool(partial_folders(out))
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=PROCESS_TIMEOUT_S)
        killed_while_writing += writing
        if out.exists():
            assert_complete(out)
        else:
            assert k % 2 == 0, "an earlier complete result vanished"
    assert killed_while_writing >= 1, "no kill landed in the writing phase; the test proved nothing about it"


def test_the_next_run_removes_what_a_killed_run_left_and_nothing_else(world, tmp_path):
    """A hidden folder of a dead process of this machine goes; one of a live process, of another machine, of an
    older name or of another OUT stays."""
    from covidseg.inference.outputs import partial_folder, remove_stale_partials
    from covidseg.io.atomic import host_tag

    out = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=PROCESS_TIMEOUT_S)  # its PID now names no process (unless reused at once: then kept, safe)
    host, hex32 = host_tag(), "0" * 32
    stale = tmp_path / f".out.partial-{host}-{dead.pid}-{hex32}"
    kept = [tmp_path / f".out.partial-{host}-{os.getppid()}-{hex32}",  # a live process (pytest's parent)
            tmp_path / f".out.partial-{'f' * 8 if host != 'f' * 8 else 'e' * 8}-{dead.pid}-{hex32}",  # elsewhere
            tmp_path / f".out.partial-{hex32}",  # a name without host and PID
            tmp_path / f".other.partial-{host}-{dead.pid}-{hex32}"]  # another OUT's
    for folder in [stale, *kept]:
        folder.mkdir()
        (folder / "lungs.nii.gz").write_bytes(b"half")
    assert partial_folder(out).name.startswith(f".out.partial-{host}-{os.getpid()}-")
    assert cli_code(segment_cmd(world, out)[3:]) == 0
    assert_complete(out)
    assert not stale.exists() and all(folder.is_dir() for folder in kept)
    assert remove_stale_partials(out) == []


def test_a_kill_between_the_two_renames_of_a_replacement_loses_nothing(tmp_path):
    """``publish`` moves the previous OUT aside, then the new one in: killed between the two, OUT is missing and the
    previous output sits in a hidden folder. The next run puts it back (then replaces it as usual); with OUT
    present the hidden copy is only removed; a live process's and another machine's are left."""
    from covidseg.inference.outputs import old_folder, remove_stale_partials
    from covidseg.io.atomic import host_tag

    out = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=PROCESS_TIMEOUT_S)
    host = host_tag()
    assert old_folder(out).name == f".out.old-{host}-{os.getpid()}"
    aside = tmp_path / f".out.old-{host}-{dead.pid}"
    aside.mkdir()
    (aside / "report.json").write_text("{}", encoding="utf-8")
    live = tmp_path / f".out.old-{host}-{os.getppid()}"
    other = tmp_path / f".out.old-{'f' * 8 if host != 'f' * 8 else 'e' * 8}-{dead.pid}"
    for folder in (live, other):
        folder.mkdir()
    assert remove_stale_partials(out) == []  # put back, not removed
    assert (out / "report.json").read_text(encoding="utf-8") == "{}" and not aside.exists()
    aside.mkdir()  # OUT is there now: a hidden copy is only what a kill after the second rename left
    assert remove_stale_partials(out) == [aside] and not aside.exists() and (out / "report.json").is_file()
    assert live.is_dir() and other.is_dir()


@pytest.mark.parametrize("when", ["in mkdir", "while drawing", "while writing"])
def test_an_interrupt_as_the_work_folder_is_made_leaves_nothing(tmp_path, monkeypatch, when):
    """Deterministic twin of the signal tests: Ctrl-C right as the hidden folder appears (the moment a busy machine
    is most likely to deschedule the process), while the picture is drawn or while a mask is written, and no folder
    is left behind."""
    from covidseg.inference import outputs
    from covidseg.inference.case import CaseSegmentation
    from covidseg.io.volume import make_ct_image

    image = make_ct_image(np.full((6, 5, 4), -1000.0, np.float32), np.eye(4), tmp_path / "ct.nii.gz")
    zeros = np.zeros(image.shape, np.uint8)
    seg = CaseSegmentation(hu=image.array, lungs=zeros, infection=zeros, probability=zeros.astype(np.float32),
                           outside_ml=0.0, convention="hu", box=None, lung_method="classical")
    real_mkdir, real_write = Path.mkdir, outputs.write_mask

    def mkdir(self: Path, *args, **kwargs) -> None:
        if ".partial-" in self.name and when == "in mkdir":
            real_mkdir(self, *args, **kwargs)
            raise KeyboardInterrupt  # the folder exists, the call has not returned
        real_mkdir(self, *args, **kwargs)

    def write_mask(*args, **kwargs):
        if when == "while writing":
            raise KeyboardInterrupt
        return real_write(*args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    monkeypatch.setattr(outputs, "write_mask", write_mask)
    if when == "while drawing":  # the writer is at work meanwhile
        monkeypatch.setattr("covidseg.report.overview.render_overview",
                            lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        outputs.write_case_folder(out, image, "case", seg, {"model": {"name": "m"}, "inference": {}}, 0.0)
    assert not out.exists() and not partial_folders(out)


def test_an_interrupt_as_the_writer_thread_starts_leaves_nothing(tmp_path, monkeypatch):
    """Ctrl-C right after the mask writer's thread has started, before the pool has recorded it (where the signal
    test below once left a hidden folder on busy cores): the pool would not wait for that writer, which would write
    on after the clean-up and make the folder again. No folder is left, not even after every thread has ended."""
    import threading

    from covidseg.inference import outputs
    from covidseg.inference.case import CaseSegmentation
    from covidseg.io.volume import make_ct_image

    image = make_ct_image(np.full((6, 5, 4), -1000.0, np.float32), np.eye(4), tmp_path / "ct.nii.gz")
    zeros = np.zeros(image.shape, np.uint8)
    seg = CaseSegmentation(hu=image.array, lungs=zeros, infection=zeros, probability=zeros.astype(np.float32),
                           outside_ml=0.0, convention="hu", box=None, lung_method="classical")
    real_start, real_write = threading.Thread.start, outputs.write_mask
    before = set(threading.enumerate())

    def start(self: threading.Thread) -> None:
        real_start(self)
        raise KeyboardInterrupt  # the thread runs; Thread.start has not returned to the pool

    def slow_write(*args, **kwargs):
        time.sleep(0.3)  # still writing when a clean-up that did not wait for it would run
        return real_write(*args, **kwargs)

    monkeypatch.setattr(threading.Thread, "start", start)
    monkeypatch.setattr(outputs, "write_mask", slow_write)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        outputs.write_case_folder(out, image, "case", seg, {"model": {"name": "m"}, "inference": {}}, 0.0)
    monkeypatch.undo()
    for thread in set(threading.enumerate()) - before:  # a writer left running writes now
        thread.join(timeout=PROCESS_TIMEOUT_S)
    assert not out.exists() and not partial_folders(out)


@pytest.mark.parametrize("sig, phase", [(signal.SIGINT, "writing"), (signal.SIGTERM, "inference")],
                         ids=["SIGINT-writing", "SIGTERM-inference"])
def test_ctrl_c_or_sigterm_of_segment_exits_130_and_leaves_nothing(world, tmp_path, sig, phase):
    out = tmp_path / "out"
    log = tmp_path / "log.txt"
    if phase == "writing":
        def in_phase() -> bool:
            return bool(partial_folders(out)) and not out.exists()
    else:
        # the sliding-window progress bar; should its text change, the writing phase still tests the handler
        def in_phase() -> bool:
            return (b"windows" in log.read_bytes() or bool(partial_folders(out))) and not out.exists()
    # the process is frozen (SIGSTOP) inside the phase, checked there, and only then sent the signal: on busy cores
    # the test's own process can otherwise be descheduled long enough for `segment` to finish first
    for _attempt in range(3):
        proc = start(segment_cmd(world, out), log)
        ready = wait_for(in_phase, proc)
        if ready and proc.poll() is None:
            proc.send_signal(signal.SIGSTOP)
            if in_phase():
                break
            proc.send_signal(signal.SIGCONT)
        proc.wait(timeout=PROCESS_TIMEOUT_S)
        shutil.rmtree(out, ignore_errors=True)
    assert ready and proc.poll() is None, log.read_text(encoding="utf-8")
    proc.send_signal(sig)
    proc.send_signal(signal.SIGCONT)
    code = proc.wait(timeout=PROCESS_TIMEOUT_S)
    err = log.read_text(encoding="utf-8")
    assert code == EXIT_INTERRUPTED, err
    assert "interrupted" in err and "Traceback" not in err
    assert not out.exists() and not partial_folders(out)


# ------------------------------------------------------------------------------------------ train


TRAIN_EXTRA = ("model.name=unet", "model.depth=2", "runtime.loader_benchmark_batches=0")
"""On top of the shared tiny run (conftest): a run of 2 epochs x 2 steps that takes a few seconds."""


@pytest.fixture(scope="module")
def cohort(make_cohort) -> Path:
    return make_cohort(4, SCALE)


@pytest.fixture(scope="module")
def train_argv(tiny_overrides):
    def argv(data: Path, out: Path, cache: Path) -> list[str]:
        items = ["train", "--data", str(data), "--out", str(out), "--quiet"]
        for item in [*tiny_overrides, *TRAIN_EXTRA, f"runtime.cache_dir={cache}"]:
            items += ["--set", item]
        return items

    return argv


def cli_code(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as info:
        cli(argv)
    return int(info.value.code or 0)


@pytest.fixture(scope="module")
def reference_run(cohort: Path, tmp_path_factory: pytest.TempPathFactory, train_argv) -> tuple[Path, Path]:
    """An uninterrupted run (and its cache folder, shared by the interrupted runs)."""
    root = tmp_path_factory.mktemp("train_ref")
    assert cli_code(train_argv(cohort, root / "ref", root / "cache")) == 0
    return root / "ref", root / "cache"


@pytest.mark.parametrize("at_step", [1, 3])
def test_sigterm_during_train_exits_130_and_the_run_resumes_to_the_same_weights(cohort, reference_run, tmp_path,
                                                                               capsys, monkeypatch, at_step,
                                                                               train_argv):
    """A real SIGTERM, sent to this process in step 1 (epoch 1: no checkpoint yet) or step 3 of 4 (epoch 2),
    through the console entry's handler; `--resume` then ends with the uninterrupted run's weights."""
    import covidseg.losses as losses
    from covidseg.training.trainer import run_progress

    ref_dir, cache = reference_run
    real_loss = losses.DeepSupervisionLoss
    calls = {"n": 0}

    class TerminatedLoss(real_loss):  # type: ignore[misc, valid-type]
        def forward(self, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == at_step:
                os.kill(os.getpid(), signal.SIGTERM)
            return super().forward(*args, **kwargs)

    monkeypatch.setattr(losses, "DeepSupervisionLoss", TerminatedLoss)
    run = tmp_path / "run"
    capsys.readouterr()
    assert cli_code(train_argv(cohort, run, cache)) == EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err
    state = run_progress(run)
    if at_step == 1:
        assert state is None and (run / "config.yaml").is_file()  # no epoch finished: resumes from step 0
    else:
        assert state is not None and state["step"] == 2 and not state["complete"]  # epoch 1 kept, 2 redone
    assert not [p for p in run.iterdir() if ".part" in p.name]
    monkeypatch.setattr(losses, "DeepSupervisionLoss", real_loss)

    assert cli_code(["train", "--resume", str(run), "--quiet"]) == 0
    state = run_progress(run)
    assert state is not None and state["complete"] and state["step"] == state["total_steps"] == 4
    ref = torch.load(ref_dir / "last.pt", weights_only=True)["state_dict"]
    resumed = torch.load(run / "last.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(ref[k], resumed[k]) for k in ref)
    lines = (run / "metrics.csv").read_text(encoding="utf-8").splitlines()
    assert [ln.split(",")[0] for ln in lines[1:]] == ["1", "2"]


@pytest.mark.parametrize("defect, words", [
    ("labels", ["unexpected label values [7]"]),
    ("shape", ["mask shape", "does not match the CT"]),
])
def test_train_refuses_a_bad_mask_naming_it(cohort, tmp_path, capsys, defect, words, train_argv):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(cohort, data)
    for victim in (data / "Lung_Mask").glob("*.nii.gz"):  # every case: the first one read must fail
        img = nib.load(str(victim))
        mask = np.asarray(img.dataobj).copy()
        if defect == "labels":
            mask[mask == 2] = 7
        else:
            mask = mask[:-1]
        nib.save(nib.Nifti1Image(mask, img.affine), str(victim))
    code = cli_code(train_argv(data, tmp_path / "run", tmp_path / "cache"))
    err = capsys.readouterr().err
    assert code == EXIT_USER and "Traceback" not in err
    assert "Lung_Mask/" in err and all(w in err for w in words), err


# ------------------------------------------------------------------------------------------ full disk


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    path.write_text("old")
    monkeypatch.setattr(os, "fsync", _enospc)  # the data never reached the disk
    with pytest.raises(OSError, match="No space left"):
        atomic_write_bytes(path, b"new" * 1000)
    assert path.read_text(encoding="utf-8") == "old" and [p.name for p in tmp_path.iterdir()] == ["report.json"]


@pytest.mark.skipif(os.name != "posix", reason="PIDs are only asked about on POSIX")
def test_the_next_write_removes_the_temporary_a_killed_writer_left_and_nothing_else(tmp_path):
    """A writer SIGKILLed mid-write leaves its hidden temporary; the next process's first write into that folder
    removes it (and any other dead writer's of this machine there). A live writer's, another machine's and
    foreign names stay."""
    from covidseg.io.atomic import host_tag

    path = tmp_path / "last.pt"
    path.write_bytes(b"old")
    killed = subprocess.run([sys.executable, "-c", (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from covidseg.io.atomic import atomic_path\n"
        "with atomic_path(Path(sys.argv[1])) as tmp:\n"
        "    tmp.write_bytes(b'half')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"), str(path)], timeout=PROCESS_TIMEOUT_S)
    assert killed.returncode == -9
    (stale,) = [p for p in tmp_path.iterdir() if p.name.endswith(".part.pt")]
    assert stale.name.startswith(f".last.{host_tag()}-") and path.read_bytes() == b"old"
    other_host, dead_pid = "f" * 8 if host_tag() != "f" * 8 else "e" * 8, stale.name.split("-")[1]
    kept = [tmp_path / f".last.{host_tag()}-{os.getppid()}-abc.part.pt",  # a live writer (pytest's parent)
            tmp_path / f".last.{other_host}-{dead_pid}-abc.part.pt",  # another machine's
            tmp_path / ".last.abc.part.pt"]  # a name without host and PID
    other_file = tmp_path / f".other.{host_tag()}-{dead_pid}-abc.part.nii.gz"  # another file's, same dead writer
    for file in [*kept, other_file]:
        file.write_bytes(b"x")
    atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new" and not stale.exists() and not other_file.exists()
    assert all(file.is_file() for file in kept)


def test_full_disk_while_saving_a_checkpoint_keeps_the_last_good_one(tmp_path, monkeypatch):
    torch.manual_seed(0)
    cfg = Config(model=variant_config("unet", base_width=4, depth=2))
    model = create_model(cfg.model)
    last = save_checkpoint(tmp_path / "last.pt", model, cfg, step=2)
    real_save = torch.save

    def half_then_full(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        Path(f).write_bytes(Path(f).read_bytes()[:1000])
        raise OSError(errno.ENOSPC, "No space left on device", str(f))

    monkeypatch.setattr(torch, "save", half_then_full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(last, model, cfg, step=4)
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint(last)[2]["step"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


# ------------------------------------------------------------------------------------------ metrics: properties


masks = arrays(np.bool_, st.tuples(st.integers(1, 4), st.integers(1, 7), st.integers(1, 7)))
spacings = st.tuples(*[st.floats(0.3, 5.0)] * 3)


@PROPERTY
@given(data=st.data(), spacing=spacings, blank=st.sampled_from(["none", "pred", "gt", "both"]))
def test_metric_properties_including_empty_masks(data, spacing, blank):
    """[0, 1] ranges, symmetry, IoU = Dice / (2 - Dice), Dice = harmonic mean of sensitivity and precision, and
    the empty-mask convention, on masks of any small shape with either or both forced empty."""
    pred = data.draw(masks)
    gt = data.draw(arrays(np.bool_, pred.shape))
    if blank in ("pred", "both"):
        pred = np.zeros_like(pred)
    if blank in ("gt", "both"):
        gt = np.zeros_like(gt)
    m = binary_metrics(pred, gt, spacing=spacing, tolerance_mm=1.0)
    swapped = binary_metrics(gt, pred, spacing=spacing, tolerance_mm=1.0)
    for key in ("dice", "iou", "sensitivity", "precision", "nsd"):
        assert 0.0 <= m[key] <= 1.0
        if key in ("dice", "iou", "nsd"):
            assert m[key] == pytest.approx(swapped[key])
    assert m["sensitivity"] == pytest.approx(swapped["precision"])
    assert m["iou"] == pytest.approx(m["dice"] / (2.0 - m["dice"]))
    assert math.isfinite(m["hd95"]) and m["hd95"] >= 0.0 and m["hd95"] == pytest.approx(swapped["hd95"])
    p, g = int(pred.sum()), int(gt.sum())
    if p == 0 and g == 0:
        assert m == {"dice": 1.0, "iou": 1.0, "sensitivity": 1.0, "precision": 1.0, "nsd": 1.0, "hd95": 0.0}
    elif p == 0 or g == 0:
        diagonal = math.sqrt(sum((n * s) ** 2 for n, s in zip(pred.shape, spacing, strict=True)))
        assert m["dice"] == m["iou"] == m["nsd"] == m["sensitivity"] == m["precision"] == 0.0
        assert m["hd95"] == pytest.approx(diagonal)
    else:
        sens, prec = m["sensitivity"], m["precision"]
        harmonic = 2 * sens * prec / (sens + prec) if sens + prec else 0.0
        assert m["dice"] == pytest.approx(harmonic)


@PROPERTY
@given(pred=masks, spacing=spacings, pad=st.integers(1, 3))
def test_metrics_do_not_change_when_background_is_added(pred, spacing, pad):
    """Padding both masks with background changes no metric (voxels outside the array are background)."""
    gt = np.roll(pred, 1, axis=-1)
    if not pred.any():
        return  # one-empty HD95 is the grid's diagonal, which padding changes by design
    a = binary_metrics(pred, gt, spacing=spacing, tolerance_mm=2.0)
    b = binary_metrics(np.pad(pred, pad), np.pad(gt, pad), spacing=spacing, tolerance_mm=2.0)
    for key in a:
        assert a[key] == pytest.approx(b[key]), key


@PROPERTY
@given(labels=arrays(np.uint8, (3, 5, 5), elements=st.integers(0, 3)))
def test_label_arrays_count_any_nonzero_as_foreground(labels):
    gt = labels > 1
    assert binary_metrics(labels, gt) == binary_metrics(labels > 0, gt)


# ------------------------------------------------------------------------------------------ fuzz: headers


NIFTI_FIELDS = {
    # header field: values that are legal to store but wrong for a CT
    "dim": st.lists(st.integers(-2, 9), min_size=8, max_size=8),
    "pixdim": st.lists(st.sampled_from([0.0, -1.0, 1e-30, 1e30, float("nan"), float("inf"), 0.7, 2.5]),
                       min_size=8, max_size=8),
    "datatype": st.sampled_from([0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048,
                                 2304, 9999]),
    "bitpix": st.integers(-8, 256),
    "vox_offset": st.sampled_from([0.0, 1.0, 352.0, 353.5, 1e9, -5.0, float("nan")]),
    "scl_slope": st.sampled_from([0.0, 1.0, -1.0, 1e38, float("nan"), float("inf")]),
    "scl_inter": st.sampled_from([0.0, -1024.0, 1e38, float("nan"), float("-inf")]),
    "qform_code": st.integers(-1, 5),
    "sform_code": st.integers(-1, 5),
    "quatern_b": st.sampled_from([0.0, 1.0, 2.0, float("nan")]),
    "srow_x": st.lists(st.sampled_from([0.0, 1.0, -1.0, float("nan"), 1e30]), min_size=4, max_size=4),
    "magic": st.sampled_from([b"n+1", b"ni1", b"n+2", b"xyz", b""]),
    "sizeof_hdr": st.sampled_from([348, 540, 0, -1, 1000]),
}


@pytest.fixture(scope="module")
def nifti_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("nifti_fuzz") / "ct.nii"
    rng = np.random.default_rng(0)
    affine = np.diag([-0.7, 0.8, 2.5, 1.0])
    nib.save(nib.Nifti1Image(rng.integers(-1024, 400, (10, 9, 6)).astype(np.int16), affine), str(path))
    return path


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # a huge scl_slope: Inf voxels, which
@settings(FUZZ, max_examples=NIFTI_FUZZ_EXAMPLES)  # covidseg.intensity refuses (test_intensity.py)
@given(data=st.data())
def test_fuzz_nifti_header_fields(nifti_template, tmp_path_factory, monkeypatch, data):
    """Set 1-3 header fields to wrong values: reading a CT or a mask gives a valid volume or one InputError."""
    monkeypatch.setenv(MAX_VOXELS_ENV, "1e6")
    raw = bytearray(nifti_template.read_bytes())
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(bytes(raw[:348])), check=False)
    for name in data.draw(st.lists(st.sampled_from(sorted(NIFTI_FIELDS)), min_size=1, max_size=3, unique=True)):
        try:
            header[name] = data.draw(NIFTI_FIELDS[name])
        except (ValueError, TypeError, OverflowError):
            pass  # not storable in the field at all
    raw[:348] = header.binaryblock
    path = tmp_path_factory.mktemp("f") / "fuzz.nii"
    path.write_bytes(bytes(raw))
    for reader in (read_image, read_mask):
        try:
            result = reader(path)
        except InputError as exc:
            assert "fuzz.nii" in str(exc) and "\n" not in str(exc)
            continue
        array = result.array if reader is read_image else result
        assert array.ndim == 3 and min(array.shape) >= 2
        if reader is read_image:
            assert all(math.isfinite(s) and s > 0 for s in result.spacing), result.spacing
            assert np.isfinite(result.affine).all()


@pytest.fixture(scope="module")
def dicom_template(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    from dicom_series import write_dicom_series

    folder = tmp_path_factory.mktemp("dicom_fuzz")
    volume = np.random.default_rng(1).integers(-1024, 400, (3, 8, 8)).astype(np.int16)
    paths = write_dicom_series(folder, volume, series_uid="1.2.826.0.1.3680043.2.1125.88", intercept=-1024)
    blobs = [path.read_bytes() for path in paths]
    return blobs


DICOM_FIELDS = {
    "Rows": st.sampled_from([0, 1, 7, 9, 65535]),
    "Columns": st.sampled_from([0, 1, 7, 9, 65535]),
    "BitsAllocated": st.sampled_from([0, 1, 8, 12, 32, 64]),
    "BitsStored": st.sampled_from([0, 1, 12, 16, 40]),
    "PixelRepresentation": st.sampled_from([0, 1, 2]),
    "SamplesPerPixel": st.sampled_from([0, 2, 3, 4]),
    "ImagePositionPatient": st.sampled_from([["nan", "0", "0"], ["0", "0"], ["1e400", "0", "0"], ["0", "0", "0"]]),
    "ImageOrientationPatient": st.sampled_from([["1", "0", "0", "0", "1", "0"], ["0"] * 6, ["1", "0", "0"],
                                                ["1", "0", "0", "1", "0", "0"], ["nan"] * 6]),
    "RescaleSlope": st.sampled_from(["0", "-1", "1e300", "nan", "abc"]),
    "RescaleIntercept": st.sampled_from(["-1024", "1e300", "nan"]),
    "PixelSpacing": st.sampled_from([["0", "0"], ["-1", "1"], ["nan", "1"], ["1"]]),
    "SeriesInstanceUID": st.sampled_from(["1.2.3", "", "9.9.9.9"]),
    "PixelData": st.sampled_from([b"", b"\0" * 10, b"\0" * 200]),
}


@pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning")  # pydicom warns about the values we set
@settings(FUZZ, max_examples=DICOM_FUZZ_EXAMPLES)
@given(data=st.data())
def test_fuzz_dicom_tags(dicom_template, tmp_path_factory, monkeypatch, data):
    """Set 1-2 tags of one slice to wrong values (with pydicom): a valid volume or one InputError, never a crash."""
    import pydicom

    monkeypatch.setenv(MAX_VOXELS_ENV, "1e6")
    folder = tmp_path_factory.mktemp("d")
    victim = data.draw(st.integers(0, len(dicom_template) - 1))
    for k, blob in enumerate(dicom_template):
        path = folder / f"{k}.dcm"
        path.write_bytes(blob)
        if k != victim:
            continue
        ds = pydicom.dcmread(str(path))
        for name in data.draw(st.lists(st.sampled_from(sorted(DICOM_FIELDS)), min_size=1, max_size=2, unique=True)):
            value = data.draw(DICOM_FIELDS[name])
            try:
                setattr(ds, name, value)
            except (ValueError, TypeError, OverflowError):
                pass
        try:
            ds.save_as(str(path), enforce_file_format=True)
        except (ValueError, TypeError, OverflowError, AttributeError, KeyError):
            return  # pydicom refuses to write this combination: nothing to read
    try:
        ct = read_image(folder)
    except InputError as exc:
        assert "\n" not in str(exc)
    else:
        assert ct.array.ndim == 3 and np.isfinite(ct.affine).all()
        assert all(math.isfinite(s) and s > 0 for s in ct.spacing), ct.spacing
