"""Plan signatures: an HMAC-SHA256 over plan.json and every file it names, with a key the cluster already shares.

The key is `--key-file PATH`, else the file named by $EDGESPLIT_KEY_FILE, else the Ray auth token (as Ray finds it).
`plan.sig` beside plan.json holds the algorithm, the key's id (the first 16 hex digits of its SHA-256, never the key),
the manifest (plan.json's sha256 and each named file's name and sha256, in name order) and the MAC over the manifest's
canonical bytes. Plan.load checks it before any stage is read; every Ray device checks it again with its own key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgesplit.errors import EdgesplitError, PlanError
from edgesplit.plandir import PLAN_FILE, SIG_FILE

FORMAT = "edgesplit-signature/1"
MANIFEST_FORMAT = "edgesplit-manifest/1"
ALGORITHM = "hmac-sha256"
KEY_FILE_ENV = "EDGESPLIT_KEY_FILE"
MISSING = "missing"
SIGN = ("re-create it with `edgesplit partition` where the cluster's key is found (--key-file PATH, "
        f"${KEY_FILE_ENV} or the Ray auth token)")
TRUST = "pass --trust-unsigned (trust_unsigned=True) if you trust where it came from"
log = logging.getLogger("edgesplit")


@dataclass(frozen=True)
class Key:
    secret: bytes = field(repr=False)
    source: str  # where it was read, for messages

    @property
    def key_id(self) -> str:
        return hashlib.sha256(self.secret).hexdigest()[:16]

    def mac(self, manifest: bytes) -> str:
        return hmac.new(self.secret, manifest, hashlib.sha256).hexdigest()

    def describe(self) -> str:
        return f"key id {self.key_id}, from {self.source}"


@dataclass(frozen=True)
class Seal:
    """A signed manifest: what the driver sends every device with its stages. `inlined`: stages whose bytes are
    not their file's (weights read from external data files), checked by the driver only; not covered by the MAC."""

    manifest: bytes
    mac: str
    key_id: str
    inlined: frozenset[str] = frozenset()

    def files(self) -> dict[str, str]:
        return dict(json.loads(self.manifest)["files"])


def find_key(key_file: Path | None = None, environ: Mapping[str, str] = os.environ) -> Key | None:
    """The signing key: `key_file`, else $EDGESPLIT_KEY_FILE, else the Ray auth token; None when there is none."""
    if key_file is not None:
        return _read_key(Path(key_file), f"--key-file {key_file}")
    if environ.get(KEY_FILE_ENV):
        return _read_key(Path(environ[KEY_FILE_ENV]), f"${KEY_FILE_ENV} ({environ[KEY_FILE_ENV]})")
    from edgesplit.runtime.raynodes import token_source

    where = token_source(None, environ)
    if where is None:
        return None
    if where == "RAY_AUTH_TOKEN":
        return Key(environ["RAY_AUTH_TOKEN"].strip().encode(), "the Ray auth token in $RAY_AUTH_TOKEN")
    return _read_key(Path(where), f"the Ray auth token {where}")


def _read_key(path: Path, source: str) -> Key:
    try:
        secret = path.read_bytes().strip()
    except OSError as exc:
        raise EdgesplitError(f"expected a key file at {str(path)!r}, got {exc.strerror or exc}") from None
    if not secret:
        raise EdgesplitError(f"expected a key in {str(path)!r}, but the file is empty")
    return Key(secret, source)


def manifest(plan_json: bytes, files: Mapping[str, str]) -> bytes:
    """The canonical bytes the MAC covers: plan.json's sha256 and every named file's sha256, in name order."""
    body = {"format": MANIFEST_FORMAT, PLAN_FILE: hashlib.sha256(plan_json).hexdigest(),
            "files": sorted(files.items())}
    return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()


def named_files(plan: Any) -> list[str]:
    """The files a parsed plan.json names: each stage's `NAME.onnx` and its external data files (plain names only;
    Plan.load refuses any other)."""
    names: set[str] = set()
    for s in plan.get("stages", []) if isinstance(plan, dict) and isinstance(plan.get("stages"), list) else []:
        if isinstance(s, dict) and isinstance(s.get("name"), str):
            names.add(f"{s['name']}.onnx")
        if isinstance(s, dict) and isinstance(s.get("external_data"), dict):
            names.update(n for n in s["external_data"] if isinstance(n, str))
    return sorted(n for n in names if n not in ("", ".", "..") and Path(n).name == n)


def _file_hash(path: Path) -> str:
    if not path.is_file():
        return MISSING
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def signature(key: Key, plan_json: bytes, files: Mapping[str, str]) -> bytes:
    """plan.sig's bytes for plan.json and the named files' hashes."""
    body = manifest(plan_json, files)
    return json.dumps({"format": FORMAT, "algorithm": ALGORITHM, "key_id": key.key_id,
                       "manifest": json.loads(body), "mac": key.mac(body)}, indent=1).encode()


def sign_directory(directory: Path, key: Key) -> Path:
    """Sign the plan in `directory` as it is now (writes plan.sig)."""
    plan_json = (directory / PLAN_FILE).read_bytes()
    files = {n: _file_hash(directory / n) for n in named_files(json.loads(plan_json))}
    (directory / SIG_FILE).write_bytes(signature(key, plan_json, files))
    return directory / SIG_FILE


def check_directory(directory: Path, plan_json: bytes, plan: Any, key: Key | None,
                    trust_unsigned: bool = False) -> Seal | None:
    """The plan's seal if `key` signed plan.json and the files it names as they are now; else refused (or, with
    `trust_unsigned`, a warning and None)."""
    found = manifest(plan_json, {n: _file_hash(directory / n) for n in named_files(plan)})
    try:
        return _check(directory, found, key)
    except PlanError:
        if not trust_unsigned:
            raise
        log.warning(f"--trust-unsigned: loading plan {directory} without a valid signature")
        return None


def _check(directory: Path, found: bytes, key: Key | None) -> Seal:
    sig_path = directory / SIG_FILE
    refusing = f"refusing plan {directory}:"
    here = key.describe() if key else f"no key here (no --key-file, ${KEY_FILE_ENV} or Ray auth token)"
    if not sig_path.is_file():
        raise PlanError(f"{refusing} it is unsigned (no {SIG_FILE}); expected an {ALGORITHM} signature by the "
                        f"cluster's key ({here}); to sign it, {SIGN}; or {TRUST}")
    sig = _read_signature(sig_path)
    if key is None:
        raise PlanError(f"{refusing} it is signed with key id {sig['key_id']}, but there is {here} to check it; "
                        f"give the key it was signed with (--key-file PATH), or {TRUST}")
    if sig["key_id"] != key.key_id:
        raise PlanError(f"{refusing} it is signed with key id {sig['key_id']}, expected {here}; give the key it "
                        f"was signed with (--key-file PATH), or {SIGN} under this key, or {TRUST}")
    if not hmac.compare_digest(key.mac(found), sig["mac"]):
        raise PlanError(f"{refusing} its signature does not match its files ({_changes(sig, found)}): changed "
                        f"after it was signed; if that was you, {SIGN}; or {TRUST}")
    return Seal(found, sig["mac"], key.key_id)


def _read_signature(path: Path) -> dict[str, Any]:
    try:
        sig = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise PlanError(f"refusing plan {path.parent}: {SIG_FILE} is not a signature ({type(exc).__name__}); "
                        f"to sign it, {SIGN}; or {TRUST}") from None
    if not (isinstance(sig, dict) and sig.get("format") == FORMAT and sig.get("algorithm") == ALGORITHM
            and isinstance(sig.get("key_id"), str) and isinstance(sig.get("mac"), str)):
        raise PlanError(f"refusing plan {path.parent}: expected {SIG_FILE} in format {FORMAT!r} with algorithm "
                        f"{ALGORITHM!r}, a key_id and a mac; got {str(sig)[:120]}; to sign it, {SIGN}; or {TRUST}")
    return sig


def _changes(sig: Mapping[str, Any], found: bytes) -> str:
    """Which files differ from the ones the signature lists (what was expected, what was found)."""
    now = json.loads(found)
    signed = sig.get("manifest") if isinstance(sig.get("manifest"), dict) else {}
    want = {PLAN_FILE: signed.get(PLAN_FILE), **_as_map(signed.get("files"))}
    have = {PLAN_FILE: now[PLAN_FILE], **dict(now["files"])}
    changed = [f"{n}: signed {_short(want.get(n))}, found {_short(have.get(n))}"
               for n in sorted(set(want) | set(have)) if want.get(n) != have.get(n)]
    return "; ".join(changed) or "the MAC differs"


def _as_map(files: Any) -> dict[str, str]:
    try:
        return {str(n): str(h) for n, h in files}
    except (TypeError, ValueError):
        return {}


def _short(digest: object) -> str:
    if digest is None:
        return "not listed"
    return "missing" if digest == MISSING else f"sha256 {str(digest)[:12]}…"


def sealed(key: Key, plan_json: bytes, files: Mapping[str, str]) -> Seal:
    """A seal for a plan held in memory (one this process built or accepted): plan.json's bytes, file -> sha256."""
    body = manifest(plan_json, files)
    return Seal(body, key.mac(body), key.key_id)


def check_stages(device: str, seal: Seal | None, stages: Mapping[str, bytes], key: Key | None,
                 trust_unsigned: bool = False) -> None:
    """On a device, before it loads a stage: the manifest is signed with this device's own key, and every stage's
    bytes are the ones the manifest lists (stages in `seal.inlined` excepted). Raises PlanError naming the device."""
    refusing = f"device {device!r} refuses its stages:"
    if seal is None:
        if trust_unsigned:
            return
        raise PlanError(f"{refusing} the plan it was sent is unsigned; {SIGN}, or {TRUST}")
    if key is None:
        raise PlanError(f"{refusing} it has no key to check the plan's signature (key id {seal.key_id}) with: no "
                        f"${KEY_FILE_ENV} or Ray auth token on its node; give it the cluster's key")
    if key.key_id != seal.key_id or not hmac.compare_digest(key.mac(seal.manifest), seal.mac):
        raise PlanError(f"{refusing} the plan is signed with key id {seal.key_id}, but this device's key is "
                        f"{key.describe()}; give every node the same key (the cluster's Ray auth token)")
    listed = seal.files()
    for name, data in stages.items():
        if name in seal.inlined:
            continue
        digest = hashlib.sha256(data).hexdigest()
        if listed.get(f"{name}.onnx") != digest:
            raise PlanError(f"{refusing} stage {name!r} is not the signed one (sha256 {digest[:12]}…, expected "
                            f"{_short(listed.get(f'{name}.onnx'))})")
