"""Everything the generic trainer (ppvilg.engine.trainer.Trainer) asks of a training stage.

A task owns its modules and losses; the trainer owns the loop, optimizers, AMP, accumulation, logging,
evaluation scheduling and checkpoints, and never branches on which task it runs. The trainer calls nothing on
a task but what this class declares. A task registers under a name (`ppvilg.registry.TASKS`, `Global.task`);
its config sections and validator are read by ppvilg.config from the registered class.
"""
from ppvilg.checkpoints import set_state_strict


class Task:
    #: extra config sections with their defaults, e.g. {"Loss": {...}}
    config_sections = {}
    #: config sections renamed in this release: {old name: new name}; the old name is accepted with a
    #: deprecation message for one release
    renamed_sections = {}

    @classmethod
    def validate_config(cls, cfg, origin):
        """Raise ppvilg.config.ConfigError for task-specific problems; may derive values (cfg not yet frozen)."""

    def __init__(self, cfg, parallel):
        """parallel: this process's ppvilg.distributed.env.ParallelState (made once by the entry point)."""
        self.cfg, self.parallel = cfg, parallel
        #: the trained model: what checkpoints call 'model' and inference loads
        self.model = None

    # ---- every task ------------------------------------------------------------------------------------
    def modules(self):
        """{name: Layer} saved in checkpoints; 'model' (self.model) first."""
        raise NotImplementedError

    def phases(self):
        """{phase: (parameters, optimizer overrides dict)} in the order their losses are computed each step."""
        raise NotImplementedError

    def phase_loss(self, phase, batch, step):
        """(loss tensor or None to skip this phase now, {name: float} to log)."""
        raise NotImplementedError

    def evaluate(self, dataset):
        """({metric: float}, {name: RGB uint8 image}, {name: text}) on an evaluation dataset; the images and
        texts go to VisualDL. Must not change the random streams training draws from."""
        raise NotImplementedError

    def train(self):
        for m in self.modules().values():
            m.train()

    def eval(self):
        for m in self.modules().values():
            m.eval()

    # ---- checkpoints: states keyed by the single-process model's names ---------------------------------
    def checkpoint_state(self, name):
        """The weights of module `name` as checkpoints key them."""
        return self.modules()[name].state_dict()

    def load_checkpoint_state(self, name, state, origin):
        """Load what checkpoint_state(name) gave (strictly; `origin` names the file in errors)."""
        set_state_strict(self.modules()[name], state, origin)

    def load_model_weights(self, full_state, origin):
        """Global.init_weights: the single-process weights of a 'model' (any layout, merged), cut for this
        process's layout."""
        self.load_checkpoint_state("model", full_state, origin)

    # ---- several processes (tasks that support them override these) -----------------------------------
    def distribute(self, model):
        """Use `model` (self.model wrapped for parallel training by the trainer) for training."""
        raise NotImplementedError(f"{type(self).__name__} does not train in several processes")

    def pipeline_step(self, batch, optimizer, scaler, step):
        """Pipeline parallel: forward, backward and the optimizer step of one batch -> (loss float, logs)."""
        raise NotImplementedError(f"{type(self).__name__} does not train under pipeline parallel")

    def gather_sharded_parameters(self):
        """Sharding stage 3: gather each rank's slice of the weights before they are saved."""
        raise NotImplementedError(f"{type(self).__name__} does not train with sharding stage 3")
