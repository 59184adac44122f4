"""T_app / T_geo image transforms, T_mask, T_mix and L_geo's transform: their effect on inputs and maps."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sslt_cli.config import AppearanceConfig, GeometricConfig
from sslt_cli.data.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    GeoTransform,
    apply_geo_transform,
    build_eval_transform,
    build_image_transform,
    find_mix_neighbours,
    mix_probability_and_alpha,
    mix_waveforms,
    sample_geo_transform,
    seeded_call,
    spec_augment,
)
from sslt_cli.losses import equivariance_loss

NO_APP, NO_GEO = AppearanceConfig(enabled=False), GeometricConfig(enabled=False)  # a group switched off


def textured_image(width: int = 96, height: int = 96, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def denormalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return x * std + mean


# --- image transforms -----------------------------------------------------------------------------------------------


def test_row_a_transform_is_resize_and_normalise_only():
    image = textured_image(80, 60)
    transform = build_image_transform(32, NO_APP, NO_GEO)
    first, second = seeded_call(transform, image, 1), seeded_call(transform, image, 2)
    assert first.shape == (3, 32, 32) and first.dtype == torch.float32
    torch.testing.assert_close(first, second)
    expected = torch.from_numpy(np.array(image.resize((32, 32), Image.BICUBIC))).permute(2, 0, 1) / 255.0
    torch.testing.assert_close(denormalise(first), expected, atol=1e-5, rtol=0)


def test_geo_only_with_full_crop_gives_the_frame_or_its_mirror():
    image = textured_image(48, 48)
    transform = build_image_transform(48, NO_APP, GeometricConfig(crop_scale=(1.0, 1.0)))
    plain = build_image_transform(48, NO_APP, NO_GEO)(image)
    outcomes = set()
    for seed in range(12):
        out = seeded_call(transform, image, seed)
        if torch.allclose(out, plain, atol=1e-5):
            outcomes.add("same")
        elif torch.allclose(out, plain.flip(-1), atol=1e-5):
            outcomes.add("mirrored")
        else:
            outcomes.add("other")
    assert outcomes == {"same", "mirrored"}


def test_geo_without_flip_never_mirrors_and_app_changes_colours_not_geometry():
    image = Image.new("RGB", (40, 40), (200, 40, 40))
    image.paste((20, 200, 20), (0, 0, 20, 40))  # left half green, right half red
    no_flip = build_image_transform(40, NO_APP, GeometricConfig(crop_scale=(1.0, 1.0), flip=False))
    for seed in range(6):
        out = denormalise(seeded_call(no_flip, image, seed))
        assert out[1, :, :15].mean() > out[0, :, :15].mean()  # green stays on the left
    app_only = build_image_transform(40, AppearanceConfig(jitter_p=1.0, gray_p=0.0, blur_p=0.0), NO_GEO)
    outs = [seeded_call(app_only, image, seed) for seed in range(4)]
    assert not torch.allclose(outs[0], outs[1])
    for out in outs:
        out = denormalise(out)
        # Jitter shifts colours but the left/right halves stay distinct, in place.
        assert (out[:, :, :15].mean(dim=(1, 2)) - out[:, :, 25:].mean(dim=(1, 2))).abs().max() > 0.1


def test_geo_without_crop_resizes_and_rotation_fills_the_corners():
    image = textured_image(60, 40)
    plain = build_image_transform(32, NO_APP, NO_GEO)(image)
    resize_flip = build_image_transform(32, NO_APP, GeometricConfig(crop=False))
    outs = [seeded_call(resize_flip, image, seed) for seed in range(8)]
    assert all(torch.allclose(o, plain) or torch.allclose(o, plain.flip(-1)) for o in outs)
    rotate = build_image_transform(32, NO_APP, GeometricConfig(crop=False, flip=False, rotation=45))
    black = denormalise(seeded_call(rotate, Image.new("RGB", (32, 32), (255, 255, 255)), 1))  # 23 degrees
    assert black[:, 0, 0].max() < 0.05 and black[:, 16, 16].min() > 0.95  # zero fill outside, content inside


def test_stages_compose_and_the_transform_pickles():
    transform = build_image_transform(32, AppearanceConfig(), GeometricConfig(rotation=10))
    image = textured_image()
    staged = seeded_call(lambda x: transform.appearance(transform.geometric(x)), image, 3)
    torch.testing.assert_close(seeded_call(transform, image, 3), staged)
    restored = pickle.loads(pickle.dumps(transform))
    torch.testing.assert_close(seeded_call(restored, image, 3), staged)


def test_grayscale_with_probability_one_gives_equal_channels():
    transform = build_image_transform(32, AppearanceConfig(jitter_p=0.0, gray_p=1.0, blur_p=0.0), NO_GEO)
    out = denormalise(transform(textured_image()))
    torch.testing.assert_close(out[0], out[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], out[2], atol=1e-5, rtol=0)


def test_blur_lowers_pixel_variation():
    image = textured_image(64, 64)
    sharp = denormalise(build_image_transform(64, NO_APP, NO_GEO)(image))
    blur_only = AppearanceConfig(jitter_p=0.0, gray_p=0.0, blur_p=1.0, blur_sigma=(1.5, 2.0))
    blurred = denormalise(build_image_transform(64, blur_only, NO_GEO)(image))
    assert blurred.diff(dim=-1).abs().mean() < 0.5 * sharp.diff(dim=-1).abs().mean()


def test_seeded_call_is_reproducible_and_leaves_the_global_generator_alone():
    transform = build_image_transform(32, AppearanceConfig(), GeometricConfig())
    image = textured_image()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = seeded_call(transform, image, 7)
    assert torch.equal(torch.get_rng_state(), state)
    torch.testing.assert_close(seeded_call(transform, image, 7), first)
    assert not torch.allclose(seeded_call(transform, image, 8), first)


def test_eval_transforms_crop_or_squash():
    # 3 vertical stripes: red | green | blue on a 300 x 100 frame.
    array = np.zeros((100, 300, 3), dtype=np.uint8)
    array[:, :100, 0] = array[:, 100:200, 1] = array[:, 200:, 2] = 255
    image = Image.fromarray(array)
    crop = denormalise(build_eval_transform(32, "resize_centercrop")(image))
    assert crop.shape == (3, 32, 32)
    assert crop[1].mean() > 0.95 and crop[0].mean() < 0.05  # the centre crop sees only the green stripe
    square = denormalise(build_eval_transform(33, "resize_square")(image))
    assert square[0, :, :8].mean() > 0.95 and square[1, :, 14:19].mean() > 0.95 and square[2, :, -8:].mean() > 0.95
    with pytest.raises(ValueError, match="unknown eval image mode 'crop'"):
        build_eval_transform(32, "crop")


# --- T_mask ---------------------------------------------------------------------------------------------------------


def test_spec_augment_masks_the_ranges_drawn_from_the_generator():
    spec = torch.rand(1, 40, 300) + 1.0
    out = spec_augment(spec, torch.Generator().manual_seed(5), p=1.0, time_mask=180, freq_mask=35)
    # Replay the same draws: p, time width, time start, freq width, freq start (torchaudio's order: time, then freq).
    gen = torch.Generator().manual_seed(5)
    torch.rand((), generator=gen)
    t_width = int(torch.rand((), generator=gen).item() * 180)
    t_start = int(torch.randint(0, 300 - t_width + 1, (), generator=gen).item())
    f_width = int(torch.rand((), generator=gen).item() * 35)
    f_start = int(torch.randint(0, 40 - f_width + 1, (), generator=gen).item())
    expected = spec.clone()
    expected[..., t_start:t_start + t_width] = 0
    expected[..., f_start:f_start + f_width, :] = 0
    assert t_width > 0 and f_width > 0
    torch.testing.assert_close(out, expected)
    assert torch.equal(spec > 0, torch.ones_like(spec, dtype=torch.bool))  # the input is untouched


def test_spec_augment_widths_stay_below_the_parameter_and_inside_the_spectrogram():
    gen = torch.Generator().manual_seed(0)
    spec = torch.ones(1, 20, 50)
    time_widths, freq_widths, masked = [], [], 0
    for _ in range(400):
        out = spec_augment(spec, gen, p=0.8, time_mask=30, freq_mask=8)
        zero = out[0] == 0
        if zero.any():
            masked += 1
        time_widths.append(int(zero.all(dim=0).sum()))
        freq_widths.append(int(zero.all(dim=1).sum()))
    assert max(time_widths) <= 29 and max(time_widths) >= 25
    assert max(freq_widths) <= 7 and max(freq_widths) >= 6
    assert 0.72 < masked / 400 < 0.88
    # A mask wider than the axis is cut to the axis: a 5-frame spectrogram with time_mask 180 never errors.
    short = spec_augment(torch.ones(1, 4, 5), torch.Generator().manual_seed(1), p=1.0, time_mask=180, freq_mask=2)
    assert short.shape == (1, 4, 5)
    assert torch.equal(spec_augment(spec, gen, p=0.0), spec)


def test_spec_augment_fill_value():
    out = spec_augment(torch.zeros(8, 30), torch.Generator().manual_seed(3), p=1.0, time_mask=20, freq_mask=4,
                       fill=-100.0)
    assert set(out.unique().tolist()) <= {0.0, -100.0} and (out == -100.0).any()


# --- T_mix ----------------------------------------------------------------------------------------------------------


def test_mix_schedule():
    assert mix_probability_and_alpha(1) == pytest.approx((0.11, 0.01))
    assert mix_probability_and_alpha(10) == pytest.approx((0.2, 0.1))
    with pytest.raises(ValueError, match="k must be >= 1"):
        mix_probability_and_alpha(0)


def test_neighbours_on_hand_built_embeddings_exclude_self():
    emb = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [1.0, -0.01]])
    # Clips 0 and 4 are nearly equal: each picks the other, never itself; an embedding's scale does not matter.
    emb[2] *= 7.0
    neighbours = find_mix_neighbours(emb, queue_size=4000, generator=torch.Generator().manual_seed(0))
    assert neighbours.dtype == torch.int64
    assert neighbours.tolist() == [4, 0, 3, 2, 0]
    assert find_mix_neighbours(emb[:1], generator=torch.Generator()).tolist() == [0]


def brute_force_neighbours(emb: torch.Tensor, queue: torch.Tensor) -> np.ndarray:
    emb = F.normalize(emb, dim=1)
    sims = emb @ emb.t()
    allowed = torch.zeros_like(sims, dtype=torch.bool)
    allowed[:, queue] = True
    allowed.fill_diagonal_(False)
    return sims.masked_fill(~allowed, float("-inf")).argmax(dim=1).numpy()


def test_chunked_neighbour_search_equals_brute_force():
    emb = torch.randn(300, 12, generator=torch.Generator().manual_seed(4))
    queue = torch.randperm(300, generator=torch.Generator().manual_seed(9))[:40]
    expected = brute_force_neighbours(emb, queue)
    for chunk in (7, 64, 1000):
        got = find_mix_neighbours(emb, queue_size=40, generator=torch.Generator().manual_seed(9), chunk_size=chunk)
        np.testing.assert_array_equal(got.numpy(), expected)
    assert set(expected.tolist()) <= set(queue.tolist())
    assert (expected != np.arange(300)).all()


def test_mix_waveforms_weights_and_length():
    own = np.ones(10, dtype=np.float32)
    neighbour = np.full(6, 3.0, dtype=np.float32)
    mixed = mix_waveforms(own, neighbour, 0.25)
    assert mixed.dtype == np.float32 and mixed.shape == (6,)
    np.testing.assert_allclose(mixed, 0.75 * 1 + 0.25 * 3)


# --- L_geo's transform ----------------------------------------------------------------------------------------------


def dot_image(row: int, col: int, size: int = 8) -> torch.Tensor:
    x = torch.zeros(1, 1, size, size)
    x[0, 0, row, col] = 1.0
    return x


def test_rotation_moves_a_bright_pixel_counter_clockwise_about_the_centre():
    # Centre of an 8x8 grid is (3.5, 3.5); the pixel at (row 3, col 6) sits 2.5 right and 0.5 up of it.
    # +90 degrees (counter-clockwise on screen) takes "right" to "up": 2.5 up and 0.5 left -> (row 1, col 3).
    out = apply_geo_transform(dot_image(3, 6), GeoTransform(torch.tensor([90.0]), 1.0, False))
    torch.testing.assert_close(out, dot_image(1, 3), atol=1e-5, rtol=0)
    out = apply_geo_transform(dot_image(3, 6), GeoTransform(torch.tensor([-90.0]), 1.0, False))
    torch.testing.assert_close(out, dot_image(6, 4), atol=1e-5, rtol=0)
    out = apply_geo_transform(dot_image(3, 6), GeoTransform(torch.tensor([180.0]), 1.0, False))
    torch.testing.assert_close(out, dot_image(4, 1), atol=1e-5, rtol=0)


def test_flip_mirrors_columns_and_twice_is_identity():
    flip = GeoTransform(torch.zeros(1), 1.0, True)
    once = apply_geo_transform(dot_image(2, 1), flip)
    torch.testing.assert_close(once, dot_image(2, 6))
    x = torch.rand(3, 2, 6, 10)
    torch.testing.assert_close(apply_geo_transform(apply_geo_transform(x, GeoTransform(torch.zeros(3), 1.0, True)),
                                                   GeoTransform(torch.zeros(3), 1.0, True)), x)


def test_scale_half_zooms_out_about_the_centre_pads_zeros_and_halves_the_size():
    out = apply_geo_transform(torch.ones(1, 1, 8, 8), GeoTransform(torch.zeros(1), 0.5, False))
    expected = torch.zeros(1, 1, 4, 4)
    expected[..., 1:3, 1:3] = 1.0
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    # A 14x14 map warped at a 224 image's resolution comes back 7x7; an explicit out_size wins.
    map_out = apply_geo_transform(torch.ones(2, 1, 14, 14), GeoTransform(torch.zeros(2), 0.5, False),
                                  upsample_to=(224, 224))
    assert map_out.shape == (2, 1, 7, 7)
    assert map_out[..., 2:5, 2:5].min() > 0.99 and map_out[..., 0, :].max() < 0.01
    same = apply_geo_transform(torch.ones(2, 1, 14, 14), GeoTransform(torch.zeros(2), 1.0, False),
                               upsample_to=(224, 224))
    torch.testing.assert_close(same, torch.ones(2, 1, 14, 14))
    assert apply_geo_transform(torch.ones(1, 1, 14, 14), GeoTransform(torch.zeros(1), 0.5, False),
                               out_size=(4, 4)).shape == (1, 1, 4, 4)


def test_non_square_rotation_keeps_pixels_on_the_grid():
    # 4 rows x 8 cols, 180 degrees about (3.5, 1.5): (row 0, col 1) -> (row 3, col 6).
    x = torch.zeros(1, 1, 4, 8)
    x[0, 0, 0, 1] = 1.0
    out = apply_geo_transform(x, GeoTransform(torch.tensor([180.0]), 1.0, False))
    assert out[0, 0, 3, 6].item() == pytest.approx(1.0) and out.sum().item() == pytest.approx(1.0)


def test_l_geo_is_zero_for_an_exactly_equivariant_model():
    # A 1x1 convolution without bias commutes with the (linear, per-channel) warp, resize and flip, and maps the
    # zero padding to zero: the map of T(image) equals T(map of image) for every draw of T.
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 1, kernel_size=1, bias=False)
    images = torch.rand(4, 3, 32, 32)
    gen = torch.Generator().manual_seed(3)
    seen_scales = set()
    for _ in range(6):
        transform = sample_geo_transform(4, gen)
        seen_scales.add(transform.scale)
        with torch.no_grad():
            pred = model(apply_geo_transform(images, transform))
            target = apply_geo_transform(model(images), transform, upsample_to=(32, 32))
        assert equivariance_loss(pred, target).item() < 1e-12
    assert seen_scales == {0.5, 1.0}
    # A model that is not equivariant (a fixed spatial bias) gives a clearly positive L_geo.
    bias = torch.linspace(0, 1, 32).view(1, 1, 1, 32)
    transform = GeoTransform(torch.full((4,), 30.0), 1.0, True)
    with torch.no_grad():
        pred = model(apply_geo_transform(images, transform)) + bias
        target = apply_geo_transform(model(images) + bias, transform)
    assert equivariance_loss(pred, target).item() > 1e-2


def test_sample_geo_transform_draws():
    gen = torch.Generator().manual_seed(0)
    draws = [sample_geo_transform(16, gen, max_rotation=30) for _ in range(200)]
    angles = torch.cat([d.angles for d in draws])
    assert angles.min() == -30 and angles.max() == 30
    assert torch.equal(angles, angles.round())
    assert {d.scale for d in draws} == {1.0, 0.5}
    assert 0.4 < np.mean([d.scale == 0.5 for d in draws]) < 0.6
    assert 0.4 < np.mean([d.flip for d in draws]) < 0.6
    fixed = sample_geo_transform(4, gen, max_rotation=0, scale_p=0.0, flip_p=0.0)
    assert torch.equal(fixed.angles, torch.zeros(4)) and fixed.scale == 1.0 and not fixed.flip
    again = [sample_geo_transform(16, torch.Generator().manual_seed(0)) for _ in range(2)]
    assert torch.equal(again[0].angles, draws[0].angles) and again[0].scale == draws[0].scale


def test_mix_queue_is_drawn_anew_each_epoch():
    from sslt_cli.train import mix_queue_seed

    emb = torch.randn(300, 16, generator=torch.Generator().manual_seed(3))

    def queue_members(epoch: int) -> set[int]:
        neighbours = find_mix_neighbours(emb, queue_size=20,
                                         generator=torch.Generator().manual_seed(mix_queue_seed(4, epoch)))
        return set(neighbours.tolist())

    # the same (seed, epoch) gives the same queue (resume); another epoch draws other candidates
    assert queue_members(1) == queue_members(1)
    assert queue_members(1) != queue_members(2)
    assert len(queue_members(1) | queue_members(2) | queue_members(3)) > 20
