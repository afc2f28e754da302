"""Small explicit registries: a name maps to a class or function, and a wrong name gets a helpful error."""
import difflib


class Registry:
    def __init__(self, kind):
        self.kind = kind
        self._items = {}

    def register(self, name):
        def deco(obj):
            if name in self._items:
                raise KeyError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = obj
            return obj
        return deco

    def get(self, name):
        if name not in self._items:
            near = difflib.get_close_matches(str(name), list(self._items), n=1)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            raise KeyError(f"unknown {self.kind} '{name}' (known: {', '.join(sorted(self._items))}){hint}")
        return self._items[name]

    def names(self):
        return sorted(self._items)

    def __contains__(self, name):
        return name in self._items


# name -> dataclass holding a model's hyper-parameters (with a PRESETS dict attribute)
MODEL_CONFIGS = Registry("model")


def model_config(section):
    """The model dataclass instance for a resolved `Model` config section (extra keys such as preset dropped)."""
    import dataclasses
    cls = MODEL_CONFIGS.get(section["name"])
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in section.items() if k in fields})

# name -> the model's Layer class, built from its config dataclass: MODELS.get(name)(model_config(section))
MODELS = Registry("model class")


def build_model(section):
    """The model of a resolved `Model` config section (as a checkpoint's config.yaml holds it)."""
    return MODELS.get(section["name"])(model_config(section))


# name -> Task class (ppvilg.engine.task_interface.Task subclass): builds model, losses, evaluation for a stage
TASKS = Registry("task")
