"""lmms-eval's entry point for the ``prior`` model (``[project.entry-points."lmms_eval.models"]``),
and the two fixes lmms-eval 0.7.3 needs to run here.

lmms-eval imports every ``lmms_eval.models`` entry point when it builds its model registry, for
every command, so this module stays light: the model class itself (``prior.eval.lmms.PriorLMM``,
which pulls in torch and the LVLM) is imported only when a run asks for ``--model prior``.
Building the manifest also applies :func:`apply_compat`; that happens inside lmms-eval's own
``import lmms_eval.evaluator``, before the evaluator binds the functions the fixes replace.
"""

from __future__ import annotations

import importlib
import numbers
import sys
import types
from typing import Any

MODEL_ID = "prior"
CLASS_PATH = "prior.eval.lmms.PriorLMM"


def manifest() -> Any:
    """The ``ModelManifest`` that maps ``--model prior`` to :class:`prior.eval.lmms.PriorLMM`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    apply_compat()
    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)


def apply_compat() -> None:
    """Both fixes below; idempotent."""
    filelock_compat()
    loglikelihood_compat()


def filelock_compat() -> None:
    """Let lmms-eval 0.7.3 run with filelock 4 (which this project's other dependencies installed).

    ``lmms_eval.evaluator.simple_evaluate`` patches ``filelock._api.FileLockMeta.__call__``
    (filelock 3's private module) to share lock instances between filelock's and datasets'
    ``FileLock`` classes; filelock 4 moved that class to ``filelock._core._singleton`` and the
    import fails. This registers ``filelock._api`` as an alias of the new location, with the
    three names lmms-eval reads, so its patch applies unchanged. Nothing happens where
    ``filelock._api`` exists (filelock 3) or the new layout is absent.
    """
    if "filelock._api" in sys.modules:
        return
    try:
        importlib.import_module("filelock._api")
        return
    except ImportError:
        pass
    try:
        import filelock
        from filelock._core import _lock, _singleton
    except ImportError:
        return
    alias = types.ModuleType("filelock._api")
    alias.FileLockMeta = _singleton.FileLockMeta
    alias.BaseFileLock = _lock.BaseFileLock
    alias._UNSET_FILE_MODE = getattr(_singleton, "UNSET_FILE_MODE", None)
    sys.modules["filelock._api"] = alias
    filelock._api = alias


def loglikelihood_compat() -> None:
    """Keep loglikelihood answers ``(score, is_greedy)`` intact through lmms-eval 0.7.3's evaluator.

    Its ``unwrap_generation_output``, applied to every model answer, passes strings and
    ``GenerationResult`` through but turns anything else into ``str(answer)``: a ``(float, bool)``
    pair becomes the text ``"(0.7, False)"`` and every ``multiple_choice`` task then fails in
    ``process_results`` (``lls, is_greedy = zip(*results)``), whatever the model. This wraps it
    so that a pair of a real number and a bool (or the list a response cache gives back) comes
    back as the tuple; every other answer goes to lmms-eval's own function unchanged.
    """
    from lmms_eval.api import instance

    original = instance.unwrap_generation_output
    if getattr(original, "_prior_compat", False):
        return

    def unwrap_generation_output(output: Any) -> tuple[Any, Any]:
        if (
            isinstance(output, (tuple, list))
            and len(output) == 2
            and isinstance(output[1], bool)
            and isinstance(output[0], numbers.Real)
            and not isinstance(output[0], bool)
        ):
            return (float(output[0]), output[1]), None
        return original(output)

    unwrap_generation_output._prior_compat = True  # type: ignore[attr-defined]
    unwrap_generation_output.__doc__ = original.__doc__
    instance.unwrap_generation_output = unwrap_generation_output
    evaluator = sys.modules.get("lmms_eval.evaluator")  # already bound the original by name
    if evaluator is not None and getattr(evaluator, "unwrap_generation_output", None) is original:
        evaluator.unwrap_generation_output = unwrap_generation_output
