"""Typed schema of ``stage:``: what a training stage is, declared as data.

Each ``experiments/stages/*.yaml`` fills one ``StageConfig``; nothing else in fvl compares a stage's name
with a string. Freezing (``set_trainable``), the data side (image resize mode, validation task), the chat
template, where ``init_from=latest`` looks, and which LightningModule runs read these fields. A new stage is
a YAML file, plus at most one module registered in ``fvl.train.module.STAGE_MODULES``.

In any experiment YAML or override, ``stage: NAME`` (a plain string) stands for the contents of
``experiments/stages/NAME.yaml``; ``fvl info tiny stage=finetune`` reports the finetune stage's trainable set.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fvl.config.model import COMPONENTS

STAGES_SUBDIR = "stages"
RESIZE_MODES = ("square", "pad")  # what ``fvl.inputs.transform.ImageTransform`` implements
VAL_TASKS = (
    "caption",
    "qa",
)  # the synthetic split's tasks (``fvl.synthetic.TASKS``; a test keeps them equal)


@dataclass
class StageConfig:
    """A training stage.

    name: the stage's label: run folders ``{name}-{stage}-{time}``, the MLflow tag ``stage``, ``resume=last``
      and ``init_from=latest`` of a later stage find runs by it.
    trainable: components whose parameters train, any of ``vision``, ``fusion``, ``projector``, ``llm``
      (parameters that cannot reach the output stay frozen and are reported as unused); with several towers
      (``model.vision.towers``) ``vision.<name>`` trains one of them (``vision``: all).
    template: chat template of this stage's samples (``plain`` for caption pretraining); empty keeps the
      preset's ``model.text.template``. A non-empty value is written into ``model.text.template``.
    resize_mode: ``square`` (resize) | ``pad`` (pad to square with the mean colour, as LLaVA's SFT does).
    init_stage: the stage whose newest run ``init_from=latest`` starts from (empty: none). A stage that names
      one and starts from scratch is warned about.
    val_task: task of the synthetic validation split: ``caption`` | ``qa``.
    module: the LightningModule that runs the stage (a ``STAGE_MODULES`` name; ``default`` runs every
      shipped stage).
    """

    name: str = "pretrain"
    trainable: list[str] = field(default_factory=lambda: list(COMPONENTS))
    template: str = ""
    resize_mode: str = "square"
    init_stage: str = ""
    val_task: str = "caption"
    module: str = "default"

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").isalnum():
            raise ValueError(f"stage.name={self.name!r}: use letters, digits and underscores")
        unknown = [c for c in self.trainable if c not in COMPONENTS and not _is_tower_component(c)]
        if unknown:
            raise ValueError(
                f"stage.trainable: unknown components {unknown}; known: {', '.join(COMPONENTS)}, vision.<tower>"
            )
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(
                f"stage.resize_mode={self.resize_mode!r}: expected one of {', '.join(RESIZE_MODES)}"
            )
        if self.val_task not in VAL_TASKS:
            raise ValueError(f"stage.val_task={self.val_task!r}: expected one of {', '.join(VAL_TASKS)}")
        # ``template`` names a registered chat template: written into ``model.text.template``, it is checked
        # with the model's other names (``fvl.models.check``).


def _is_tower_component(name: str) -> bool:
    head, dot, tower = name.partition(".")
    return head == "vision" and bool(dot) and tower.isidentifier()


def trains_vision(trainable: list[str]) -> bool:
    """Whether a trainable list trains any tower (``vision`` or ``vision.<tower>``)."""
    return any(c == "vision" or _is_tower_component(c) for c in trainable)
