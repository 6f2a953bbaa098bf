"""Tiny random Qwen-Image-Edit components, built fully offline, and a diffusers-format folder of them.

The shapes follow diffusers' own test (``tests/pipelines/qwenimage/test_qwenimage_edit_plus.py::
get_dummy_components``); the tokenizer and processor, which that test downloads, are built here: a
byte-level ``Qwen2Tokenizer`` with Qwen's special tokens at their real ids, and a processor with the
PIL image processor (no torchvision). Used by the parity tests and the benchmarks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

# Qwen2.5-VL's special tokens and their ids in the real vocabulary (tokenizer_config.json).
QWEN_SPECIAL_TOKENS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
}
# Qwen2.5-VL's embedding table size (config.json of Qwen2.5-VL-7B-Instruct).
QWEN_VOCAB_SIZE = 152064
# Qwen-Image's scheduler/scheduler_config.json.
QWEN_SCHEDULER_CONFIG: dict[str, Any] = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}
TINY_Z_DIM = 4


def byte_level_tokenizer() -> Any:
    """A Qwen2Tokenizer over the 256 byte symbols (no merges) plus Qwen's special tokens."""
    from transformers import Qwen2Tokenizer

    vocab = {ch: i for i, ch in enumerate(_byte_symbols())}
    vocab.update(QWEN_SPECIAL_TOKENS)
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tok.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS)})
    return tok


def _byte_symbols() -> list[str]:
    """The 256 symbols byte-level BPE uses for bytes 0..255 (GPT-2's scheme): printable Latin-1
    bytes stand for themselves, the others are shifted to code points 256 and up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = [], 0
    for b in range(256):
        if b in printable:
            symbols.append(chr(b))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


def tiny_image_processor() -> Any:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil()


def build_components(zero_cond_t: bool = False, seed: int = 0) -> dict[str, Any]:
    """Tiny random transformer, VAE, Qwen2.5-VL text encoder, tokenizer, image processor, scheduler."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=3,
        joint_attention_dim=16,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
        zero_cond_t=zero_cond_t,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(
        base_dim=TINY_Z_DIM * 6,
        z_dim=TINY_Z_DIM,
        dim_mult=[1, 2, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        # Not diffusers' 0/1: non-trivial statistics so the test checks the normalisation too.
        latents_mean=[0.1, -0.2, 0.05, 0.0],
        latents_std=[1.5, 0.8, 1.0, 1.2],
    )
    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
            "vocab_size": QWEN_VOCAB_SIZE,
        },
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=16,
        vocab_size=QWEN_VOCAB_SIZE,
        vision_start_token_id=QWEN_SPECIAL_TOKENS["<|vision_start|>"],
        vision_end_token_id=QWEN_SPECIAL_TOKENS["<|vision_end|>"],
        vision_token_id=QWEN_SPECIAL_TOKENS["<|vision_pad|>"],
        image_token_id=QWEN_SPECIAL_TOKENS["<|image_pad|>"],
        video_token_id=QWEN_SPECIAL_TOKENS["<|video_pad|>"],
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    return {
        "transformer": transformer.eval(),
        "vae": vae.eval(),
        "scheduler": FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER_CONFIG),
        "text_encoder": text_encoder,
        "tokenizer": byte_level_tokenizer(),
        "image_processor": tiny_image_processor(),
    }


def save_folder(components: dict[str, Any], folder: str | Path) -> Path:
    """Write ``components`` as a diffusers-format Qwen-Image-Edit-2509 folder (model_index.json
    naming ``Qwen2VLProcessor``, as the real one does)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("transformer", "vae", "text_encoder", "scheduler", "tokenizer"):
        components[name].save_pretrained(folder / name)
    components["tokenizer"].save_pretrained(folder / "processor")
    components["image_processor"].save_pretrained(folder / "processor")
    index = {
        "_class_name": "QwenImageEditPlusPipeline",
        "_diffusers_version": "0.42.1",
        "processor": ["transformers", "Qwen2VLProcessor"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "transformer": ["diffusers", "QwenImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLQwenImage"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def diffusers_processor(components: dict[str, Any]) -> Any:
    """The processor as diffusers' own tests build it: a ``Qwen2VLProcessor`` over the image processor
    and tokenizer (theirs is ``from_pretrained`` of a Hub folder). Built here, not by our loader's
    ``_make_processor``, so the reference side shares none of our code. The only change is that the
    subclass declares no video processor: the real one needs torchvision and never sees an image."""
    from transformers import Qwen2VLProcessor

    class NoVideo(Qwen2VLProcessor):
        # ProcessorMixin builds (and type-checks) the attributes __init__ declares.
        def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None, **kw: Any):
            super().__init__(image_processor, tokenizer, chat_template=chat_template, **kw)

    return NoVideo(components["image_processor"], components["tokenizer"])


def diffusers_pipeline(components: dict[str, Any]) -> Any:
    """diffusers' own ``QwenImageEditPlusPipeline`` over ``components``, progress bar off."""
    from diffusers import QwenImageEditPlusPipeline

    pipe = QwenImageEditPlusPipeline(
        scheduler=components["scheduler"],
        vae=components["vae"],
        text_encoder=components["text_encoder"],
        tokenizer=components["tokenizer"],
        processor=diffusers_processor(components),
        transformer=components["transformer"],
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
