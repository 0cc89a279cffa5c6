"""Compiled loops kept on disk, so that a rerun skips tracing as well as compiling.

JAX's persistent compilation cache stores XLA's executables, keyed by the
lowered program: every process still traces the model in Python and lowers it
before it can look the executable up (1.7–2.1 s of the 2.0–2.3 s a cached
32³ TME compile took on a 2-core CPU, ``python -m benchmarks --only tme``).
This cache keys the executable by what the trace depends on instead, and
loads it without tracing:

* the environment: JAX and jaxlib versions, backend, device kind and platform
  version, the host CPU's instruction-set flags (an executable built for AVX-512
  must not run on a node without it), the JAX settings that change a trace
  (x64, dtype promotion, matmul precision) and ``XLA_FLAGS``;
* the tmesolve source: a digest of every ``.py`` file of the package, taken at
  import (nothing is stored or loaded once a file is newer than that), and
  the plain module-level values of every module a trace may read (a constant changed at
  run time);
* the integrator and its model: a recursive digest of their attributes
  (numbers, strings, enums, dataclasses, NumPy/JAX arrays by their bytes,
  functions and methods of tmesolve by their code, closures' captured values,
  shared objects by identity). An attribute of any other kind (a user's
  callable, an object of another package) makes the model *unkeyable* and the
  integrator compiles through ``jax.jit`` as usual;
* the arguments: their tree structure (static fields included) and each
  leaf's shape, dtype and weak type.

Entries live in ``<jax_compilation_cache_dir>/tmesolve-executables/`` and are
used only while JAX's persistent cache is configured (``output.compilation_cache_dir``)
and no JAX debugging mode is on. An entry that cannot be read or loaded
(truncated, written by another JAX) is ignored with a log line and rewritten;
entries are written to a temporary file and renamed, so concurrent jobs of a
sweep never see half a file. Only fresh compiles are stored (see
:func:`compile_for_storage`). Entries are pickles: the directory must be as
trusted as the code (it is the user's own cache).

Housekeeping (:func:`prune`, after each store): temporary files older than an
hour (left by a killed job) are removed, and when JAX's
``jax_compilation_cache_max_size`` is set (bytes; −1, the default, is no
limit) the least recently used entries are removed until this folder fits in
it. A load marks its entry as used. Entries are ~0.6 MB for the 16-field TME
model; each source edit, grid or solver setting adds one.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import importlib
import inspect
import logging
import os
import pickle
import platform
import sys
import tempfile
import time
import types
import uuid
import zlib
from pathlib import Path
from typing import Any

import jax
import numpy as np

logger = logging.getLogger(__name__)

#: Bumped when the entry layout changes.
FORMAT = 1
#: A temporary file this old is a killed writer's: a live one is renamed within seconds.
STALE_TEMPORARY_S = 3600.0
SUBDIRECTORY = "tmesolve-executables"
_PACKAGE_ROOT = Path(__file__).resolve().parent
#: JAX settings that change what a trace produces.
_TRACE_SETTINGS = ("jax_enable_x64", "jax_numpy_dtype_promotion", "jax_default_matmul_precision",
                   "jax_numpy_rank_promotion")


#: Settings under which JAX runs a jitted function differently (op by op, or
#: re-run to locate a NaN): the cache is off while they are on.
_DEBUG_SETTINGS = ("jax_disable_jit", "jax_debug_nans", "jax_debug_infs")


def _is_ours(module: str | None) -> bool:
    """Whether ``module`` is tmesolve or one of its submodules (its code is in the source digest)."""
    return module == "tmesolve" or (module or "").startswith("tmesolve.")


class Unkeyable(Exception):
    """An object whose effect on a trace cannot be digested (the cache is not used)."""


def cache_directory() -> Path | None:
    """The entries' folder under JAX's persistent cache, or None when that cache is off."""
    base = jax.config.jax_compilation_cache_dir
    if not base or not getattr(jax.config, "jax_enable_compilation_cache", True) or "://" in str(base):
        return None  # off, or a remote cache (gs://...) that only JAX's own cache can write
    if getattr(jax.config, "jax_compilation_cache_max_size", -1) == 0:
        return None  # JAX reads a limit of 0 bytes as "cache nothing"
    if any(getattr(jax.config, name, False) for name in _DEBUG_SETTINGS):
        return None  # a loaded executable would bypass these checks
    return Path(base).expanduser() / SUBDIRECTORY


@functools.cache
def source_digest() -> str:
    """SHA-256 over the path and contents of every ``.py`` file of the tmesolve package."""
    digest = hashlib.sha256()
    for path in sorted(_PACKAGE_ROOT.rglob("*.py")):
        digest.update(str(path.relative_to(_PACKAGE_ROOT)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def source_changed_since_import() -> bool:
    """Whether a ``.py`` file of the package was modified after this process read the sources.

    The digest describes the files as they were at import; code edited since
    then is not the code this process runs, so nothing is stored or loaded.
    """
    try:
        return any(path.stat().st_mtime > _SOURCE_READ_AT for path in _PACKAGE_ROOT.rglob("*.py"))
    except OSError:
        return True


@functools.cache
def _cpu_flags() -> str:
    """The host CPU's feature flags (Linux ``/proc/cpuinfo``), else the processor name."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("flags", "Features")):
                    return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def environment_digest() -> str:
    """Digest of what, outside tmesolve, decides the traced program and its executable."""
    device = jax.devices()[0]
    parts = [
        f"format {FORMAT}",
        f"jax {jax.__version__}",
        f"jaxlib {jaxlib_version()}",
        f"backend {jax.default_backend()} {device.device_kind} {device.client.platform_version}",
        f"cpu {_cpu_flags()}",
        f"XLA_FLAGS {os.environ.get('XLA_FLAGS', '')}",
        f"python {sys.implementation.cache_tag}",  # bytecode, and so code digests, differ by version
    ]
    parts += [f"{name} {getattr(jax.config, name, None)}" for name in _TRACE_SETTINGS]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def jaxlib_version() -> str:
    """The installed jaxlib's version."""
    from jaxlib import version  # the compiler and runtime that built the executable

    return version.__version__


def _code_bytes(function: Any) -> bytes:
    """Digest of a Python function's compiled code (two lambdas of one scope differ here, not by name).

    Built from the code object's parts, not from ``marshal``: from format 3
    on, marshal flags every object that has more than one holder, so its bytes
    for one function changed with whether a closure of it was alive (the
    garbage collector's timing), and so did the entry's key; formats below 5
    cannot write every constant of Python 3.14. File name and line numbers are
    left out: the source digest already covers the text, and two checkouts at
    different paths share entries.
    """
    code = getattr(function, "__code__", None)
    if code is None:
        return b""
    digest = hashlib.sha256()
    _code_into(digest, code)
    return digest.digest()


def _code_into(digest, code: types.CodeType) -> None:
    """Feed what a code object does into ``digest``: its bytecode, names, counts, flags and constants."""
    name = getattr(code, "co_qualname", code.co_name)
    exception_table = getattr(code, "co_exceptiontable", b"")
    digest.update(f"code {name} {code.co_argcount} {code.co_posonlyargcount} {code.co_kwonlyargcount} "
                  f"{code.co_flags} {code.co_names!r} {code.co_varnames!r} {code.co_freevars!r} "
                  f"{code.co_cellvars!r} {len(code.co_code)} {len(exception_table)};".encode())
    digest.update(code.co_code)  # the unspecialised bytecode (adaptive forms are not shown here)
    digest.update(exception_table)
    for constant in code.co_consts:
        _constant_into(digest, constant)


def _constant_into(digest, constant: Any) -> None:
    """A code constant: nested code recursively, containers item by item, the rest by type and repr."""
    if isinstance(constant, types.CodeType):
        _code_into(digest, constant)
    elif isinstance(constant, tuple):
        digest.update(f"tuple[{len(constant)}](".encode())
        for item in constant:
            _constant_into(digest, item)
        digest.update(b")")
    elif isinstance(constant, frozenset):
        # Iteration order follows hashes (salted for strings): sort the items' own digests.
        items = []
        for item in constant:
            item_digest = hashlib.sha256()
            _constant_into(item_digest, item)
            items.append(item_digest.digest())
        digest.update(f"frozenset[{len(constant)}](".encode() + b"".join(sorted(items)) + b")")
    else:
        # None, bools, numbers (repr round-trips floats exactly, -0.0 included), str, bytes, slices, Ellipsis.
        digest.update(f"{type(constant).__name__}:{constant!r};".encode())


def _digest_into(digest, value: Any, seen: dict[int, int], path: str) -> None:
    """Feed ``value`` into ``digest``: its type and everything that can change a trace."""
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
        digest.update(f"{type(value).__name__}:{value!r};".encode())
        return
    if isinstance(value, enum.Enum):
        digest.update(f"enum:{type(value).__qualname__}.{value.name};".encode())
        return
    if isinstance(value, (np.ndarray, np.generic, jax.Array)):
        array = np.asarray(value)
        digest.update(f"array:{array.dtype.str}{array.shape};".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
        return
    if isinstance(value, np.dtype):
        digest.update(f"dtype:{value.str};".encode())
        return
    if isinstance(value, (tuple, list)):
        digest.update(f"{type(value).__name__}[{len(value)}](".encode())
        for index, item in enumerate(value):
            _digest_into(digest, item, seen, f"{path}[{index}]")
        digest.update(b")")
        return
    if isinstance(value, dict):
        digest.update(f"dict[{len(value)}](".encode())
        for key in sorted(value, key=repr):
            _digest_into(digest, key, seen, f"{path}.key")
            _digest_into(digest, value[key], seen, f"{path}[{key!r}]")
        digest.update(b")")
        return
    if isinstance(value, (frozenset, set)):
        digest.update(f"set[{len(value)}](".encode())
        for item in sorted(value, key=repr):
            _digest_into(digest, item, seen, f"{path}{{}}")
        digest.update(b")")
        return
    if isinstance(value, type) or inspect.isroutine(value):
        # A class or a function: its code is tmesolve's (in source_digest) or unknown.
        module = getattr(value, "__module__", None) or ""
        if not _is_ours(module):
            raise Unkeyable(f"{path}: {value!r} is not tmesolve's")
        digest.update(f"code:{module}.{value.__qualname__};".encode())
        digest.update(_code_bytes(value))
        bound_to = getattr(value, "__self__", None)
        if bound_to is not None and not isinstance(bound_to, types.ModuleType):  # builtins: bound to a module
            _digest_into(digest, bound_to, seen, f"{path}.__self__")
        # A closure's captured values and a function's defaults change its trace.
        for cell_index, cell in enumerate(getattr(value, "__closure__", None) or ()):
            _digest_into(digest, cell.cell_contents, seen, f"{path}.<closure {cell_index}>")
        _digest_into(digest, getattr(value, "__defaults__", None), seen, f"{path}.__defaults__")
        _digest_into(digest, getattr(value, "__kwdefaults__", None), seen, f"{path}.__kwdefaults__")
        return
    if isinstance(value, functools.partial):
        digest.update(b"partial(")
        _digest_into(digest, value.func, seen, f"{path}.func")
        _digest_into(digest, value.args, seen, f"{path}.args")
        _digest_into(digest, value.keywords, seen, f"{path}.keywords")
        digest.update(b")")
        return
    kind = type(value)
    if not _is_ours(kind.__module__):
        raise Unkeyable(f"{path}: an object of type {kind.__module__}.{kind.__qualname__}")
    if id(value) in seen:
        # Which object: two attributes sharing one object differ from two equal copies.
        digest.update(f"<ref {seen[id(value)]}>;".encode())
        return
    seen[id(value)] = len(seen)
    digest.update(f"object:{kind.__module__}.{kind.__qualname__}(".encode())
    if dataclasses.is_dataclass(value):
        attributes = {field.name: getattr(value, field.name) for field in dataclasses.fields(value)}
    else:
        attributes = dict(vars(value)) if hasattr(value, "__dict__") else {}
        for slot in getattr(kind, "__slots__", ()):
            if hasattr(value, slot):
                attributes[slot] = getattr(value, slot)
    # Class-level settings a subclass overrides (e.g. ``trace_substeps_once``),
    # and the methods' code (a method replaced at run time is not in the source).
    for klass in kind.__mro__:
        if _is_ours(klass.__module__):
            for name, attribute in vars(klass).items():
                if name in attributes or name.startswith("__") and name != "__init__":
                    continue
                if _is_setting(attribute):
                    attributes[name] = attribute
                else:
                    function = getattr(attribute, "__func__", getattr(attribute, "fget", attribute))
                    if inspect.isfunction(function):
                        digest.update(f"method:{klass.__qualname__}.{name}:".encode())
                        digest.update(_code_bytes(function))
    for name in sorted(attributes):
        digest.update(f"{name}=".encode())
        _digest_into(digest, attributes[name], seen, f"{path}.{name}")
    digest.update(b")")


def _is_setting(attribute: Any) -> bool:
    """A plain class attribute (a flag, a number, a tuple of names), not a method or property."""
    return isinstance(attribute, (bool, int, float, str, tuple, frozenset, enum.Enum, type(None)))


def object_digest(value: Any) -> str:
    """SHA-256 of ``value``'s trace-relevant content; raises :class:`Unkeyable`.

    Anything that cannot be digested (a foreign object, an empty closure cell,
    a structure too deep) raises :class:`Unkeyable` too: the cache is then
    not used, never guessed.
    """
    digest = hashlib.sha256()
    try:
        _digest_into(digest, value, {}, type(value).__name__)
    except Unkeyable:
        raise
    except Exception as error:  # noqa: BLE001 - e.g. ValueError of an empty cell, RecursionError
        raise Unkeyable(f"{type(error).__name__}: {error}") from error
    return digest.hexdigest()


#: Modules that run on the host only (command lines, configuration, files,
#: figures, cohorts, set-up and scoring, this cache): nothing of theirs is
#: read while a loop is traced. Leaving them out also keeps a cohort preset
#: file (read when tmesolve.cohort is imported) out of a single run's key.
_HOST_ONLY_MODULES = frozenset({
    "tmesolve.api", "tmesolve.cli", "tmesolve.cohort_cli", "tmesolve.config", "tmesolve.plots",
    "tmesolve.io", "tmesolve.io.hdf5", "tmesolve.io.reader", "tmesolve.io.xdmf", "tmesolve.cohort",
    "tmesolve.geometry", "tmesolve.recist", "tmesolve.model.tme_setup", __name__,
})


def _holds_code(value: Any) -> bool:
    """A dict or list of functions or classes: code, which the source digest covers,
    and often a registry that fills at run time (simulation.BUILDERS), not a setting."""
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return any(callable(item) and not _is_setting(item) for item in items)


@functools.cache
def _trace_module_names() -> tuple[str, ...]:
    """Every module of the package but the host-only ones, from its files (nothing imported here)."""
    names = []
    for path in sorted(_PACKAGE_ROOT.rglob("*.py")):
        parts = path.relative_to(_PACKAGE_ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        name = ".".join(("tmesolve", *parts))
        if name not in _HOST_ONLY_MODULES and not name.endswith("__main__"):
            names.append(name)
    return tuple(names)


def module_settings_digest() -> str:
    """Digest of the plain module-level values of every tmesolve module a trace may read.

    Constants such as solver tolerances are read while tracing; one changed at
    run time (``tmesolve.implicit.SOLVE_TOLERANCE = ...``) must give a new key.
    Functions and classes are covered by the source digest and the objects' digests.
    The set of modules is fixed (those not yet loaded are imported): a module
    first imported during a trace (``tmesolve.readouts`` in the TME readouts)
    must not give the next identical integrator another key. Host-only modules
    are left out, so a command-line flag or a plot module loaded later changes nothing.
    """
    digest = hashlib.sha256()
    for name in _trace_module_names():
        try:
            module = sys.modules.get(name) or importlib.import_module(name)
        except Exception as error:  # noqa: BLE001 - a module being written: its name and the error stand for it
            digest.update(f"module:{name}:unimportable:{type(error).__name__};".encode())
            continue
        digest.update(f"module:{name};".encode())
        for attribute, value in sorted(vars(module).items()):
            if attribute.startswith("__") or not (_is_setting(value) or isinstance(value, (np.ndarray, dict, list))):
                continue
            if _holds_code(value):
                continue
            digest.update(f"{attribute}=".encode())
            try:
                _digest_into(digest, value, {}, f"{name}.{attribute}")
            except Exception:  # noqa: BLE001 - a tuple of foreign objects: its name stands for it
                digest.update(b"<opaque>;")
    return digest.hexdigest()


def arguments_signature(args: tuple) -> tuple:
    """(tree structure, per-leaf (shape, dtype, weak type)): what one executable accepts."""
    leaves, treedef = jax.tree_util.tree_flatten(args)
    avals = tuple(_leaf_type(leaf) for leaf in leaves)
    return treedef, avals


def _leaf_type(leaf: Any) -> tuple:
    """(shape, dtype, weak type) as ``jit`` sees the leaf (a Python float is weakly typed)."""
    if isinstance(leaf, jax.Array):
        return leaf.shape, leaf.dtype.str, leaf.weak_type  # attribute reads: the per-call path
    aval = jax.typeof(leaf)
    return aval.shape, np.dtype(aval.dtype).str, aval.weak_type


def entry_key(owner_digest: str, signature: tuple) -> str:
    """The entry's file stem: environment, source, owner (integrator + model) and arguments."""
    treedef, avals = signature
    text = "\n".join([environment_digest(), source_digest(), module_settings_digest(), owner_digest,
                      str(treedef), repr(avals)])
    return hashlib.sha256(text.encode()).hexdigest()


_JAX_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_jax_cache_hits = 0
_listening = False


def _count_jax_cache_hit(event: str, **_: Any) -> None:
    global _jax_cache_hits
    if event == _JAX_CACHE_HIT_EVENT:
        _jax_cache_hits += 1


def _compile_named(function, args: tuple, name: str, donate_argnums: tuple[int, ...]):
    """Trace, lower and compile ``function`` as a program called ``name``; (executable, read from JAX's cache)."""
    global _listening
    if not _listening:
        jax.monitoring.register_event_listener(_count_jax_cache_hit)
        _listening = True

    def named(*arguments):
        return function(*arguments)

    named.__name__ = named.__qualname__ = name
    hits_before = _jax_cache_hits
    compiled = jax.jit(named, donate_argnums=donate_argnums).lower(*args).compile()
    return compiled, _jax_cache_hits > hits_before


def compile_for_storage(function, args: tuple, key: str, donate_argnums: tuple[int, ...] = (0,)):
    """A freshly compiled executable of ``function`` for ``args``, safe to :func:`store` under ``key``.

    An executable that JAX read back from its own persistent cache does not
    survive being serialised again on the CPU backend (jaxlib 0.12: the copy
    fails at run time with "Function ... not found"). The program is therefore
    named after ``key`` (the module name is part of JAX's cache key), so JAX's
    cache holds it only if an earlier run compiled it for this very entry; if
    it does (the entry was lost), it is compiled once more under a unique name.
    """
    name = f"tmesolve_loop_{key[:16]}"
    compiled, reused = _compile_named(function, args, name, donate_argnums)
    if reused:
        logger.info("compiled loop %s came from JAX's cache; compiling it afresh to store it", name)
        compiled, _ = _compile_named(function, args, f"{name}_{uuid.uuid4().hex[:8]}", donate_argnums)
    return compiled


def discard(directory: Path, key: str) -> None:
    """Remove the entry ``key`` (it loaded but failed to run)."""
    (directory / f"{key}.exe").unlink(missing_ok=True)


def load(directory: Path, key: str):
    """The executable stored under ``key``, or None (missing, unreadable or not loadable here)."""
    path = directory / f"{key}.exe"
    if not path.is_file():
        return None
    from jax.experimental import serialize_executable

    try:
        entry = pickle.loads(zlib.decompress(path.read_bytes()))
        if entry.get("format") != FORMAT or entry.get("key") != key:
            raise ValueError("entry written for another key or format")
        loaded = serialize_executable.deserialize_and_load(entry["payload"], entry["in_tree"], entry["out_tree"])
    except Exception as error:  # noqa: BLE001 - any bad entry means: compile again
        logger.warning("ignoring compiled-loop cache entry %s (%s: %s); compiling again",
                       path, type(error).__name__, error)
        return None
    try:
        os.utime(path)  # used now: the size limit removes the least recently used first
    except OSError:
        pass  # a read-only shared cache still serves its entries
    return loaded


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def store(directory: Path, key: str, compiled) -> bool:
    """Write ``compiled`` under ``key`` (atomically); False, with a log line, if it cannot be."""
    from jax.experimental import serialize_executable

    try:
        payload, in_tree, out_tree = serialize_executable.serialize(compiled)
        blob = zlib.compress(pickle.dumps({"format": FORMAT, "key": key, "payload": payload,
                                           "in_tree": in_tree, "out_tree": out_tree}), 1)
        directory.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=directory, prefix=f".{key}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(blob)
            os.chmod(temporary, 0o666 & ~_umask())  # mkstemp's 0600 would hide it from a group's jobs
            os.replace(temporary, directory / f"{key}.exe")
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        prune(directory, keep=key)
        return True
    except Exception as error:  # noqa: BLE001 - the cache is an optimisation; the run goes on
        logger.warning("could not store the compiled loop in %s (%s: %s)", directory,
                       type(error).__name__, error)
        return False


def prune(directory: Path, keep: str | None = None, max_bytes: int | None = None) -> list[Path]:
    """Remove stale temporary files and, over the size limit, the least recently used entries.

    Args:
        directory: the cache folder.
        keep: an entry never removed (the one just stored).
        max_bytes: the limit on the entries' total size; None reads JAX's
            ``jax_compilation_cache_max_size`` (−1: no limit).

    Returns:
        The paths removed. Files another job removes meanwhile are skipped;
        a file that cannot be removed is left (the cache is an optimisation).
    """
    if max_bytes is None:
        max_bytes = int(getattr(jax.config, "jax_compilation_cache_max_size", -1))
    now = time.time()
    removed: list[Path] = []
    entries = []

    def remove(path: Path) -> bool:
        try:
            path.unlink()
        except FileNotFoundError:
            return True  # another job of the sweep got there first
        except OSError:
            return False
        removed.append(path)
        return True

    try:
        listing = list(directory.iterdir())
    except OSError:
        return removed  # an unreadable folder: the entry just stored still counts as stored
    kept_size = 0
    for path in listing:
        try:
            info = path.stat()
        except OSError:
            continue
        if path.name.startswith(".") and path.name.endswith(".tmp"):
            if now - info.st_mtime > STALE_TEMPORARY_S:
                remove(path)
        elif path.suffix == ".exe":
            if path.stem == keep:
                kept_size = info.st_size
            else:
                entries.append((info.st_mtime, info.st_size, path))
    if max_bytes < 0:
        return removed
    total = kept_size + sum(size for _, size, _ in entries)
    for _, size, path in sorted(entries, key=lambda entry: entry[0]):  # least recently used first
        if total <= max_bytes:
            break
        if remove(path):
            total -= size
    return removed


# Read the sources now, as the process imports them, not at the first compile
# (which may come hours later, after an edit).
_SOURCE_READ_AT = time.time()
source_digest()
