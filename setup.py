"""The one piece of packaging that pyproject.toml cannot state: the repository keeps the shipped search spaces in
``search_spaces/`` at its root, and the wheel installs them as the data package ``evoreap/search_spaces/``.

``[tool.setuptools.packages.find]`` only finds packages in directories named after them, so the package list and this
one mapping live here; everything else (metadata, dependencies, package data) is in pyproject.toml.
:data:`evoreap.search.space.SPACES_DIR` finds the installed copy, or the repository's in a checkout.
"""

from setuptools import find_namespace_packages, setup

setup(
    packages=find_namespace_packages(include=["evoreap*"]) + ["evoreap.search_spaces"],
    package_dir={"evoreap.search_spaces": "search_spaces"},
)
