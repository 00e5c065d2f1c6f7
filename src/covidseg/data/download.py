"""``covidseg data download zenodo DIR``: fetch the four archives of Zenodo record 3757476, verified and unpacked.

The record's own files API (``{api_url}/records/3757476``) lists each file with its ``key``, ``size``,
``checksum`` (``"md5:..."``) and download link (``links.self``). Each archive is downloaded into
``DIR/<key>.part`` (resumed with an HTTP ``Range`` request when a partial file is there), its size and MD5 are
checked against the record, and only then is it renamed to ``DIR/<key>`` and unpacked into ``DIR/<stem>/``
(through a temporary folder renamed at the end, with a ``.covidseg-complete`` marker holding the MD5). An archive
whose folder carries a matching marker is skipped. A checksum mismatch removes the bad download and raises
:class:`~covidseg.errors.InputError`: nothing is left looking complete.

Reference: Ma Jun et al. (2020), COVID-19 CT Lung and Infection Segmentation Dataset, Zenodo,
doi:10.5281/zenodo.3757476, CC BY 4.0.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import shutil
import sys
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from covidseg.data.layouts import ZENODO_CT_DIR, ZENODO_MASK_DIRS
from covidseg.errors import InputError, UserError

ZENODO_API_URL = "https://zenodo.org/api"
ZENODO_RECORD = "3757476"
ARCHIVES: tuple[str, ...] = (f"{ZENODO_CT_DIR}.zip", *(f"{d}.zip" for d in ZENODO_MASK_DIRS.values()))
"""The four archives of the record (docs/method.md)."""
CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60.0
COMPLETE_MARKER = ".covidseg-complete"
PART_SUFFIX = ".part"
HTTP_PARTIAL = 206
HTTP_RANGE_NOT_SATISFIABLE = 416


@dataclass
class RemoteFile:
    """One file of a Zenodo record as its files API publishes it."""

    key: str
    size: int
    md5: str
    url: str


def _get_json(url: str) -> dict:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            return json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as exc:
        raise UserError(f"{url}: the server answered HTTP {exc.code} ({exc.reason}); check --api-url and the "
                        f"record id, or try again later") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(f"{url}: cannot reach the server ({reason}); check the network connection or --api-url")\
            from None
    except ValueError as exc:
        raise UserError(f"{url}: the answer is not JSON ({exc}); check --api-url (it should end in /api)") from None


def record_files(api_url: str = ZENODO_API_URL, record: str = ZENODO_RECORD) -> list[RemoteFile]:
    """Files of a record from ``{api_url}/records/{record}`` (legacy and InvenioRDM shapes accepted)."""
    url = f"{api_url.rstrip('/')}/records/{record}"
    data = _get_json(url)
    entries = data.get("files", [])
    if isinstance(entries, dict):  # InvenioRDM: {"entries": [...] or {key: {...}}}
        entries = entries.get("entries", [])
        entries = list(entries.values()) if isinstance(entries, dict) else entries
    out = []
    for entry in entries:
        try:
            key = entry.get("key") or entry["filename"]
            size = int(entry.get("size", entry.get("filesize", -1)))
            algo, _, digest = str(entry["checksum"]).partition(":")
            links = entry.get("links", {})
            link = links.get("self") or links.get("content") or links["download"]
        except (KeyError, TypeError, ValueError, AttributeError):
            raise UserError(f"{url}: unexpected file entry {entry!r}; expected key, size, checksum and "
                            f"links.self") from None
        if not digest:  # a bare checksum without an "md5:" prefix
            algo, digest = "md5", algo
        if algo.lower() != "md5":
            raise UserError(f"{url}: file {key} has a {algo} checksum; only md5 is supported")
        out.append(RemoteFile(key=key, size=size, md5=digest.lower(), url=link))
    if not out:
        raise UserError(f"{url}: the record lists no files; check the record id and --api-url")
    return out


def md5_of(path: Path) -> str:
    """MD5 hex digest of a file, read in chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download(remote: RemoteFile, dest: Path, progress: bool) -> None:
    """Fetch ``remote`` into ``dest`` through ``dest.part``, resuming; verify size and md5; rename at the end."""
    from covidseg.progress import progress_bar

    part = dest.with_name(dest.name + PART_SUFFIX)
    have = part.stat().st_size if part.exists() else 0
    if remote.size >= 0 and have > remote.size:  # larger than published: not ours to resume
        part.unlink()
        have = 0
    if remote.size < 0 or have < remote.size:
        request = urllib.request.Request(remote.url)
        if have:
            request.add_header("Range", f"bytes={have}-")
        try:
            response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
        except urllib.error.HTTPError as exc:
            if exc.code == HTTP_RANGE_NOT_SATISFIABLE and have:
                part.unlink()
                return _download(remote, dest, progress)
            raise UserError(f"{remote.url}: HTTP {exc.code} ({exc.reason}) while downloading {remote.key}; try "
                            f"again later (the partial file {part} is kept and will be resumed)") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            raise UserError(f"{remote.url}: cannot download {remote.key} ({getattr(exc, 'reason', exc)}); check "
                            f"the connection and run the command again to resume") from None
        with response:
            if have and response.status != HTTP_PARTIAL:  # the server ignored Range: start over
                have = 0
            mode = "ab" if have else "wb"
            total = remote.size if remote.size >= 0 else None
            bar = progress_bar(total=total, initial=have, unit="B", unit_scale=True, desc=remote.key,
                               file=sys.stderr, disable=not progress)
            try:
                with open(part, mode) as fh:
                    for chunk in iter(lambda: response.read(CHUNK_BYTES), b""):
                        fh.write(chunk)
                        bar.update(len(chunk))
                    fh.flush()
                    os.fsync(fh.fileno())
            except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
                raise UserError(f"{remote.url}: the download of {remote.key} broke off ({exc}); run the command "
                                f"again to resume from {part}") from None
            finally:
                bar.close()
    size = part.stat().st_size
    if remote.size >= 0 and size != remote.size:
        raise UserError(f"{remote.url}: the download of {remote.key} broke off at {size} of {remote.size} bytes; "
                        f"run the command again to resume from {part}")
    digest = md5_of(part)
    if digest != remote.md5:
        part.unlink()
        raise InputError(f"{dest}: md5 {digest} does not match {remote.md5} published by the record; the "
                         f"corrupt download was removed — run the command again")
    os.replace(part, dest)


def _safe_members(archive: zipfile.ZipFile, target: Path) -> list[zipfile.ZipInfo]:
    members = archive.infolist()
    root = target.resolve()
    for info in members:
        resolved = (target / info.filename).resolve()
        if root != resolved and root not in resolved.parents:
            raise InputError(f"{info.filename}: archive member points outside {target}; the archive is unsafe")
    return members


def unpack(zip_path: Path, target: Path, md5: str) -> Path:
    """Unzip into ``target`` (a single top folder of the same name is flattened); atomic via a temp folder."""
    tmp = target.with_name(f".{target.name}.unpacking")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        with zipfile.ZipFile(zip_path) as archive:
            members = _safe_members(archive, tmp)
            archive.extractall(tmp, members)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise InputError(f"{zip_path}: cannot unpack ({exc}); delete it and run the command again") from None
    entries = [p for p in tmp.iterdir() if p.name != "__MACOSX"]
    content = tmp
    if len(entries) == 1 and entries[0].is_dir() and entries[0].name == target.name:
        content = entries[0]
    (content / COMPLETE_MARKER).write_text(md5 + "\n", encoding="utf-8")
    if target.exists():
        shutil.rmtree(target)
    os.replace(content, target)
    if content != tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def is_complete(target: Path, md5: str) -> bool:
    """True when ``target`` was unpacked from the archive with this md5."""
    marker = target / COMPLETE_MARKER
    with contextlib.suppress(OSError):
        return marker.read_text(encoding="utf-8").strip() == md5
    return False


def download_zenodo(out_dir: str | Path, api_url: str = ZENODO_API_URL, record: str = ZENODO_RECORD,
                    keys: tuple[str, ...] = ARCHIVES, keep_archives: bool = False, progress: bool = True) \
        -> list[Path]:
    """Download, verify and unpack the record's archives into ``out_dir`` (Zenodo layout); returns the folders.

    Args:
        out_dir: destination; each ``X.zip`` becomes ``out_dir/X/``.
        api_url: base of the Zenodo API (tests use a local server).
        record: record id (3757476).
        keys: archive names to fetch.
        keep_archives: keep the verified ``.zip`` files after unpacking.
        progress: byte progress bars on stderr.

    Raises:
        UserError: network failure (the partial file is kept for resuming), an archive missing from the record.
        InputError: a checksum mismatch (the bad file is removed) or an archive that cannot be unpacked.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    remote = {f.key: f for f in record_files(api_url, record)}
    missing = [k for k in keys if k not in remote]
    if missing:
        raise UserError(f"{api_url}/records/{record}: the record does not list {missing} (it lists "
                        f"{sorted(remote)}); check the record id")
    folders = []
    for key in keys:
        rf = remote[key]
        target = out / Path(key).stem
        if is_complete(target, rf.md5):
            print(f"{target}: already complete, skipped", file=sys.stderr)
            folders.append(target)
            continue
        zip_path = out / key
        if not (zip_path.is_file() and zip_path.stat().st_size == rf.size and md5_of(zip_path) == rf.md5):
            with contextlib.suppress(FileNotFoundError):
                zip_path.unlink()
            _download(rf, zip_path, progress)
        unpack(zip_path, target, rf.md5)
        if not keep_archives:
            zip_path.unlink()
        print(f"{target}: {rf.key} verified (md5 {rf.md5}) and unpacked", file=sys.stderr)
        folders.append(target)
    return folders
