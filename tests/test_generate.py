"""Generation: validation, <lora:...> tags, samplers, cancellation, PNG infotext, and the CLI against diffusers."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from studio.adapters import file_hashes
from studio.cli import main, parse_weighted
from studio.compose import AdapterStack
from studio.generate import SAMPLERS, GenerationCancelled, GenerationRequest, LoraRequest, generate
from studio.infotext import CIVITAI_LORA_NAME, format_infotext, parse_infotext, parse_lora_tags
from studio.models import load_base
from tests.helpers import hand_merge, make_adapter


@pytest.fixture(scope="module")
def library(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("library")
    make_adapter(tiny_model_dir, folder / "inky.safetensors", seed=3)
    make_adapter(tiny_model_dir, folder / "dots v2.safetensors", seed=4, rank=2, alpha=1.0)
    return folder


def _request(**overrides):
    values = dict(prompt="sks, a red circle", seed=5, steps=3, cfg=5.0, width=32, height=32)
    values.update(overrides)
    return GenerationRequest(**values)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("prompt", "  "),
        ("steps", 0),
        ("steps", 1000),
        ("cfg", 0.5),
        ("width", 100),
        ("height", 4096),
        ("sampler", "Magic"),
        ("batch", 0),
        ("seed", -5),
    ],
)
def test_invalid_requests_raise_a_value_error_naming_the_value(field, value):
    with pytest.raises(ValueError, match=field):
        _request(**{field: value})


def test_lora_tags_are_parsed_in_all_three_syntaxes():
    text, tags = parse_lora_tags("a cat <lora:inky:0.8> on a mat <lora:dots:0.3:1> <lora:x:te=0.2:unet=0.9> <lora:y>")
    assert text == "a cat on a mat"
    assert [(t.name, t.te_weight, t.unet_weight) for t in tags] == [
        ("inky", 0.8, 0.8),
        ("dots", 0.3, 1.0),
        ("x", 0.2, 0.9),
        ("y", 1.0, 1.0),
    ]
    with pytest.raises(ValueError, match="bad weight"):
        parse_lora_tags("<lora:inky:strong>")


def test_infotext_round_trips_and_quotes_values_with_commas():
    text = format_infotext("a, b", "ugly", {"Steps": 20, "Lora hashes": "a: 1, b: 2", "Seed": 3})
    assert text.splitlines()[2] == 'Steps: 20, Lora hashes: "a: 1, b: 2", Seed: 3'
    assert parse_infotext(text) == ("a, b", "ugly", {"Steps": "20", "Lora hashes": "a: 1, b: 2", "Seed": "3"})


def test_prompt_tags_use_the_library_and_pngs_carry_a1111_infotext(tiny_model_dir, library, tmp_path):
    base = load_base(str(tiny_model_dir))
    resolver = lambda name: library / f"{name}.safetensors"  # noqa: E731
    out = tmp_path / "out"
    result = generate(
        base,
        _request(prompt="sks, a red circle <lora:inky:0.8>", negative_prompt="blurry", batch=2),
        resolver=resolver,
        out_dir=out,
    )
    assert result.seeds == [5, 6] and len(result.paths) == 2
    saved = Image.open(result.paths[0])
    assert np.array_equal(np.asarray(saved), np.asarray(result.images[0])), "the PNG is the image, not re-encoded"
    prompt, negative, params = parse_infotext(saved.text["parameters"])
    assert prompt == "sks, a red circle <lora:inky:0.8>" and negative == "blurry"
    assert params["Steps"] == "3" and params["Seed"] == "5" and params["Size"] == "32x32"
    assert params["Lora hashes"] == f"inky: {file_hashes(library / 'inky.safetensors')['AutoV3'][:12]}"
    for name in re.findall(r"<lora:([^:>]+):", prompt):
        assert CIVITAI_LORA_NAME.fullmatch(name)


def test_names_with_spaces_become_civitai_safe_and_unknown_names_fail_clearly(tiny_model_dir, library):
    base = load_base(str(tiny_model_dir))
    result = generate(base, _request(loras=[LoraRequest(str(library / "dots v2.safetensors"), 1.0)]))
    assert "<lora:dots_v2:1>" in result.infotexts[0] and "dots_v2: " in result.infotexts[0]

    def nowhere(name):
        raise ValueError(f"unknown adapter {name!r}")

    with pytest.raises(ValueError, match="unknown adapter 'ghost'"):
        generate(base, _request(prompt="a <lora:ghost:1>"), resolver=nowhere)


def test_same_seed_same_image_and_the_stack_follows_each_request(tiny_model_dir, library):
    base = load_base(str(tiny_model_dir))
    stack = AdapterStack(base)
    resolver = lambda name: library / f"{name}.safetensors"  # noqa: E731
    first = generate(base, _request(prompt="x <lora:inky:1>"), stack=stack, resolver=resolver).images[0]
    again = generate(base, _request(prompt="x <lora:inky:1>"), stack=stack, resolver=resolver).images[0]
    plain = generate(base, _request(prompt="x"), stack=stack, resolver=resolver).images[0]
    assert np.array_equal(np.asarray(first), np.asarray(again))
    assert not np.array_equal(np.asarray(first), np.asarray(plain))
    assert stack.entries == {}


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_runs(tiny_model_dir, sampler):
    base = load_base(str(tiny_model_dir))
    result = generate(base, _request(sampler=sampler, steps=2))
    assert result.images[0].size == (32, 32)
    original = type(base.pipeline.scheduler).__name__
    assert original == "DDIMScheduler", "the model's own scheduler is put back"


def test_cancel_stops_and_saves_nothing(tiny_model_dir, tmp_path):
    base = load_base(str(tiny_model_dir))
    steps = []
    with pytest.raises(GenerationCancelled):
        generate(
            base,
            _request(steps=10),
            out_dir=tmp_path / "out",
            progress=lambda s, n: steps.append(s),
            should_stop=lambda: len(steps) >= 2,
        )
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    assert len(steps) < 10


def test_weighted_specs_parse():
    assert parse_weighted("a.safetensors") == ("a.safetensors", 1.0, None)
    assert parse_weighted("a.safetensors:0.7") == ("a.safetensors", 0.7, None)
    assert parse_weighted("C:/x/a.safetensors:0.7:0.2") == ("C:/x/a.safetensors", 0.7, 0.2)


def test_cli_generate_with_a_lora_matches_plain_diffusers_with_hand_merged_weights(tiny_model_dir, library, tmp_path):
    lora = library / "inky.safetensors"
    out = tmp_path / "out"
    code = main(
        [
            "generate",
            "--base",
            str(tiny_model_dir),
            "--prompt",
            "sks, a blue square",
            "--lora",
            f"{lora}:0.7",
            "--seed",
            "11",
            "--steps",
            "4",
            "--cfg",
            "6",
            "--width",
            "32",
            "--height",
            "32",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    ours = np.asarray(Image.open(sorted(out.glob("*.png"))[0])).astype(int)

    reference = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir), safety_checker=None)
    hand_merge(reference, [(lora, 0.7, 0.7)])
    theirs = reference(
        "sks, a blue square",
        num_inference_steps=4,
        guidance_scale=6,
        width=32,
        height=32,
        generator=torch.Generator("cpu").manual_seed(11),
    ).images[0]
    assert np.abs(ours - np.asarray(theirs).astype(int)).max() <= 8


def test_two_checkpoints_with_the_same_file_name_are_two_adapters(tiny_model_dir, tmp_path):
    first = make_adapter(tiny_model_dir, tmp_path / "step-1" / "adapter.safetensors", seed=8)
    second = make_adapter(tiny_model_dir, tmp_path / "step-2" / "adapter.safetensors", seed=9)
    base = load_base(str(tiny_model_dir))
    stack = AdapterStack(base)
    request = _request(loras=[LoraRequest(str(first), 0.5), LoraRequest(str(second), 0.5)])
    generate(base, request, stack=stack)
    assert sorted(stack.entries) == ["adapter", "adapter_2"]
    assert {e.adapter.parsed.path for e in stack.entries.values()} == {first, second}


def test_cli_generates_every_prompt_with_one_model_load_and_each_prompts_infotext(
    tiny_model_dir, library, tmp_path, monkeypatch, capsys
):
    import studio.models

    dots = make_adapter(tiny_model_dir, tmp_path / "dots.safetensors", seed=4, rank=2, alpha=1.0)
    loads = []
    real_load = studio.models.load_base
    monkeypatch.setattr(studio.models, "load_base", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("sks, a red circle <lora:dots:0.5>\n\n# a comment line\nsks, a green square\n")
    common = ["--base", str(tiny_model_dir), "--lora", f"{library / 'inky.safetensors'}:0.7", "--lora", f"{dots}:0"]
    common += ["--seed", "11", "--batch", "2", "--steps", "2", "--width", "32", "--height", "32"]
    out = tmp_path / "out"
    argv = ["generate", *common, "--prompt", "sks, a blue square", "--prompts-file", str(prompts), "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    assert len(loads) == 1, "one model load for all prompts"
    written = [Path(line.split(" ", 1)[1]) for line in capsys.readouterr().out.splitlines() if line.startswith("wrote")]
    assert len(written) == len(set(written)) == 6 and sorted(out.glob("*.png")) == sorted(written)
    infos = [parse_infotext(Image.open(path).text["parameters"]) for path in written]
    expected = ["sks, a blue square", "sks, a red circle", "sks, a green square"]
    for index, (prompt, _, params) in enumerate(infos):
        assert prompt.startswith(expected[index // 2] + " <lora:inky:0.7>"), prompt
        assert params["Seed"] == str(11 + index % 2) and params["Size"] == "32x32"
    assert "<lora:dots:0.5>" in infos[2][0] and "dots" not in infos[4][0]  # each prompt's own tags

    # the shared model and adapter stack leave no trace: the last prompt alone gives the same pictures
    alone = tmp_path / "alone"
    assert main(["generate", *common, "--prompt", "sks, a green square", "--out", str(alone)]) == 0
    assert len(loads) == 2
    for batched, single in zip(written[4:], sorted(alone.glob("*.png")), strict=True):
        assert np.array_equal(np.asarray(Image.open(batched)), np.asarray(Image.open(single)))


def test_cli_generate_needs_a_prompt_and_reads_the_prompts_file_before_loading(tmp_path, capsys):
    assert main(["generate", "--out", str(tmp_path / "o")]) == 2
    assert "no prompt" in capsys.readouterr().err
    assert main(["generate", "--prompts-file", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "cannot read prompts file" in capsys.readouterr().err
    (tmp_path / "p.txt").write_text("a cat\na dog <lora:ghost:1>\n")
    argv = ["generate", "--base", str(tmp_path / "no_model"), "--prompts-file", str(tmp_path / "p.txt")]
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    assert "unknown adapter 'ghost'" in capsys.readouterr().err  # found before loading the (missing) model
