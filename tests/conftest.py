import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ppvilg.utils.runtime import setup_device  # noqa: E402

setup_device("cpu", 2)
