"""Code approval: a site runs only app bundles (FABs) whose SHA-256 its IT team has approved.

Why an allow-list and not Flower's signed FABs: Flower 1.41's SuperNode verifies FAB signatures
(``--trusted-entities``) only for bundles that also carry a ``valid_license`` verification from the
Flower platform, which an offline hospital federation never has. The FAB hash, by contrast, is exactly
what the SuperNode receives and what a coordinator can publish (``fedfusion app-hash``): Flower builds
FABs deterministically, so the same source gives the same hash on every machine.

What is approved is the bytes Flower will load. Flower itself unpacks every FAB it receives (approved or
not) into ``$FLWR_HOME/apps/<publisher>.<name>.<version>.<first 8 hex digits of the hash>`` and, if that
folder already exists, imports whatever is in it; the hash it names the folder by is the one the
coordinator *claims*. Finding a FAB whose SHA-256 shares 8 hex digits with an approved one takes ~2^32
hashes (minutes on one GPU), so an unapproved bundle could pre-place the folder a later approved run
would import from. So the site replaces both steps (:mod:`fedfusion.client.flower_runtime`):

- the SHA-256 of the received bytes (not the claimed hash) must be approved *before anything is
  unpacked*; an unapproved bundle is never written to disk;
- an approved bundle is checked in memory (every file against its ``.info/CONTENT`` manifest, nothing
  else in the archive, no unsafe path) and unpacked into ``$FLWR_HOME/fedfusion-approved/<full sha256>``;
- before import, that folder must hold exactly the manifest's files with their hashes (no extra file,
  no symlink, no ``__pycache__``: bytecode writing is off in the task process), the run's fab id,
  version and claimed hash must equal the bundle's own, and Flower's loader imports from that folder.

The check runs in the site's own installed code (the warm SuperExec's task process), never in the
FAB: a bundle cannot approve itself. No byte of the unapproved code is imported, and no data is read:
instead of the bundle's ClientApp, Flower runs
:func:`refusing_app`, site code that answers every message with an error reply (code
``LOAD_CLIENT_APP_EXCEPTION``) naming the hash and the setting to change. That reply goes through the
site's audit mod like any other, so the refusal is in the audit log, and the coordinator sees the
reason (Flower's own load-error reply would only say "An exception was raised when attempting to load
`ClientApp`").
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import sys
import tempfile
import tomllib
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

_HASH = re.compile(r"^[0-9a-f]{64}$")


class AppNotApproved(Exception):
    """The run's FAB is not on this site's allow-list."""


def fab_hash(app_dir: str | Path) -> str:
    """SHA-256 of the FAB that ``flwr run APP_DIR`` would send (Flower's own, deterministic build)."""
    from fedfusion.client.flower_runtime import build_fab

    return hashlib.sha256(build_fab(Path(app_dir))).hexdigest()


def normalise_hashes(values: Iterable[str], source: str) -> frozenset[str]:
    """Lower-case hex digests; anything else is an error naming ``source`` (e.g. the site.toml key)."""
    hashes = set()
    for value in values:
        digest = str(value).strip().lower()
        if not _HASH.match(digest):
            raise ValueError(f"{source}: {value!r} is not a SHA-256 hex digest (64 hex characters); "
                             "get it from the coordinator's `fedfusion app-hash`")
        hashes.add(digest)
    return frozenset(hashes)


def check_approved(digest: str, approved: frozenset[str]) -> None:
    """Raise ``AppNotApproved`` unless ``digest`` is approved (an empty allow-list approves nothing)."""
    if digest.lower() not in approved:
        raise AppNotApproved(
            f"this site has not approved app bundle sha256={digest}; if the coordinator confirms it, add it to "
            "[approval] apps in site.toml and restart the site")


def refusing_app(reason: str) -> Callable[..., object]:
    """A stand-in ClientApp that answers any message with ``reason`` (recorded by the audit mod first)."""
    from flwr.app import Context, Error, Message

    from fedfusion.client.audit_mod import audit_mod
    from fedfusion.common.flower_adapter import ErrorCode

    def refuse(msg: Message, context: Context) -> Message:
        return Message(Error(ErrorCode.LOAD_CLIENT_APP_EXCEPTION, f"refused: {reason}"), reply_to=msg)

    def app(message: Message, context: Context) -> Message:
        return audit_mod(message, context, refuse)

    return app


def install_approval_check(approved: frozenset[str], on_refusal: Callable[[str, str], None] | None = None,
                           base_dir: Path | None = None) -> None:
    """Make this process's ClientApp task install and load only approved bundles (see the module doc).

    ``on_refusal(sha256, reason)`` gets the refused bundle's SHA-256 (of its bytes) and why; ``base_dir`` is where
    verified bundles are unpacked (default ``$FLWR_HOME/fedfusion-approved``).
    """
    from fedfusion.client import flower_runtime

    sys.dont_write_bytecode = True  # an unpacked bundle must stay byte-identical to its manifest
    gate = _Gate(approved, on_refusal, base_dir or flower_runtime.flower_home() / "fedfusion-approved")
    flower_runtime.replace_fab_install_and_load(gate.install, gate.loader_factory)


@dataclass(frozen=True)
class VerifiedBundle:
    """An approved FAB unpacked by :func:`install_verified`: where, and what it says it is."""

    sha256: str
    fab_id: str
    fab_version: str
    path: Path


def install_verified(content: bytes, approved: frozenset[str], base_dir: Path) -> VerifiedBundle:
    """Unpack ``content`` into ``base_dir/<sha256>`` only if its SHA-256 is approved and it is well formed.

    Raises ``AppNotApproved`` before writing anything when the bytes are not approved or malformed, and
    when an existing folder of that name does not hold exactly the bundle's files.
    """
    digest = hashlib.sha256(content).hexdigest()
    check_approved(digest, approved)
    files, pyproject = _read_bundle(content, digest)
    from fedfusion.client.flower_runtime import fab_metadata

    fab_id, version = fab_metadata(pyproject)
    target = base_dir / digest
    if not target.exists():
        base_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{digest[:8]}-", dir=base_dir))
        with zipfile.ZipFile(io.BytesIO(content)) as archive:
            for name in files:
                (staging / name).parent.mkdir(parents=True, exist_ok=True)
                (staging / name).write_bytes(archive.read(name))
        try:
            os.rename(staging, target)
        except OSError:  # another task unpacked it first: verify theirs, drop ours
            shutil.rmtree(staging, ignore_errors=True)
    _verify_tree(target, files, digest)
    return VerifiedBundle(digest, fab_id, version, target)


def _read_bundle(content: bytes, digest: str) -> tuple[dict[str, str], dict]:
    """Files (path -> sha256) of a FAB, checked in memory against its own CONTENT manifest; and its pyproject."""
    def bad(why: str) -> AppNotApproved:
        return AppNotApproved(f"app bundle sha256={digest} is malformed: {why}; it was not unpacked")

    try:
        archive = zipfile.ZipFile(io.BytesIO(content))
    except zipfile.BadZipFile as err:
        raise bad(f"not a zip archive ({err})") from None
    with archive:
        names = archive.namelist()
        if ".info/CONTENT" not in names:
            raise bad("no .info/CONTENT manifest")
        files: dict[str, str] = {}
        for line in archive.read(".info/CONTENT").decode("utf-8").strip().splitlines():
            name, _, rest = line.partition(",")
            files[name] = rest.partition(",")[0].lower()
        for name in names:
            if name.startswith(".info/"):
                continue
            parts = PurePosixPath(name).parts
            if name.startswith("/") or "\\" in name or ".." in parts or name not in files:
                raise bad(f"archive entry {name!r} is unsafe or not in .info/CONTENT")
            if hashlib.sha256(archive.read(name)).hexdigest() != files[name]:
                raise bad(f"{name} does not match its hash in .info/CONTENT")
        missing = sorted(set(files) - set(names))
        if missing:
            raise bad(f".info/CONTENT lists files the archive lacks: {missing[:3]}")
        if "pyproject.toml" not in files:
            raise bad("no pyproject.toml")
        try:
            pyproject = tomllib.loads(archive.read("pyproject.toml").decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise bad(f"pyproject.toml does not parse ({err})") from None
    return files, pyproject


def _verify_tree(folder: Path, files: dict[str, str], digest: str) -> None:
    """``folder`` must hold exactly ``files`` (path -> sha256): no extra file, no symlink, no bytecode."""
    found: dict[str, Path] = {}
    for root, dirs, names in os.walk(folder, followlinks=False):
        for entry in [*dirs, *names]:
            path = Path(root) / entry
            if path.is_symlink():
                raise AppNotApproved(f"{path} is a symlink; the unpacked bundle sha256={digest} was tampered with, "
                                     f"delete {folder} and restart the site")
        for name in names:
            found[(Path(root) / name).relative_to(folder).as_posix()] = Path(root) / name
    extra, missing = sorted(set(found) - set(files)), sorted(set(files) - set(found))
    changed = sorted(n for n in set(found) & set(files)
                     if hashlib.sha256(found[n].read_bytes()).hexdigest() != files[n])
    if extra or missing or changed:
        raise AppNotApproved(
            f"{folder} does not hold exactly app bundle sha256={digest} (extra: {extra[:3]}, missing: {missing[:3]}, "
            f"changed: {changed[:3]}); nothing was imported. Delete {folder} and restart the site")


class _Gate:
    """Per task process: what the replaced ``install_from_fab`` verified, for the replaced loader to use."""

    def __init__(self, approved: frozenset[str], on_refusal: Callable[[str, str], None] | None,
                 base_dir: Path) -> None:
        self.approved, self.on_refusal, self.base_dir = approved, on_refusal, base_dir
        self.bundle: VerifiedBundle | None = None
        self.refusal: str | None = None

    def install(self, fab_file: bytes, install_dir: Path | None = None, skip_prompt: bool = False) -> Path:
        """Stands in for Flower's ``install_from_fab``: unpacks only a verified, approved bundle."""
        del install_dir, skip_prompt
        try:
            self.bundle = install_verified(bytes(fab_file), self.approved, self.base_dir)
            return self.bundle.path
        except AppNotApproved as refused:
            self._refuse(hashlib.sha256(bytes(fab_file)).hexdigest(), str(refused))
            return self.base_dir / "refused"

    def loader_factory(self, *args: object, **kwargs: object) -> Callable[[str, str, str], object]:
        """Stands in for Flower's ``get_load_client_app_fn``: loads only the bundle :meth:`install` verified."""
        del args, kwargs
        from fedfusion.client.flower_runtime import load_client_app_from

        def load(fab_id: str, fab_version: str, claimed_hash: str) -> object:
            bundle = self.bundle
            if self.refusal is None and bundle is None:
                self._refuse(claimed_hash, f"app bundle sha256={claimed_hash} was never verified; nothing was loaded")
            elif bundle is not None and (claimed_hash.lower(), fab_id, fab_version) != (
                    bundle.sha256, bundle.fab_id, bundle.fab_version):
                self._refuse(bundle.sha256, (
                    f"the run names app {fab_id} {fab_version} sha256={claimed_hash}, but the bundle received is "
                    f"{bundle.fab_id} {bundle.fab_version} sha256={bundle.sha256}; nothing was loaded"))
            if self.refusal is not None:
                return refusing_app(self.refusal)
            assert bundle is not None
            return load_client_app_from(bundle.path, fab_id, fab_version, claimed_hash)

        return load

    def _refuse(self, digest: str, reason: str) -> None:
        self.refusal = reason
        if self.on_refusal is not None:
            self.on_refusal(digest, reason)
