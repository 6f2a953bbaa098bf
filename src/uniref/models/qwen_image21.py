"""Qwen-Image-2.1 behind :class:`EditModel`, from a local diffusers-format folder.

Components (diffusers 0.42.1): the single-stream ``QwenImage21Transformer2DModel``, the 16x
``AutoencoderKLQwenImage21`` (64 channels; one latent cell is one token, no 2x2 patching) and a
Qwen3-VL encoder. The processor is rebuilt from the folder's ``processor/`` with the PIL image
processor, because the ``Qwen3VLProcessor`` that ``model_index.json`` names builds a video processor
that needs torchvision (shared/DESIGN.md §6).

How 2.1 differs from Qwen-Image-Edit, as diffusers' ``QwenImage21Pipeline`` runs it:

* Each reference is shown to the VL encoder at the *same* size as to the VAE, after an
  ``<image{i}><|vision_start|><|image_pad|><|vision_end|>`` label; one merged vision slot (32 px)
  stands for 2x2 latent tokens, and the transformer writes the reference's latent tokens into those
  slots of the text stream. The target's tokens are appended after the text. So the joint sequence
  is ``[text ... ref 1 ... text ... ref K ... prompt | target]``; our SELF stream (target first) is
  reordered into it here, and only the target's velocity is returned (references get zeros).
* ``causal_condition``: text and reference tokens are modulated from t = 0 and never attend to the
  target, so their keys and values are the same at every step. Inside :meth:`condition_cache` (the
  sampler's loop) the first call of a request fills a ``QwenImage21KVCache`` and later calls only
  compute the target's tokens. Outside it (training, log-probs) every call is a full forward.
* True CFG is plain ``u + s·(c − u)``, without Qwen-Image-Edit's norm rescale (``cfg_norm_rescale``).

Sizes: modes ``per_image`` (diffusers: every reference at ``output_resolution``², rounded to 32) and
``global`` (SELF: all references under one budget) both come from :mod:`uniref.budget` with the
multiple 32 the VL slots need.

Batched velocity: the transformer takes one layout (``img_mask`` row 0) per call, and text positions
advance with every text token, padding included, so samples are grouped by identical layout (image
grids, text length and slot positions); each group is one call, and a lone sample is exactly
diffusers' batch-1 call.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from uniref.budget import QWEN_MULTIPLE, Size
from uniref.errors import ModelError
from uniref.images import resize
from uniref.models.base import AUTO_DTYPE, Conditioning, LatentSpec, ScheduleSpec, resolve_dtype
from uniref.models.qwen_image import DiffusersAdapter, _need_path, _place, _read_schedule, _report_keys
from uniref.sequence import PackedBatch

log = logging.getLogger(__name__)

NAME = "qwen-image-2.1"
# diffusers' QwenImage21Pipeline: system prompt, per-reference label and user template.
SYSTEM_PROMPT = "Comprehend and analyze the provided prompt."
IMAGE_LABEL = "<image{}><|vision_start|><|image_pad|><|vision_end|>"
PROMPT_TEMPLATE = (
    f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{{}}<|im_end|>\n<|im_start|>assistant\n"
)
IMAGE_PAD = "<|image_pad|>"
# The pipeline's output_resolution default (1024): each reference's and the output's pixel budget.
OUTPUT_RESOLUTION = 1024
# One VL slot is a 2x2 group of latent tokens (diffusers' _IMG_TOKENS_PER_SLOT).
TOKENS_PER_SLOT = 4
# The VAE compresses 16x and the transformer reads latents unpatched (pipeline's vae_scale_factor).
VAE_SCALE = 16
# Model card sampling defaults (pipeline: num_inference_steps=40, true_cfg_scale=1.0).
DEFAULT_STEPS = 40
DEFAULT_GUIDANCE = 1.0


class QwenImage21(DiffusersAdapter):
    """Qwen-Image-2.1 adapter (see the module docstring)."""

    name = NAME
    default_steps = DEFAULT_STEPS
    default_guidance = DEFAULT_GUIDANCE
    #: diffusers' QwenImage21Pipeline guides without rescaling to the conditional norm.
    cfg_norm_rescale = False

    def __init__(
        self,
        *,
        transformer: Any,
        vae: Any,
        text_encoder: Any,
        tokenizer: Any,
        image_processor: Any,
        chat_template: str | None = None,
        schedule: ScheduleSpec | None = None,
        kv_cache: bool = True,
        execution_device: torch.device | None = None,
    ) -> None:
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.processor = make_processor(image_processor, tokenizer, chat_template)
        self.kv_cache = kv_cache  # use the condition cache inside condition_cache() (sampling)
        self._device = execution_device
        config = transformer.config
        self._causal = bool(config.causal_condition)
        self._num_blocks = int(config.num_layers)
        self._init_vae_stats(vae)
        self._image_token_id = self.processor.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        self._drop = _system_token_count(self.processor)
        self._caches: dict[tuple[int, ...], _GroupCache] | None = None  # set inside condition_cache()
        self.spec = LatentSpec(
            latent_channels=vae.config.z_dim,
            vae_scale=VAE_SCALE,
            patch_size=config.patch_size,
            plan_multiple=QWEN_MULTIPLE,  # one merged VL slot: 2 latent cells of 16 px
            ref_budget=OUTPUT_RESOLUTION**2,
            target_budget=OUTPUT_RESOLUTION**2,
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
        """Per sample (L_txt, D_txt + 1): the VL encoder's hidden states after the system prompt, and a
        last column that is 1 at the reference slots (kept in the tensor so it survives every copy of
        a :class:`Conditioning`, the training disk cache included)."""
        txt = []
        for text, images, sizes in zip(instructions, refs, ref_sizes, strict=True):
            shown = [resize(img.convert("RGB"), s) for img, s in zip(images, sizes, strict=True)]
            labels = " ".join(IMAGE_LABEL.format(i + 1) for i in range(len(shown)))
            inputs = self.processor(
                text=[PROMPT_TEMPLATE.format(labels + (text or " "))],
                images=shown or None,
                padding=True,
                padding_side="left",
                return_tensors="pt",
                **_no_resize_kwargs(self.processor.image_processor, sizes),
            ).to(self.device)
            self._check_slots(inputs, sizes)
            kwargs = {k: inputs[k] for k in ("pixel_values", "image_grid_thw", "mm_token_type_ids") if k in inputs}
            hidden = self._last_hidden(inputs["input_ids"], inputs["attention_mask"], kwargs)
            real = inputs["attention_mask"][0].bool()
            slots = (inputs["input_ids"][0][real] == self._image_token_id)[self._drop :]
            states = hidden[0][real][self._drop :]  # (L_txt, D_txt)
            txt.append(torch.cat([states, slots[:, None].to(states.dtype)], dim=1).to(self.dtype))
        return Conditioning(txt)

    def velocity(self, batch: PackedBatch, cond: Conditioning, sigma: torch.Tensor) -> torch.Tensor:
        tokens = batch.tokens.unpack()  # per sample (L_i, D): [target | ref 1 .. ref K]
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, seq in enumerate(batch.sequences):
            txt = cond.txt[i]
            layout = (tuple(seq.grids), txt.shape[0], tuple(txt[:, -1].bool().tolist()))
            groups.setdefault(layout, []).append(i)
        out: list[torch.Tensor | None] = [None] * len(tokens)
        for members in groups.values():
            seq = batch.sequences[members[0]]
            n_target = seq.num_target_tokens
            # (G, L_refs + L_target, D) in the transformer's order: references first, target last.
            hidden = torch.stack([torch.cat([tokens[i][n_target:], tokens[i][:n_target]]) for i in members])
            txt = torch.stack([cond.txt[i] for i in members])  # (G, L_txt, D_txt + 1)
            shapes = [(1, h, w) for h, w in seq.grids[1:]] + [(1, *seq.grids[0])]
            pred = self._forward(hidden, txt, sigma[members], shapes, members, [cond.txt[i] for i in members])
            for j, i in enumerate(members):
                out[i] = torch.cat([pred[j], pred.new_zeros(tokens[i].shape[0] - n_target, pred.shape[-1])])
        return batch.pack_like(out)  # (R, C, D)

    # --- condition cache ----------------------------------------------------------------------

    @contextlib.contextmanager
    def condition_cache(self) -> Iterator[None]:
        """Within this block (one sampling loop), each group of requests computes its text and
        reference keys/values once, at its first call, and reuses them; they are freed at exit.
        Only used without gradients, with ``kv_cache`` on and a ``causal_condition`` transformer."""
        previous, self._caches = self._caches, {}
        try:
            yield
        finally:
            self._caches = previous

    def _cache_for(self, txts: list[torch.Tensor], refs: torch.Tensor) -> tuple[Any, str | None]:
        """(QwenImage21KVCache, mode) for one group's call, or (None, None) for a plain forward."""
        if self._caches is None or not (self.kv_cache and self._causal) or torch.is_grad_enabled():
            return None, None
        key = tuple(id(t) for t in txts)
        entry = self._caches.get(key)
        if entry is not None and entry.refs.shape == refs.shape and torch.equal(entry.refs, refs):
            return entry.cache, "cached"
        from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache

        # The entry keeps the txt tensors alive, so their ids cannot be reused while it exists.
        self._caches[key] = _GroupCache(QwenImage21KVCache(self._num_blocks), refs.clone(), txts)
        return self._caches[key].cache, "extract"

    # --- internals ----------------------------------------------------------------------------

    def _forward(
        self,
        hidden: torch.Tensor,
        txt: torch.Tensor,
        sigma: torch.Tensor,
        img_shapes: list[tuple[int, int, int]],
        members: list[int],
        txts: list[torch.Tensor],
    ) -> torch.Tensor:
        """One transformer call for G samples of one layout: (G, L_img, D) -> target (G, L_target, D)."""
        n_target = img_shapes[-1][1] * img_shapes[-1][2]
        slots = txt[:, :, -1].bool()  # (G, L_txt)
        img_mask = torch.cat([slots, slots.new_ones(slots.shape[0], n_target // TOKENS_PER_SLOT)], dim=1)
        cache, mode = self._cache_for(txts, hidden[:, :-n_target])
        # diffusers feeds timestep t/1000 with t = σ·1000 from its scheduler; reproduce the rounding.
        timestep = (sigma.to(torch.float32) * 1000).to(self.dtype) / 1000
        pred = self.transformer(
            hidden_states=hidden.to(self.device, self.dtype),
            encoder_hidden_states=txt[:, :, :-1].to(self.device, self.dtype),
            timestep=timestep.to(self.device),
            img_shapes=[img_shapes] * hidden.shape[0],
            img_mask=img_mask.to(self.device),
            kv_cache=cache,
            kv_cache_mode=mode,
            return_dict=False,
        )[0]
        return pred[:, -n_target:]

    def _last_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, kwargs: dict[str, Any]) -> Any:
        """The last decoder layer's output *before* the final RMSNorm, which the transformer was
        trained on (transformers 5 returns it normalised; diffusers neutralises the norm with a hook)."""
        inner = self.text_encoder.model
        text_model = getattr(inner, "language_model", inner)
        handle = text_model.norm.register_forward_hook(lambda module, args, output: args[0])
        try:
            out = self.text_encoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                output_hidden_states=True,
                logits_to_keep=1,  # hidden states only: skip the vocabulary projection of every token
                **kwargs,
            )
        finally:
            handle.remove()
        return out.hidden_states[-1]

    def _check_slots(self, inputs: Any, sizes: Sequence[Size]) -> None:
        """The VL encoder must give each reference exactly one slot per 2x2 latent tokens."""
        grids = inputs.get("image_grid_thw")
        merge = self.processor.image_processor.merge_size
        for i, s in enumerate(sizes):
            want = (s.height // VAE_SCALE) * (s.width // VAE_SCALE) // TOKENS_PER_SLOT
            got = int(grids[i].prod()) // merge**2 if grids is not None else 0
            if got != want:
                raise ModelError(
                    f"{NAME}: reference {i + 1} at {s.width}x{s.height} gave {got} vision slots, expected {want}; "
                    f"the processor's patch_size x merge_size must be {VAE_SCALE * 2} px"
                )


@dataclass
class _GroupCache:
    cache: Any  # diffusers' QwenImage21KVCache
    refs: torch.Tensor  # (G, L_refs, D) the reference tokens it was computed from
    txts: list[torch.Tensor]  # the conditioning tensors it belongs to (kept alive, see _cache_for)


def _no_resize_kwargs(image_processor: Any, sizes: Sequence[Size]) -> dict[str, Any]:
    """Pixel bounds wide enough that the VL processor keeps our planned sizes (multiples of 32)
    instead of resizing a small SELF reference up (slots would no longer match the latents)."""
    if not sizes:
        return {}
    bounds = dict(image_processor.size)
    areas = [s.width * s.height for s in sizes]
    lo, hi = bounds.get("shortest_edge", min(areas)), bounds.get("longest_edge", max(areas))
    return {"size": {"shortest_edge": min(lo, min(areas)), "longest_edge": max(hi, max(areas))}}


def _system_token_count(processor: Any) -> int:
    """Tokens of the rendered system message, dropped from the hidden states (as diffusers)."""
    message = [{"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]}]
    if not getattr(processor, "chat_template", None):
        raise ModelError(f"{NAME}: the processor has no chat template (processor/chat_template.jinja)")
    return len(processor.apply_chat_template(message, tokenize=True, return_dict=False)[0])


def make_processor(image_processor: Any, tokenizer: Any, chat_template: str | None = None) -> Any:
    """A Qwen3-VL processor with only an image processor and a tokenizer (no video processor, so no
    torchvision)."""
    from transformers import Qwen3VLProcessor

    class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
        # ProcessorMixin builds the attributes its __init__ declares; declare only these two.
        def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None, **kw: Any):
            super().__init__(image_processor, tokenizer, chat_template=chat_template, **kw)

    template = chat_template or getattr(tokenizer, "chat_template", None)
    return ImageOnlyQwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=template)


# --- loading ----------------------------------------------------------------------------------

_COMPONENTS = ("transformer", "vae", "text_encoder", "processor", "scheduler")


def load_qwen_image_21(
    folder: str | Path | None = None,
    *,
    path: str | Path | None = None,
    dtype: str | torch.dtype = AUTO_DTYPE,
    device: str | torch.device | None = None,
    offload: str = "none",
    kv_cache: bool = True,
) -> QwenImage21:
    """Open a diffusers-format Qwen-Image-2.1 folder.

    ``dtype``: ``auto`` (bf16 on a CUDA device that supports it, else fp32), a name or a torch dtype
    (:func:`uniref.models.base.resolve_dtype`);
    ``device``: default cuda if available; ``offload``: ``none`` | ``model`` | ``sequential`` (as
    :func:`uniref.models.qwen_image.load_qwen_image_edit`); ``kv_cache``: reuse the condition keys and
    values across sampler steps.
    """
    folder = _need_path(folder if folder is not None else path, NAME)
    exec_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = resolve_dtype(dtype, exec_device)
    _check_folder(folder)

    from diffusers import AutoencoderKLQwenImage21, QwenImage21Transformer2DModel
    from transformers import Qwen2Tokenizer, Qwen3VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    transformer, info = QwenImage21Transformer2DModel.from_pretrained(
        folder / "transformer", torch_dtype=torch_dtype, output_loading_info=True
    )
    _report_keys(folder / "transformer", info)
    vae, info = AutoencoderKLQwenImage21.from_pretrained(
        folder / "vae", torch_dtype=torch_dtype, output_loading_info=True
    )
    _report_keys(folder / "vae", info)
    text_encoder, info = Qwen3VLForConditionalGeneration.from_pretrained(
        folder / "text_encoder", dtype=torch_dtype, output_loading_info=True
    )
    _report_keys(folder / "text_encoder", info)
    tokenizer = Qwen2Tokenizer.from_pretrained(folder / "processor")
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(folder / "processor")
    _place([text_encoder.eval(), transformer.eval(), vae.eval()], exec_device, offload)
    return QwenImage21(
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        image_processor=image_processor,
        chat_template=_read_chat_template(folder / "processor"),
        schedule=_read_schedule(folder / "scheduler" / "scheduler_config.json"),
        kv_cache=kv_cache,
        execution_device=exec_device,
    )


def _check_folder(folder: Path) -> None:
    """Raise ModelError unless ``folder`` looks like a diffusers Qwen-Image-2.1 folder."""
    index_path = folder / "model_index.json"
    try:
        index = json.loads(index_path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{folder}: no model_index.json; expected a diffusers-format Qwen-Image-2.1 folder") from None
    except json.JSONDecodeError as exc:
        raise ModelError(f"{index_path}: not valid JSON ({exc})") from None
    pipeline = str(index.get("_class_name", ""))
    if not pipeline.startswith("QwenImage21"):
        raise ModelError(
            f"{folder}: model_index.json names {pipeline or 'no pipeline'!r}, not QwenImage21Pipeline (Qwen-Image-2.1)"
        )
    if index.get("sample_sigmas"):
        # The pipeline would sample on this fixed grid instead of linspace(1, 1/N, N); not reproduced yet.
        raise ModelError(f"{index_path}: sample_sigmas is set; custom sigma grids are not supported yet")
    missing = [sub for sub in _COMPONENTS if not (folder / sub).is_dir()]
    if missing:
        raise ModelError(f"{folder}: missing component folder(s) {', '.join(missing)}")
    config = json.loads((folder / "transformer" / "config.json").read_text())
    if config.get("_class_name") != "QwenImage21Transformer2DModel":
        raise ModelError(
            f"{folder / 'transformer' / 'config.json'}: transformer is {config.get('_class_name')!r}, "
            "expected QwenImage21Transformer2DModel"
        )


def _read_chat_template(processor_dir: Path) -> str | None:
    """The processor's chat template: ``chat_template.jinja`` (transformers 5) or the older
    ``chat_template.json``; None leaves the tokenizer's own."""
    jinja = processor_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    legacy = processor_dir / "chat_template.json"
    if legacy.is_file():
        return json.loads(legacy.read_text()).get("chat_template")
    return None
