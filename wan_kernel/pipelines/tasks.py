"""The generation tasks and their defaults (the official Wan2.1 task table).

A task names what a DiT checkpoint can do and the defaults the official code uses for it. The
task is read from the weights (``model_type`` and width of the loaded DiT); ``--task`` only
confirms it or picks between tasks that share weights (``t2v-14B`` and ``t2i-14B``).

Defaults follow the official ``generate.py``: 50 steps for text-to-video/image, 40 for the
image-conditioned tasks; flow shift 5.0, 3.0 for ``i2v`` at 480x832 / 832x480, 16.0 for
``flf2v`` (the official first-last-frame default); guidance scale 5.0; 81 frames (1 for
``t2i``); 16 fps. The default negative prompt is the official ``sample_neg_prompt`` (with the
official "镜头切换，" prefix for ``flf2v``).
"""

from __future__ import annotations

import attrs

from wan_kernel.errors import InputError
from wan_kernel.models.dit_config import MODEL_TYPES, PRESETS

DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
"""The official Wan2.1 ``sample_neg_prompt`` (``wan/configs/shared_config.py``)."""

FLF2V_NEGATIVE_PROMPT = "镜头切换，" + DEFAULT_NEGATIVE_PROMPT
"""The official flf2v-14B negative prompt (``wan/configs/__init__.py``)."""

DEFAULT_FPS = 16
SIZES_480P = ((480, 832), (832, 480))
"""(height, width) pairs at which ``i2v`` defaults to flow shift 3.0."""

KNOWN_WIDTHS = {1536: "1.3B", 5120: "14B"}
"""DiT hidden width -> model size label of the official releases."""


@attrs.frozen
class TaskSpec:
    """One generation task and its defaults.

    ``mode`` is the conditioning: ``t2v`` (text), ``t2i`` (text, one frame), ``i2v`` (first frame
    image + CLIP), ``flf2v`` (first and last frame images + CLIP). ``model_type`` is the DiT's
    ``model_type`` the task needs and ``dim`` its width (``None`` for a family of custom models).
    Sizes are ``(height, width)``.
    """

    name: str
    mode: str
    model_type: str
    dim: int | None
    steps: int
    flow_shift: float
    guidance_scale: float = 5.0
    frames: int = 81
    size: tuple[int, int] = (480, 832)
    supported_sizes: tuple[tuple[int, int], ...] = ()
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    fps: int = DEFAULT_FPS

    @property
    def needs_image(self) -> bool:
        """Whether the task is conditioned on a start image (and so needs CLIP and the VAE encoder)."""
        return self.mode in ("i2v", "flf2v")

    @property
    def needs_end_image(self) -> bool:
        return self.mode == "flf2v"

    def default_flow_shift(self, height: int, width: int) -> float:
        """The official default shift: 3.0 for ``i2v`` at 480p sizes, else the task's value."""
        if self.mode == "i2v" and (height, width) in SIZES_480P:
            return 3.0
        return self.flow_shift


_SIZES_14B = ((720, 1280), (1280, 720), (480, 832), (832, 480))


def _task(name: str, mode: str, **defaults) -> TaskSpec:
    """A named task of a released DiT: ``model_type`` and ``dim`` come from its preset."""
    preset = PRESETS[name]
    return TaskSpec(name, mode, preset.model_type, preset.dim, **defaults)


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        _task("t2v-1.3B", "t2v", steps=50, flow_shift=5.0, supported_sizes=SIZES_480P),
        _task("t2v-14B", "t2v", steps=50, flow_shift=5.0, supported_sizes=_SIZES_14B),
        _task(
            "t2i-14B", "t2i", steps=50, flow_shift=5.0, frames=1, supported_sizes=(*_SIZES_14B, (1024, 1024))
        ),
        _task("i2v-14B", "i2v", steps=40, flow_shift=5.0, supported_sizes=_SIZES_14B),
        _task(
            "flf2v-14B",
            "flf2v",
            steps=40,
            flow_shift=16.0,
            supported_sizes=_SIZES_14B,
            negative_prompt=FLF2V_NEGATIVE_PROMPT,
        ),
    )
}
"""The named tasks of the official release (``--task``): one per DiT preset
(:data:`wan_kernel.models.dit_config.PRESETS`), with the official defaults."""
assert TASKS.keys() == PRESETS.keys(), "every DiT preset is a task and every task a preset"


def _family(model_type: str, dim: int) -> TaskSpec:
    """A task for a DiT of a non-release width (tiny test and demo models): the family's defaults."""
    base = {"t2v": TASKS["t2v-1.3B"], "i2v": TASKS["i2v-14B"], "flf2v": TASKS["flf2v-14B"]}[model_type]
    return attrs.evolve(base, name=f"{model_type} (custom dim {dim})", dim=dim, supported_sizes=())


def tasks_for_model(model_type: str, dim: int) -> list[TaskSpec]:
    """Every task a DiT with this ``model_type`` and width can run, the default one first."""
    if model_type not in MODEL_TYPES:
        raise InputError(f"unsupported DiT model_type {model_type!r}; expected t2v, i2v or flf2v")
    matches = [t for t in TASKS.values() if t.model_type == model_type and t.dim == dim]
    if matches:
        return matches
    family = _family(model_type, dim)
    return (
        [family, attrs.evolve(family, name=f"t2i (custom dim {dim})", mode="t2i", frames=1)]
        if (model_type == "t2v")
        else [family]
    )


def describe_model(model_type: str, dim: int) -> str:
    """A short description of a DiT for messages (``an i2v-14B DiT (model_type i2v, dim 5120)``)."""
    label = KNOWN_WIDTHS.get(dim, "custom-size")
    article = "an" if model_type == "i2v" else "a"
    return f"{article} {model_type} {label} DiT (model_type {model_type!r}, dim {dim})"


def select_task(model_type: str, dim: int, requested: str | None = None) -> TaskSpec:
    """The task to run with a DiT of this kind.

    ``requested`` (``--task``) must be one the weights can run; it only confirms the task or
    picks ``t2i-14B`` over ``t2v-14B``. A disagreeing name is an :class:`InputError` that says
    what the file is.
    """
    candidates = tasks_for_model(model_type, dim)
    if requested is None:
        return candidates[0]
    if requested not in TASKS:
        raise InputError(f"unknown task {requested!r}; known tasks: {', '.join(TASKS)}")
    for task in candidates:
        if task.name == requested:
            return task
    wanted = TASKS[requested]
    if wanted.dim is not None and dim not in KNOWN_WIDTHS and wanted.model_type == model_type:
        # a custom-width model asked to run a named task of its family: keep the family defaults
        # of the requested task (its mode) but say nothing about size
        return attrs.evolve(wanted, name=f"{wanted.name} (custom dim {dim})", dim=dim, supported_sizes=())
    can = ", ".join(t.name for t in candidates)
    raise InputError(
        f"--task {requested} needs a {wanted.model_type} DiT of width {wanted.dim}, but the --dit file is "
        f"{describe_model(model_type, dim)}, which runs: {can}. Drop --task or pass the matching weights."
    )
