"""Frame sampling rules (both protocols) and decoding real mp4 files: padding, masks, resize + crop, and bad files.

Test clips are written with the same H.264 encoder the synthetic benchmark uses. "Ramp" clips make frame t a flat
grey of level 20 + 12 t, so the mean of a decoded frame tells which frame it was.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from petl_bench.data.synthetic import write_mp4
from petl_bench.data.video import (
    VideoDecodeError,
    VideoSource,
    decode_frames,
    load_video,
    probe_video,
    resize_center_crop,
    sample_frame_indices,
)


def ramp_clip(path: Path, num_frames: int, height: int = 32, width: int = 32, fps: int = 8) -> Path:
    levels = 20 + 12 * np.arange(num_frames)
    frames = np.broadcast_to(levels[:, None, None, None], (num_frames, height, width, 3)).astype(np.uint8)
    write_mp4(path, frames, fps)
    return path


def frame_numbers(frames: torch.Tensor) -> list[int]:
    """Which ramp frame each decoded frame is (by its mean grey level)."""
    return [round((f.float().mean().item() - 20) / 12) for f in frames]


# ------------------------------------------------------------------------------------------------------- sampling
def test_uniform_eval_takes_the_middle_of_equal_segments():
    assert sample_frame_indices(100, 25.0, 10) == [5, 15, 25, 35, 45, 55, 65, 75, 85, 95]
    # 10 frames into 4 segments [0,2) [2,5) [5,7) [7,10)
    assert sample_frame_indices(10, 25.0, 4) == [1, 3, 6, 8]


def test_uniform_train_draws_one_random_frame_per_segment():
    starts, ends = np.array([0, 2, 5, 7]), np.array([2, 5, 7, 10])
    seen = [set() for _ in range(4)]
    rng = np.random.default_rng(0)
    for _ in range(300):
        picks = sample_frame_indices(10, 25.0, 4, train=True, rng=rng)
        assert len(picks) == 4
        for k, index in enumerate(picks):
            assert starts[k] <= index < ends[k]
            seen[k].add(index)
    # every frame of every segment is reachable
    assert [sorted(s) for s in seen] == [list(range(a, b)) for a, b in zip(starts, ends)]


def test_uniform_train_is_reproducible_with_a_seeded_generator():
    def draw(seed: int) -> list[int]:
        return sample_frame_indices(1000, 30.0, 12, train=True, rng=np.random.default_rng(seed))

    assert draw(3) == draw(3)
    assert draw(3) != draw(4)
    assert draw(3) != sample_frame_indices(1000, 30.0, 12)  # not the evaluation frames


@pytest.mark.parametrize("protocol", ["uniform", "fps"])
@pytest.mark.parametrize("train", [False, True])
def test_a_clip_shorter_than_max_frames_gives_all_its_frames(protocol, train):
    # 5 frames at 1 fps: both protocols keep every frame
    assert sample_frame_indices(5, 1.0, 8, protocol, train=train, rng=np.random.default_rng(0)) == [0, 1, 2, 3, 4]


def test_fps_protocol_takes_one_frame_per_second():
    assert sample_frame_indices(300, 30.0, 12, "fps") == [0, 30, 60, 90, 120, 150, 180, 210, 240, 270]
    # CLIP4Clip truncates the rate to an integer: 29.97 fps steps by 29 frames (its "seconds" drift, as in the release)
    assert sample_frame_indices(300, 29.97, 20, "fps") == list(range(0, 300, 29))
    assert sample_frame_indices(100, 7.9, 20, "fps") == list(range(0, 100, 7))
    # slower than 1 fps (CLIP4Clip divides by zero there): each frame once
    assert sample_frame_indices(4, 0.5, 8, "fps") == [0, 1, 2, 3]


def test_fps_protocol_thins_like_clip4clip_linspace_truncated():
    # CLIP4Clip: np.linspace(0, count - 1, num=max_frames, dtype=int) over its one-per-second frames
    for n, fps, k in [(300, 30.0, 12), (7411, 29.97, 12), (901, 25.0, 7), (3000, 24.0, 64)]:
        per_second = list(range(0, n, int(fps)))
        picks = np.linspace(0, len(per_second) - 1, num=k, dtype=int) if len(per_second) > k else range(len(per_second))
        assert sample_frame_indices(n, fps, k, "fps") == [per_second[i] for i in picks]


def test_fps_protocol_thins_uniformly_to_max_frames():
    # 10 one-per-second frames thinned to 5: positions linspace(0, 9, 5) -> 0, 2, 4, 6, 9
    assert sample_frame_indices(300, 30.0, 5, "fps") == [0, 60, 120, 180, 270]
    many = sample_frame_indices(3000, 25.0, 12, "fps")  # 120 s
    assert len(many) == 12 and many[0] == 0 and many[-1] == 119 * 25
    assert all(b > a for a, b in itertools.pairwise(many))


def test_sampling_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown frame protocol"):
        sample_frame_indices(10, 25.0, 4, protocol="random")
    with pytest.raises(ValueError, match="positive frame rate"):
        sample_frame_indices(10, 0.0, 4, protocol="fps")
    with pytest.raises(ValueError, match="at least one frame"):
        sample_frame_indices(0, 25.0, 4)
    with pytest.raises(ValueError, match="max_frames"):
        sample_frame_indices(10, 25.0, 0)


# ------------------------------------------------------------------------------------------------------- decoding
def test_load_video_pads_and_masks_a_short_clip(tmp_path):
    path = ramp_clip(tmp_path / "short.mp4", num_frames=5)
    frames, mask = load_video(path, max_frames=8, image_size=32)
    assert frames.dtype == torch.uint8 and frames.shape == (8, 3, 32, 32)
    assert mask.dtype == torch.bool and mask.tolist() == [True] * 5 + [False] * 3
    assert frame_numbers(frames[:5]) == [0, 1, 2, 3, 4]
    assert frames[5:].eq(0).all()


def test_load_video_decodes_the_sampled_frames(tmp_path):
    path = ramp_clip(tmp_path / "ramp.mp4", num_frames=16, fps=4)
    frames, mask = load_video(path, max_frames=4, image_size=32)
    assert mask.all() and frame_numbers(frames) == sample_frame_indices(16, 4.0, 4) == [2, 6, 10, 14]
    frames, mask = load_video(path, max_frames=8, image_size=32, protocol="fps")  # 4 s at 4 fps -> frames 0,4,8,12
    assert mask.tolist() == [True] * 4 + [False] * 4
    assert frame_numbers(frames[:4]) == [0, 4, 8, 12]
    frames, _ = load_video(path, max_frames=4, image_size=32, train=True, rng=np.random.default_rng(0))
    numbers = frame_numbers(frames)
    assert all(4 * k <= n < 4 * (k + 1) for k, n in enumerate(numbers))


def test_resize_short_side_then_center_crop(tmp_path):
    # 96x64 frames: red 16-column bands at both sides, green in between. Short side 64 -> 32 halves the width to 48,
    # and the centre 32 columns drop 8 on each side: exactly the (halved) red bands.
    frames = np.zeros((4, 64, 96, 3), np.uint8)
    frames[..., :, :] = (40, 200, 60)
    frames[:, :, :16] = frames[:, :, -16:] = (220, 30, 30)
    path = tmp_path / "wide.mp4"
    write_mp4(path, frames, fps=8)
    out, _ = load_video(path, max_frames=4, image_size=32)
    assert out.shape == (4, 3, 32, 32)
    inner = out[:, :, :, 2:-2].float()  # the outermost columns may carry the resize kernel's reach into the bands
    assert (inner[:, 1] - inner[:, 0]).min() > 100  # green everywhere: the red bands were cropped away
    info = probe_video(path)
    assert (info.width, info.height, info.num_frames, info.fps) == (96, 64, 4, 8.0)


def test_large_frames_decoded_at_reduced_size_match_a_full_size_resize(tmp_path):
    # Short side 128 > 2 x 32, so decord first shrinks to 64 (bilinear) before torch's bicubic step. On smooth content
    # that stays within a couple of grey levels of resizing the full frames (about what bilinear vs bicubic differ).
    rng = np.random.default_rng(0)
    coarse = torch.from_numpy(rng.uniform(0, 255, size=(3, 3, 8, 10)).astype(np.float32))
    smooth = F.interpolate(coarse, size=(128, 160), mode="bicubic", align_corners=False).clamp(0, 255).to(torch.uint8)
    path = tmp_path / "large.mp4"
    write_mp4(path, smooth.permute(0, 2, 3, 1).numpy(), fps=8)
    reduced = decode_frames(path, [0, 1, 2], image_size=32)
    full = VideoSource(path, image_size=None).read([0, 1, 2])
    assert full.shape == (3, 3, 128, 160)
    reference = resize_center_crop(full, 32)
    assert reduced.shape == reference.shape == (3, 3, 32, 32)
    assert (reduced.float() - reference.float()).abs().mean() < 3.0
    # and it is really that frame: far from the other frames
    assert (reduced[0].float() - reference[1].float()).abs().mean() > 20.0


def test_widths_decord_cannot_output_still_decode(tmp_path):
    # decord 0.6.0 fails on 48-pixel-wide output (dmlc/decord#336); the reader asks for 49 and crops
    frames = np.full((3, 48, 48, 3), (200, 50, 50), np.uint8)
    path = tmp_path / "w48.mp4"
    write_mp4(path, frames, fps=8)
    out, mask = load_video(path, max_frames=3, image_size=48)
    assert out.shape == (3, 3, 48, 48) and mask.all()
    assert (out.permute(0, 2, 3, 1).float() - torch.tensor([200.0, 50.0, 50.0])).abs().mean() < 6.0


def test_resize_center_crop_matches_torch_bicubic_antialias():
    image = torch.randint(0, 256, (2, 3, 40, 60), dtype=torch.uint8)
    out = resize_center_crop(image, 20)
    expected = F.interpolate(image, size=(20, 30), mode="bicubic", antialias=True)[..., 5:25]
    assert torch.equal(out, expected)
    assert torch.equal(resize_center_crop(image[..., :40], 40), image[..., :40])  # already square: untouched


# ------------------------------------------------------------------------------------- rotation and pixel shape
def staircase_clip(path: Path, width: int, height: int, rotation: int = 0, sar=None, rotate_tag: str | None = None,
                   container: str = "mp4", num_frames: int = 3) -> torch.Tensor:
    """A clip of 10 vertical colour bands (a staircase across the stored width), as phone footage stores it: the
    pixels sideways and a display rotation (``rotation``, counter-clockwise degrees, in the display matrix) or a
    ``rotate`` tag; or with non-square pixels (``sar``). Returns the stored frames as uint8 ``(T, 3, H, W)``."""
    import av

    band = np.minimum(np.arange(width) * 10 // width, 9)
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    frames[..., 0] = (20 + 23 * band)[None, None, :]
    frames[..., 1] = (230 - 23 * band)[None, None, :]
    frames[..., 2] = 128
    with av.open(str(path), mode="w", format=container) as out:
        stream = out.add_stream("libx264", rate=8)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        stream.options = {"qp": "16", "preset": "ultrafast"}
        if sar is not None:
            stream.codec_context.sample_aspect_ratio = sar
        if rotation:
            stream.set_display_rotation(rotation)
        if rotate_tag is not None:
            stream.metadata["rotate"] = rotate_tag
        for frame in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode(None))
    return torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()


def shown(stored: torch.Tensor, rotation: int = 0, sar: float = 1.0) -> torch.Tensor:
    """The frames as a player shows them: stored width stretched by the sample aspect ratio, then turned
    counter-clockwise by ``rotation`` degrees."""
    if sar != 1.0:
        height, width = stored.shape[-2:]
        stored = F.interpolate(stored, size=(height, round(width * sar)), mode="bicubic", antialias=True)
    return torch.rot90(stored, rotation // 90 % 4, dims=(2, 3)).contiguous()


def mean_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().mean().item()


# 160x96 stored: 32 px takes decord's shrink path (short side 96 > 2 x 32), 64 px the native one
@pytest.mark.parametrize("image_size", [32, 64])
@pytest.mark.parametrize("rotation", [90, -90, 180])
def test_a_rotated_clip_is_decoded_upright_at_its_shown_shape(tmp_path, rotation, image_size):
    stored = staircase_clip(tmp_path / "phone.mp4", 160, 96, rotation=rotation)
    upright = shown(stored, rotation)
    decoded = decode_frames(tmp_path / "phone.mp4", [0, 1], image_size)
    expected = resize_center_crop(upright, image_size)[:2]
    assert decoded.shape == expected.shape == (2, 3, image_size, image_size)
    assert mean_difference(decoded, expected) < 6.0
    # the wrong decodes are far: unrotated, the other way round, or upright but squeezed into the stored shape
    # (what a decode size from the unrotated dimensions gives)
    assert mean_difference(decoded, resize_center_crop(stored, image_size)[:2]) > 25
    assert mean_difference(decoded, resize_center_crop(shown(stored, rotation + 180), image_size)[:2]) > 40
    if rotation % 180:
        squeezed = F.interpolate(upright, size=tuple(stored.shape[-2:]), mode="bicubic", antialias=True)
        assert mean_difference(decoded, resize_center_crop(squeezed, image_size)[:2]) > 10
    info = probe_video(tmp_path / "phone.mp4")
    assert (info.width, info.height) == ((96, 160) if rotation % 180 else (160, 96))
    assert info.rotation == (-rotation) % 360  # clockwise, as decord applies it
    assert VideoSource(tmp_path / "phone.mp4", None).read([0]).shape == (1, 3, info.height, info.width)


def test_a_rotate_tag_turns_the_frames_as_decord_does(tmp_path):
    # a Matroska ROTATE tag (old ffmpeg `-metadata:s:v rotate=90`): decord turns the frames clockwise; so must the
    # decode size
    stored = staircase_clip(tmp_path / "tagged.mkv", 160, 96, rotate_tag="90", container="matroska")
    decoded = decode_frames(tmp_path / "tagged.mkv", [0], 32)
    assert mean_difference(decoded, resize_center_crop(shown(stored, -90), 32)[:1]) < 6.0
    assert probe_video(tmp_path / "tagged.mkv").rotation == 90


@pytest.mark.parametrize("image_size", [32, 64])
@pytest.mark.parametrize("rotation", [0, 90])
def test_non_square_pixels_are_resized_at_their_shown_shape(tmp_path, rotation, image_size):
    from fractions import Fraction

    # 80x96 stored with pixels twice as wide as high: shown 160x96 (96x160 turned)
    stored = staircase_clip(tmp_path / "anamorphic.mp4", 80, 96, rotation=rotation, sar=Fraction(2, 1))
    info = probe_video(tmp_path / "anamorphic.mp4")
    assert info.sample_aspect_ratio == 2.0
    assert info.display_size == ((96.0, 160.0) if rotation else (160.0, 96.0))
    decoded = decode_frames(tmp_path / "anamorphic.mp4", [0], image_size)
    expected = resize_center_crop(shown(stored, rotation, sar=2.0), image_size)[:1]
    assert mean_difference(decoded, expected) < 6.0
    assert mean_difference(decoded, resize_center_crop(shown(stored, rotation), image_size)[:1]) > 10


def test_the_frame_cache_stores_rotated_clips_upright(tmp_path):
    from petl_bench.data.frame_cache import CacheSampling, FrameCache
    from petl_bench.data.video import read_sampled

    stored = staircase_clip(tmp_path / "phone.mp4", 160, 96, rotation=90, num_frames=4)
    cache = FrameCache.create(tmp_path / "cache", "msvd", 32, CacheSampling(num_frames=2, frames_per_segment=1))
    entry = cache.add("phone", tmp_path / "phone.mp4")
    cached = FrameCache.open(tmp_path / "cache", "msvd", 32).read(entry, 2)
    direct = read_sampled(VideoSource(tmp_path / "phone.mp4", 32), 2)
    assert torch.equal(cached, direct)  # the very pixels decoding gives
    expected = resize_center_crop(shown(stored, 90), 32)[:2]
    assert mean_difference(cached, expected) < 6.0
    assert mean_difference(cached, resize_center_crop(stored, 32)[:2]) > 25
    # a cache built before rotation was respected holds squeezed frames: refused, saying why and what to do
    import json

    from petl_bench.data.frame_cache import FrameCacheError

    manifest = tmp_path / "cache/manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "version": 1}))
    with pytest.raises(FrameCacheError, match=r"version 1 stored rotated .* rebuild the cache into a new folder"):
        FrameCache.open(tmp_path / "cache", "msvd", 32)


@pytest.mark.parametrize(("codec", "container", "size", "num_frames"), [
    ("libvpx-vp9", "webm", 32, 4),  # a VP9 webm, as YouTube downloads often are
    ("libx264", "mp4", 32, 1),  # a single frame: padded and masked
    ("libx264", "mp4", 2, 3),  # 2x2: decord fails at widths 2, 3 and 4 (dmlc/decord#336); read 5 wide
])
def test_unusual_but_valid_videos_decode(tmp_path, codec, container, size, num_frames):
    import av

    path = tmp_path / f"clip.{container}"
    with av.open(str(path), mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for t in range(num_frames):
            frame = np.full((size, size, 3), 20 + 12 * t, np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode(None))
    frames, mask = load_video(path, max_frames=4, image_size=16)
    assert frames.shape == (4, 3, 16, 16) and mask.tolist() == [t < num_frames for t in range(4)]
    assert frame_numbers(frames[:num_frames]) == list(range(num_frames))


# ---------------------------------------------------------------------------------------------------------- errors
def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.mp4"
    with pytest.raises(VideoDecodeError, match="not found") as err:
        load_video(missing, 4, 32)
    assert str(missing) in str(err.value)


def test_truncated_file_is_a_decode_error(tmp_path):
    whole = ramp_clip(tmp_path / "whole.mp4", num_frames=16)
    data = whole.read_bytes()
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoDecodeError, match="re-download") as err:
        load_video(truncated, 4, 32)
    assert str(truncated) in str(err.value)


def test_an_empty_file_is_rejected(tmp_path):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(VideoDecodeError, match="not a readable video") as err:
        load_video(empty, 4, 32)
    assert str(empty) in str(err.value)


def test_a_file_that_is_not_a_video_is_rejected(tmp_path):
    # decord alone would "open" this as a one-frame video
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 20)
    with pytest.raises(VideoDecodeError, match="not a readable video") as err:
        load_video(text, 4, 32)
    assert str(text) in str(err.value)
    with pytest.raises(VideoDecodeError, match="not a file"):
        load_video(tmp_path, 4, 32)


def test_a_video_without_frames_is_rejected(tmp_path):
    import av

    empty = tmp_path / "empty.mp4"
    with av.open(str(empty), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        container.start_encoding()  # writes the header: a valid mp4 with zero frames
        container.mux(stream.encode(None))
    assert empty.stat().st_size > 0
    with pytest.raises(VideoDecodeError, match="no video") as err:
        load_video(empty, 4, 32)
    assert str(empty) in str(err.value)


def test_out_of_range_indices_name_the_file(tmp_path):
    path = ramp_clip(tmp_path / "ramp.mp4", num_frames=4)
    with pytest.raises(IndexError, match="ramp.mp4"):
        decode_frames(path, [0, 4], image_size=32)
