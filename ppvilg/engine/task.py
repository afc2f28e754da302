"""What a training stage must provide to the generic trainer (ppvilg.engine.trainer.Trainer).

A task owns its modules and losses; the trainer owns the loop, optimizers, AMP, accumulation, logging,
evaluation scheduling and checkpoints, and never branches on which task it runs.
"""


class Task:
    #: extra config sections with their defaults, e.g. {"Loss": {...}}
    config_sections = {}

    @classmethod
    def validate_config(cls, cfg, origin):
        """Raise ppvilg.config.ConfigError for task-specific problems; may derive values (cfg not yet frozen)."""

    def __init__(self, cfg):
        self.cfg = cfg

    def modules(self):
        """{name: Layer} saved in checkpoints; 'model' is the one inference loads."""
        raise NotImplementedError

    def phases(self):
        """{phase: (parameters, optimizer overrides dict)} in the order their losses are computed each step."""
        raise NotImplementedError

    def phase_loss(self, phase, batch, step):
        """(loss tensor or None to skip this phase now, {name: float} to log)."""
        raise NotImplementedError

    def evaluate(self, dataset):
        """({metric: float}, {name: RGB uint8 image}) on an evaluation dataset."""
        raise NotImplementedError

    def distribute(self, model):
        """Use `model` (this task's 'model' wrapped for parallel training by the trainer) for training."""
        raise NotImplementedError(f"{type(self).__name__} does not train in several processes")

    def train(self):
        for m in self.modules().values():
            m.train()

    def eval(self):
        for m in self.modules().values():
            m.eval()
