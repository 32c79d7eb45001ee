"""Tests for hyperflow_ext.data: data sets, digits, glyphs, folders and episodes."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from hyperflow_ext.data import (
    Episode, EpisodeSampler, ImageDataset, benchmark_domains, episodes, glyph_domains, load_digits, load_folder,
    render_glyphs, usable_fonts,
)
from hyperflow_ext.data.benchmark import META_SCRIPTS, SOURCE_SCRIPTS, TARGET_SCRIPTS
from hyperflow_ext.data.glyphs import glyph_cache_path
from hyperflow_ext.data import glyphs as glyphs_module

GLYPH_SIZE = 16  # small images keep the session render short; script and font coverage are the same


@pytest.fixture(scope="session")
def glyph_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("glyph-cache")


@pytest.fixture(scope="session")
def glyphs(glyph_cache):
    return render_glyphs(image_size=GLYPH_SIZE, cache_dir=glyph_cache, progress=False)


def toy_dataset(num_classes=6, per_class=8, domain="toy", size=4):
    """Images whose pixel (0, 0) encodes the class and pixel (0, 1) the image index."""
    n = num_classes * per_class
    images = torch.zeros(n, 1, size, size)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    images[:, 0, 0, 0] = labels.float() / num_classes
    images[:, 0, 0, 1] = torch.arange(n).float() / n
    return ImageDataset(images, labels, [f"c{i}" for i in range(num_classes)], domain)


# ----------------------------------------------------------------------------- ImageDataset

def test_dataset_basics_and_subset_relabels():
    ds = toy_dataset(num_classes=4, per_class=3)
    assert len(ds) == 12 and ds.num_classes == 4 and ds.image_size == 4
    assert ds.indices_of("c2").tolist() == [6, 7, 8]
    assert ds.indices_of(1).tolist() == [3, 4, 5]
    sub = ds.subset(["c3", 1])
    assert sub.class_names == ["c3", "c1"]
    assert sub.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.equal(sub.images[:3], ds.images[9:12])
    groups = ds.by_class()
    assert groups is ds.by_class()  # cached
    assert [g.shape[0] for g in groups] == [3, 3, 3, 3]
    assert torch.equal(groups[2], ds.images[6:9])


@pytest.mark.parametrize("images, labels, names, match", [
    (torch.rand(4, 1, 5, 5).double(), torch.tensor([0, 0, 1, 1]), ["a", "b"], "float32"),
    (torch.rand(4, 5, 5), torch.tensor([0, 0, 1, 1]), ["a", "b"], r"\(n, 1, H, W\)"),
    (torch.rand(4, 1, 5, 5), torch.tensor([0, 0, 1]), ["a", "b"], "4 entries"),
    (torch.rand(4, 1, 5, 5), torch.tensor([0, 0, 1, 1], dtype=torch.int32), ["a", "b"], "int64"),
    (torch.rand(4, 1, 5, 5) * 2, torch.tensor([0, 0, 1, 1]), ["a", "b"], r"\[0, 1\]"),
    (torch.rand(4, 1, 5, 5), torch.tensor([0, 0, 2, 2]), ["a", "b"], r"\[0, 2\)"),
    (torch.rand(4, 1, 5, 5), torch.tensor([0, 0, 2, 2]), ["a", "empty", "c"], "empty"),
    (torch.rand(4, 1, 5, 5), torch.tensor([0, 0, 1, 1]), ["a", "a"], "unique"),
])
def test_dataset_rejects_bad_inputs(images, labels, names, match):
    with pytest.raises(ValueError, match=match):
        ImageDataset(images, labels, names, "bad")


def test_dataset_rejects_wrong_kinds_and_unknown_classes():
    with pytest.raises(TypeError, match="torch.Tensor"):
        ImageDataset(np.zeros((2, 1, 3, 3), np.float32), torch.tensor([0, 1]), ["a", "b"], "x")
    ds = toy_dataset()
    with pytest.raises(ValueError, match="'nope'"):
        ds.indices_of("nope")
    with pytest.raises(ValueError, match="distinct"):
        ds.subset([1, "c1"])


# ----------------------------------------------------------------------------- digits

def test_digits_shape_range_and_values():
    ds = load_digits()
    assert ds.images.shape == (1797, 1, 28, 28) and ds.images.dtype == torch.float32
    assert ds.domain == "digits" and ds.class_names == [str(d) for d in range(10)]
    assert float(ds.images.min()) == 0.0 and 0.9 < float(ds.images.max()) <= 1.0
    assert torch.bincount(ds.labels).min() >= 170
    native = load_digits(image_size=8)
    from sklearn.datasets import load_digits as sk_load
    assert torch.allclose(native.images[:, 0], torch.tensor(sk_load().images, dtype=torch.float32) / 16)


def test_digits_checks_image_size():
    with pytest.raises(ValueError, match="load_digits: image_size"):
        load_digits(0)
    with pytest.raises(TypeError, match="load_digits: image_size"):
        load_digits(28.0)


# ----------------------------------------------------------------------------- glyphs

def test_usable_fonts_apply_exclusion_rule_and_check():
    names = [f.name for f in usable_fonts()]
    assert len(names) >= 15
    assert {"DejaVuSans", "DejaVuSerif-Bold", "DejaVuSansMono-Oblique", "STIXGeneral"} <= set(names)
    assert not any(n.startswith(("cm", "STIXSiz", "STIXNonUni", "LastResort")) for n in names)
    assert "DejaVuSansDisplay" not in names  # fails the ASCII-letters check, not the name rule


def test_glyphs_cover_many_scripts_and_fonts(glyphs):
    assert len(glyphs) >= 6
    assert {"Latin", "Greek", "Cyrillic", "Armenian", "Georgian", "Hebrew"} <= set(glyphs)
    fonts = set().union(*(set(ds.meta["fonts"]) for ds in glyphs.values()))
    assert len(fonts) >= 15
    assert len(glyphs["Latin"].meta["fonts"]) >= 15
    for name, ds in glyphs.items():
        assert ds.domain == name and ds.num_classes >= 5
        assert ds.images.shape[1:] == (1, GLYPH_SIZE, GLYPH_SIZE)
        assert torch.bincount(ds.labels).min() >= 10  # min_instances
        assert len(ds.meta["codepoints"]) == ds.num_classes
    latin = glyphs["Latin"]
    assert latin.class_names == [chr(c) for c in range(65, 91)] + [chr(c) for c in range(97, 123)]
    assert torch.bincount(latin.labels).tolist() == [len(latin.meta["fonts"]) * 3] * 52


def test_glyphs_are_white_on_black_and_augmented(glyphs):
    images = glyphs["Latin"].images
    assert float(images.min()) == 0.0 and float(images.max()) == 1.0
    clean = images[::3]  # per class and font: the clean rendering, then two augmentations
    border = torch.cat([clean[..., 0, :], clean[..., -1, :], clean[..., 0], clean[..., -1]], -1)
    assert float(border.max()) == 0.0  # glyphs fit inside the margin on a black background
    assert float(images[..., 0, :].mean()) < 0.02
    first = glyphs["Latin"].indices_of("A")[:3]  # clean, then two augmentations of one font
    clean, aug1, aug2 = images[first]
    assert not torch.equal(clean, aug1) and not torch.equal(aug1, aug2)
    assert (clean - aug1).abs().mean() < 0.25  # still the same letter, roughly


def test_glyphs_drop_homoglyphs(glyphs):
    assert "Α" not in glyphs["Greek"].class_names  # Greek capital alpha looks like Latin A
    assert "А" not in glyphs["Cyrillic"].class_names  # Cyrillic A
    assert "о" not in glyphs["Cyrillic"].class_names  # Cyrillic o
    assert {"Ω", "λ"} <= set(glyphs["Greek"].class_names)
    assert {"Б", "Ж", "я"} <= set(glyphs["Cyrillic"].class_names)


def test_glyph_cache_round_trip(glyphs, glyph_cache, monkeypatch):
    path = glyph_cache_path(image_size=GLYPH_SIZE, cache_dir=glyph_cache)
    assert path.is_file() and path.name.startswith("glyphs-") and path.suffix == ".safetensors"

    def no_render(*args, **kwargs):
        raise AssertionError("render_glyphs rendered although a cache file exists")

    monkeypatch.setattr(glyphs_module._GlyphSetBuilder, "build", no_render)
    again = render_glyphs(image_size=GLYPH_SIZE, cache_dir=glyph_cache, progress=False)
    assert list(again) == list(glyphs)
    for name, ds in glyphs.items():
        assert torch.equal(again[name].images, ds.images)
        assert torch.equal(again[name].labels, ds.labels)
        assert again[name].class_names == ds.class_names and again[name].meta == ds.meta


def test_glyphs_deterministic_given_seed(glyphs, tmp_path):
    same = render_glyphs(image_size=GLYPH_SIZE, cache_dir=tmp_path / "a", progress=False)
    other = render_glyphs(image_size=GLYPH_SIZE, seed=1, cache_dir=tmp_path / "b", progress=False)
    assert list(same) == list(glyphs)
    for name in glyphs:
        assert torch.equal(same[name].images, glyphs[name].images)
    assert list(other) == list(glyphs)
    assert not torch.equal(other["Latin"].images, glyphs["Latin"].images)
    clean = glyphs["Latin"].indices_of("A")[0]  # clean renderings do not depend on the seed
    assert torch.equal(other["Latin"].images[clean], glyphs["Latin"].images[clean])


def test_glyphs_rerender_over_corrupt_cache(tmp_path):
    kwargs = dict(image_size=8, augmentations=0, min_instances=4, cache_dir=tmp_path)
    path = glyph_cache_path(**kwargs)
    path.write_bytes(b"not a safetensors file")
    domains = render_glyphs(progress=False, **kwargs)
    assert "Latin" in domains and domains["Latin"].images.shape[1:] == (1, 8, 8)
    assert path.stat().st_size > 1000  # replaced by a real cache file


def test_glyph_domains_selects_and_checks(glyphs, glyph_cache):
    picked = glyph_domains(["Hebrew", "Latin"], image_size=GLYPH_SIZE, cache_dir=glyph_cache,
                           progress=False)
    assert list(picked) == ["Hebrew", "Latin"]
    assert torch.equal(picked["Hebrew"].images, glyphs["Hebrew"].images)
    with pytest.raises(ValueError, match="Klingon"):
        glyph_domains(["Latin", "Klingon"], image_size=GLYPH_SIZE, cache_dir=glyph_cache,
                      progress=False)


def test_render_glyphs_checks_arguments(tmp_path):
    with pytest.raises(ValueError, match="render_glyphs: image_size must be >= 8, got 4"):
        render_glyphs(image_size=4, cache_dir=tmp_path)
    with pytest.raises(TypeError, match="render_glyphs: augmentations"):
        render_glyphs(augmentations=1.5, cache_dir=tmp_path)


def test_split_constants_are_disjoint_rendered_scripts(glyphs):
    groups = [set(SOURCE_SCRIPTS), set(META_SCRIPTS), set(TARGET_SCRIPTS)]
    assert all(not a & b for i, a in enumerate(groups) for b in groups[i + 1:])
    assert set().union(*groups) <= set(glyphs)


@pytest.mark.slow
def test_benchmark_domains_support_5way_5shot_15query(tmp_path):
    source, meta, target = benchmark_domains(cache_dir=tmp_path, progress=False)
    assert tuple(source) == SOURCE_SCRIPTS
    assert tuple(meta) == META_SCRIPTS + tuple(f"{s}@8px" for s in META_SCRIPTS)
    assert meta["Lisu@8px"].class_names == meta["Lisu"].class_names
    assert tuple(target) == TARGET_SCRIPTS + ("digits",)
    EpisodeSampler({**source, **meta, **target}, way=5, shot=5, query=15)  # raises if any class is short


# ----------------------------------------------------------------------------- folders

def _write(path, size=(10, 7), color=(255, 255, 255), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def test_load_folder_happy_path(tmp_path):
    root = tmp_path / "mydata"
    _write(root / "zeta" / "1.png", color=(255, 255, 255))
    _write(root / "zeta" / "2.JPG", size=(50, 40), color=(0, 0, 0))
    _write(root / "alpha" / "x.bmp", mode="L", color=128)
    _write(root / "alpha" / "y.gif", mode="L", color=64)
    _write(root / "alpha" / "z.webp", color=(255, 0, 0))
    (root / "alpha" / "notes.txt").write_text("ignored")
    (root / "README.md").write_text("ignored")
    ds = load_folder(root, image_size=12)
    assert ds.class_names == ["alpha", "zeta"] and ds.domain == "mydata"
    assert ds.images.shape == (5, 1, 12, 12) and ds.images.dtype == torch.float32
    assert ds.labels.tolist() == [0, 0, 0, 1, 1]
    means = ds.images.mean(dim=(1, 2, 3))
    assert torch.allclose(means[:2], torch.tensor([128 / 255, 64 / 255]), atol=0.01)
    assert 0.2 < float(means[2]) < 0.4  # pure red → luma ~0.3
    assert float(means[3]) == pytest.approx(1.0) and float(means[4]) == pytest.approx(0.0, abs=0.02)
    assert ds.meta["files"][0].endswith("x.bmp")


def test_load_folder_missing_or_not_a_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_folder(tmp_path / "nowhere")
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match="file.png"):
        load_folder(tmp_path / "file.png")


def test_load_folder_without_class_folders(tmp_path):
    _write(tmp_path / "loose.png")
    with pytest.raises(ValueError, match="class sub-folders"):
        load_folder(tmp_path)


def test_load_folder_empty_class(tmp_path):
    _write(tmp_path / "cats" / "a.png")
    (tmp_path / "dogs").mkdir()
    (tmp_path / "dogs" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="'dogs'.*no image"):
        load_folder(tmp_path)


def test_load_folder_corrupt_image(tmp_path):
    _write(tmp_path / "cats" / "good.png")
    (tmp_path / "cats" / "broken.png").write_bytes(b"definitely not a png")
    with pytest.raises(ValueError, match="broken.png"):
        load_folder(tmp_path)


def test_load_folder_min_images(tmp_path):
    for i in range(3):
        _write(tmp_path / "many" / f"{i}.png")
    _write(tmp_path / "few" / "0.png")
    assert len(load_folder(tmp_path, min_images=1)) == 4
    with pytest.raises(ValueError, match=r"'few' must hold at least 2 images.*got 1"):
        load_folder(tmp_path, min_images=2)


# ----------------------------------------------------------------------------- episodes

def _class_of(images, num_classes):
    return (images[:, 0, 0, 0] * num_classes).round().long()


def test_episode_shapes_labels_and_content():
    ds = toy_dataset(num_classes=6, per_class=8)
    episode = EpisodeSampler(ds, way=4, shot=2, query=3, seed=0).sample()
    assert isinstance(episode, Episode) and episode.domain == "toy"
    assert episode.support_x.shape == (8, 1, 4, 4) and episode.query_x.shape == (12, 1, 4, 4)
    assert episode.support_y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert episode.query_y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert len(set(episode.classes)) == 4
    wanted = torch.tensor([ds.class_names.index(c) for c in episode.classes])
    assert torch.equal(_class_of(episode.support_x, 6), wanted[episode.support_y])
    assert torch.equal(_class_of(episode.query_x, 6), wanted[episode.query_y])
    ids = torch.cat([episode.support_x, episode.query_x])[:, 0, 0, 1]
    assert len(set(ids.tolist())) == 20  # no image drawn twice


def test_episode_class_order_is_random():
    ds = toy_dataset(num_classes=6, per_class=8)
    orders = {e.classes for e in EpisodeSampler(ds, way=3, shot=1, query=1).episodes(20)}
    assert len(orders) > 5


def test_episode_sampler_reproducible_and_seed_dependent():
    domains = {"a": toy_dataset(domain="a"), "b": toy_dataset(num_classes=7, domain="b")}

    def draw(seed, n=10):
        return list(EpisodeSampler(domains, way=3, shot=2, query=2, seed=seed).episodes(n))

    def same(e1, e2):
        return (e1.domain == e2.domain and e1.classes == e2.classes
                and torch.equal(e1.support_x, e2.support_x) and torch.equal(e1.query_x, e2.query_x))

    first, second, other = draw(0), draw(0), draw(1)
    assert all(same(x, y) for x, y in zip(first, second))
    assert not all(same(x, y) for x, y in zip(first, other))
    sampler = EpisodeSampler(domains, way=3, shot=2, query=2, seed=0)
    assert all(same(x, y) for x, y in zip(itertools.islice(iter(sampler), 10), first))
    assert all(same(x, y) for x, y in zip(itertools.islice(iter(sampler), 10), first))  # restarts
    assert {e.domain for e in draw(0, n=40)} == {"a", "b"}


def test_episodes_function_counts_and_unpacks():
    ds = toy_dataset()
    assert len(list(episodes(ds, way=2, shot=1, query=1, n=3))) == 3
    stream = episodes([ds], way=2, shot=1, query=0)  # n=None: endless
    for support_x, support_y, query_x, query_y, domain, classes in itertools.islice(stream, 50):
        assert support_x.shape[0] == 2 and query_x.shape[0] == 0 and domain == "toy"
        assert set(support_y.tolist()) == {0, 1} and len(classes) == 2


def test_episode_sampler_errors():
    ds = toy_dataset(num_classes=4, per_class=8, domain="small")
    with pytest.raises(ValueError, match=r"domain 'small' must have at least way=5 classes, got 4"):
        EpisodeSampler(ds, way=5, shot=1, query=1)
    images = torch.rand(11, 1, 4, 4)
    labels = torch.tensor([0] * 5 + [1] * 3 + [2] * 3)
    short = ImageDataset(images, labels, ["ok", "thin", "thin2"], "d")
    with pytest.raises(ValueError, match=r"class 'thin' of domain 'd' .* 5 images, got 3"):
        EpisodeSampler(short, way=2, shot=2, query=3)
    with pytest.raises(TypeError, match="ImageDataset"):
        EpisodeSampler({"x": images}, way=2)
    with pytest.raises(ValueError, match="at least one domain"):
        EpisodeSampler({}, way=2)
    with pytest.raises(ValueError, match="EpisodeSampler: shot must be >= 1, got 0"):
        EpisodeSampler(ds, way=2, shot=0)


def test_episode_sampler_on_real_domains(glyphs):
    sampler = EpisodeSampler({k: glyphs[k] for k in ("Latin", "Armenian")}, way=5, shot=5,
                             query=15, seed=3)
    for episode in sampler.episodes(4):
        assert episode.support_x.shape == (25, 1, GLYPH_SIZE, GLYPH_SIZE)
        assert episode.query_x.shape == (75, 1, GLYPH_SIZE, GLYPH_SIZE)
        assert set(episode.classes) <= set(glyphs[episode.domain].class_names)


# ----------------------------------------------------------------------------- low resolution

def test_coarse_scan_counts_ink_of_the_size_normalised_bitmap():
    from hyperflow_ext.data.resolution import coarse_scan

    small = torch.zeros(1, 1, 28, 28)
    small[..., 2:8, 3:9] = 1.0           # a small square in a corner
    large = torch.zeros(1, 1, 28, 28)
    large[..., 5:25, 4:24] = 0.9         # a large square in the middle
    scans = coarse_scan(torch.cat([small, large]), side=8)
    assert scans.shape == (2, 1, 8, 8)
    # Size and position are normalised away: both squares fill the whole grid.
    torch.testing.assert_close(scans, torch.ones_like(scans))
    bar = torch.zeros(1, 1, 28, 28)
    bar[..., 4:24, 10:14] = 1.0          # a tall bar keeps its aspect ratio, centred
    scan = coarse_scan(bar, side=8)[0, 0]
    assert torch.equal(scan * 16, torch.round(scan * 16))  # ink counts 0..16 of a 4x4 block
    # 20x4 → 32x6 pixels at columns 13..18: 3 of 4 columns of blocks 3 and 4, nothing elsewhere.
    assert torch.equal(scan[:, 3:5], torch.full((8, 2), 12 / 16))
    assert scan[:, :3].max() == 0.0 and scan[:, 5:].max() == 0.0
    assert torch.equal(coarse_scan(torch.zeros(1, 1, 28, 28)), torch.zeros(1, 1, 8, 8))  # blank stays blank


def test_low_resolution_keeps_classes():
    from hyperflow_ext.data import low_resolution
    from hyperflow_ext.data.resolution import coarse_scan

    g = torch.Generator().manual_seed(0)
    images = torch.rand(6, 1, 16, 16, generator=g)
    ds = ImageDataset(images, torch.tensor([0, 1, 2, 0, 1, 2]), ["a", "b", "c"], "toy", {"fonts": ["x"]})
    coarse = low_resolution(ds, side=4)
    assert coarse.images.shape == images.shape and coarse.images.dtype == torch.float32
    assert torch.equal(coarse.labels, ds.labels) and coarse.class_names == ds.class_names
    assert coarse.domain == "toy@4px" and coarse.meta["fonts"] == ["x"]
    assert coarse.meta["low_resolution"] == {"side": 4, "block": 4}
    expected = torch.nn.functional.interpolate(coarse_scan(images, 4), size=(16, 16), mode="bilinear",
                                               align_corners=False)
    torch.testing.assert_close(coarse.images, expected.clamp(0, 1))


def test_from_scans_rejects_scans_of_another_shape():
    from hyperflow_ext.data.resolution import from_scans

    ds = ImageDataset(torch.rand(2, 1, 8, 8), torch.tensor([0, 1]), ["a", "b"], "toy")
    with pytest.raises(ValueError, match=r"scans must be \(n=2, 1, side, side\)"):
        from_scans(ds, torch.rand(3, 1, 4, 4))


def test_meta_scans_are_cached_beside_the_glyphs_and_rebuilt_when_stale(tmp_path, monkeypatch):
    from hyperflow_ext.data import benchmark as bench
    from hyperflow_ext.data.resolution import coarse_scan

    g = torch.Generator().manual_seed(0)
    glyphs = {name: ImageDataset(torch.rand(4, 1, 16, 16, generator=g), torch.tensor([0, 0, 1, 1]), ["a", "b"], name)
              for name in META_SCRIPTS}
    glyph_file = tmp_path / "glyphs-abc.safetensors"
    scans = bench.meta_scans(glyphs, glyph_file)
    for name in META_SCRIPTS:
        torch.testing.assert_close(scans[name], coarse_scan(glyphs[name].images, bench.META_SCAN_SIDE))
    cached = list(tmp_path.glob("glyphs-abc-scans*.safetensors"))
    assert len(cached) == 1

    def no_scan(*args, **kwargs):
        raise AssertionError("rescanned although the cache matches")

    monkeypatch.setattr(bench, "coarse_scan", no_scan)
    again = bench.meta_scans(glyphs, glyph_file)
    assert all(torch.equal(again[n], scans[n]) for n in META_SCRIPTS)

    monkeypatch.setattr(bench, "coarse_scan", coarse_scan)
    more = {name: ImageDataset(torch.cat([ds.images, ds.images[:2]]), torch.tensor([0, 0, 1, 1, 0, 0]), ["a", "b"],
                               name) for name, ds in glyphs.items()}
    rebuilt = bench.meta_scans(more, glyph_file)  # the cached scans are of 4 images, not 6: rescanned
    assert all(rebuilt[n].shape[0] == 6 for n in META_SCRIPTS)
    cached[0].write_bytes(b"not a safetensors file")
    assert all(torch.equal(bench.meta_scans(more, glyph_file)[n], rebuilt[n]) for n in META_SCRIPTS)


def test_low_resolution_rejects_bad_arguments():
    from hyperflow_ext.data import low_resolution

    ds = ImageDataset(torch.rand(2, 1, 8, 8), torch.tensor([0, 1]), ["a", "b"], "toy")
    with pytest.raises(ValueError, match="side must be <= the image side 8"):
        low_resolution(ds, side=9)
    with pytest.raises(ValueError, match="side must be >= 1"):
        low_resolution(ds, side=0)
    with pytest.raises(TypeError, match="dataset must be an ImageDataset"):
        low_resolution(torch.rand(2, 1, 8, 8))
    wide = ImageDataset(torch.rand(2, 1, 8, 6), torch.tensor([0, 1]), ["a", "b"], "toy")
    with pytest.raises(ValueError, match="images must be square"):
        low_resolution(wide)
