"""ppvilg: ERNIE-ViLG (unified bidirectional text<->image generation) in PaddlePaddle."""
__version__ = "0.1.0"

# The deployment runtime (deploy/python/ppvilg_deploy: tokenizer and numpy decoding, shared with training) is
# a package of its own; from a source checkout without `pip install -e .` it is found here.
import os as _os
import sys as _sys

_DEPLOY = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "deploy", "python")
if _os.path.isdir(_DEPLOY) and _DEPLOY not in _sys.path:
    _sys.path.append(_DEPLOY)

import ppvilg_deploy as _ppvilg_deploy  # noqa: E402,F401  (applies the CPU math setting of ppvilg_deploy/cpu.py)
