"""The method registry: every method atlasreg trains and applies is a :class:`Method` registered by
name, so the command line, training, segmentation and the report find it without ``if method ==``
branches. A new method plugs in by subclassing :class:`Method` (a LightningModule) and decorating it
with :func:`register`; ``model.method: <name>`` in a config then selects it.

A method's checkpoint records the method name, its constructor arguments (the config sections it
needs, never the data paths) and the preprocessing it needs, so :func:`load_model` rebuilds it
without the experiment's config (the way VoxelMorph's ``LoadableModel`` does).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch

from ..errors import AtlasregError

#: Modules that define the built-in methods; imported when the registry is first asked.
BUILTIN_MODULES = ("atlasreg.models.atlas_istn", "atlasreg.deepatlas.method")
#: The key of a checkpoint (a dict) under which atlasreg keeps the method's name and provenance.
CHECKPOINT_KEY = "atlasreg"

_REGISTRY: dict[str, type["Method"]] = {}


class Method(L.LightningModule):
    """What every method provides (the method protocol).

    * ``name`` / ``title``: registry key and the name the report uses;
    * ``arguments_from_config(config)``: the constructor arguments taken from an experiment config
      (what the checkpoint stores); the module is built as ``cls(arguments)``;
    * ``training_step`` (Lightning), or ``training_run`` (a training run of its own);
    * ``predict(images)``: model-grid predictions for a batch of preprocessed images
      (N, 1, *model size) -> dict with ``itn`` probabilities (N, C, *size) where the method has a
      segmentation network, and ``transforms`` {'onepass': transform} where it registers;
    * ``refine(images, predicted)``: test-time refinement, or None where the method has none;
    * ``report_column(info, output)``: the report's column for one output (or None to hide it), and
      ``report_hidden(info, output)``: why an output the method writes is hidden (None otherwise; the
      report lists the hidden outputs with this reason).
    """

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    #: A training run of the method's own, ``f(config, out_dir, resume=, progress=, device=, callbacks=)
    #: -> final checkpoint``, which ``atlasreg train`` runs instead of its epoch loop (DeepATLAS: a staged
    #: schedule counted in steps, :func:`atlasreg.deepatlas.method.pretrain`); None: the epoch loop of
    #: :func:`atlasreg.models.train.train`.
    training_run: ClassVar = None

    @classmethod
    def arguments_from_config(cls, config: dict) -> dict:
        raise NotImplementedError

    def predict(self, images: torch.Tensor) -> dict:
        raise NotImplementedError

    def refine(self, images: torch.Tensor, predicted: dict, settings: dict | None = None) -> dict | None:
        return None

    @classmethod
    def report_label(cls, info: dict) -> str:
        return str(info.get("label") or cls.title)

    @classmethod
    def report_column(cls, info: dict, output: str) -> str | None:
        return None

    @classmethod
    def report_hidden(cls, info: dict, output: str) -> str | None:
        """Why :meth:`report_column` hides `output` (one line), or None when it shows it or the method
        does not write it."""
        return None if cls.report_column(info, output) is not None else "the method does not report it"

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        from .. import __version__

        checkpoint[CHECKPOINT_KEY] = {"method": self.name, "atlasreg_version": __version__,
                                      "torch_version": str(torch.__version__)}


def register(name: str, title: str):
    """Class decorator: register a :class:`Method` subclass under `name` (shown as `title`).
    Raises ValueError if the name is taken by another class."""

    def wrap(cls: type[Method]) -> type[Method]:
        if not issubclass(cls, Method):
            raise TypeError(f"{cls.__name__} is not a Method")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method name {name!r} is already registered by {_REGISTRY[name].__name__}")
        cls.name, cls.title = name, title
        _REGISTRY[name] = cls
        return cls

    return wrap


def _load_builtins() -> None:
    for module in BUILTIN_MODULES:
        importlib.import_module(module)


def known_methods() -> tuple[str, ...]:
    """Names of the registered methods (the values ``model.method`` accepts): the built-in ones in the
    order of :data:`BUILTIN_MODULES` (and of registration within a module), whatever was imported
    first, then the others in the order they were registered."""
    _load_builtins()
    rank = {module: i for i, module in enumerate(BUILTIN_MODULES)}
    return tuple(sorted(_REGISTRY, key=lambda name: rank.get(_REGISTRY[name].__module__, len(rank))))


def get_method(name: str) -> type[Method]:
    """The registered method class. Raises AtlasregError naming the known methods."""
    _load_builtins()
    if name not in _REGISTRY:
        raise AtlasregError(f"unknown method {name!r}; known methods: {', '.join(known_methods())}")
    return _REGISTRY[name]


def build_method(config: dict) -> Method:
    """A new, untrained method module from an experiment config (``model.method`` picks it)."""
    cls = get_method(config["model"]["method"])
    return cls(cls.arguments_from_config(config))


def load_model(checkpoint: str | Path, device: str | torch.device = "cpu") -> Method:
    """Load a trained method module (weights, atlas, arguments) from a checkpoint written by
    ``atlasreg train``, in eval mode on `device` ('auto' picks CUDA when available). Needs no
    experiment config. Raises AtlasregError naming the file if it is missing or unusable."""
    from ..devices import resolve_device

    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise AtlasregError("checkpoint not found", checkpoint)
    device = resolve_device(device)
    try:
        state: Any = torch.load(checkpoint, map_location="cpu", weights_only=False)
        name = (state.get(CHECKPOINT_KEY) or {}).get("method") if isinstance(state, dict) else None
        if name is None:  # checkpoints written before the registry kept the name in the config only
            name = state["hyper_parameters"]["config"]["model"].get("method", "atlas_istn")
        cls = get_method(name)
        # Built from the state already read (Lightning's load_from_checkpoint would read the file again).
        module = cls(**state["hyper_parameters"])
        module.load_state_dict(state["state_dict"])
    except AtlasregError as e:
        raise AtlasregError(str(e), checkpoint) from None
    except Exception as e:  # noqa: BLE001 - any failure here means an unusable file
        raise AtlasregError(f"cannot load checkpoint: {type(e).__name__}: {str(e).splitlines()[0][:200]}",
                            checkpoint) from None
    module.eval()
    return module.to(device)
