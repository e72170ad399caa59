"""GGUF files as ordinary Hugging Face model directories: convert once, cache, then load like any checkpoint.

A GGUF file (llama.cpp's format) holds a causal LM's weights, often block-quantized, plus its tokenizer and chat
template as metadata. transformers reads it (``from_pretrained(dir, gguf_file=name)``, needs the ``gguf``
package) and de-quantizes the weights into a plain model, but such a model cannot be trained or saved as it comes:
it carries a GGUF quantization config, and re-reading the file costs minutes each time. :func:`convert_gguf`
therefore converts a file once into a directory that every finegrain command loads like any other checkpoint:

* ``model.safetensors`` + ``config.json`` (no quantization config) + ``generation_config.json``: the weights
  copied into a freshly built model of the same architecture, in ``dtype`` (float32 by default; a quantized file
  is de-quantized, so the weights are the quantized values exactly, not the model before quantization);
* the tokenizer (``tokenizer.json``, ``tokenizer_config.json``) with the file's chat template;
* ``finegrain_gguf.json``, the marker: the source path, size, modification time and SHA-256, the dtype and the
  marker format. A directory is complete exactly when its marker matches the source file's size and mtime
  (checked without reading the file), so a second call returns at once.

Conversion writes into a temporary sibling directory and renames it into place when everything (marker last) is
written, under a file lock, so a killed conversion never looks complete and two processes never convert the same
file at once. By default the directory is ``<cache>/gguf/<file stem>-<hash of the absolute path>``, where
``<cache>`` is ``$FINEGRAIN_CACHE``, else ``$FINEGRAIN_HOME`` (where the built-in world lives), else
``~/.cache/finegrain``. :func:`finegrain.models.loading.load_causal_lm` and ``load_tokenizer`` call
:func:`ensure_converted` for any path ending in ``.gguf``, so ``--model_name_or_path model.gguf`` works in every
command. Reading GGUF never executes code from the file (the format has no code objects).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from finegrain.errors import ConfigError

__all__ = [
    "GGUF_MARKER",
    "cache_root",
    "check_gguf_file",
    "convert_gguf",
    "default_converted_dir",
    "ensure_converted",
    "is_converted",
    "is_gguf_path",
    "sha256_file",
]

GGUF_MARKER = "finegrain_gguf.json"
"""The file whose presence (with a matching source size and mtime) marks a complete conversion."""

_FORMAT = 1
_MAGIC = b"GGUF"


def cache_root() -> Path:
    """``$FINEGRAIN_CACHE``, else ``$FINEGRAIN_HOME``, else ``~/.cache/finegrain``."""
    for name in ("FINEGRAIN_CACHE", "FINEGRAIN_HOME"):
        value = os.environ.get(name)
        if value:
            return Path(value).expanduser()
    return Path.home() / ".cache" / "finegrain"


def is_gguf_path(name_or_path: str | os.PathLike) -> bool:
    """True when ``name_or_path`` names a ``.gguf`` file (by its suffix; the file need not exist)."""
    return str(name_or_path).lower().endswith(".gguf")


def default_converted_dir(gguf_path: str | os.PathLike) -> Path:
    """``<cache>/gguf/<stem>-<first 12 hex digits of sha1(absolute path)>`` (one directory per source path)."""
    path = Path(gguf_path).expanduser().resolve()
    digest = hashlib.sha1(str(path).encode("utf-8")).hexdigest()[:12]
    return cache_root() / "gguf" / f"{path.stem}-{digest}"


def check_gguf_file(gguf_path: str | os.PathLike) -> Path:
    """Check that ``gguf_path`` is a complete GGUF file; return it as a resolved path.

    Reads the header and tensor table with ``gguf.GGUFReader`` (memory-mapped, nothing de-quantized) and checks
    that every tensor's data lies inside the file, which is what a truncated download gets wrong.

    Raises:
        ConfigError: a missing file, a file that does not start with the GGUF magic bytes, a truncated or
            corrupt file, or the ``gguf`` package missing (with the command that installs it).
    """
    path = Path(gguf_path).expanduser()
    if not path.is_file():
        raise ConfigError(f"GGUF file {path} does not exist (or is not a file)")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != _MAGIC:
        raise ConfigError(f"{path} is not a GGUF file: it starts with {magic!r}, not {_MAGIC!r}")
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ConfigError("reading GGUF files needs the 'gguf' package: pip install gguf "
                          "(or pip install 'finegrain[ifeval]')") from None
    try:
        reader = GGUFReader(str(path), "r")
    except Exception as exc:  # GGUFReader raises ValueError/IndexError/struct errors on damaged files
        raise ConfigError(f"{path} is not a readable GGUF file (truncated or corrupt?): "
                          f"{type(exc).__name__}: {exc}") from None
    size = path.stat().st_size
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size:
            raise ConfigError(f"{path} is truncated: tensor {tensor.name!r} ends at byte {end} of a {size}-byte file; "
                              "download or copy it again")
    if not reader.tensors:
        raise ConfigError(f"{path} holds no tensors: not a model file")
    return path.resolve()


def _source_stamp(path: Path) -> dict:
    st = path.stat()
    return {"source": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _read_marker(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / GGUF_MARKER).read_text())
    except (OSError, ValueError):
        return None


def is_converted(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> bool:
    """True when ``out_dir`` holds a complete conversion of the file at ``gguf_path`` as it is now (same size
    and mtime, current marker format)."""
    marker = _read_marker(Path(out_dir))
    if not marker or marker.get("format") != _FORMAT:
        return False
    try:
        stamp = _source_stamp(Path(gguf_path).expanduser().resolve())
    except OSError:
        return False
    return all(marker.get(k) == v for k, v in stamp.items() if k != "source")


def sha256_file(path: Path) -> str:
    """The SHA-256 hex digest of a file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def _locked(out_dir: Path):
    """An exclusive lock beside ``out_dir`` (one converter per target; others wait, then find it done); closing
    the lock file releases it."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with (out_dir.parent / f".{out_dir.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _load_and_rebuild(path: Path, weights_dtype):
    """The GGUF's tokenizer and a plain model (no quantization config) holding its de-quantized weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=weights_dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ConfigError(f"transformers could not load the GGUF file {path}: {type(exc).__name__}: {exc}") from None
    config = loaded.config
    # save_pretrained refuses a model loaded through the GGUF quantizer; the de-quantized weights are plain
    # tensors, so a fresh model of the same config (without quantization_config) holds them exactly.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = ""
    model = AutoModelForCausalLM.from_config(config, dtype=weights_dtype)
    state = {k: v.detach().to(weights_dtype) for k, v in loaded.state_dict().items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ConfigError(f"converting {path}: the rebuilt model does not match the loaded one (missing "
                          f"{sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]})")
    if tied:
        model.tie_weights()
    model.generation_config = loaded.generation_config
    del loaded
    model.eval()
    return model, tokenizer


def convert_gguf(
    gguf_path: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    *,
    dtype: str = "float32",
    force: bool = False,
    verbose: bool = True,
) -> Path:
    """Convert a GGUF causal LM into a Hugging Face directory (see the module docstring); idempotent.

    Args:
        gguf_path: the ``.gguf`` file.
        out_dir: where the model goes (default :func:`default_converted_dir`).
        dtype: ``float32`` (default), ``bfloat16`` or ``float16`` for the saved weights.
        force: convert again even when ``out_dir`` is complete.
        verbose: print one line when converting (nothing when already converted).

    Returns:
        ``out_dir``, complete.

    Raises:
        ConfigError: not a GGUF file, a truncated file, an architecture transformers cannot read, or ``out_dir``
            holding something that is not a conversion of this file's path (another model, user files).
    """
    path = Path(gguf_path).expanduser()
    if not is_gguf_path(path):
        raise ConfigError(f"{path}: a GGUF file name ends in .gguf")
    out = Path(out_dir).expanduser() if out_dir is not None else default_converted_dir(path)
    if not force and path.is_file() and is_converted(path, out):
        return out
    from finegrain.models.build import torch_dtype

    path = check_gguf_file(path)
    weights_dtype = torch_dtype(dtype, " for a GGUF conversion")
    with _locked(out):
        if not force and is_converted(path, out):
            return out
        if out.exists() and any(out.iterdir()) and _read_marker(out) is None:
            raise ConfigError(f"{out} exists and is not a finegrain GGUF conversion (no {GGUF_MARKER}); "
                              "remove it or choose another output directory")
        if verbose:
            print(f"converting {path} ({path.stat().st_size / 2**20:.0f} MiB) into {out} (once)", flush=True)
        start = time.perf_counter()
        stamp = _source_stamp(path)
        model, tokenizer = _load_and_rebuild(path, weights_dtype)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            marker = {"format": _FORMAT, **stamp, "sha256": sha256_file(path), "dtype": dtype,
                      "architecture": type(model).__name__, "seconds": round(time.perf_counter() - start, 1)}
            (tmp / GGUF_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            if out.exists():
                os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def ensure_converted(name_or_path: str | os.PathLike, *, dtype: str = "float32", verbose: bool = True) -> str:
    """``name_or_path`` itself, or for a ``.gguf`` file its converted directory (converting on first use)."""
    if not is_gguf_path(name_or_path):
        return str(name_or_path)
    return str(convert_gguf(name_or_path, dtype=dtype, verbose=verbose))
