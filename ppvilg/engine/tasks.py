"""Importing this module registers every task (and the model configs they use)."""
from ppvilg.engine import vilg_task, vqgan_task  # noqa: F401
from ppvilg.registry import TASKS


def build_task(cfg):
    return TASKS.get(cfg.Global.task)(cfg)
