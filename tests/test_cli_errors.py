"""Every error a user can cause, through the real console entry (`covidseg.cli.main.run`): exit code and one line.

Rows of docs/reliability.md. Each test runs the CLI in-process (fast: no interpreter start), catches SystemExit and
reads stderr; user errors must exit 2 with a message naming the file or key and no "Traceback".
"""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from covidseg.checkpoint import FORMAT_VERSION, save_checkpoint
from covidseg.cli.main import run as cli
from covidseg.config import Config, config_to_dict, load_config
from covidseg.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_USER
from covidseg.io.volume import MAX_VOXELS_ENV
from covidseg.models import create_model, variant_config
from covidseg.phantom import make_phantom
from dicom_series import write_dicom_series

SCALE = 0.1
"""Phantom scale: about 51x51 pixels and 25 slices; a whole `segment` takes about half a second in-process."""
WINDOW = "inference.window=8x32x32"
SHAPE = (20, 20, 8)
"""File grid (X, Y, Z) of the small bad inputs."""


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``covidseg ARGV`` in-process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as info:
        cli(argv)
    out, err = capsys.readouterr()
    return int(info.value.code or 0), out, err


def assert_user_error(code: int, err: str, *needles: str) -> None:
    """Exit 2, one ``covidseg: error:`` line holding every needle, no traceback."""
    assert code == EXIT_USER, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("covidseg: error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def save(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def hu_volume(shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(-1024, 400, size=shape).astype(np.int16)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A phantom CT and a tiny random infection model (U-Net, 2 poolings, width 4)."""
    root = tmp_path_factory.mktemp("cli_errors")
    ph = make_phantom("coronacases", seed=1, scale=SCALE)
    ct = save(root / "case_a.nii.gz", ph.stored_ct(), ph.affine)
    torch.manual_seed(0)
    cfg = Config(model=variant_config("unet", base_width=4, depth=2))
    ckpt = save_checkpoint(root / "tiny.pt", create_model(cfg.model), cfg, target="infection")
    return {"root": root, "ct": ct, "ckpt": ckpt}


def segment_argv(world: dict[str, Path], input_path: Path, out: Path, *extra: str) -> list[str]:
    return ["segment", str(input_path), "-o", str(out), "--checkpoint", str(world["ckpt"]), "--set", WINDOW, *extra]


# ------------------------------------------------------------------------------------------ exit codes


def test_no_command_prints_help_and_exits_2(capsys):
    code, out, _ = run_cli([], capsys)
    assert code == EXIT_USER and "usage: covidseg" in out


def test_usage_errors_exit_2_without_traceback(capsys):
    code, _, err = run_cli(["segment"], capsys)  # missing INPUT and -o
    assert code == EXIT_USER and "required" in err and "Traceback" not in err
    code, _, err = run_cli(["no-such-command"], capsys)
    assert code == EXIT_USER and "invalid choice" in err and "Traceback" not in err


def test_internal_error_prints_traceback_and_hint_exit_1(capsys, monkeypatch):
    import covidseg.cli.phantom as phantom_cli

    def boom(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(phantom_cli, "run", boom)
    code, _, err = run_cli(["phantom", "x"], capsys)
    assert code == EXIT_INTERNAL
    assert "Traceback" in err and "RuntimeError: a bug" in err and "Please report it" in err


@pytest.mark.parametrize("exc, expected, needle", [
    (KeyboardInterrupt(), EXIT_INTERRUPTED, "interrupted"),
    (MemoryError(), EXIT_USER, "out of memory"),
    (OSError(errno.ENOSPC, "No space left on device", "/x/out.nii.gz"), EXIT_USER, "disk is full"),
    (PermissionError(errno.EACCES, "Permission denied", "/x"), EXIT_USER, "no permission to write"),
    (OSError(errno.EROFS, "Read-only file system", "/x"), EXIT_USER, "no permission to write"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/x/f/out"), EXIT_USER, "a file stands where"),
    (OSError(errno.EIO, "Input/output error"), EXIT_INTERNAL, "Please report it"),
], ids=["interrupt", "memory", "disk-full", "permission", "read-only", "not-a-folder", "other-os-error"])
def test_exceptions_map_to_documented_exit_codes(capsys, monkeypatch, exc, expected, needle):
    import covidseg.cli.phantom as phantom_cli

    def raiser(args):
        raise exc

    monkeypatch.setattr(phantom_cli, "run", raiser)
    code, _, err = run_cli(["phantom", "x"], capsys)
    assert code == expected and needle in err
    assert ("Traceback" in err) == (expected == EXIT_INTERNAL)


def test_sigterm_handler_is_restored_after_a_command(capsys, monkeypatch):
    import covidseg.cli.phantom as phantom_cli

    monkeypatch.setattr(phantom_cli, "run", lambda args: 0)
    before = signal.getsignal(signal.SIGTERM)
    assert run_cli(["phantom", "x"], capsys)[0] == 0
    assert signal.getsignal(signal.SIGTERM) == before


# ------------------------------------------------------------------------------------------ configuration


SET_CASES = [
    ("train.epoch=5", ["unknown config key 'train.epoch'", "epochs"]),
    ("trian.epochs=5", ["unknown config key 'trian'", "train"]),
    ("train.epochs=many", ["'train.epochs'", "expected an integer", "'many'"]),
    ("train.epochs=2.5", ["'train.epochs'", "expected an integer"]),
    ("runtime.amp=fast", ["'runtime.amp'", "'fast' is not one of", "'bf16'"]),
    ("train.amp=fast", ["'runtime.amp'", "'fast' is not one of", "'bf16'"]),  # an old key, named at its new home
    ("train.patch_size=[8,128]", ["'train.patch_size'", "expected 3 values"]),
    ("train.learning_rate=fast", ["'train.learning_rate'", "expected a number"]),
    ("train=5", ["'train' is a section"]),
    ("train.epochs", ["expected key=value"]),
    ("model.name=unet-xl", ["unet-xl", "valid names"]),
    ("inference.grid=box", ["'inference.grid'", "'box'", "removed", "MONAI's grid", "delete it"]),
    ("inference.fit_window=true", ["'inference.fit_window'", "removed", "delete it"]),
]
"""(``--set`` item, words the one-line error must hold)."""


@pytest.mark.parametrize("item, needles", SET_CASES, ids=[item for item, _ in SET_CASES])
def test_bad_set_override_is_one_line_naming_the_key(tmp_path, capsys, item, needles):
    code, _, err = run_cli(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--set", item], capsys)
    assert_user_error(code, err, *needles)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text, needles", [
    ("train:\n  epoch: 5\n", ["unknown config key 'train.epoch'", "epochs"]),
    ("train:\n  epochs: many\n", ["'train.epochs'", "expected an integer"]),
    ("inference:\n  tta: maybe\n", ["'inference.tta'", "expected true or false"]),
    ("- train\n", ["must be a mapping"]),
    ("train: [1, 2\n", ["not valid YAML"]),
], ids=["unknown-key", "wrong-type", "not-a-bool", "not-a-mapping", "bad-syntax"])
def test_bad_config_file_is_one_line_naming_the_key(tmp_path, capsys, text, needles):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(text)
    code, _, err = run_cli(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--config", str(cfg)],
                           capsys)
    assert_user_error(code, err, *needles)
    code, _, err = run_cli(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--config",
                            str(tmp_path / "missing.yaml")], capsys)
    assert_user_error(code, err, "missing.yaml", "not found")


@pytest.mark.parametrize("raw, expected", [("off", "off"), ("on", "on"), ("auto", "auto"), ("false", "off"),
                                           ("no", "off"), ("yes", "on")])
def test_yaml_booleans_map_onto_on_off_literals(tmp_path, raw, expected):
    """YAML 1.1 reads bare off/on/yes/no as booleans; a Literal["auto", "on", "off"] must still accept them."""
    assert load_config(None, [f"runtime.bf16={raw}"]).runtime.bf16 == expected
    path = tmp_path / "c.yaml"
    path.write_text(f"runtime:\n  bf16: {raw}\n")
    assert load_config(path).runtime.bf16 == expected
    path.write_text(f"inference:\n  bf16: {raw}\n")  # the old key
    assert load_config(path).runtime.bf16 == expected
    assert load_config(None, ["runtime.amp=off"]).runtime.amp == "off"
    assert yaml.safe_load(raw) in (True, False, raw)  # the case this test is about does occur


def test_removed_inference_keys_at_their_old_defaults_still_load(tmp_path):
    """Run folders and checkpoints written before inference.grid and inference.fit_window were removed hold them at
    their defaults: they load, and the keys are gone from the loaded config."""
    path = tmp_path / "old.yaml"
    path.write_text("inference:\n  grid: volume\n  fit_window: false\n  window: [8, 64, 64]\n")
    config = load_config(path)
    assert config.inference.window == (8, 64, 64)
    assert "grid" not in config_to_dict(config)["inference"] and "fit_window" not in config_to_dict(config)["inference"]


def test_boolean_for_a_literal_without_on_off_is_still_refused():
    from covidseg.errors import ConfigError

    with pytest.raises(ConfigError, match="'train.target': True is not one of"):
        load_config(None, ["train.target=yes"])


# ------------------------------------------------------------------------------------------ bad inputs to segment


def _dicom_series(folder: Path, n: int = 6, drop: int | None = None, duplicate: int | None = None,
                  positions: list[float] | None = None) -> Path:
    """A small CT series (slices 2 mm apart unless ``positions`` says otherwise)."""
    write_dicom_series(folder, hu_volume((n, 16, 16)), positions_z=positions, drop=drop, duplicate=duplicate)
    return folder


def _truncated(root: Path) -> Path:
    path = save(root / "trunc.nii.gz", hu_volume((40, 40, 20)))
    path.write_bytes(path.read_bytes()[:2000])
    return path


def _corrupt_dicom(root: Path) -> Path:
    folder = _dicom_series(root / "corrupt_dcm")
    victim = sorted(folder.glob("*.dcm"))[2]
    victim.write_bytes(victim.read_bytes()[:300])
    return folder


BAD_INPUTS = {
    # name: (make(root) -> path, words the one-line message must hold besides the path)
    "missing": (lambda r: r / "nope.nii.gz", ["no such file"]),
    "truncated-nifti": (_truncated, ["truncated or corrupt"]),
    "corrupt-nifti": (lambda r: _write(r / "garbage.nii.gz", b"\x1f\x8b" + b"garbage" * 50), ["not a readable NIfTI"]),
    "not-nifti": (lambda r: _write(r / "scan.dcm", b"\0" * 10), ["folder that holds the series"]),
    "2d": (lambda r: save(r / "slice.nii.gz", hu_volume((20, 20))), ["2D image"]),
    "4d": (lambda r: save(r / "series4d.nii.gz", hu_volume((20, 20, 8, 3))), ["4D image"]),
    "all-zeros": (lambda r: save(r / "zeros.nii.gz", np.zeros(SHAPE, np.int16)), ["all zeros"]),
    "nan": (lambda r: save(r / "nan.nii.gz", np.where(hu_volume() > 300, np.nan, hu_volume()).astype(np.float32)),
            ["NaN or infinite"]),
    "inf": (lambda r: save(r / "inf.nii.gz", np.where(hu_volume() > 300, np.inf, hu_volume()).astype(np.float32)),
            ["NaN or infinite"]),
    "mr-like": (lambda r: save(r / "mr.nii.gz", np.random.default_rng(0).uniform(0, 1800, SHAPE).astype(np.float32)),
                ["may be an MR image"]),
    "empty-folder": (lambda r: _mkdir(r / "empty_dir" / "inner") and r / "empty_dir" / "inner", ["empty"]),
    "dicom-missing-slice": (lambda r: _dicom_series(r / "gap_dcm", drop=3), ["missing slice"]),
    "dicom-duplicated-slice": (lambda r: _dicom_series(r / "dup_dcm", duplicate=2), ["duplicated slice"]),
    "dicom-uneven-spacing": (lambda r: _dicom_series(r / "uneven_dcm", positions=[0, 2, 4, 7.1, 9.1, 11.1]),
                             ["uneven slice spacing"]),
    "dicom-corrupt-slice": (_corrupt_dicom, ["corrupt_dcm"]),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _mkdir(path: Path) -> bool:
    path.mkdir(parents=True)
    return True


@pytest.mark.parametrize("kind", sorted(BAD_INPUTS))
def test_bad_input_to_segment_is_one_line_exit_2(world, tmp_path, capsys, kind):
    make, words = BAD_INPUTS[kind]
    path = make(tmp_path)
    out = tmp_path / "out"
    code, _, err = run_cli(segment_argv(world, path, out), capsys)
    assert_user_error(code, err, path.name, *words)
    assert not out.exists()


def test_scan_too_large_for_memory_is_refused_before_loading(world, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(MAX_VOXELS_ENV, "1000")
    code, _, err = run_cli(segment_argv(world, world["ct"], tmp_path / "out"), capsys)
    assert_user_error(code, err, world["ct"].name, "voxels is more than the 1e+03 allowed", MAX_VOXELS_ENV)


# ------------------------------------------------------------------------------------------ checkpoints, device


def _tampered(world: dict[str, Path], tmp_path: Path, **changes: object) -> Path:
    payload = torch.load(world["ckpt"], weights_only=True)
    for key, value in changes.items():
        if key == "model":
            payload["config"]["model"].update(value)  # type: ignore[arg-type]
        else:
            payload[key] = value
    path = tmp_path / "tampered.pt"
    torch.save(payload, path)
    return path


@pytest.mark.parametrize("change, needles", [
    ({"format_version": FORMAT_VERSION + 1, "covidseg_version": "9.9.9"},
     [f"format version {FORMAT_VERSION + 1}", "9.9.9"]),
    ({"model": {"name": "unet-fv-ce-paspp-ds", "fv": "ce", "paspp": True, "deep_supervision": True}},
     ["expected unet-fv-ce-paspp-ds", "look like"]),
])
def test_checkpoint_of_another_version_or_variant(world, tmp_path, capsys, change, needles):
    ckpt = _tampered(world, tmp_path, **change)
    code, _, err = run_cli(["segment", str(world["ct"]), "-o", str(tmp_path / "out"), "--checkpoint", str(ckpt)],
                           capsys)
    assert_user_error(code, err, "tampered.pt", *needles)


def test_checkpoint_that_is_not_one(world, tmp_path, capsys):
    bad = _write(tmp_path / "weights.pt", b"PK\x03\x04 not a zip at all" * 20)
    code, _, err = run_cli(["segment", str(world["ct"]), "-o", str(tmp_path / "out"), "--checkpoint", str(bad)],
                           capsys)
    assert_user_error(code, err, "weights.pt")


def test_lung_model_given_as_infection_model(world, tmp_path, capsys):
    cfg = Config(model=variant_config("unet", base_width=4, depth=2, out_channels=2))
    cfg.train.target = "lung"
    ckpt = save_checkpoint(tmp_path / "lungs.pt", create_model(cfg.model), cfg, target="lung")
    code, _, err = run_cli(["segment", str(world["ct"]), "-o", str(tmp_path / "out"), "--checkpoint", str(ckpt)],
                           capsys)
    assert_user_error(code, err, "lungs.pt", "--lungs CKPT")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: --device cuda is valid here")
def test_device_cuda_without_a_gpu(world, tmp_path, capsys):
    code, _, err = run_cli([*segment_argv(world, world["ct"], tmp_path / "seg"), "--device", "cuda"], capsys)
    assert_user_error(code, err, "--device cuda", "no CUDA GPU")
    code, _, err = run_cli(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--device", "cuda"],
                           capsys)
    assert_user_error(code, err, "runtime.device='cuda'", "--device cpu")
    assert not (tmp_path / "seg").exists() and not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------ outputs


def test_existing_output_is_kept_without_force_and_replaced_with_it(world, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    code, _, err = run_cli(segment_argv(world, world["ct"], out), capsys)
    assert_user_error(code, err, str(out), "--force")
    assert (out / "mine.txt").read_text(encoding="utf-8") == "keep me" and len(list(out.iterdir())) == 1
    code, _, err = run_cli([*segment_argv(world, world["ct"], out), "--force"], capsys)
    assert code == 0, err
    assert (out / "report.json").is_file() and not (out / "mine.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no hidden partial or old folder left


def test_force_never_deletes_the_input(world, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    ct = data / "ct.nii.gz"
    ct.write_bytes(world["ct"].read_bytes())
    code, _, err = run_cli([*segment_argv(world, ct, data), "--force"], capsys)
    assert ct.is_file(), "the input scan was deleted"
    assert_user_error(code, err, "input")


def test_force_never_replaces_a_dicom_input_in_a_cohort(world, tmp_path, capsys):
    """A folder of cases written onto itself: the output of case ``c`` would be the DICOM folder ``c``."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "ct.nii.gz").write_bytes(world["ct"].read_bytes())
    before = sorted(p.name for p in data.iterdir())
    code, _, err = run_cli([*segment_argv(world, data, data), "--force"], capsys)
    assert_user_error(code, err, "input")
    assert sorted(p.name for p in data.iterdir()) == before


def test_output_under_a_regular_file(world, tmp_path, capsys):
    blocker = _write(tmp_path / "results.txt", b"a file, not a folder")
    code, _, err = run_cli(segment_argv(world, world["ct"], blocker / "out"), capsys)
    assert_user_error(code, err, "results.txt", "choose another output path")
    assert blocker.read_bytes() == b"a file, not a folder"


def _blocks_writes(folder: Path) -> bool:
    """Whether a 0o500 folder really refuses writes here (not as root, where chmod does not stop writing)."""
    try:
        (folder / ".probe").write_text("x")
    except PermissionError:
        return True
    (folder / ".probe").unlink()
    return False


def test_output_folder_not_writable(world, tmp_path, capsys, monkeypatch):
    """A read-only parent folder: with chmod 0o500 when that blocks writes; as root (where it does not) the same
    refusal is simulated by making ``os.mkdir`` inside that folder raise EACCES, as the kernel would."""
    parent = tmp_path / "readonly"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        if not _blocks_writes(parent):
            real_mkdir = os.mkdir

            def refusing_mkdir(path, *args, **kwargs):
                if Path(path).parent == parent:
                    raise PermissionError(errno.EACCES, "Permission denied", str(path))
                return real_mkdir(path, *args, **kwargs)

            monkeypatch.setattr(os, "mkdir", refusing_mkdir)
        code, _, err = run_cli(segment_argv(world, world["ct"], parent / "out"), capsys)
    finally:
        parent.chmod(0o700)
    assert_user_error(code, err, "readonly", "Permission denied", "choose an output folder you can write to")
    assert list(parent.iterdir()) == []


def test_full_disk_while_writing_leaves_nothing_that_looks_complete(world, tmp_path, capsys, monkeypatch):
    """The second NIfTI written gets half its bytes on disk, then ENOSPC (a tmpfs is not available to tests)."""
    real_save = nib.save
    calls: list[str] = []

    def filling_save(img, filename, *args, **kwargs):
        calls.append(str(filename))
        real_save(img, filename, *args, **kwargs)
        if len(calls) == 2:
            data = Path(filename).read_bytes()
            Path(filename).write_bytes(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))

    monkeypatch.setattr(nib, "save", filling_save)
    out = tmp_path / "out"
    code, _, err = run_cli(segment_argv(world, world["ct"], out), capsys)
    assert len(calls) == 2
    assert_user_error(code, err, "No space left on device", "disk is full")
    assert not out.exists()
    assert [p for p in tmp_path.rglob("*")] == [], "a partial folder or temporary file was left behind"


def test_help_keeps_the_examples_lines_and_wraps_long_descriptions(capsys):
    from covidseg.cli._common import DESCRIPTION_WIDTH
    from covidseg.cli.main import build_parser

    for argv in (["segment", "--help"], ["semiseg", "train", "--help"]):
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args(argv)
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert all(len(line) <= DESCRIPTION_WIDTH for line in out.splitlines()), argv
        if argv[0] == "segment":
            assert "\n  torchrun --nproc_per_node 4 -m covidseg segment cases.txt -o OUT" in out
