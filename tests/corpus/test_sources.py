"""The readers and the transform alone: decoding quirks, geometry, Parquet and .npy inputs."""
from __future__ import annotations

import io
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from nda_ann.errors import InputError
from nda_ann.corpus.sources import DecodeError, FolderSource, NpySource, ParquetSource, open_image, open_source
from nda_ann.corpus.transform import resize_center_crop, to_array

R = 16
BIG = 1 << 27


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def decode(data: bytes, channels: int = 3, r: int = R) -> np.ndarray:
    return to_array(open_image(data, BIG), r, channels)


# ---- geometry ---------------------------------------------------------------------------------

def test_exact_size_image_is_byte_identical(rng):
    arr = rng.integers(0, 256, (R, R, 3), dtype=np.uint8)
    assert np.array_equal(decode(encode(Image.fromarray(arr))), arr)


def test_tall_image_equals_full_resize_then_center_crop(rng):
    arr = rng.integers(0, 256, (3 * R, 2 * R, 3), dtype=np.uint8)  # 2R wide, 3R tall
    img = Image.fromarray(arr)
    full = np.asarray(img.resize((R, 3 * R // 2), Image.Resampling.LANCZOS))  # an independent path
    top = (3 * R // 2 - R) // 2
    assert np.array_equal(to_array(img, R, 3), full[top:top + R])


def test_tall_image_keeps_the_centre_square():
    arr = np.zeros((3 * R, 2 * R, 3), dtype=np.uint8)
    arr[: R // 2] = (255, 0, 0)  # outside the centre 2R x 2R square: red above, blue below
    arr[R // 2: R // 2 + 2 * R] = 128
    arr[R // 2 + 2 * R:] = (0, 0, 255)
    out = to_array(Image.fromarray(arr), R, 3).astype(int)
    assert np.abs(out[3:-3] - 128).max() <= 1  # away from the filter's reach of the edges: pure centre
    assert out[0, :, 0].mean() > out[-1, :, 0].mean() and out[-1, :, 2].mean() > out[0, :, 2].mean()


def test_shorter_side_equal_to_r_is_cropped_not_resampled(rng):
    arr = rng.integers(0, 256, (R, R + 5, 3), dtype=np.uint8)
    assert np.array_equal(to_array(Image.fromarray(arr), R, 3), arr[:, 2:2 + R])


def test_small_image_is_upscaled():
    img = Image.new("RGB", (4, 6), (10, 200, 30))
    out = to_array(img, R, 3)
    assert out.shape == (R, R, 3) and np.abs(out.astype(int) - (10, 200, 30)).max() <= 1
    assert resize_center_crop(img, R).size == (R, R)


# ---- modes ------------------------------------------------------------------------------------

def test_sixteen_bit_gray_is_scaled_not_clipped():
    values = (np.arange(256, dtype=np.uint16) * 257).reshape(R, R)
    data = encode(Image.fromarray(values))
    assert open_image(data, BIG).mode.startswith("I")
    out = decode(data, channels=1)
    assert np.array_equal(out[:, :, 0], np.arange(256, dtype=np.uint8).reshape(R, R))


def test_alpha_is_composited_on_white():
    rgba = np.zeros((R, R, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[:, : R // 2, 3] = 255  # left half opaque red, right half fully transparent
    out = decode(encode(Image.fromarray(rgba, "RGBA")))
    assert (out[:, : R // 2] == (255, 0, 0)).all() and (out[:, R // 2:] == 255).all()
    la = Image.fromarray(np.stack([np.zeros((R, R), np.uint8), np.where(np.eye(R) > 0, 255, 0).astype(np.uint8)], -1), "LA")
    gray = decode(encode(la), channels=1)[:, :, 0]
    assert (np.diag(gray) == 0).all() and gray[0, 1] == 255


def test_palette_with_transparency():
    img = Image.new("P", (R, R), 0)
    img.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    img.paste(1, (0, 0, R, R // 2))  # top half index 1, made transparent
    out = decode(encode(img, transparency=1))
    assert (out[: R // 2] == 255).all() and (out[R // 2:] == (255, 0, 0)).all()


def test_cmyk_tiff():
    img = Image.new("CMYK", (R, R), (255, 0, 0, 0))  # pure cyan
    assert (decode(encode(img, "TIFF")) == (0, 255, 255)).all()


def test_gray_to_one_and_three_channels(rng):
    gray = rng.integers(0, 256, (R, R), dtype=np.uint8)
    data = encode(Image.fromarray(gray))
    assert np.array_equal(decode(data, channels=1)[:, :, 0], gray)
    assert np.array_equal(decode(data, channels=3), np.repeat(gray[:, :, None], 3, axis=2))


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (2 * R, R), 0)
    img.paste((255, 255, 255), (R, 0, 2 * R, R))  # stored: left black, right white
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: left edge goes to the top
    shown = open_image(encode(img, "JPEG", exif=exif.tobytes(), quality=95), BIG)
    assert shown.size == (R, 2 * R)
    out = to_array(shown, R, 1)[:, :, 0].astype(int)
    assert out[:2].mean() < 60 and out[-2:].mean() > 200


def test_gif_first_frame():
    frames = [Image.new("RGB", (R, R), (255, 0, 0)), Image.new("RGB", (R, R), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert (decode(data) == (255, 0, 0)).all()


# ---- decode failures --------------------------------------------------------------------------

def test_unusable_bytes_raise_decode_error(rng):
    png = encode(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    for data, words in [(b"", "empty"), (b"not an image at all", "not a readable image"), (png[: len(png) // 2], "truncated")]:
        with pytest.raises(DecodeError, match=words):
            open_image(data, BIG)


def test_decompression_bomb_guard():
    for side in (12, 20):  # PIL warns above the limit and errors above twice it: both are skips
        with pytest.raises(DecodeError, match="decompression bomb"):
            open_image(encode(Image.new("L", (side, side))), max_pixels=100)
    assert Image.MAX_IMAGE_PIXELS != 100  # the limit is restored


def test_decompression_bomb_message_quotes_the_limit_in_force():
    """PIL quotes twice its limit above that (and 2 for a limit of 1); the message quotes ours."""
    for side, limit in ((12, 100), (20, 100), (2, 1), (5, 12)):
        with pytest.raises(DecodeError) as err:
            open_image(encode(Image.new("L", (side, side))), max_pixels=limit)
        text = str(err.value)
        assert f"image of {side * side:,} pixels, over the limit of {limit:,} pixel" in text, text
        assert f"limit of {2 * limit:,} " not in text and "--max-pixels" in text


# ---- readers ----------------------------------------------------------------------------------

def test_folder_lists_images_sorted_and_ignores_others(tmp_path):
    for rel in ["b/2.PNG", "a.jpg", "b/1.webp", ".hidden/x.png", "notes.txt", ".x.png"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    src = FolderSource(tmp_path)
    assert src.files == ["a.jpg", "b/1.webp", "b/2.PNG"] and src.ignored == {".txt": 1}
    assert [i.name for i in src.items(1)] == ["b/1.webp", "b/2.PNG"]


def test_empty_folder_is_an_error_naming_it(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(InputError, match="no image files") as err:
        open_source(tmp_path)
    assert err.value.path == str(tmp_path)


def hf_table(n: int, null_at: int | None = None) -> pa.Table:
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    cells = [None if i == null_at else {"bytes": encode(Image.new("L", (4, 4), i)), "path": f"p{i}.png"} for i in range(n)]
    return pa.table({"image": pa.array(cells, struct), "caption": [f"c{i}" for i in range(n)],
                     "source": [f"s{i}" for i in range(n)], "tags": [[i] for i in range(n)]})


def test_parquet_struct_column_and_metadata(tmp_path):
    pq.write_table(hf_table(3, null_at=1), tmp_path / "t.parquet")
    src = open_source(tmp_path / "t.parquet")
    assert isinstance(src, ParquetSource) and src.image_column == "image"
    assert src.metadata_schema.names == ["image_path", "caption", "meta_source"] and src.dropped == ["tags"]
    items = list(src.items())
    assert [i.name for i in items] == ["t.parquet#0", "t.parquet#1", "t.parquet#2"]
    assert items[0].metadata == {"image_path": "p0.png", "caption": "c0", "meta_source": "s0"}
    assert items[1].error and "null image" in items[1].error and items[2].error is None


def test_parquet_resume_positions_cross_row_groups_and_files(tmp_path):
    for k in range(2):
        t = pa.table({"img": [encode(Image.new("L", (2, 2), i)) for i in range(5)], "n": list(range(5 * k, 5 * k + 5))})
        pq.write_table(t, tmp_path / f"part{k}.parquet", row_group_size=2)
    src = open_source(tmp_path, source_column="n")
    assert src.count == 10 and src.image_column == "img"
    every = [i.name for i in src.items()]
    assert every == [str(i) for i in range(10)]
    for start in (0, 1, 4, 5, 6, 9):
        assert [i.name for i in src.items(start)] == every[start:]


def test_parquet_column_errors_name_file_and_column(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"image": [1, 2], "x": ["a", "b"]}), path)
    with pytest.raises(InputError, match="'image' has type int64") as err:
        open_source(path)
    assert err.value.path == str(path)
    with pytest.raises(InputError, match="'pixels' not found"):
        open_source(path, image_column="pixels")
    pq.write_table(pa.table({"x": ["a"]}), path)
    with pytest.raises(InputError, match="no image column"):
        open_source(path)


def test_parquet_schema_mismatch_between_files(tmp_path):
    pq.write_table(pa.table({"image": [b"x"], "n": [1]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"image": [b"x"], "n": ["one"]}), tmp_path / "b.parquet")
    with pytest.raises(InputError, match="'n' has type string here"):
        open_source(tmp_path)


def test_npy_shapes_and_errors(tmp_path, rng):
    gray = tmp_path / "g.npy"
    np.save(gray, rng.integers(0, 256, (3, 5, 6), dtype=np.uint8))
    src = open_source(gray)
    assert isinstance(src, NpySource) and src.count == 3
    assert [i.name for i in src.items(1)] == ["g.npy[1]", "g.npy[2]"]
    for arr, words in [(np.zeros((2, 4, 4, 3), np.float32), "dtype is float32"), (np.zeros((2, 4), np.uint8), "shape is"),
                       (np.zeros((2, 4, 4, 2), np.uint8), "shape is"), (np.zeros((0, 4, 4, 3), np.uint8), "no images")]:
        bad = tmp_path / "bad.npy"
        np.save(bad, arr)
        with pytest.raises(InputError, match=words) as err:
            open_source(bad)
        assert err.value.path == str(bad)


def test_unsupported_and_mixed_sources(tmp_path):
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(InputError, match="unsupported source"):
        open_source(tmp_path / "x.csv")
    with pytest.raises(InputError, match="no such file"):
        open_source(tmp_path / "missing")
    (tmp_path / "a.png").write_bytes(b"")
    pq.write_table(pa.table({"image": [b"x"]}), tmp_path / "t.parquet")
    with pytest.raises(InputError, match="both image files and .parquet"):
        open_source(tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(b"")
    with pytest.raises(InputError, match="Parquet sources only"):
        open_source(images, image_column="image")
