"""Maps the top-level folders converters/ and kernels/ to megatron_swift.converters and
megatron_swift.kernels (see pyproject.toml for why); everything else is in pyproject.toml."""
from setuptools import find_packages, setup

MAPPED_FOLDERS = ("converters", "kernels")

packages = find_packages(include=["megatron_swift", "megatron_swift.*"])
package_dir = {"megatron_swift": "megatron_swift"}
for folder in MAPPED_FOLDERS:
    for sub in [""] + ["." + p for p in find_packages(folder)]:
        packages.append(f"megatron_swift.{folder}{sub}")
    package_dir[f"megatron_swift.{folder}"] = folder

setup(packages=packages, package_dir=package_dir)
