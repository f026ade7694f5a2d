"""The umt5-xxl text encoder Wan2.1 conditions on, as transformers' ``UMT5EncoderModel``.

Architecture (official ``wan/modules/t5.py``, encoder only, ``shared_pos=False``)::

    x = token_embedding(ids)                                  # [B, L, dim]
    for each block:                                           # every block has its OWN position table
        x = x + attn(rms_norm1(x), mask, rel_bias_block(L))   # no 1/sqrt(d) scaling; padded keys masked
        x = x + fc2(fc1(rms_norm2(x)) * gelu_tanh(gate(rms_norm2(x))))
    x = rms_norm(x)                                           # RMS norm without mean/bias, eps 1e-6

transformers' UMT5 expresses exactly this (``relative_attention_bias`` in every block, scaling 1.0,
``gated-gelu`` = ``gelu_new``, the tanh GELU of the official code), so the module is
``UMT5EncoderModel`` with a config read off the tensor shapes. Official checkpoints
(``models_t5_umt5-xxl-enc-bf16.pth``) are renamed to its layout while loading; files already in
its layout (ComfyUI ``umt5_xxl_fp16.safetensors``, ``umt5_xxl_fp8_e4m3fn_scaled.safetensors``,
with or without the ``encoder.`` prefix) load as they are. The relative-position buckets of
transformers equal the official float32 computation (checked in ``tests/test_t5.py``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import torch

from wan_kernel.errors import InputError, WeightsError
from wan_kernel.models import arguments
from wan_kernel.models.quantization import check_quantizer
from wan_kernel.models.weights import (
    as_path,
    assign_state_dict,
    check_finite_weights,
    describe_keys,
    float_elements_by_dtype,
    fold_fp8_scales,
    guess_model_kind,
    key_mismatch,
    load_state_dict,
)

#: The official text length: every prompt is padded (or cut) to this many tokens.
TEXT_LEN = 512

# official name (after ``blocks.N.``) -> transformers name (after ``encoder.block.N.``)
_OFFICIAL_BLOCK_KEYS = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_OFFICIAL_ANCHOR = "blocks.0.attn.q.weight"
_HF_ANCHOR = "block.0.layer.0.SelfAttention.q.weight"
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
T5_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""Dtypes ``load_t5(dtype=)`` computes in (fp8 comes from ``quant=``)."""


@attrs.frozen
class T5Spec:
    """The shape of a umt5 encoder, as read off its weights.

    ``num_heads`` comes from the relative-position tables (``[num_buckets, num_heads]``).
    """

    vocab: int
    dim: int
    dim_attn: int
    dim_ffn: int
    num_heads: int
    num_layers: int
    num_buckets: int
    max_distance: int = 128
    eps: float = 1e-6

    def to_config(self):
        """The transformers ``UMT5Config`` of this encoder (dropout off, as at inference)."""
        from transformers import UMT5Config

        return UMT5Config(
            vocab_size=self.vocab,
            d_model=self.dim,
            d_kv=self.dim_attn // self.num_heads,
            d_ff=self.dim_ffn,
            num_layers=self.num_layers,
            num_decoder_layers=0,
            num_heads=self.num_heads,
            relative_attention_num_buckets=self.num_buckets,
            relative_attention_max_distance=self.max_distance,
            dropout_rate=0.0,
            layer_norm_epsilon=self.eps,
            feed_forward_proj="gated-gelu",  # -> dense_act_fn "gelu_new": the official tanh GELU
            is_encoder_decoder=False,
            use_cache=False,
            pad_token_id=0,
            eos_token_id=1,
        )


#: The real model Wan2.1 uses (official ``umt5_xxl``).
UMT5_XXL = T5Spec(
    vocab=256384, dim=4096, dim_attn=4096, dim_ffn=10240, num_heads=64, num_layers=24, num_buckets=32
)


def _anchor_prefix(keys: Sequence[str], anchor: str) -> str | None:
    """The text before ``anchor`` in the shortest key ending with it (decoder keys skipped), if any."""
    hits = sorted(
        (k for k in keys if k.endswith(anchor) and not k[: -len(anchor)].endswith("decoder.")), key=len
    )
    return hits[0][: -len(anchor)] if hits else None


def official_to_hf(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename official ``T5Encoder`` keys (``blocks.N.attn.q.weight``...) to ``UMT5EncoderModel`` keys."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
        if m and m.group(2) in _OFFICIAL_BLOCK_KEYS:
            out[f"encoder.block.{m.group(1)}.{_OFFICIAL_BLOCK_KEYS[m.group(2)]}"] = value
        elif key == "token_embedding.weight":
            out["shared.weight"] = value
        elif key == "norm.weight":
            out["encoder.final_layer_norm.weight"] = value
        else:
            unknown.append(key)
    if unknown:
        raise WeightsError(
            f"unexpected tensors for an official umt5 encoder: {describe_keys(unknown)} (a shared position "
            "table `pos_embedding` means a T5 with shared_pos=True, not the umt5 encoder Wan uses)"
        )
    return out


def _normalise_hf(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF-layout keys with or without ``encoder.``, decoder/LM head dropped, to ``UMT5EncoderModel`` keys."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(("decoder.", "lm_head.")) or key in ("spiece_model", "scaled_fp8"):
            continue  # other halves of a full T5, a tokenizer blob, ComfyUI's fp8 marker
        if key in ("shared.weight", "embed_tokens.weight", "encoder.embed_tokens.weight"):
            out.setdefault("shared.weight", value)
            continue
        if not key.startswith("encoder."):
            key = "encoder." + key
        out[key] = value
    return out


def _dequantize_fp8(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Undo scaled-fp8 storage (ComfyUI ``*_fp8_e4m3fn_scaled``, ``fp8_t5``/musubi block scales).

    ``weight = fp8_weight * scale_weight`` for every scale layout
    :func:`~wan_kernel.models.weights.fold_fp8_scales` reads (per tensor, per channel, per block of
    inputs, musubi's two-level scales); fp8 tensors without a scale are up-cast.
    """
    folded = fold_fp8_scales(state, {}, dtype)
    return {k: v.to(dtype) if v.dtype in _FP8 else v for k, v in folded.items()}


def t5_state_to_hf(state: Mapping[str, torch.Tensor], *, source: str = "weights") -> dict[str, torch.Tensor]:
    """Any accepted layout (official, HF with/without ``encoder.``, outer prefixes) -> HF keys.

    Raises :class:`WeightsError` saying what the file looks like when it is no umt5 encoder.
    """
    keys = list(state)
    prefix = _anchor_prefix(keys, _OFFICIAL_ANCHOR)
    if prefix is not None:
        picked = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        try:
            return official_to_hf(picked)
        except WeightsError as exc:
            raise WeightsError(f"{source}: {exc}") from None
    prefix = _anchor_prefix(keys, _HF_ANCHOR)
    if prefix is not None:
        if prefix.endswith("encoder."):
            outer = prefix[: -len("encoder.")]
        else:
            outer = prefix
        picked = {k[len(outer) :]: v for k, v in state.items() if k.startswith(outer)}
        return _normalise_hf(picked)
    raise WeightsError(
        f"{source}: this is not a umt5 text encoder file: it looks like {guess_model_kind(keys)} "
        f"(tensors: {describe_keys(keys)}). Give the umt5-xxl encoder, e.g. the official "
        "models_t5_umt5-xxl-enc-bf16.pth or ComfyUI's umt5_xxl_fp16.safetensors."
    )


def infer_t5_spec(state: Mapping[str, torch.Tensor], *, source: str = "weights") -> T5Spec:
    """Read the encoder's sizes off ``UMT5EncoderModel``-layout tensors."""
    if "shared.weight" not in state:
        raise WeightsError(
            f"{source}: the token embedding (shared.weight / token_embedding.weight) is missing"
        )
    block_ids = {int(m.group(1)) for k in state if (m := re.match(r"encoder\.block\.(\d+)\.", k))}
    num_layers = max(block_ids) + 1
    if block_ids != set(range(num_layers)):
        raise WeightsError(f"{source}: encoder blocks are missing: found {sorted(block_ids)}")
    attn = "encoder.block.{}.layer.0.SelfAttention."
    missing_tables = [
        i for i in range(num_layers) if attn.format(i) + "relative_attention_bias.weight" not in state
    ]
    if missing_tables:
        kind = (
            "a T5 v1.1 encoder (one position table, in block 0)"
            if missing_tables == list(range(1, num_layers))
            else "damaged"
        )
        raise WeightsError(
            f"{source}: blocks {missing_tables[:5]} have no relative position table; the file looks {kind}. "
            "Wan uses umt5-xxl, where every block has its own table."
        )
    if "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" not in state:
        raise WeightsError(f"{source}: the feed-forward is not gated (no wi_0 / ffn.gate); this is not umt5")
    vocab, dim = state["shared.weight"].shape
    dim_attn = state[attn.format(0) + "q.weight"].shape[0]
    num_buckets, num_heads = state[attn.format(0) + "relative_attention_bias.weight"].shape
    dim_ffn = state["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0]
    if dim_attn % num_heads:
        raise WeightsError(f"{source}: attention width {dim_attn} is not a multiple of {num_heads} heads")
    return T5Spec(
        vocab=int(vocab),
        dim=int(dim),
        dim_attn=int(dim_attn),
        dim_ffn=int(dim_ffn),
        num_heads=int(num_heads),
        num_layers=num_layers,
        num_buckets=int(num_buckets),
    )


def _default_dtype(state: Mapping[str, torch.Tensor]) -> torch.dtype:
    """The dtype most weight values are stored in; files with fp8 weights compute in bfloat16."""
    counts = float_elements_by_dtype(state)
    if any(d in _FP8 for d in counts):
        return torch.bfloat16
    return max(counts, key=counts.get) if counts else torch.float32


def _check_state_keys(
    state: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    source: str,
    *,
    missing_only=False,
) -> None:
    mismatch = key_mismatch(expected, state, missing_only=missing_only)
    if mismatch:
        raise WeightsError(f"{source}: the umt5 encoder tensors do not match its shape: {mismatch}")


def build_t5(
    spec: T5Spec,
    state: Mapping[str, torch.Tensor],
    *,
    source: str = "weights",
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    quantizer: Any = None,
):
    """A ``UMT5EncoderModel`` built on the meta device that adopts ``state`` (``assign=True``).

    :param state: ``UMT5EncoderModel``-layout tensors (see :func:`t5_state_to_hf`).
    :param device: where the tensors go (``None``: where they are).
    :param dtype: the floating-point dtype of the model (``None``: each tensor keeps its own).
    :param quantizer: a ``Quantizer`` supporting ``"t5"``: it swaps modules of the meta model
        (``convert_for_runtime``) and turns ``state`` into its stored form (``quantize_state_dict``)
        before the tensors are adopted.
    Tensors are cast and moved one at a time (one copy when the dtype or device changes, none otherwise).
    """
    from transformers import UMT5EncoderModel

    config = spec.to_config()
    # sdpa: float32 results equal eager's to 1.4e-6, and in bf16 it is nearer the official code (which
    # takes its softmax in float32) than transformers' eager path (bf16 softmax): max err 0.077 vs 0.10
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    if dtype is not None:
        model.to(dtype)
    state = dict(state)
    state["encoder.embed_tokens.weight"] = state["shared.weight"]  # tied, one tensor
    if quantizer is not None:
        _check_state_keys(state, model.state_dict(), source, missing_only=True)
        model = quantizer.convert_for_runtime(model, target="t5")
        state = quantizer.quantize_state_dict(
            state, target="t5", device=torch.device(device) if device is not None else "cpu"
        )
    expected = model.state_dict()
    _check_state_keys(state, expected, source)
    moved: dict[int, torch.Tensor] = {}  # by id: the tied embedding is cast once
    for key, ref in expected.items():
        value = state[key]
        if id(value) not in moved:
            want = ref.dtype if (dtype is not None or quantizer is not None) else value.dtype
            moved[id(value)] = value.to(device=device if device is not None else value.device, dtype=want)
        state[key] = moved[id(value)]
    del moved
    check_finite_weights(state, source)
    assign_state_dict(model, state, source=source, what="a umt5 encoder")
    # assign=True gave the two names two Parameters over one tensor: make them one again, as
    # transformers ties them (a later .to(dtype) would otherwise copy the embedding twice)
    model.encoder.embed_tokens.weight = model.shared.weight
    return model.eval().requires_grad_(False)


def load_t5(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    quant: Any = None,
):
    """Load a umt5 text encoder from an official, ComfyUI or transformers-layout file.

    :param path: ``.pth``/``.safetensors`` file or folder of shards.
    :param device: where the weights go.
    :param dtype: compute dtype; ``None`` keeps the file's (fp8 files compute in bfloat16).
    :param quant: a resolved ``Quantizer`` supporting the ``"t5"`` target (e.g.
        ``wan_kernel.pipelines.plugin_setup.resolve_quantizer("fp8_t5", target="t5")``), or ``None``.
        The model is built on ``meta``, the quantizer swaps its Linears, quantizes the tensors read
        from the file (on ``device``), and the result is adopted: the high-precision encoder is never
        held in full next to the quantized one.
    :returns: a transformers ``UMT5EncoderModel`` in eval mode; ``t5(input_ids, attention_mask)``
        returns an output whose ``last_hidden_state`` is ``[B, L, dim]``.
    :raises WeightsError: the file is missing, unreadable, malformed or not a umt5 encoder.
    :raises InputError: ``quant`` is not a quantizer, or does not handle the text encoder; ``path``
        is not a path; ``dtype`` / ``device`` unknown or unsupported.
    """
    path = as_path(path, what="T5 text encoder").expanduser()
    dtype = arguments.resolve_dtype(dtype, allowed=T5_DTYPES, what="the T5 text encoder")
    device = arguments.check_device(device)
    quantizer = check_quantizer(quant, target="t5")
    raw = load_state_dict(path, what="T5 text encoder")
    state = t5_state_to_hf(raw, source=str(path))
    del raw
    spec = infer_t5_spec(state, source=str(path))
    target = dtype or _default_dtype(state)
    if quantizer is None and any(v.dtype in _FP8 for v in state.values()):
        state = _dequantize_fp8(state, target)  # with a quantizer, stored fp8 goes to it as it is
    return build_t5(spec, state, source=str(path), device=device, dtype=target, quantizer=quantizer)


def _last_hidden(output) -> torch.Tensor:
    return output.last_hidden_state if hasattr(output, "last_hidden_state") else output


def encode_prompts(
    t5,
    tokenizer,
    prompts: str | Sequence[str],
    device: str | torch.device | None = None,
    *,
    seq_len: int = TEXT_LEN,
) -> list[torch.Tensor]:
    """Prompt embeddings the way Wan's ``T5EncoderModel.__call__`` makes them.

    Each prompt is cleaned (whitespace) and tokenised to exactly ``seq_len`` ids (``</s>`` after the
    text, pad 0), the encoder runs on ids + mask, and every output is cut to its real length.

    :param t5: the module from :func:`load_t5` (or any ``t5(ids, mask)`` returning ``[B, L, dim]``).
    :param tokenizer: from :func:`wan_kernel.models.tokenizer.load_tokenizer`.
    :param prompts: one prompt or a list.
    :param device: where the ids go (default: the encoder's device).
    :returns: one ``[L_i, dim]`` tensor per prompt (``L_i`` = tokens + eos, at most ``seq_len``).
    """
    from wan_kernel.models.tokenizer import clean_prompt

    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise InputError("no prompts to encode")
    if not all(isinstance(p, str) for p in prompts):
        raise InputError("prompts must be strings")
    if device is None:
        device = next(t5.parameters()).device
    batch = tokenizer(
        [clean_prompt(p) for p in prompts],
        padding="max_length",
        truncation=True,
        max_length=seq_len,
        add_special_tokens=True,
        return_tensors="pt",
    )
    ids = batch["input_ids"].to(device)
    mask = batch["attention_mask"].to(device)
    vocab = getattr(getattr(t5, "config", None), "vocab_size", None)
    if vocab is not None and int(ids.max()) >= vocab:
        raise InputError(
            f"the tokenizer produced id {int(ids.max())} but the text encoder has only {vocab} "
            "token embeddings; "
            "use the tokenizer that belongs to this encoder (google/umt5-xxl for Wan2.1)"
        )
    lengths = mask.gt(0).sum(dim=1).tolist()
    with torch.no_grad():
        hidden = _last_hidden(t5(ids, mask))  # [B, seq_len, dim]
    return [h[:n] for h, n in zip(hidden, lengths)]
