"""A plan directory on disk: which files are the plan's, and writing a plan without touching any other file."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgesplit.errors import PlanError
from edgesplit.files import replace_files

PLAN_FILE = "plan.json"
SIG_FILE = "plan.sig"  # edgesplit.signing writes it


def _plain(name: object) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name


def owned_files(directory: Path, with_external_data: bool = True) -> set[str]:
    """The files of the plan in `directory`: plan.json, plan.sig and the stage files (and external data files)
    plan.json names; empty without plan.json. A plan.json that cannot be read owns only itself and plan.sig."""
    path = directory / PLAN_FILE
    if not path.is_file():
        return set()
    try:
        stages = json.loads(path.read_text()).get("stages")
    except (OSError, ValueError, AttributeError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return {PLAN_FILE, SIG_FILE}
    names = {PLAN_FILE, SIG_FILE}
    for s in stages if isinstance(stages, list) else []:
        if not isinstance(s, dict):
            continue
        listed = [s.get("file"), f"{s['name']}.onnx" if isinstance(s.get("name"), str) else None]
        if with_external_data and isinstance(s.get("external_data"), dict):
            listed += list(s["external_data"])
        names.update(n for n in listed if _plain(n))
    return names


def check_target(directory: Path, force: bool = False) -> None:
    """A plan may be written to `directory`: new, empty, or holding a plan (replaced only with `force`)."""
    if directory.exists() and not directory.is_dir():
        raise PlanError(f"expected {str(directory)!r} to be a plan directory, but it is a file")
    if (directory / PLAN_FILE).is_file():
        if not force:
            raise PlanError(f"{str(directory)!r} already holds a plan; pass --force (force=True) to replace it "
                            "(only plan.json and its stage files are replaced, other files are kept)")
    elif directory.is_dir() and any(directory.iterdir()):
        raise PlanError(f"expected {directory} to be a new directory, an empty one or an existing plan; it is "
                        "something else (it holds files but no plan.json)")


def write(directory: Path, files: Mapping[str, bytes], force: bool = False) -> Path:
    """Write a plan's files (plan.json last); an old plan's stage files that the new plan lacks are deleted, any
    other file is kept, and a file the old plan does not name is never overwritten."""
    check_target(directory, force)
    if not directory.exists():
        return _write_new(directory, files)
    owned = owned_files(directory)
    clash = sorted(n for n in files if (directory / n).exists() and n not in owned)
    if clash:
        raise PlanError(f"refusing to write the plan into {directory}: it would overwrite {clash}, which the plan "
                        "there does not name; move them away first")
    old_stages = owned_files(directory, with_external_data=False) - {PLAN_FILE}
    ordered = {n: data for n, data in files.items() if n != PLAN_FILE} | {PLAN_FILE: files[PLAN_FILE]}
    replace_files(directory, ordered, remove=sorted(old_stages - set(files)))
    return directory


def _write_new(directory: Path, files: Mapping[str, bytes]) -> Path:
    """A new directory appears whole: written under a temporary name beside it, then renamed."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp's own mode is 700
        replace_files(tmp, files)
        tmp.rename(directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def field_problems(d: Any) -> list[str]:
    """plan.json's fields have the types edgesplit writes, checked before anything uses them (every problem)."""
    if not isinstance(d, dict):
        return [f"expected a JSON object, got {type(d).__name__}"]
    problems: list[str] = []
    for i, s in enumerate(_entries(d, "stages", problems)):
        problems += _typed(s, f"stages[{i}]", {"name": str, "device": str, "sha256": str},
                           ("layers", "inputs", "outputs"))
        if isinstance(s, dict) and not _str_map(s.get("external_data", {})):
            problems.append(f"stages[{i}].external_data: expected file name -> sha256, got {_kind(s['external_data'])}")
    for i, t in enumerate(_entries(d, "transfers", problems)):
        problems += _typed(t, f"transfers[{i}]", {"tensor": str, "src": str, "dst": str}, ())
    for key in ("inputs", "outputs"):
        for i, t in enumerate(_entries(d, key, problems)):
            problems += _typed(t, f"{key}[{i}]", {"name": str, "dtype": str}, ())
            if isinstance(t, dict) and isinstance(t.get("dtype"), str) and t["dtype"] not in _DTYPES:
                problems.append(f"{key}[{i}].dtype: expected a numpy dtype name like 'float32', got {t['dtype']!r}")
            shape = t.get("shape") if isinstance(t, dict) else None
            if not isinstance(shape, list) or not all(x is None or type(x) in (int, str) for x in shape):
                problems.append(f"{key}[{i}].shape: expected a list of sizes and dimension names, got {_kind(shape)}")
    standbys = d.get("standbys", [])
    for i, sb in enumerate(standbys if isinstance(standbys, list) else [standbys]):
        problems += _typed(sb, f"standbys[{i}]", {"stage": str, "device": str}, ())
    if not _str_map(d.get("placement")):
        problems.append(f"placement: expected layer -> device names, got {_kind(d.get('placement'))}")
    return problems


_DTYPES = {"float16", "float32", "float64", "bfloat16", "int8", "int16", "int32", "int64", "uint8", "uint16",
           "uint32", "uint64", "bool", "complex64", "complex128", "str", "object"}


def _entries(d: dict, key: str, problems: list[str]) -> list[Any]:
    if not isinstance(d.get(key), list):
        problems.append(f"{key}: expected a list, got {_kind(d.get(key))}")
        return []
    return d[key]


def _typed(entry: Any, where: str, scalars: Mapping[str, type], name_lists: tuple[str, ...]) -> list[str]:
    if not isinstance(entry, dict):
        return [f"{where}: expected an object, got {_kind(entry)}"]
    problems = [f"{where}.{k}: expected a {t.__name__}, got {_kind(entry.get(k))}"
                for k, t in scalars.items() if not isinstance(entry.get(k), t)]
    return problems + [f"{where}.{k}: expected a list of names, got {_kind(entry.get(k))}" for k in name_lists
                       if not isinstance(entry.get(k), list) or not all(isinstance(x, str) for x in entry[k])]


def _str_map(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(v, str) for v in value.values())


def _kind(x: Any) -> str:
    return f"{type(x).__name__} {x!r}"[:80]
