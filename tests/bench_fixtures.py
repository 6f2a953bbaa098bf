"""Benchmarks in their published on-disk formats, made by the tests, and a scripted judge on 127.0.0.1."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image

Handler = Callable[[str, int, dict[str, Any]], tuple[int, str]]  # (prompt text, images shown, body) -> reply


def colour(rgb: tuple[int, int, int], size: tuple[int, int] = (40, 32)) -> Image.Image:
    return Image.new("RGB", size, rgb)


RED, GREEN, BLUE, WHITE = (200, 30, 30), (30, 180, 60), (40, 60, 200), (240, 240, 240)


class ScriptedJudge:
    """``/v1/chat/completions`` answering ``handler(prompt text, number of images, body)``; counts calls."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.lock = threading.Lock()
        self.prompts: list[str] = []
        self.app = FastAPI()

        @self.app.post("/v1/chat/completions")
        async def complete(request: Request) -> JSONResponse:
            body = await request.json()
            parts = body["messages"][1]["content"]
            text = parts[-1]["text"]
            images = sum(p["type"] == "image_url" for p in parts)
            with self.lock:
                self.prompts.append(text)
            status, content = self.handler(text, images, body)
            if status != 200:
                return JSONResponse({"error": content}, status_code=status)
            return JSONResponse({"choices": [{"message": {"role": "assistant", "content": content}}]})

    @property
    def calls(self) -> int:
        return len(self.prompts)


def reply(*scores: float, reason: str = "scripted") -> tuple[int, str]:
    score: Any = scores[0] if len(scores) == 1 else list(scores)
    return 200, json.dumps({"score": score, "reasoning": reason})


# --- OmniContext: a save_to_disk folder ---------------------------------------------------------------

OMNI_ROWS = [  # key, task_type, language, instruction, K
    ("o1", "single_object", "en", "put the cup from image 1 on a table", 1),
    ("o2", "single_object", "en", "show the lamp from image 1 at night", 1),
    ("o3", "scene_object", "en", "place the vase from image 1 in the room of image 2", 2),
    ("o4", "scene_object", "cn", "把图1的花瓶放进图2的房间", 2),
]


def write_omnicontext(folder: Path) -> Path:
    import datasets

    rows = {"key": [], "task_type": [], "instruction": [], "instruction_language": [], "input_images": []}
    for key, task, lang, instruction, k in OMNI_ROWS:
        rows["key"].append(key)
        rows["task_type"].append(task)
        rows["instruction"].append(instruction)
        rows["instruction_language"].append(lang)
        rows["input_images"].append([colour(RED), colour(BLUE, (48, 32))][:k])
    features = datasets.Features(
        {
            "key": datasets.Value("string"),
            "task_type": datasets.Value("string"),
            "instruction": datasets.Value("string"),
            "instruction_language": datasets.Value("string"),
            "input_images": datasets.Sequence(datasets.Image()),
        }
    )
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(folder))
    return folder


# --- GEdit-Bench: parquet ------------------------------------------------------------------------------

GEDIT_ROWS = [  # key, task_type, language, instruction, intersection
    ("g1", "color_alter", "en", "make the car red", True),
    ("g2", "color_alter", "en", "make the sky green", False),
    ("g3", "subject-add", "en", "add a dog", True),
    ("g1", "color_alter", "cn", "把车变成红色", True),
]


def write_gedit(folder: Path) -> Path:
    import datasets

    rows: dict[str, list[Any]] = {
        "task_type": [],
        "key": [],
        "instruction": [],
        "instruction_language": [],
        "input_image": [],
        "input_image_raw": [],
        "Intersection_exist": [],
    }
    for key, task, lang, instruction, inter in GEDIT_ROWS:
        for name, value in (
            ("task_type", task),
            ("key", key),
            ("instruction", instruction),
            ("instruction_language", lang),
            ("Intersection_exist", inter),
        ):
            rows[name].append(value)
        rows["input_image"].append(colour(GREEN))
        rows["input_image_raw"].append(colour(GREEN, (80, 64)))
    features = datasets.Features(
        {
            "task_type": datasets.Value("string"),
            "key": datasets.Value("string"),
            "instruction": datasets.Value("string"),
            "instruction_language": datasets.Value("string"),
            "input_image": datasets.Image(),
            "input_image_raw": datasets.Image(),
            "Intersection_exist": datasets.Value("bool"),
        }
    )
    folder.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(folder / "train-00000-of-00001.parquet"))
    return folder


# --- MICo-Bench: JSONL per task + images + weights -----------------------------------------------------


def write_mico(folder: Path) -> Path:
    for task, sub, rows in (
        ("HOI", "mico_bench_hoi", [(0, "the man from image 1 holds the cup from image 2", 2)]),
        ("DeRe", "mico_bench_dere", [(2, "the dog from image 1 beside the cat from image 2 in image 3", 3)]),
    ):
        lines = []
        for idx, prompt, k in rows:
            case = folder / sub / str(idx)
            case.mkdir(parents=True, exist_ok=True)
            inputs = []
            for i in range(k):
                colour([RED, GREEN, BLUE][i]).save(case / f"{i}.png")
                inputs.append(f"{sub}/{idx}/{i}.png")
            colour(WHITE).save(case / "reference.png")
            row = {
                "Task": task,
                "input": inputs,
                "reference": f"{sub}/{idx}/reference.png",
                "prompt": prompt,
                "human_indices": [0],
            }
            row |= {"ed_idx": idx, "refined_prompt": prompt + ", photorealistic"} if task == "DeRe" else {"idx": idx}
            lines.append(json.dumps(row))
        (folder / f"{sub}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "weights").mkdir(parents=True, exist_ok=True)
    (folder / "weights" / "HOI.json").write_text(json.dumps({"0": 0.5}), encoding="utf-8")  # DeRe: no weights file
    return folder


# --- ImgEdit: basic_edit.json + originals under singleturn/ --------------------------------------------

IMGEDIT_ROWS = {
    "22": {"id": "animal/cat.png", "prompt": "add a hat to the cat", "edit_type": "add"},
    "23": {"id": "daily object/cup.png", "prompt": "make the cup blue", "edit_type": "alter"},
    "24": {"id": "style/x.png", "prompt": "in the style of van gogh", "edit_type": "style"},
    "25": {"id": "animal/cat.png", "edit_type": "remove"},  # no prompt: a bad row
    "26": {"id": "animal/missing.png", "prompt": "remove the cat", "edit_type": "remove"},  # no image: a bad row
}


def write_imgedit(folder: Path) -> Path:
    for rel in ("animal/cat.png", "daily object/cup.png", "style/x.png"):
        path = folder / "singleturn" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        colour(BLUE).save(path)
    (folder / "basic_edit.json").write_text(json.dumps(IMGEDIT_ROWS), encoding="utf-8")
    return folder
