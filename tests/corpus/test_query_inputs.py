"""Queries and corpora in every form the scorers accept: range and layout checks, paths, resizing."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from nda_ann.corpus.queries import load_query_batch
from nda_ann.corpus.store import uint8_to_float, write_store
from nda_ann.errors import InputError
from nda_ann.scoring.exact import exact_scores

R = 12
EXACT = dict(timesteps=[100], scales=["3"], precision="float32")


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A 12x12 store of 8 smooth images and two query PNGs: one of the store's size, one at 24x24."""
    root = tmp_path_factory.mktemp("queries")
    rng = np.random.default_rng(3)
    base = rng.integers(0, 256, (8, 4, 4, 3), dtype=np.uint8)
    images = np.stack([np.asarray(Image.fromarray(b).resize((R, R), Image.Resampling.BILINEAR)) for b in base])
    store = write_store(root / "store", images, [f"img{i}" for i in range(len(images))])
    qdir = root / "q"
    qdir.mkdir()
    Image.fromarray(images[3]).save(qdir / "same.png")
    Image.fromarray(images[5]).resize((2 * R, 2 * R), Image.Resampling.NEAREST).save(qdir / "big.png")
    return root, store, images


def test_floats_outside_minus_one_one_are_refused_naming_the_range(case):
    _, store, images = case
    x = uint8_to_float(images[:2])  # (2, 3, R, R) in [-1, 1]
    with pytest.raises(InputError, match=r"\[-1, 1\].*values in \[.*255.*\].*divide by 127.5"):
        exact_scores(store, (x + 1) * 127.5, **EXACT)  # images in [0, 255]
    with pytest.raises(InputError, match=r"image 1 has values in \[-1.*1.1\]"):
        exact_scores(store, torch.cat([x[:1], x[1:] * 1.1]), **EXACT)
    inside = exact_scores(store, x.clamp(-1, 1) * 1.005, **EXACT)  # within the tolerance: scored
    assert inside.shape == (1, 2, 8) and np.isfinite(inside).all()


def test_channels_last_floats_are_told_the_expected_layout(case):
    _, store, images = case
    x = uint8_to_float(images[:2]).permute(0, 2, 3, 1)  # (2, R, R, 3)
    with pytest.raises(InputError, match=r"channels-last \(B, H, W, C\); permute"):
        exact_scores(store, x, **EXACT)
    with pytest.raises(InputError, match=r"expected square images as \(B, C, H, W\).*12x10"):
        exact_scores(store, torch.zeros(1, 3, 12, 10), **EXACT)


def test_exact_scores_accepts_paths_folders_pil_uint8_and_a_store_path(case):
    root, store, images = case
    want = exact_scores(store, uint8_to_float(images[3:4]), **EXACT)
    png = root / "q" / "same.png"
    for corpus in (str(store.path), store.path):
        for queries in (str(png), [png], [Image.open(png)], images[3], images[3:4]):
            got = exact_scores(corpus, queries, **EXACT)
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
    both = exact_scores(str(store.path), [str(root / "q")], **EXACT)  # a folder: big.png, same.png in order
    assert both.shape == (1, 2, 8)
    # batched with another query the float32 product has other shapes (and may take the other conv layout,
    # scoring/conv_layout.py): equal to float32 summation order, far inside the 1e-4 the scores hold
    np.testing.assert_allclose(both[:, 1:], want, rtol=2e-5, atol=1e-9)
    assert int(np.argmax(both[0, 1])) == 3 and int(np.argmax(both[0, 0])) == 5


def test_a_query_of_another_size_is_resized_with_a_warning_and_a_record_or_refused(case, caplog):
    root, store, _ = case
    shape = (3, R, R)
    with caplog.at_level(logging.WARNING, logger="nda_ann.corpus.queries"):
        batch = load_query_batch([root / "q"], shape)
    assert batch.names == ["big.png", "same.png"] and tuple(batch.images.shape) == (2, 3, R, R)
    assert batch.resized == [{"query": "big.png", "size": [2 * R, 2 * R], "resized_to": [R, R]}]
    assert "big.png (24x24)" in caplog.text and "same.png" not in caplog.text
    renamed = load_query_batch([root / "q" / "big.png"], shape, names=["mine"])
    assert renamed.resized[0]["query"] == "mine"
    assert load_query_batch([root / "q" / "same.png"], shape, allow_resize=False).resized == []
    with pytest.raises(InputError, match=r"big.png is 24x24 but the corpus holds 12x12 images.*--resize"):
        load_query_batch([root / "q"], shape, allow_resize=False)
    u8 = np.zeros((2 * R, 2 * R, 3), np.uint8)
    assert load_query_batch(u8, shape).resized[0]["size"] == [2 * R, 2 * R]
    with pytest.raises(InputError, match="is 24x24"):
        load_query_batch(u8, shape, allow_resize=False)


def test_a_missing_store_path_is_a_clear_error(tmp_path):
    from nda_ann.errors import StoreError

    with pytest.raises(StoreError, match="nope"):
        exact_scores(str(tmp_path / "nope"), torch.zeros(1, 3, R, R), **EXACT)
