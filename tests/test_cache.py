import json
from pathlib import Path

import torch

from test_sft import _config
from uniref.budget import Size
from uniref.data import SizeRange, TaskConfig, generate
from uniref.data.formats import JsonlWriter
from uniref.images import resize, to_tensor
from uniref.models import load_model
from uniref.train.cache import CachedEncoders, EncodingCache, with_cache
from uniref.train.sft import train_sft

SMALL = TaskConfig(max_refs=3, size_range=SizeRange(32, 64))


def test_cached_encodings_equal_the_encoders_and_are_read_back_on_the_second_call(tmp_path: Path) -> None:
    model = load_model("tiny-random")
    samples = [generate(i, SMALL) for i in range(3)]
    cached = with_cache(model, tmp_path, "tiny-random")
    assert isinstance(cached, CachedEncoders)
    images = [to_tensor(resize(s.target, Size(width=32, height=24))) for s in samples]
    sizes = [[Size(width=32, height=32)] * s.k for s in samples]
    args = ([s.instruction for s in samples], [list(s.refs) for s in samples], sizes)
    for _ in range(2):
        got = cached.encode_images(images)
        assert all(torch.equal(a, b) for a, b in zip(got, model.encode_images(images), strict=True))
        cond = cached.encode_condition(*args)
        assert all(torch.equal(a, b) for a, b in zip(cond.txt, model.encode_condition(*args).txt, strict=True))
    assert (cached.cache.misses, cached.cache.hits) == (6, 6)
    assert len(list(tmp_path.rglob("*.safetensors"))) == 6 and not list(tmp_path.rglob("*.tmp"))
    # Another planned size is another entry: stages at different budgets never share conditioning.
    cached.encode_condition(args[0][:1], args[1][:1], [[Size(width=16, height=16)] * samples[0].k])
    assert cached.cache.misses == 7
    assert with_cache(model, None, "x") is model


def test_a_torn_cache_file_is_recomputed_not_trusted(tmp_path: Path) -> None:
    cache = EncodingCache(tmp_path, "m")
    key = cache.key("image", b"abc")
    cache.path(key).parent.mkdir(parents=True)
    cache.path(key).write_bytes(b"not safetensors")
    value = torch.arange(4.0)
    assert torch.equal(cache.fetch([key], lambda idx: [value])[0], value)
    assert cache.misses == 1 and torch.equal(cache.load(key), value)


def test_sft_on_a_dataset_with_the_cache_matches_sft_without_it(tmp_path: Path) -> None:
    writer = JsonlWriter(tmp_path / "data")
    for i in range(4):
        writer.add(generate(i, SMALL), key=f"s{i}")
    manifest = writer.close()
    common = ["train.max_steps=4", f"data.source={manifest}", "stages=[{budget: 32, steps: 4, batch_size: 4}]"]
    plain = train_sft(_config(tmp_path / "plain", *common))
    cached = train_sft(_config(tmp_path / "cached", *common, f"data.cache_dir={tmp_path / 'cache'}"))
    assert cached.losses == plain.losses  # the tiny codec is exact, so caching changes nothing
    rows = [json.loads(line) for line in (tmp_path / "cached" / "metrics.jsonl").read_text().splitlines()]
    hits = [r["cache_hit_fraction"] for r in rows if "cache_hit_fraction" in r]
    assert hits[0] == 0.0 and hits[-1] > 0.4  # 4 rows, batch 4: every step after the first is an epoch again
