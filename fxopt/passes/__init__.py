"""Graph passes. Each is a small function `GraphModule → (GraphModule, records)` that ends with
`graph.lint()` and `recompile()` (docs/architecture.md, principle 5)."""

from .cleanup import cleanup, live_nodes
from .collapse import collapse
from .freeze import freeze
from .fuse import fuse
from .substitute import substitute

__all__ = ["substitute", "collapse", "cleanup", "live_nodes", "fuse", "freeze"]
