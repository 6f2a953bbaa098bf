"""Tiny random Qwen-Image-2.1 components, built fully offline, and a diffusers-format folder of them.

The real model (diffusers 0.42.1 ``QwenImage21Pipeline``) is a 32-block single-stream
``QwenImage21Transformer2DModel``, the 64-channel 16x ``AutoencoderKLQwenImage21`` and a Qwen3-VL
encoder. Here every part keeps the real geometry (16x VAE, unpatched latent tokens, 16-px vision
patches merged 2x2 so one vision slot is 2x2 latent tokens) at toy widths. The tokenizer is
``qwen_tiny``'s byte-level one; the processor is a Qwen3-VL processor with only the PIL image
processor (no torchvision) and a chat template that renders a system message as the real one does.
Used by the 2.1 parity tests and ``benchmarks.device_check --smoke``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from qwen_tiny import QWEN_SPECIAL_TOKENS, byte_level_tokenizer

# Qwen3-VL's embedding table size (config.json of Qwen3-VL-8B-Instruct).
QWEN3_VOCAB_SIZE = 151936
TINY_Z_DIM = 8
TINY_TEXT_DIM = 16
# diffusers' FlowMatchEulerDiscreteScheduler with dynamic shifting (the keys a 2.1 folder sets).
QWEN21_SCHEDULER_CONFIG: dict[str, Any] = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": None,
    "time_shift_type": "exponential",
    "use_dynamic_shifting": True,
}
# Qwen3-VL's chat template reduced to what the pipeline renders: messages whose content is a list of
# text parts, each as "<|im_start|>{role}\n{text}<|im_end|>\n" (no generation prompt).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for part in message['content'] %}{{ part['text'] }}{% endfor %}<|im_end|>\n{% endfor %}"
)
# Vision patches of 16 px merged 2x2, as Qwen3-VL; small pixel bounds so tiny images are not resized.
VISION_PATCH = 16
PROCESSOR_SIZE = {"shortest_edge": 32 * 32, "longest_edge": 2048 * 2048}


def tiny_image_processor() -> Any:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(patch_size=VISION_PATCH, merge_size=2, size=dict(PROCESSOR_SIZE))


def build_components(seed: int = 0, causal_condition: bool = True) -> dict[str, Any]:
    """Tiny random transformer, VAE, Qwen3-VL encoder, tokenizer, image processor and scheduler."""
    from diffusers import AutoencoderKLQwenImage21, FlowMatchEulerDiscreteScheduler, QwenImage21Transformer2DModel
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    transformer = QwenImage21Transformer2DModel(
        patch_size=1,
        in_channels=TINY_Z_DIM,
        out_channels=TINY_Z_DIM,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        context_in_dim=TINY_TEXT_DIM,
        mlp_ratio=2,
        axes_dims_rope=(4, 6, 6),
        causal_condition=causal_condition,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage21(
        base_dim=8,
        decoder_base_dim=8,
        z_dim=TINY_Z_DIM,
        dim_mult=[1, 1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True, True],
        # Not the identity: non-trivial statistics so the tests check the normalisation too.
        latents_mean=[0.1 * (i - 3) for i in range(TINY_Z_DIM)],
        latents_std=[0.8 + 0.1 * i for i in range(TINY_Z_DIM)],
    )
    torch.manual_seed(seed)
    config = Qwen3VLConfig(
        text_config={
            "hidden_size": TINY_TEXT_DIM,
            "intermediate_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [1, 1, 2]},
            "vocab_size": QWEN3_VOCAB_SIZE,
        },
        vision_config={
            "depth": 2,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 2,
            "out_hidden_size": TINY_TEXT_DIM,
            "patch_size": VISION_PATCH,
            "spatial_merge_size": 2,
            "num_position_embeddings": 16,
            "deepstack_visual_indexes": [1],
        },
        image_token_id=QWEN_SPECIAL_TOKENS["<|image_pad|>"],
        video_token_id=QWEN_SPECIAL_TOKENS["<|video_pad|>"],
        vision_start_token_id=QWEN_SPECIAL_TOKENS["<|vision_start|>"],
        vision_end_token_id=QWEN_SPECIAL_TOKENS["<|vision_end|>"],
    )
    text_encoder = Qwen3VLForConditionalGeneration(config).eval()
    tokenizer = byte_level_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return {
        "transformer": transformer.eval(),
        "vae": vae.eval(),
        "scheduler": FlowMatchEulerDiscreteScheduler(**QWEN21_SCHEDULER_CONFIG),
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "image_processor": tiny_image_processor(),
    }


def save_folder(components: dict[str, Any], folder: str | Path) -> Path:
    """Write ``components`` as a diffusers-format Qwen-Image-2.1 folder: ``model_index.json`` names
    ``Qwen3VLProcessor`` (which needs torchvision for its video processor), as a real folder does."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("transformer", "vae", "text_encoder", "scheduler"):
        components[name].save_pretrained(folder / name)
    components["tokenizer"].save_pretrained(folder / "processor")
    components["image_processor"].save_pretrained(folder / "processor")
    (folder / "processor" / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    index = {
        "_class_name": "QwenImage21Pipeline",
        "_diffusers_version": "0.42.1",
        "processor": ["transformers", "Qwen3VLProcessor"],
        "sample_sigmas": None,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen3VLForConditionalGeneration"],
        "transformer": ["diffusers", "QwenImage21Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLQwenImage21"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def diffusers_processor(components: dict[str, Any]) -> Any:
    """The processor the way diffusers' own tests build one: ``Qwen3VLProcessor(image_processor,
    tokenizer, video_processor)``, with a stand-in video processor (the real one needs torchvision
    and is never called for images)."""
    from transformers import Qwen3VLProcessor

    class NoVideo(Qwen3VLProcessor):
        # ProcessorMixin checks every declared attribute's type; declare only the two that exist.
        def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None, **kw: Any):
            super().__init__(image_processor, tokenizer, chat_template=chat_template, **kw)

    return NoVideo(components["image_processor"], components["tokenizer"], chat_template=CHAT_TEMPLATE)


def diffusers_pipeline(components: dict[str, Any]) -> Any:
    """diffusers' own ``QwenImage21Pipeline`` over ``components``, progress bar off."""
    from diffusers import QwenImage21Pipeline

    pipe = QwenImage21Pipeline(
        scheduler=components["scheduler"],
        vae=components["vae"],
        text_encoder=components["text_encoder"],
        processor=diffusers_processor(components),
        transformer=components["transformer"],
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
