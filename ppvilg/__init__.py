"""ppvilg: ERNIE-ViLG (unified bidirectional text<->image generation) in PaddlePaddle."""
__version__ = "0.1.0"
