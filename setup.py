"""Package discovery only; everything else is in pyproject.toml. setuptools' `packages.find`
cannot rename a folder, and the folder kernels/ ships as `sku_kernels` (package-dir there), so
discovery and that one mapped package are combined here. Namespace discovery also finds the
data folders (sku/train/recipes, sku/demo/data), whose files package-data ships."""

from setuptools import find_namespace_packages, setup

packages = find_namespace_packages(include=["taskvec", "taskvec.*", "sku", "sku.*"],
                                   exclude=["*.__pycache__"])
setup(packages=[*packages, "sku_kernels"])
