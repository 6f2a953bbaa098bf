"""Qwen-Image-Edit-2509/2511 behind :class:`EditModel`, from a local diffusers-format folder.

Components are diffusers' ``QwenImageTransformer2DModel`` and ``AutoencoderKLQwenImage`` and
transformers' Qwen2.5-VL encoder. The processor is rebuilt from the folder's ``tokenizer/`` and
``processor/`` with the PIL image processor, because the ``Qwen2VLProcessor`` that
``model_index.json`` names builds a video processor that needs torchvision.

Conditioning, as diffusers' ``QwenImageEditPlusPipeline``: the instruction is put in Qwen's system
template after one ``Picture i: <|vision_start|><|image_pad|><|vision_end|>`` label per reference,
the VL encoder sees the references, and the last hidden states of the real tokens, minus the first
64 (the system prompt), are the text tokens. The VL encoder sees each reference either at about
``condition_size`` pixels (diffusers: 384², rounded to 32) or, with ``condition_size="self"``, at
28/32 of its SELF size (UniPic-3: one 28-px vision patch per 32-px DiT token).

Batched velocity: diffusers' rotary embedding takes one ``img_shapes`` for a whole batch, so a
packed batch is split into groups of samples with identical image grids; each group is one
transformer call (text padded and masked when lengths differ), a lone sample is exactly diffusers'
batch-1 call (no text mask).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from uniref.budget import QWEN_MULTIPLE, Size
from uniref.errors import ModelError
from uniref.images import resize
from uniref.models.base import AUTO_DTYPE, Conditioning, EditModel, LatentSpec, ScheduleSpec, resolve_dtype
from uniref.sequence import PackedBatch

log = logging.getLogger(__name__)

# diffusers' QwenImageEditPlusPipeline: system template, and the number of its tokens to drop.
PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
PROMPT_DROP_TOKENS = 64
PICTURE_LABEL = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"
# diffusers' CONDITION_IMAGE_SIZE and VAE_IMAGE_SIZE (pixels per image) and the output budget.
CONDITION_IMAGE_SIZE = 384 * 384
VAE_IMAGE_SIZE = 1024 * 1024
TARGET_IMAGE_SIZE = 1024 * 1024
# UniPic-3: the VL encoder's 28-px patches (14 px x 2x2 merge) per 32-px DiT token.
VL_PATCH_PIXELS = 28
SELF_CONDITION = "self"
_OFFLOAD = ("none", "model", "sequential")


class DiffusersAdapter(EditModel):
    """What the diffusers-backed flavours share: the transformer is the denoiser, and VAE latents are
    normalised by the VAE config's ``latents_mean`` / ``latents_std`` (as diffusers' pipelines do)."""

    transformer: Any
    vae: Any
    _device: torch.device | None

    def _init_vae_stats(self, vae: Any) -> None:
        z_dim = vae.config.z_dim
        self._latents_mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(z_dim, 1, 1)
        self._latents_std = torch.tensor(vae.config.latents_std, dtype=torch.float32).view(z_dim, 1, 1)

    @property
    def device(self) -> torch.device:
        if self._device is not None:
            return self._device
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    def denoiser(self) -> torch.nn.Module:
        return self.transformer

    def set_denoiser(self, module: torch.nn.Module) -> None:
        self.transformer = module

    @torch.no_grad()
    def encode_images(self, images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        latents = []
        for img in images:
            x = img.to(self.device, self.vae.dtype)
            if getattr(self.vae.config, "in_channels", 3) == 4:  # the 2.1 VAE reads RGBA: ours are opaque
                x = torch.cat([x, torch.ones_like(x[:1])])
            lat = self.vae.encode(x[None, :, None]).latent_dist.mode()[0, :, 0]  # (C, h, w), argmax as diffusers
            mean, std = self._stats(lat)
            latents.append(((lat - mean) / std).to(self.dtype))
        return latents

    @torch.no_grad()
    def decode_latents(self, latents: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        images = []
        for lat in latents:
            lat = lat.to(self.device, self.vae.dtype)
            mean, std = self._stats(lat)
            out = self.vae.decode((lat * std + mean)[None, :, None], return_dict=False)[0][0, :, 0].float()
            images.append(out[:3])  # (3, H, W); an alpha channel, if decoded, is dropped
        return images

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._latents_mean.to(like.device, like.dtype), self._latents_std.to(like.device, like.dtype)


class QwenImageEdit(DiffusersAdapter):
    """Qwen-Image-Edit adapter (see the module docstring)."""

    def __init__(
        self,
        *,
        transformer: Any,
        vae: Any,
        text_encoder: Any,
        tokenizer: Any,
        image_processor: Any,
        schedule: ScheduleSpec | None = None,
        condition_size: int | str = CONDITION_IMAGE_SIZE,
        name: str | None = None,
        execution_device: torch.device | None = None,
    ) -> None:
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.processor = _make_processor(image_processor, tokenizer)
        self.condition_size = condition_size
        self.zero_cond_t = bool(getattr(transformer.config, "zero_cond_t", False))
        self.name = name or ("qwen-image-edit-2511" if self.zero_cond_t else "qwen-image-edit-2509")
        self._device = execution_device
        self._init_vae_stats(vae)
        self.spec = LatentSpec(
            latent_channels=vae.config.z_dim,
            vae_scale=2 ** len(vae.config.temperal_downsample),  # as diffusers' vae_scale_factor
            patch_size=transformer.config.patch_size,
            plan_multiple=QWEN_MULTIPLE,
            ref_budget=VAE_IMAGE_SIZE,
            target_budget=TARGET_IMAGE_SIZE,
            centred_positions=True,
            schedule=schedule or ScheduleSpec(),
        )

    # --- protocol -----------------------------------------------------------------------------

    @torch.no_grad()
    def encode_condition(
        self,
        instructions: Sequence[str],
        refs: Sequence[Sequence[Image.Image]],
        ref_sizes: Sequence[Sequence[Size]],
    ) -> Conditioning:
        # One VL call per sample: padding several prompts together would change nothing in the
        # result but cost memory, and samples rarely share a length.
        txt = []
        for text, images, sizes in zip(instructions, refs, ref_sizes, strict=True):
            cond_images = [resize(img, self.condition_image_size(img, s)) for img, s in zip(images, sizes, strict=True)]
            labels = "".join(PICTURE_LABEL.format(i + 1) for i in range(len(cond_images)))
            inputs = self.processor(
                text=[PROMPT_TEMPLATE.format(labels + text)], images=cond_images, padding=True, return_tensors="pt"
            ).to(self.device)
            out = self.text_encoder(
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                pixel_values=inputs.get("pixel_values"),
                image_grid_thw=inputs.get("image_grid_thw"),
                output_hidden_states=True,
                # Only hidden states are used: skip the logits over the 152k-word vocabulary for every
                # prompt token (diffusers computes and discards them; same hidden states, ~20x faster here).
                logits_to_keep=1,
            )
            hidden = out.hidden_states[-1][0][inputs["attention_mask"][0].bool()]  # (L_real, D_txt)
            txt.append(hidden[PROMPT_DROP_TOKENS:].to(self.dtype))
        return Conditioning(txt)

    def condition_image_size(self, img: Image.Image, self_size: Size) -> Size:
        """The size a reference is shown to the VL encoder at (see the module docstring)."""
        if self.condition_size == SELF_CONDITION:
            return Size(
                self_size.width * VL_PATCH_PIXELS // QWEN_MULTIPLE, self_size.height * VL_PATCH_PIXELS // QWEN_MULTIPLE
            )
        # diffusers' calculate_dimensions(condition_size, aspect), rounded to 32.
        aspect = img.width / img.height
        width = math.sqrt(int(self.condition_size) * aspect)
        return Size(
            max(QWEN_MULTIPLE, round(width / QWEN_MULTIPLE) * QWEN_MULTIPLE),
            max(QWEN_MULTIPLE, round(width / aspect / QWEN_MULTIPLE) * QWEN_MULTIPLE),
        )

    def velocity(self, batch: PackedBatch, cond: Conditioning, sigma: torch.Tensor) -> torch.Tensor:
        tokens = batch.tokens.unpack()  # per sample (L_i, D)
        groups: dict[tuple[tuple[int, int], ...], list[int]] = {}
        for i, seq in enumerate(batch.sequences):
            groups.setdefault(tuple(seq.grids), []).append(i)
        out: list[torch.Tensor | None] = [None] * len(tokens)
        for members in groups.values():
            preds = self._forward(
                torch.stack([tokens[i] for i in members]),
                [cond.txt[i] for i in members],
                sigma[members],
                batch.sequences[members[0]].img_shapes(),
            )
            for j, i in enumerate(members):
                out[i] = preds[j]
        return batch.pack_like(out)  # (R, C, D)

    # --- internals ----------------------------------------------------------------------------

    def _forward(
        self, hidden: torch.Tensor, txt: list[torch.Tensor], sigma: torch.Tensor, img_shapes: list[tuple[int, int, int]]
    ) -> torch.Tensor:
        """One transformer call for G samples with the same image grids: (G, L, D) -> (G, L, D)."""
        lens = [t.shape[0] for t in txt]
        width = max(lens)
        encoder = torch.stack([torch.cat([t, t.new_zeros(width - t.shape[0], t.shape[1])]) for t in txt])
        mask = None
        if min(lens) != width:  # diffusers drops an all-ones mask; keep that path for equal lengths
            mask = torch.stack([torch.arange(width) < n for n in lens]).to(self.device)
        return self.transformer(
            hidden_states=hidden.to(self.device, self.dtype),
            timestep=sigma.to(self.device, self.dtype),
            encoder_hidden_states=encoder.to(self.device, self.dtype),
            encoder_hidden_states_mask=mask,
            img_shapes=[img_shapes] * hidden.shape[0],
            return_dict=False,
        )[0]


def _make_processor(image_processor: Any, tokenizer: Any) -> Any:
    """A Qwen2-VL processor with only an image processor and a tokenizer (no video processor, so
    no torchvision)."""
    from transformers import Qwen2VLProcessor

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None, **kw: Any):
            super().__init__(image_processor, tokenizer, chat_template=chat_template, **kw)

    return ImageOnlyQwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer)


# --- loading ----------------------------------------------------------------------------------


def load_qwen_image_edit(
    folder: str | Path,
    *,
    dtype: str | torch.dtype = AUTO_DTYPE,
    device: str | torch.device | None = None,
    offload: str = "none",
    condition_size: int | str = CONDITION_IMAGE_SIZE,
    zero_cond_t: bool | None = None,
    name: str | None = None,
) -> QwenImageEdit:
    """Open a diffusers-format Qwen-Image-Edit folder; the variant (2509 or 2511) comes from the
    transformer config unless ``zero_cond_t`` forces it.

    ``dtype``: ``auto`` (bf16 on a CUDA device that has it, else fp32), a name (``bf16``, ``fp32``...) or
    a torch dtype, as :func:`uniref.models.base.resolve_dtype`;
    ``device``: ``cpu`` | ``cuda`` (default: cuda if available);
    ``offload``: ``none`` | ``model`` (one whole model on the device at a time) | ``sequential``
    (layer by layer), both through accelerate as diffusers does.
    """
    folder = Path(folder)
    if offload not in _OFFLOAD:
        raise ModelError(f"offload {offload!r}: expected one of {', '.join(_OFFLOAD)}")
    exec_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = resolve_dtype(dtype, exec_device)
    _check_folder(folder)

    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    overrides = {} if zero_cond_t is None else {"zero_cond_t": zero_cond_t}
    transformer, info = QwenImageTransformer2DModel.from_pretrained(
        folder / "transformer", torch_dtype=torch_dtype, output_loading_info=True, **overrides
    )
    _report_keys(folder / "transformer", info)
    vae, info = AutoencoderKLQwenImage.from_pretrained(
        folder / "vae", torch_dtype=torch_dtype, output_loading_info=True
    )
    _report_keys(folder / "vae", info)
    text_encoder, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        folder / "text_encoder", dtype=torch_dtype, output_loading_info=True
    )
    _report_keys(folder / "text_encoder", info)
    tokenizer = Qwen2Tokenizer.from_pretrained(folder / "tokenizer")
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(folder / "processor")
    modules = [text_encoder.eval(), transformer.eval(), vae.eval()]
    _place(modules, exec_device, offload)
    return QwenImageEdit(
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        image_processor=image_processor,
        schedule=_read_schedule(folder / "scheduler" / "scheduler_config.json"),
        condition_size=condition_size,
        name=name,
        execution_device=exec_device,
    )


def load_qwen_image_edit_2509(path: str | Path | None = None, **kwargs: Any) -> QwenImageEdit:
    """Qwen-Image-Edit-2509 from ``path`` (all tokens modulated with the step's timestep)."""
    return load_qwen_image_edit(_need_path(path, "qwen-image-edit-2509"), zero_cond_t=False, **kwargs)


def load_qwen_image_edit_2511(path: str | Path | None = None, **kwargs: Any) -> QwenImageEdit:
    """Qwen-Image-Edit-2511 from ``path`` (``zero_cond_t``: references modulated with timestep 0)."""
    return load_qwen_image_edit(_need_path(path, "qwen-image-edit-2511"), zero_cond_t=True, **kwargs)


def _need_path(path: str | Path | None, flavour: str) -> Path:
    if path is None:
        raise ModelError(
            f"{flavour}: weights cannot be downloaded here; pass the local diffusers folder (--model PATH)"
        )
    return Path(path)


def _check_folder(folder: Path) -> None:
    """Raise ModelError unless ``folder`` looks like a diffusers Qwen-Image-Edit(-Plus) folder."""
    index_path = folder / "model_index.json"
    try:
        index = json.loads(index_path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{folder}: no model_index.json; expected a diffusers-format Qwen-Image-Edit folder") from None
    except json.JSONDecodeError as exc:
        raise ModelError(f"{index_path}: not valid JSON ({exc})") from None
    pipeline = str(index.get("_class_name", ""))
    if not pipeline.startswith("QwenImageEdit"):
        raise ModelError(
            f"{folder}: model_index.json names {pipeline or 'no pipeline'!r}, not a Qwen-Image-Edit pipeline "
            "(QwenImageEditPlusPipeline for 2509/2511)"
        )
    missing = [
        sub
        for sub in ("transformer", "vae", "text_encoder", "tokenizer", "processor", "scheduler")
        if not (folder / sub).is_dir()
    ]
    if missing:
        raise ModelError(f"{folder}: missing component folder(s) {', '.join(missing)}")
    config = json.loads((folder / "transformer" / "config.json").read_text())
    if config.get("_class_name") != "QwenImageTransformer2DModel":
        raise ModelError(
            f"{folder / 'transformer' / 'config.json'}: transformer is {config.get('_class_name')!r}, "
            "expected QwenImageTransformer2DModel"
        )


def _report_keys(where: Path, info: dict[str, Any]) -> None:
    """Weights the checkpoint lacks are an error (they would be left uninitialised: garbage
    output, or meta tensors that cannot run); weights it has in excess are ignored with a warning."""
    missing = list(info.get("missing_keys") or [])
    if missing:
        raise ModelError(
            f"{where}: checkpoint lacks {len(missing)} weight(s): {_some(missing)}; is it a complete model?"
        )
    unexpected = list(info.get("unexpected_keys") or [])
    if unexpected:
        log.warning("%s: %d unexpected weight(s) ignored: %s", where, len(unexpected), _some(unexpected))


def _some(keys: list[str], shown: int = 5) -> str:
    return ", ".join(keys[:shown]) + (f" … (+{len(keys) - shown})" if len(keys) > shown else "")


def _read_schedule(path: Path) -> ScheduleSpec:
    """ScheduleSpec from a FlowMatchEulerDiscreteScheduler config (its defaults where a key is absent)."""
    if not path.is_file():
        return ScheduleSpec()
    cfg = json.loads(path.read_text())
    if cfg.get("time_shift_type", "exponential") != "exponential":
        raise ModelError(f"{path}: time_shift_type {cfg['time_shift_type']!r} is not supported (exponential only)")
    # Absent keys take diffusers' FlowMatchEulerDiscreteScheduler defaults, not Qwen-Image's.
    return ScheduleSpec(
        dynamic_shift=bool(cfg.get("use_dynamic_shifting", False)),
        base_seq_len=int(cfg.get("base_image_seq_len", 256)),
        max_seq_len=int(cfg.get("max_image_seq_len", 4096)),
        base_shift=float(cfg.get("base_shift", 0.5)),
        max_shift=float(cfg.get("max_shift", 1.15)),
        shift=float(cfg.get("shift", 1.0)),
        shift_terminal=cfg.get("shift_terminal"),
    )


def _place(modules: list[torch.nn.Module], device: torch.device, offload: str) -> None:
    """Move models to ``device``, or attach accelerate's CPU-offload hooks in pipeline order."""
    if offload == "none" or device.type == "cpu":
        for m in modules:
            m.to(device)
        return
    from accelerate import cpu_offload, cpu_offload_with_hook

    hook = None
    for m in modules:
        if offload == "sequential":
            cpu_offload(m, execution_device=device)
        else:
            _, hook = cpu_offload_with_hook(m, device, prev_module_hook=hook)
