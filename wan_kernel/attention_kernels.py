"""A base class for attention backends that call a library's CUDA kernel (xformers, FlashAttention,
SageAttention, ...): the lazy kernel import, the availability verdict, the input and head-size
checks and the half-precision casts are written once here, so a backend plugin keeps only its
probe (what it needs from the GPU) and its call (how it hands Wan's layout to the kernel).

A subclass sets ``name``, ``module_name``, ``library``, ``distribution`` and ``install_hint`` and
writes :meth:`KernelAttention.load_kernel` and :meth:`KernelAttention.attend`; it may override
:meth:`KernelAttention.capability_problem`, :meth:`KernelAttention.head_dim_problem` and
:meth:`KernelAttention.check_call`. Nothing here imports torch or the library at import time:
the library is imported by :meth:`KernelAttention.availability` (once torch sees a usable GPU) or
at the first call.
"""

from __future__ import annotations

import abc
import importlib.metadata
import importlib.util
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from wan_kernel.attention_inputs import check_attention_inputs, half_precision
from wan_kernel.errors import InputError, PluginUnavailableError
from wan_kernel.interfaces import AttentionBackend, Availability

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

NO_CUDA = "it needs a CUDA GPU and torch sees none (torch.cuda.is_available() is False)"


def installed_version(module_name: str) -> str | None:
    """The installed version of the distribution named like ``module_name``, or ``None``."""
    try:
        return importlib.metadata.version(module_name)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None


class KernelAttention(AttentionBackend):
    """An attention backend around a library's CUDA kernel, imported on first use."""

    module_name: ClassVar[str]
    """The library's import name (probed with ``importlib.util.find_spec``; :meth:`load_kernel` imports it)."""
    library: ClassVar[str] = ""
    """How messages name the library (default: ``module_name``)."""
    distribution: ClassVar[str] = ""
    """The plugin's distribution (``wan-attention-<impl>``), named in ``PluginUnavailableError``."""

    def __init__(self) -> None:
        self._kernel: Callable[..., Any] | None = None

    # -- what a backend writes --------------------------------------------------------------------

    @abc.abstractmethod
    def load_kernel(self) -> Callable[..., Any]:
        """Import the library and return its kernel (called once, when the backend is judged usable)."""

    @abc.abstractmethod
    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_lens: torch.Tensor | None,
        *,
        kernel: Callable[..., Any],
    ) -> torch.Tensor:
        """Attention through ``kernel`` on checked half-precision CUDA tensors in Wan's layout
        (``q`` ``[B, Lq, H, D]``, ``k``/``v`` ``[B, Lk, H, D]``) -> ``[B, Lq, H, D]``."""

    def capability_problem(self, capability: tuple[int, int], *, version: str | None = None) -> str | None:
        """Why a GPU of this compute capability cannot run the kernel (``None``: it can).

        :param version: the installed library's version, when known.
        """
        return None

    def head_dim_problem(self, head_dim: int) -> str | None:
        """Why the kernel cannot take this head size, as a phrase following ``"<name> attention "``
        (``None``: it can)."""
        return None

    def check_call(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Refuse a call the kernel cannot serve beyond shapes and devices (e.g. one needing a backward)."""

    # -- given ------------------------------------------------------------------------------------

    def judge(
        self,
        *,
        library_found: bool,
        cuda_available: bool,
        capability: tuple[int, int] | None = None,
        version: str | None = None,
    ) -> Availability:
        """The availability verdict from what was probed (a pure function, tested on CPU)."""
        problems = []
        if not library_found:
            library = self.library or self.module_name
            problems.append(
                f"{library} is not installed (no module {self.module_name!r}); {self.install_hint}"
            )
        if not cuda_available:
            problems.append(NO_CUDA)
        elif capability is not None:
            problem = self.capability_problem(tuple(capability), version=version)
            if problem:
                problems.append(problem)
        return Availability.no("; ".join(problems)) if problems else Availability.yes()

    def availability(self) -> Availability:
        """Probe the library (without importing torch when it is absent), the GPU, then import the kernel."""
        if self._kernel is not None:
            return Availability.yes()
        try:
            found = importlib.util.find_spec(self.module_name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:  # say so without importing torch: `wan plugins` stays fast
            return self.judge(library_found=False, cuda_available=True)
        import torch

        cuda = torch.cuda.is_available()
        capability = tuple(torch.cuda.get_device_capability()) if cuda else None
        verdict = self.judge(
            library_found=True,
            cuda_available=cuda,
            capability=capability,
            version=installed_version(self.module_name),
        )
        if not verdict.ok:
            return verdict
        try:
            self._kernel = self.load_kernel()
        except Exception as exc:  # a wheel built for another torch/CUDA fails here (undefined symbol)
            return Availability.no(
                f"{self.module_name} is installed but fails to import ({type(exc).__name__}: {exc}); it was "
                f"probably built for another torch or CUDA version than torch {torch.__version__}: "
                f"reinstall it against this torch ({self.install_hint})"
            )
        return verdict

    def kernel(self) -> Callable[..., Any]:
        """The loaded kernel; raises ``PluginUnavailableError`` saying what to install when it cannot run."""
        if self._kernel is None:
            verdict = self.availability()
            if not verdict.ok:
                raise PluginUnavailableError(
                    "attention", self.name, verdict.reason, self.distribution or None
                )
        assert self._kernel is not None
        return self._kernel

    def check_head_dim(self, head_dim: int) -> None:
        """An ``InputError`` when the kernel cannot take this head size (:meth:`head_dim_problem`)."""
        problem = self.head_dim_problem(head_dim)
        if problem:
            raise InputError(f"{self.name} attention {problem}")

    def __call__(self, q, k, v, k_lens=None):
        """Attention of ``q`` ``[B, Lq, H, D]`` over ``k``/``v`` ``[B, Lk, H, D]`` (CUDA tensors).

        Returns ``[B, Lq, H, D]`` in ``q``'s dtype; keys at index ``>= k_lens[b]`` get no weight.
        fp32 inputs run in bf16 and the result is cast back.
        """
        self.check_call(q, k, v)
        check_attention_inputs(q, k, v, backend=self.name)
        self.check_head_dim(q.shape[-1])
        kernel = self.kernel()
        qh, kh, vh = half_precision(q, k, v)
        return self.attend(qh, kh, vh, k_lens, kernel=kernel).to(q.dtype)


__all__ = ["KernelAttention", "installed_version"]
