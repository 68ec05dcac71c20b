"""medmoe: efficient clinical question answering with mixture-of-experts routing.

Layout (imports run downward only: docs/architecture.md has every layer; `lint-imports` checks them):
    cli/      the `medmoe` command
    eval/     scoring rules and benchmark harness
    models/   model zoo: bundled offline models, hub ids, local paths, cache
    data/     record type, loaders, splits, validation
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("medmoe")  # written once, in pyproject.toml
except PackageNotFoundError:  # a source tree on PYTHONPATH, not installed
    __version__ = "0+unknown"
