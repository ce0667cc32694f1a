"""Maps the top-level folders converters/ and kernels/ to megatron_swift.converters and
megatron_swift.kernels; everything else is in pyproject.toml.

Why: the design card's layout keeps converters/ and kernels/ at the top, but a top-level import
named `kernels` would shadow Hugging Face's `kernels` package, which transformers probes for.
The two folders therefore have no __init__.py: run from the repo root, `import kernels` still
finds the real package (a regular package beats a namespace portion anywhere on sys.path), and
our code imports them only as megatron_swift.kernels / megatron_swift.converters.
"""
from setuptools import find_namespace_packages, find_packages, setup

MAPPED_FOLDERS = ("converters", "kernels")

packages = find_packages(include=["megatron_swift", "megatron_swift.*"])
package_dir = {"megatron_swift": "megatron_swift"}
for folder in MAPPED_FOLDERS:
    for sub in [""] + ["." + p for p in find_namespace_packages(folder, exclude=["*__pycache__*"])]:
        packages.append(f"megatron_swift.{folder}{sub}")
    package_dir[f"megatron_swift.{folder}"] = folder

setup(packages=packages, package_dir=package_dir)
