"""Attribution figures: PNG of the documented size, tiles upscaled with NEAREST, heatmaps drawn."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from nda_ann.results.figures import CELL, MAX_PROPONENTS, PAD, TITLE_HEIGHT, Proponent, colormap, figure_size, render_attribution


def _images(rng, n):
    return rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def test_figure_with_heatmaps_has_the_expected_size_and_tiles(tmp_path, rng):
    query, props = _images(rng, 1)[0], _images(rng, 10)
    heat = [rng.random((32, 32)) for _ in range(10)]
    proponents = [Proponent(props[i], f"#{i} photo.png@x=1,y=2,s=64,flip=0", 10.0 - i, heat[i]) for i in range(10)]
    path = render_attribution(query, proponents, tmp_path / "fig.png", title="a title")
    assert path == tmp_path / "fig.png" and not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*"))
    img = np.asarray(Image.open(path).convert("RGB"))
    assert (img.shape[1], img.shape[0]) == figure_size(10, heatmaps=True, title=True)
    assert img.shape[1] == PAD + (1 + MAX_PROPONENTS) * (CELL + PAD)  # capped at 8 proponents
    top = PAD + TITLE_HEIGHT
    # the query tile is the query upscaled with NEAREST
    want = np.asarray(Image.fromarray(query).resize((CELL, CELL), Image.Resampling.NEAREST))
    assert np.array_equal(img[top : top + CELL, PAD : PAD + CELL], want)
    # first proponent next to it
    x1 = PAD + (CELL + PAD)
    want1 = np.asarray(Image.fromarray(props[0]).resize((CELL, CELL), Image.Resampling.NEAREST))
    assert np.array_equal(img[top : top + CELL, x1 : x1 + CELL], want1)
    # second row: heatmap tiles differ from the plain proponent and from the background
    row = CELL + 4 * 13 + PAD
    tile = img[top + row : top + row + CELL, x1 : x1 + CELL]
    assert tile.std() > 10 and not np.array_equal(tile, want1)


def test_figure_without_heatmaps_is_one_row(tmp_path, rng):
    props = [Proponent(img, f"#{i}", 1.0) for i, img in enumerate(_images(rng, 3))]
    path = render_attribution(_images(rng, 1)[0], props, tmp_path / "sub" / "f.png")
    with Image.open(path) as im:
        assert im.size == figure_size(3, heatmaps=False, title=False)
    assert figure_size(3, False, False)[1] < figure_size(3, True, False)[1]


def test_heatmap_brightness_follows_contribution(tmp_path):
    query = np.full((32, 32, 3), 128, np.uint8)
    heat = np.zeros((32, 32))
    heat[:, 16:] = 1.0  # right half contributes
    path = render_attribution(query, [Proponent(query, "#0", 1.0, heat)], tmp_path / "h.png")
    img = np.asarray(Image.open(path).convert("RGB")).astype(float)
    top = PAD + CELL + 4 * 13 + PAD
    x = PAD + CELL + PAD
    tile = img[top : top + CELL, x : x + CELL]
    assert tile[:, CELL // 2 :].mean() > tile[:, : CELL // 2].mean() + 40


def test_colormap_ramp():
    c = colormap(np.array([0.0, 0.5, 1.0, -3.0, 7.0, np.nan]))
    assert c.dtype == np.uint8 and c.shape == (6, 3)
    assert c[0].sum() < c[1].sum() < c[2].sum()  # dark to bright
    assert np.array_equal(c[3], c[0]) and np.array_equal(c[4], c[2])  # clipped


def test_rejects_bad_images(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        render_attribution(np.zeros((32, 32, 3), np.float32), [], tmp_path / "x.png")


def test_heatmaps_show_the_share_of_each_image_score_with_a_labelled_colour_bar(tmp_path, rng):
    """Two proponents whose maps differ by a factor of 3 draw the same tile (shares, not raw mass);
    the first cell of the heatmap row is the colour ramp, bright (the largest share) at the top."""
    from nda_ann.results.figures import BAR_WIDTH, TICK_GAP, percent, share_maps, share_ticks

    query = np.full((32, 32, 3), 128, np.uint8)
    heat = rng.random((32, 32)) ** 4
    props = [Proponent(query, "#0", 3.0, 3 * heat), Proponent(query, "#1", 1.0, heat)]
    img = np.asarray(Image.open(render_attribution(query, props, tmp_path / "s.png")).convert("RGB")).astype(int)
    top = PAD + CELL + 4 * 13 + PAD
    x1, x2 = PAD + CELL + PAD, PAD + 2 * (CELL + PAD)
    np.testing.assert_array_equal(img[top : top + CELL, x1 : x1 + CELL], img[top : top + CELL, x2 : x2 + CELL])
    bar = img[top : top + CELL, PAD + 2 : PAD + 2 + BAR_WIDTH]
    np.testing.assert_array_equal(bar[0, 0], colormap(np.array(1.0)))
    np.testing.assert_array_equal(bar[-1, 0], colormap(np.array(0.0)))
    assert (np.diff(bar[:, 0].sum(1)) <= 0).all()  # darker downwards
    shares = share_maps([3 * heat, None])
    assert shares[1] is None and abs(shares[0].sum() - 1) < 1e-9
    vmax = float(shares[0].max())
    ticks = share_ticks(vmax)
    assert ticks[0] == (vmax, 0) and ticks[-1] == (0.0, CELL - 1)
    rows = [r for _, r in ticks]
    assert rows == sorted(rows) and min(np.diff(rows)) >= TICK_GAP and len(ticks) >= 3
    assert [v for v, _ in ticks] == sorted((v for v, _ in ticks), reverse=True)
    assert percent(0.0213) == "2.1%" and percent(0.0005) == "0.05%" and percent(0) == "0"
