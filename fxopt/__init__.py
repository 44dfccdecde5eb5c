"""fxopt: trace a PyTorch model, rewrite its linear/conv layers by YAML rules, validate, save.

    >>> import fxopt
    >>> result = fxopt.optimize(model, (torch.randn(8, 64),), "kron")      # doctest: +SKIP
    >>> result.model(x)                  # the rewritten model (a torch.fx GraphModule)
    >>> result.report["end_to_end"]      # errors against the original, params, FLOPs
    >>> result.save("out/")              # model.pt2 + report.json + report.md
    >>> model = fxopt.load("out/")       # runs without the original model file
"""

from .errors import FxoptError
from .pipeline import Result, optimize
from .save import load

__version__ = "0.1.0"
__all__ = ["optimize", "load", "Result", "FxoptError", "__version__"]
