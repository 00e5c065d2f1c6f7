"""`covidseg data download zenodo` against a local HTTP server (127.0.0.1, random port) serving zips made here."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import threading
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from covidseg.cli.main import run as cli
from covidseg.data.download import ARCHIVES, COMPLETE_MARKER, download_zenodo, record_files
from covidseg.data.layouts import find_cases
from covidseg.errors import InputError, UserError

RECORD = "3757476"


def nifti_bytes(data: np.ndarray) -> bytes:
    img = nib.Nifti1Image(data, np.eye(4))
    return img.to_bytes()


def make_archives(top_folder: bool = False) -> dict[str, bytes]:
    """The four archives with one tiny case (coronacases_001) in the real names; noise makes them ~50 kB."""
    rng = np.random.default_rng(0)
    ct = rng.integers(-1024, 400, size=(24, 24, 12)).astype(np.int16)
    mask = (rng.random((24, 24, 12)) > 0.7).astype(np.uint8)
    contents = {
        "COVID-19-CT-Seg_20cases.zip": {"coronacases_org_001.nii": nifti_bytes(ct)},
        "Lung_Mask.zip": {"coronacases_001.nii": nifti_bytes(mask * 2)},
        "Infection_Mask.zip": {"coronacases_001.nii": nifti_bytes(mask)},
        "Lung_and_Infection_Mask.zip": {"coronacases_001.nii": nifti_bytes(mask * 3)},
    }
    out = {}
    for key, files in contents.items():
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
            for name, blob in files.items():
                zf.writestr(f"{Path(key).stem}/{name}" if top_folder else name, blob)
        out[key] = buf.getvalue()
    return out


class FakeZenodo:
    """A tiny Zenodo: /api/records/3757476 (files API JSON) and /files/<key> with HTTP Range support."""

    def __init__(self, archives: dict[str, bytes]):
        self.archives = archives
        self.published_md5 = {k: hashlib.md5(v).hexdigest() for k, v in archives.items()}
        self.interrupt_once: set[str] = set()
        self.requests: list[tuple[str, str | None]] = []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_GET(self):  # noqa: N802 (http.server's name)
                fake.requests.append((self.path, self.headers.get("Range")))
                if self.path == f"/api/records/{RECORD}":
                    body = json.dumps(fake.record_json()).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                key = self.path.rsplit("/", 1)[-1]
                if key not in fake.archives:
                    self.send_error(404)
                    return
                blob = fake.archives[key]
                start = 0
                rng = self.headers.get("Range")
                if rng:
                    start = int(rng.split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(blob) - 1}/{len(blob)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(blob) - start))
                self.end_headers()
                if key in fake.interrupt_once:
                    fake.interrupt_once.discard(key)
                    self.wfile.write(blob[start:start + (len(blob) - start) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(blob[start:])

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.api_url = f"http://127.0.0.1:{self.server.server_address[1]}/api"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def record_json(self) -> dict:
        base = self.api_url
        return {"id": int(RECORD), "files": [
            {"key": k, "size": len(v), "checksum": f"md5:{self.published_md5[k]}",
             "links": {"self": f"{base}/records/{RECORD}/files/{k}"}} for k, v in self.archives.items()
        ]}

    def file_requests(self) -> list[tuple[str, str | None]]:
        return [r for r in self.requests if "/files/" in r[0]]

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def zenodo():
    with FakeZenodo(make_archives()) as server:
        yield server


def test_record_files_reads_the_files_api(zenodo):
    files = {f.key: f for f in record_files(zenodo.api_url)}
    assert sorted(files) == sorted(ARCHIVES)
    lung = files["Lung_Mask.zip"]
    assert lung.size == len(zenodo.archives["Lung_Mask.zip"])
    assert lung.md5 == zenodo.published_md5["Lung_Mask.zip"]


def test_interrupted_download_resumes_with_range_then_skips_when_complete(zenodo, tmp_path):
    key = "COVID-19-CT-Seg_20cases.zip"
    zenodo.interrupt_once.add(key)
    with pytest.raises(UserError, match="broke off.*resume"):
        download_zenodo(tmp_path, api_url=zenodo.api_url, progress=False)
    part = tmp_path / f"{key}.part"
    half = len(zenodo.archives[key]) // 2
    assert part.stat().st_size == half
    assert not (tmp_path / "COVID-19-CT-Seg_20cases").exists()  # nothing looks complete

    folders = download_zenodo(tmp_path, api_url=zenodo.api_url, progress=False)
    assert (f"/api/records/{RECORD}/files/{key}", f"bytes={half}-") in zenodo.requests
    assert [f.name for f in folders] == [Path(k).stem for k in ARCHIVES]
    assert not list(tmp_path.glob("*.part")) and not list(tmp_path.glob("*.zip"))  # archives removed
    assert (tmp_path / "COVID-19-CT-Seg_20cases" / COMPLETE_MARKER).read_text(encoding="utf-8").strip() == \
        zenodo.published_md5[key]
    cases = find_cases(tmp_path)
    assert [c.case_id for c in cases] == ["coronacases_001"] and cases[0].lung is not None

    before = len(zenodo.file_requests())
    download_zenodo(tmp_path, api_url=zenodo.api_url, progress=False)
    assert len(zenodo.file_requests()) == before  # everything already complete: no file fetched


def test_checksum_mismatch_is_reported_and_nothing_looks_complete(zenodo, tmp_path, capsys):
    zenodo.published_md5["Infection_Mask.zip"] = "0" * 32
    with pytest.raises(InputError, match=r"Infection_Mask\.zip: md5 [0-9a-f]{32} does not match 0{32}"):
        download_zenodo(tmp_path, api_url=zenodo.api_url, progress=False)
    assert not (tmp_path / "Infection_Mask").exists()
    assert not (tmp_path / "Infection_Mask.zip").exists() and not (tmp_path / "Infection_Mask.zip.part").exists()
    with pytest.raises(SystemExit) as exc:
        cli(["data", "download", "zenodo", str(tmp_path), "--api-url", zenodo.api_url, "--no-progress"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "md5" in err and "Traceback" not in err


def test_cli_download_and_flattened_top_folder(tmp_path, capsys):
    with FakeZenodo(make_archives(top_folder=True)) as server:
        with pytest.raises(SystemExit) as exc:
            cli(["data", "download", "zenodo", str(tmp_path), "--api-url", server.api_url, "--no-progress",
                 "--keep-archives"])
    assert exc.value.code == 0
    assert (tmp_path / "Lung_Mask" / "coronacases_001.nii").is_file()  # not Lung_Mask/Lung_Mask/...
    assert (tmp_path / "Lung_Mask.zip").is_file()
    assert "archives ready" in capsys.readouterr().out


def test_unreachable_server_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot reach the server"):
        download_zenodo(tmp_path, api_url="http://127.0.0.1:9/api", progress=False)
