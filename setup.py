"""The package list, found rather than written by hand: every package under hf_prune/, plus the card templates of
the top-level model_cards/ folder, shipped as hf_prune.model_cards (pyproject.toml maps that folder; its
package finder cannot combine a search with a mapped folder). Everything else is in pyproject.toml."""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["hf_prune", "hf_prune.*"]), "hf_prune.model_cards"])
