"""Tests of the widened few-shot benchmark's data: Hershey stroke domains, capture shifts and the split."""
from __future__ import annotations

import inspect
import logging

import numpy as np
import pytest
import torch

from hyperflow_ext.data import (
    ImageDataset, add_noise, apply_shift, blur, contrast, domain_families, draw_strokes, families, fewshot_benchmark,
    flip, invert, leave_one_out, low_resolution, rescan, rotate, stroke_domains,
)
from hyperflow_ext.data.benchmark import SOURCE_SCRIPTS
from hyperflow_ext.data.fewshot import (FEWSHOT_META, FEWSHOT_TARGETS, HELD_OUT_FAMILIES, HELD_OUT_SCRIPTS,
                                        HELD_OUT_SHIFTS, META_SHIFTS, STROKE_INSTANCES)
from hyperflow_ext.data.shifts import SHIFTS
from hyperflow_ext.data.strokes import STROKE_FAMILIES, stroke_cache_path
from hyperflow_ext.data import strokes as strokes_module

SIZE = 12        # small images and few instances keep the drawing short
INSTANCES = 2


@pytest.fixture(scope="module")
def stroke_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("stroke-cache")


@pytest.fixture(scope="module")
def strokes(stroke_cache):
    return stroke_domains(image_size=SIZE, instances=INSTANCES, cache_dir=stroke_cache, progress=False)


@pytest.fixture(scope="module")
def split_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("fewshot-cache")


@pytest.fixture(scope="module")
def split(split_cache):
    return fewshot_benchmark(cache_dir=split_cache, progress=False, image_size=16)


def toy(n=6, size=8, domain="toy", seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 1, size, size, generator=g)
    return ImageDataset(images, torch.arange(n) % 3, ["a", "b", "c"], domain)


# ----------------------------------------------------------------------------- strokes

def test_stroke_domains_shapes_ranges_and_classes(strokes):
    assert list(strokes) == [f"Hershey-{f.name}" for f in STROKE_FAMILIES]
    for name, ds in strokes.items():
        assert ds.domain == name
        assert ds.images.shape[1:] == (1, SIZE, SIZE) and ds.images.dtype == torch.float32
        assert 0.0 <= float(ds.images.min()) and float(ds.images.max()) <= 1.0
        assert ds.num_classes >= 40, name
        assert torch.equal(torch.bincount(ds.labels), torch.full((ds.num_classes,), INSTANCES))
        assert all(float(img.max()) > 0.3 for img in ds.images), f"{name} has a blank instance"


def test_stroke_domains_default_has_20_instances_per_class():
    # drawing 20 instances is checked on the benchmark itself (test_fewshot_benchmark_domains)
    assert inspect.signature(stroke_domains).parameters["instances"].default >= 20 and STROKE_INSTANCES >= 20


def test_stroke_domains_deterministic_across_builds(strokes, tmp_path):
    again = stroke_domains(image_size=SIZE, instances=INSTANCES, cache_dir=tmp_path, progress=False)
    for name, ds in strokes.items():
        assert torch.equal(ds.images, again[name].images) and ds.class_names == again[name].class_names


def test_stroke_domains_seed_changes_jitter(strokes, tmp_path):
    other = stroke_domains(["Script"], image_size=SIZE, instances=INSTANCES, seed=1, cache_dir=tmp_path,
                           progress=False)["Hershey-Script"]
    assert not torch.equal(other.images, strokes["Hershey-Script"].images)


def test_stroke_instances_differ_within_a_class(strokes):
    ds = strokes["Hershey-Japanese"]  # one face: instances differ only by the jitter
    first, second = ds.images[ds.indices_of(0)]
    assert not torch.equal(first, second)


def test_stroke_domains_loads_from_cache(strokes, stroke_cache, monkeypatch):
    path = stroke_cache_path(image_size=SIZE, instances=INSTANCES, cache_dir=stroke_cache)
    assert path.is_file()
    monkeypatch.setattr(strokes_module, "_build", lambda *a, **k: pytest.fail("redrew despite the cache"))
    loaded = stroke_domains(["Greek", "Hershey-Cyrillic"], image_size=SIZE, instances=INSTANCES,
                            cache_dir=stroke_cache, progress=False)
    assert list(loaded) == ["Hershey-Greek", "Hershey-Cyrillic"]
    assert torch.equal(loaded["Hershey-Greek"].images, strokes["Hershey-Greek"].images)


def test_stroke_domains_rebuilds_corrupted_cache_atomically(strokes, tmp_path, caplog):
    stroke_domains(["Roman"], image_size=SIZE, instances=INSTANCES, cache_dir=tmp_path, progress=False)
    path = stroke_cache_path(image_size=SIZE, instances=INSTANCES, cache_dir=tmp_path)
    path.write_bytes(path.read_bytes()[:100])  # a truncated file, as after a crash without atomic writes
    with caplog.at_level(logging.WARNING, logger=strokes_module.__name__):
        again = stroke_domains(["Roman"], image_size=SIZE, instances=INSTANCES, cache_dir=tmp_path, progress=False)
    assert "unreadable cache" in caplog.text
    assert torch.equal(again["Hershey-Roman"].images, strokes["Hershey-Roman"].images)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # rewritten in place, no temporary left


def test_stroke_cache_key_follows_settings(tmp_path):
    paths = {stroke_cache_path(SIZE, INSTANCES, 0, tmp_path), stroke_cache_path(SIZE + 1, INSTANCES, 0, tmp_path),
             stroke_cache_path(SIZE, INSTANCES + 1, 0, tmp_path), stroke_cache_path(SIZE, INSTANCES, 1, tmp_path)}
    assert len(paths) == 4


@pytest.mark.parametrize("kwargs, error", [
    (dict(families=["Klingon"]), ValueError), (dict(image_size=4), ValueError), (dict(instances=0), ValueError),
    (dict(seed=-1), ValueError), (dict(families="Roman"), TypeError), (dict(image_size=12.0), TypeError),
])
def test_stroke_domains_bad_arguments(kwargs, error, tmp_path):
    with pytest.raises(error, match="stroke_domains"):
        stroke_domains(cache_dir=tmp_path, progress=False, **kwargs)


def test_draw_strokes_clean_and_jittered():
    paths = [[(-8, -12), (0, 9), (8, -12)], [(-5, 0), (5, 0)]]
    clean = draw_strokes(paths, 20)
    assert clean.shape == (20, 20) and clean.dtype == np.uint8 and clean.max() == 255
    a = draw_strokes(paths, 20, np.random.default_rng(3))
    b = draw_strokes(paths, 20, np.random.default_rng(3))
    assert np.array_equal(a, b) and not np.array_equal(a, clean)
    assert draw_strokes([], 20).max() == 0


# ----------------------------------------------------------------------------- shifts

def test_flip_twice_is_identity_and_input_untouched():
    ds = toy()
    before = ds.images.clone()
    for axis in ("horizontal", "vertical"):
        once = flip(ds, axis)
        assert not torch.equal(once.images, ds.images)
        assert torch.equal(flip(once, axis).images, ds.images)
    assert torch.equal(ds.images, before)
    assert flip(ds).domain == "toy~flipx" and flip(ds, "vertical").domain == "toy~flipy"
    assert torch.equal(flip(ds).images, ds.images.flip(-1))


def test_invert_maps_x_to_one_minus_x():
    ds = toy()
    out = invert(ds)
    assert torch.allclose(out.images, 1.0 - ds.images) and out.domain == "toy~inv"
    assert torch.equal(out.labels, ds.labels) and out.class_names == ds.class_names


def test_rotate_quarter_turns_are_exact():
    ds = toy()
    assert torch.equal(rotate(ds, 90.0).images, torch.rot90(ds.images, 1, dims=(-2, -1)))
    four = ds
    for _ in range(4):
        four = rotate(four, 90.0)
    assert torch.equal(four.images, ds.images) and four.domain == "toy~rot~rot~rot~rot"
    assert torch.equal(rotate(ds, 0.0).images, ds.images)


def test_rotate_with_jitter_is_seeded_and_matches_quarter_turn_when_tiny():
    ds = toy(size=9)
    a, b = rotate(ds, 0.0, jitter=30.0, seed=1), rotate(ds, 0.0, jitter=30.0, seed=1)
    assert torch.equal(a.images, b.images)
    assert not torch.equal(a.images, rotate(ds, 0.0, jitter=30.0, seed=2).images)
    # the resampling path agrees with the exact path in direction (interior pixels)
    near = rotate(ds, 90.0, jitter=1e-6, seed=0).images
    exact = torch.rot90(ds.images, 1, dims=(-2, -1))
    assert torch.allclose(near[..., 1:-1, 1:-1], exact[..., 1:-1, 1:-1], atol=1e-3)


def test_blur_spreads_a_dot_and_keeps_its_mass():
    images = torch.zeros(1, 1, 15, 15)
    images[0, 0, 7, 7] = 1.0
    ds = ImageDataset(images, torch.tensor([0]), ["dot"], "dot")
    out = blur(ds, sigma=1.0)
    assert out.images[0, 0, 7, 7] < 0.2 and out.images[0, 0, 7, 8] > 0.05
    assert float(out.images.sum()) == pytest.approx(1.0, abs=1e-4)
    assert torch.allclose(out.images[0, 0], out.images[0, 0].T, atol=1e-6)  # isotropic


def test_add_noise_is_seeded_clipped_and_has_the_requested_scale():
    ds = ImageDataset(torch.full((50, 1, 16, 16), 0.5), torch.arange(50) % 2, ["a", "b"], "grey")
    a, b = add_noise(ds, 0.1, seed=4), add_noise(ds, 0.1, seed=4)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, add_noise(ds, 0.1, seed=5).images)
    assert float((a.images - 0.5).std()) == pytest.approx(0.1, rel=0.05)
    assert 0.0 <= float(add_noise(ds, 2.0).images.min()) and float(add_noise(ds, 2.0).images.max()) <= 1.0
    # another domain gets other noise from the same seed
    other = ImageDataset(ds.images, ds.labels, ds.class_names, "grey2")
    assert not torch.equal(add_noise(other, 0.1, seed=4).images, a.images)


def test_contrast_maps_black_and_white_towards_the_level():
    images = torch.zeros(2, 1, 4, 4)
    images[:, :, :2] = 1.0
    ds = ImageDataset(images, torch.tensor([0, 1]), ["a", "b"], "bw")
    out = contrast(ds, factor=0.3)
    assert out.images.unique().tolist() == pytest.approx([0.35, 0.65])
    jit = contrast(ds, factor=0.3, jitter=0.5, seed=0)
    assert torch.equal(jit.images, contrast(ds, factor=0.3, jitter=0.5, seed=0).images)
    assert jit.domain == "bw~contrast"


def test_rescan_reuses_the_coarse_scans():
    ds = toy(size=16)
    out = rescan(ds, 8)
    assert out.domain == "toy~scan8" and torch.equal(out.images, low_resolution(ds, 8).images)


def test_apply_shift_chains_named_shifts():
    ds = toy()
    out = apply_shift(ds, "flipx+inv")
    assert out.domain == "toy~flipx~inv"
    assert torch.allclose(out.images, 1.0 - ds.images.flip(-1))
    assert torch.equal(apply_shift(ds, ["noise"], seed=3).images, apply_shift(ds, "noise", seed=3).images)
    for name in SHIFTS:  # every registered shift keeps shapes, labels and the range
        shifted = apply_shift(toy(size=16), name)
        assert shifted.images.shape == (6, 1, 16, 16) and shifted.domain == f"toy~{name}"
        assert 0.0 <= float(shifted.images.min()) and float(shifted.images.max()) <= 1.0


@pytest.mark.parametrize("call, match", [
    (lambda ds: flip(ds, "diagonal"), "flip: axis"),
    (lambda ds: blur(ds, 0.0), "blur: sigma"),
    (lambda ds: blur(ds, float("nan")), "blur: sigma"),
    (lambda ds: add_noise(ds, -0.1), "add_noise: std"),
    (lambda ds: add_noise(ds, 0.1, seed=-1), "add_noise: seed"),
    (lambda ds: contrast(ds, 0.0), "contrast: factor"),
    (lambda ds: contrast(ds, 0.5, level=2.0), "contrast: level"),
    (lambda ds: contrast(ds, 0.5, jitter=1.0), "contrast: jitter"),
    (lambda ds: rotate(ds, 10.0, jitter=-1.0), "rotate: jitter"),
    (lambda ds: rescan(ds, 0), "rescan: side"),
    (lambda ds: rescan(ds, 9), "rescan: side"),
    (lambda ds: apply_shift(ds, "sepia"), "apply_shift"),
    (lambda ds: apply_shift(ds, []), "apply_shift"),
    (lambda ds: invert(ds, suffix="a~b"), "suffix"),
])
def test_shifts_reject_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call(toy())


def test_shifts_reject_non_datasets():
    with pytest.raises(TypeError, match="invert: dataset"):
        invert(torch.zeros(1, 1, 4, 4))


# ----------------------------------------------------------------------------- the split

def test_fixed_split_never_meta_trains_on_a_held_out_family_shift_or_script():
    meta_families = {f for d in FEWSHOT_META for f in domain_families(d)}
    assert not meta_families & {f"strokes:{f}" for f in HELD_OUT_FAMILIES}
    assert not meta_families & {f"shift:{s}" for s in HELD_OUT_SHIFTS}
    assert not {d.split("~")[0].split("@")[0] for d in FEWSHOT_META} & set(HELD_OUT_SCRIPTS)
    assert not set(META_SHIFTS) & set(HELD_OUT_SHIFTS) and set(META_SHIFTS) | set(HELD_OUT_SHIFTS) <= set(SHIFTS)
    target_families = {f for d in FEWSHOT_TARGETS for f in domain_families(d)}
    assert "digits" in target_families
    assert target_families & {f"strokes:{f}" for f in HELD_OUT_FAMILIES}
    assert target_families & {f"shift:{s}" for s in HELD_OUT_SHIFTS}


def test_fewshot_benchmark_domains(split):
    assert list(split.source) == list(SOURCE_SCRIPTS)
    assert list(split.meta) == list(FEWSHOT_META) and list(split.target) == list(FEWSHOT_TARGETS)
    assert len(split.meta) >= 8 and not set(split.meta) & set(split.target)
    kinds = {domain_families(d)[0].split(":")[0] for d in split.meta} | {f for d in split.meta
                                                                          for f in domain_families(d)[1:]}
    assert {"glyphs", "strokes", "scan"} <= kinds and any(k.startswith("shift:") for k in kinds)
    for name, ds in {**split.meta, **split.target}.items():
        assert ds.domain == name and ds.images.shape[1:] == (1, 16, 16)
        assert 0.0 <= float(ds.images.min()) and float(ds.images.max()) <= 1.0
        assert int(torch.bincount(ds.labels).min()) >= 20, name  # 5-shot episodes with 15 queries


def test_fewshot_benchmark_is_deterministic(split, split_cache):
    # the renders are tested for determinism above and in test_data; here the shifts on top of them
    again = fewshot_benchmark(cache_dir=split_cache, progress=False, image_size=16)
    for name in ("Lisu~blur", "OldItalic~noise", "Hershey-Greek~noise"):
        assert torch.equal(split.meta[name].images, again.meta[name].images)
    for name in split.target:
        assert torch.equal(split.target[name].images, again.target[name].images)


def test_domain_families():
    assert domain_families("Hershey-Script~blur") == ("strokes:Script", "shift:blur")
    assert domain_families("Greek@8px") == ("glyphs", "scan")
    assert domain_families("Hershey-Italic~scan8") == ("strokes:Italic", "scan")
    assert domain_families("digits") == ("digits",)
    assert domain_families("Hebrew~inv~contrast") == ("glyphs", "shift:inv", "shift:contrast")
    with pytest.raises(ValueError, match="domain_families"):
        domain_families("")


def test_leave_one_out_holds_out_a_whole_family(split):
    folds = families(split)
    assert "strokes:Script" in folds and "shift:blur" in folds and "glyphs" in folds
    fold = leave_one_out(split, "strokes:Script")
    assert set(fold.target) == {"Hershey-Script", "Hershey-Script~blur"}
    assert not set(fold.meta) & set(fold.target) and set(fold.meta) | set(fold.target) == set(split.meta)
    assert all("strokes:Script" not in domain_families(d) for d in fold.meta)
    blur_fold = leave_one_out(split, "shift:blur")
    assert set(blur_fold.target) == {d for d in split.meta if d.endswith("~blur")}
    with pytest.raises(ValueError, match="leave_one_out: family"):
        leave_one_out(split, "strokes:Gothic")  # a target family is no meta-training family
