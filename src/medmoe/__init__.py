"""medmoe: efficient clinical question answering with mixture-of-experts routing.

Layout (imports run downward only; the core never imports `cli` or `serve`):
    cli/      the `medmoe` command
    eval/     scoring rules and benchmark harness
    models/   model zoo: bundled offline models, hub ids, local paths, cache
    data/     record type, loaders, splits, validation
"""

__version__ = "0.1.0"
