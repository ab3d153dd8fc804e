"""Image opening, SigLIP and VQ preprocessing, AnyRes, and bad input."""

import io
import re
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from unitoken_jax.tokenizer import anyres
from unitoken_jax.tokenizer.images import (ImageError, load_image, pil_from_pixels, siglip_pixels, to_rgb, vq_crop,
                                           vq_pixels, whiten)

PHOTOS = {name: getattr(skdata, name)() for name in ("astronaut", "coffee", "chelsea", "rocket", "camera")}


def _pil(name):
    return Image.fromarray(PHOTOS[name])


@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_siglip_preprocessing_equals_transformers(name):
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    proc = SiglipImageProcessorPil(size={"height": 384, "width": 384}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    image = _pil(name)
    theirs = proc(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    ours = siglip_pixels(load_image(image))
    assert ours.shape == (384, 384, 3) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs, atol=1e-6)


def test_transparency_is_dropped_for_siglip_and_blended_for_vq():
    """The SigLIP side composited transparency on white (transformers' `convert_to_rgb`), but the
    reference calls `Image.open(path).convert("RGB")` before its SigLIP processor (finetune_solver_*.py,
    demos/inference.py), which drops it: a transparent pixel gave 1.0 where the ViT was trained on
    the colour under it."""
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = np.array([0, 64, 128, 255])[None, :]
    image = Image.fromarray(rgba, "RGBA")
    np.testing.assert_array_equal(np.asarray(to_rgb(image)), np.asarray(image.convert("RGB")))
    np.testing.assert_array_equal(siglip_pixels(image, 4), siglip_pixels(image.convert("RGB"), 4))
    assert siglip_pixels(image, 4)[0, 0].tolist() == pytest.approx([200 / 255 * 2 - 1, -1.0, -1.0])
    a = rgba[..., 3:] / 255.0
    expected = ((1 - a) * 255 + a * rgba[..., :3]).astype(np.uint8)  # the reference's formula, truncating
    np.testing.assert_array_equal(np.asarray(whiten(image)), expected)
    assert np.asarray(whiten(image))[0, 0].tolist() == [255, 255, 255]


def test_premultiplied_alpha_is_read_as_plain_alpha():
    """PIL's premultiplied modes ("La", "RGBa") converted to nothing but their plain forms: a
    ValueError of PIL's ("conversion from La to L not supported")."""
    plain = Image.new("LA", (4, 4), (120, 255))  # (opaque: premultiplying rounds nothing)
    assert load_image(plain.convert("La")).mode == "LA"
    assert to_rgb(load_image(plain.convert("La"))).getpixel((1, 1)) == to_rgb(plain).getpixel((1, 1))
    colour = Image.new("RGBA", (4, 4), (200, 100, 50, 255))
    assert load_image(colour.convert("RGBa")).getpixel((1, 1)) == (200, 100, 50, 255)


def test_modes_are_converted_correctly(tmp_path):
    grey16 = (np.arange(16, dtype=np.uint16).reshape(4, 4) * 4369)  # 0 .. 65535
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    loaded = np.asarray(to_rgb(load_image(tmp_path / "g16.png")))
    np.testing.assert_array_equal(loaded[..., 0], np.round(grey16 / 65535 * 255).astype(np.uint8))  # scaled, not clipped
    # 8-bit values held as 32-bit ints (a caller's convert("I") or int32 array): read as PIL's convert("L")
    # reads them (rescaled as 16-bit they were black)
    grey8 = Image.fromarray((np.arange(16, dtype=np.uint8).reshape(4, 4) * 17))
    np.testing.assert_array_equal(np.asarray(load_image(grey8.convert("I"))), np.asarray(grey8))
    cmyk = Image.new("CMYK", (3, 3), (0, 255, 255, 0))  # pure red in CMYK
    assert np.asarray(to_rgb(cmyk))[0, 0].tolist() == [255, 0, 0]
    pal = Image.new("P", (2, 2))
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.putpixel((0, 0), 1)
    pal.info["transparency"] = 0
    rgb = np.asarray(to_rgb(pal))
    assert rgb[0, 0].tolist() == [10, 20, 30] and rgb[1, 1].tolist() == [0, 0, 0]  # as pal.convert("RGB")
    assert to_rgb(Image.new("L", (2, 2), 7)).getpixel((0, 0)) == (7, 7, 7)


def test_vq_crop_is_deterministic_and_follows_the_reference_rule():
    image = _pil("coffee")  # 600 x 400
    a, b = vq_crop(image, 256), vq_crop(image, 256)
    assert a.size == (256, 256) and np.array_equal(np.asarray(a), np.asarray(b))
    # reference: halve with BOX while both sides >= 2x (400 < 512: not here), bicubic so that it
    # covers the square (600x400 * 0.64 = 384x256), crop (here: centred)
    expected = image.resize((384, 256), Image.BICUBIC).crop((64, 0, 320, 256))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(expected))
    big = _pil("astronaut")  # 512 x 512 -> 256 -> 128 by box halving, then nothing left to scale
    expected = big.resize((256, 256), Image.BOX).resize((128, 128), Image.BOX)
    np.testing.assert_array_equal(np.asarray(vq_crop(big, 128)), np.asarray(expected))
    s1, s2 = vq_crop(image, 256, seed=1), vq_crop(image, 256, seed=1)
    assert np.array_equal(np.asarray(s1), np.asarray(s2))
    assert any(not np.array_equal(np.asarray(vq_crop(image, 256, seed=s)), np.asarray(a)) for s in range(2, 6))
    px = vq_pixels(a)
    assert px.min() >= -1 and px.max() <= 1
    np.testing.assert_array_equal(np.asarray(pil_from_pixels(px)), (((px + 1) / 2) * 255).astype(np.uint8))


@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_anyres_choice_and_unpad_equal_transformers(name):
    from transformers.image_processing_utils import select_best_resolution
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    image = _pil(name)
    w, h = image.size
    pinpoints_hw = [(ph, pw) for pw, ph in anyres.GRID_PINPOINTS]
    best_h, best_w = select_best_resolution((h, w), pinpoints_hw)
    assert anyres.select_best_resolution((w, h)) == (best_w, best_h)

    result = anyres.anyres_image(image)
    across, down = result.grid_wh
    assert result.pixels.shape == (1 + across * down, 384, 384, 3)
    grid = torch.arange(down * 27 * across * 27).reshape(1, down * 27, across * 27)
    kept = unpad_image(grid, (h, w))[0]
    ours = anyres.unpad_slices((down * 27, across * 27), (w, h))
    assert torch.equal(grid[0][ours], kept)  # the same cells, not only as many (an off-centre crop fails)
    # end-of-row rule: base 729, then every kept row followed by one newline
    rows, cols = kept.shape
    assert result.num_positions == 729 + rows * (cols + 1)
    newline_at = np.flatnonzero(result.entries == anyres.NEWLINE_ENTRY)
    assert newline_at.tolist() == [729 + (r + 1) * (cols + 1) - 1 for r in range(rows)]
    # the base image's features come first; the first kept feature is the grid's top-left kept cell
    assert result.entries[:729].tolist() == list(range(729))


def test_anyres_tiles_are_row_major_over_the_padded_image():
    image = Image.fromarray(PHOTOS["coffee"])  # 600 x 400 -> (768, 384)? checked below
    result = anyres.anyres_image(image)
    best = anyres.select_best_resolution(image.size)
    padded = anyres.resize_and_pad(image, best)
    for t in range(result.grid_wh[0] * result.grid_wh[1]):
        y, x = divmod(t, result.grid_wh[0])
        tile = padded.crop((x * 384, y * 384, x * 384 + 384, y * 384 + 384))
        np.testing.assert_allclose(result.pixels[1 + t], siglip_pixels(tile), atol=1e-6)


def test_anyres_at_a_smaller_tile_cuts_the_tiles_its_entries_count():
    """With 56-px tiles (the small models') the default canvases are the reference's scaled to the
    tile, as the pre-tokenizer scales them: 1 + across x down tiles, every entry a feature of one of
    them (the 384-px canvases cut 14 tiles a row where the entries counted 13, so every index past
    the first row pointed at the wrong tile). A pipeline takes the canvases it was trained with."""
    from unitoken_jax.inference.pipeline import UniTokenPipeline

    image = Image.new("RGB", (400, 300), (200, 30, 30))
    result = anyres.anyres_image(image, 56, 14)
    across, down = result.grid_wh
    assert (across, down) == (2, 2) and result.pixels.shape == (1 + across * down, 56, 56, 3)  # 112 x 112 fits best
    assert result.entries.max() < len(result.pixels) * 16
    with pytest.raises(ValueError, match=r"pinpoints \[\(100, 56\)\] are not whole multiples of the 56-px tile"):
        anyres.anyres_image(image, 56, 14, [(112, 56), (100, 56)])
    # an empty list is the defaults everywhere (the picture went on None, a TypeError, while the
    # positions were sized for the defaults), and a flat pair or a float canvas is said as such
    assert anyres.anyres_image(image, 56, 14, []).grid_wh == (2, 2)
    assert anyres.max_block(56, 14, []) == anyres.max_block(56, 14, None)
    for bad in ([112, 56], [(112.0, 56)], [(112, 56, 1)], [(True, 56)]):
        with pytest.raises(ValueError, match="give .width, height. pairs of whole pixels"):
            anyres.anyres_image(image, 56, 14, bad)
        with pytest.raises(ValueError, match="give .width, height. pairs of whole pixels"):
            anyres.max_block(56, 14, bad)

    from unitoken_jax.world import default

    bundled = default.pipeline()
    kw = dict(anyres=True, vq_size=bundled.vq_size, default_size=bundled.default_size)
    request = UniTokenPipeline(bundled.model, bundled.tokenizer, bundled.vq, **kw).understand_request([image], "?")
    assert len(request.pixels) == 5
    tile = bundled.siglip_size
    tall = UniTokenPipeline(bundled.model, bundled.tokenizer, bundled.vq, anyres_pinpoints=[(tile, 3 * tile)], **kw)
    assert len(tall.understand_request([image], "?").pixels) == 4  # the base tile and three down


def test_an_anyres_picture_has_the_references_budget_the_discrete_tokens_and_its_siglip_block_on_top():
    """The 4,096 limit counted the SigLIP block: a square photo's 4,760 positions were over it before
    any text, so pre-tokenizing skipped most AnyRes pictures and the AnyRes pipeline refused them.
    The reference caps a sample's discrete tokens at the model's positions and inserts the block
    after (modeling_xllmx_chameleon_anyres.py)."""
    from unitoken_jax.data import pretokenize as pt
    from unitoken_jax.inference.pipeline import UniTokenPipeline
    from unitoken_jax.world import default

    # the largest block: a picture of a canvas's exact shape, nothing unpadded (and the block's SEP)
    for tile, patch in ((384, 14), (56, 14)):
        biggest = max(len(anyres.anyres_entries((w // tile, h // tile), (w, h), tile // patch))
                      for w, h in anyres.default_pinpoints(tile))
        assert anyres.max_block(tile, patch) == 1 + biggest
    assert anyres.max_block() == 1 + 729 + 54 * 55  # 2 x 2 tiles: 54 rows of 54 features and a newline
    assert pt.PretokenizeSettings(anyres=True).max_length == 4096 + 3700
    assert pt.PretokenizeSettings().max_length == 4096
    assert pt.PretokenizeSettings(anyres=True, continuous=False).max_length == 4096  # no block
    assert pt.PretokenizeSettings(anyres=True, max_length=5000).max_length == 5000
    from unitoken_jax.configs import stages
    assert stages.stage_config(2, "anyres").data.length >= 4096 + 3700  # such a sample fits a row

    bundled = default.pipeline()
    positions = bundled.model.config.decoder.max_position_embeddings
    pipe = UniTokenPipeline(bundled.model, bundled.tokenizer, bundled.vq, anyres=True, vq_size=bundled.vq_size,
                            default_size=bundled.default_size)
    block = anyres.max_block(bundled.siglip_size, bundled.patch)
    assert pipe.decode_loop.config.decoder.max_position_embeddings == positions + block
    assert bundled.model.config.decoder.max_position_embeddings == positions  # the model itself is unchanged
    square = Image.new("RGB", (300, 300), (30, 200, 30))
    short = len(pipe.understand_request([square], "?").tokens)
    per_word = len(bundled.tokenizer.encode_text(" red" * 11)) - len(bundled.tokenizer.encode_text(" red" * 10))
    request = pipe.understand_request([square], "?" + " red" * ((positions + block // 2 - short) // per_word))
    assert positions < len(request.tokens) <= positions + block  # (refused before: over the model's positions)


# --- bad input ------------------------------------------------------------------------------------

def _png_header(width, height):
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def test_empty_truncated_and_non_image_files(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        load_image(tmp_path / "empty.png")
    buf = io.BytesIO()
    Image.fromarray(PHOTOS["astronaut"]).save(buf, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_image(tmp_path / "cut.jpg")
    (tmp_path / "notes.png").write_text("this is not a picture")
    with pytest.raises(ImageError, match="not an image"):
        load_image(tmp_path / "notes.png")
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="empty"):
        load_image(b"")
    with pytest.raises(ImageError, match="is a directory"):  # was a bare IsADirectoryError
        load_image(tmp_path)
    # files cut anywhere, of the formats whose readers decode as they open (a WebP, a JPEG cut in its
    # header raised PIL's bare OSError: a 500 from the server, a whole caption run stopped), and a
    # cut file the caller opened with PIL
    picture = Image.fromarray(PHOTOS["astronaut"]).resize((64, 64))
    for form in ("WEBP", "JPEG", "PNG"):
        buf = io.BytesIO()
        picture.save(buf, form)
        data = buf.getvalue()
        for part in (0.1, 0.3, 0.5, 0.7, 0.9):
            (tmp_path / "cut").write_bytes(data[:int(len(data) * part)])
            with pytest.raises(ImageError, match=re.escape(f"{tmp_path / 'cut'}: ")):
                load_image(tmp_path / "cut")
    # a PIL image is named by its file (it was "PngImageFile")
    with pytest.raises(ImageError, match=re.escape(f"{tmp_path / 'cut'}: cannot decode") + ".*truncated or corrupt"):
        load_image(Image.open(tmp_path / "cut"))
    # a sound file opened wrongly is not called truncated or corrupt: a file object in text mode, a
    # PIL image closed before the call
    picture.save(tmp_path / "good.png")
    with open(tmp_path / "good.png") as text:
        with pytest.raises(ImageError, match="good.png: a file opened in text mode; open pictures in binary mode"):
            load_image(text)
    closed = Image.open(tmp_path / "good.png")
    closed.load()
    closed.close()
    with pytest.raises(ImageError, match=re.escape(f"{tmp_path / 'good.png'}: the PIL image was closed")):
        load_image(closed)


@pytest.mark.parametrize("side", [9000, 10_000, 100_000])
def test_decompression_bombs_are_refused_before_decoding(tmp_path, side):
    """Against this package's limit, in its words, with no warning of PIL's own first (PIL warns past
    its limit and raises past twice it: three limits were said for three sizes)."""
    import warnings

    (tmp_path / "bomb.png").write_bytes(_png_header(side, side))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageError, match=re.escape(f"refused, {f'{side}x{side} = ' if side < 12_000 else ''}"
                                                       f"{side * side} pixels is more than the limit of 67108864")):
            load_image(tmp_path / "bomb.png")


def test_animated_gif_gives_its_first_frame_and_says_so_once(tmp_path, monkeypatch, caplog):
    from unitoken_jax.tokenizer import images

    monkeypatch.setattr(images, "_SAID_FRAMES", [])
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    with caplog.at_level("WARNING", logger="unitoken_jax.tokenizer.images"):
        for _ in range(2):
            image = load_image(tmp_path / "anim.gif")
            assert to_rgb(image).getpixel((3, 3)) == (255, 0, 0)
    said = [r.getMessage() for r in caplog.records]
    assert said == [f"{tmp_path / 'anim.gif'} is an animation of 3 frames: only its first frame is read (said for "
                    "the first animation only)"]
    # a phone's JPEG holding a second picture (a depth or gain map: PIL's MPO) is no animation: its
    # first picture is the photo, unsaid (it was called an animation, and took the one warning)
    monkeypatch.setattr(images, "_SAID_FRAMES", [])
    caplog.clear()
    frames[0].save(tmp_path / "phone.jpg", format="MPO", save_all=True, append_images=frames[1:2])
    assert Image.open(tmp_path / "phone.jpg").format == "MPO"
    with caplog.at_level("WARNING", logger="unitoken_jax.tokenizer.images"):
        red = to_rgb(load_image(tmp_path / "phone.jpg")).getpixel((3, 3))
    assert red[0] > 200 and red[2] < 60, red  # (JPEG's rounding)
    assert [r.getMessage() for r in caplog.records] == []


@pytest.mark.parametrize("orientation, turn", [(1, 0), (3, 2), (6, -1), (8, 1)])
def test_a_photo_is_turned_as_its_exif_orientation_says_it_is_shown(tmp_path, orientation, turn):
    """A phone stores its photos as the sensor saw them and tags how to show them (EXIF
    Orientation: 6 = turn a quarter clockwise, 8 = counter-clockwise, 3 = half a turn). The
    picture read is the one shown, from a path, from bytes (what the server gets) or a PIL image
    the caller opened (taken as stored before: another answer than its file's), here against
    numpy's rotation of the stored pixels, as transformers' `load_image` turns all three."""
    stored = np.zeros((48, 64, 3), np.uint8)
    stored[:, :32] = (255, 0, 0)  # left half red, right half blue
    stored[:, 32:] = (0, 0, 255)
    stored[:8, :8] = (0, 255, 0)  # and a green corner, so that no turn looks like another
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(tmp_path / "photo.png", exif=exif.tobytes())
    shown = np.rot90(stored, k=turn)
    for source in (tmp_path / "photo.png", (tmp_path / "photo.png").read_bytes(), Image.open(tmp_path / "photo.png")):
        np.testing.assert_array_equal(np.asarray(load_image(source)), shown)
    from transformers.image_utils import load_image as transformers_load

    np.testing.assert_array_equal(np.asarray(transformers_load(Image.open(tmp_path / "photo.png"))), shown)


@pytest.mark.parametrize("size", [(1, 1), (1, 2000), (3000, 2), (5, 700)])
def test_tiny_and_extreme_aspect_ratios(size):
    image = Image.new("RGB", size, (10, 200, 30))
    assert vq_crop(image, 64).size == (64, 64)
    assert siglip_pixels(image).shape == (384, 384, 3)
    result = anyres.anyres_image(image)
    assert result.pixels.shape[0] == 1 + result.grid_wh[0] * result.grid_wh[1]
    assert result.num_positions >= 729  # a 3000x2 strip keeps no tile row after unpad, as in the reference
    assert (result.entries[result.entries >= 0] < result.pixels.shape[0] * 729).all()


def _cover_then_crop(image, size, seed=None):
    """The reference's rule written out (no halving needed for a strip): scale to cover, crop."""
    scale = max(size / image.width, size / image.height)
    cover = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))),
                         Image.BICUBIC)
    if seed is None:
        left, top = (cover.width - size) // 2, (cover.height - size) // 2
    else:
        rng = np.random.default_rng(seed)
        left, top = int(rng.integers(0, cover.width - size + 1)), int(rng.integers(0, cover.height - size + 1))
    return cover.crop((left, top, left + size, top + size))


@pytest.mark.parametrize("seed", [None, 3])
def test_a_long_strip_is_cropped_without_scaling_all_of_it(seed):
    """A 60000 x 1 PNG passed the pixel-count check and died scaling to ~30 M x 512 (issue 15);
    the crop now scales only the part it keeps, with the reference rule's result."""
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (1, 60000, 3), dtype=np.uint8)).save(buf, "PNG")
    strip = load_image(buf.getvalue())
    assert vq_crop(strip, 512, seed=seed).size == (512, 512)
    small = Image.fromarray(rng.integers(0, 256, (3, 200, 3), dtype=np.uint8))  # 66x the square when covering
    got = np.asarray(vq_crop(small, 64, seed=seed), np.int16)
    want = np.asarray(_cover_then_crop(small, 64, seed), np.int16)
    assert np.abs(got - want).max() <= 1


def test_a_uint8_array_is_a_picture_and_other_arrays_and_objects_are_refused_by_what_they_are():
    """An array (as numpy, PIL and skimage hold pictures) went to PIL's file opener: "'numpy.ndarray'
    object has no attribute 'read'"."""
    cat = skdata.chelsea()  # [H, W, 3] uint8
    np.testing.assert_array_equal(np.asarray(load_image(cat)), cat)
    rgba = np.dstack([cat, np.full(cat.shape[:2], 128, np.uint8)])
    assert load_image(rgba).mode == "RGBA"
    np.testing.assert_array_equal(np.asarray(load_image(rgba)), rgba)
    grey = cat[..., 0]
    for array in (grey, grey[..., None]):
        picture = load_image(array)
        assert picture.mode == "L"
        np.testing.assert_array_equal(np.asarray(picture), grey)
    with pytest.raises(ImageError, match=r"<array 300x451x3 float64>: an array picture holds uint8 values 0\.\.255"):
        load_image(cat / 255.0)  # 0..1, -1..1 or 0..255 cannot be told from the values: said, not guessed
    with pytest.raises(ImageError, match=r"is \[H, W\] or \[H, W, 1 \| 3 \| 4\], got shape \(4, 4, 5\)"):
        load_image(np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(ImageError, match="a picture is a path, bytes, a file object, a PIL image or a uint8 array; "
                                         "got int"):
        load_image(5)
