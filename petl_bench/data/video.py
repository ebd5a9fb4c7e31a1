"""Video decoding and frame sampling: one path from a video file to the uint8 frames every method sees.

Two frame protocols are offered because the papers in this benchmark use both (see DATASETS.md, "Frames"):

- ``"uniform"`` (X-Pool and most recent work; the default): split the clip into ``max_frames`` equal segments and take
  one frame per segment, a random one in training and the middle one at evaluation.
- ``"fps"`` (CLIP4Clip): take one frame per second, then thin uniformly to ``max_frames`` when there are more.

Clips shorter than ``max_frames`` give all their frames; `load_video` zero-pads and returns a mask, and the similarity
heads pool only over real frames.

Decoding uses decord (random access by frame index). Two decord quirks are handled here rather than left to callers:
it "opens" files that are not videos (a text file reads as one frame), so every file is probed with PyAV first; and
some output widths (16, 24, 48, 72, ...) make it return 4-channel frames and fail (dmlc/decord#336), so those widths
are never requested. Resizing is done by torch (bicubic, antialiased, on uint8 — fast); decord only shrinks very
large frames to twice the target size first, which saves the RGB conversion of full-resolution frames.

Frames are resized as they are shown, not as they are stored:

- Rotation (phone footage): decord applies a 90/180/270° rotation itself — from a ``rotate`` tag if the stream has
  one, else from the display matrix — so frames come out upright, and the size asked of decord is in those upright
  axes (decord transposes, then scales). The probe mirrors decord's rule (`_decord_rotation`) to know which axes those
  are; other angles and the display matrix's flips are ignored by decord, and so here.
- Non-square pixels (a sample aspect ratio other than 1, e.g. anamorphic DVD rips): decord ignores it; the shown
  width is ``stored width x SAR`` (ffmpeg's convention) and the resize to ``image_size`` keeps that shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

FRAME_PROTOCOLS = ("uniform", "fps")

# Output widths for which decord 0.6.0 returns 4 channels and then fails to copy the batch (dmlc/decord#336). Found by
# decoding at every width from 2 to 600; widths above 72 all work.
_DECORD_BROKEN_WIDTHS = frozenset({2, 3, 4, 6, 8, 12, 16, 24, 48, 72})

# decord shrinks a frame before RGB conversion only when its short side exceeds this multiple of the target size:
# the shrink is bilinear, so torch's bicubic resize still does the last step from at most this multiple.
_DECORD_SHRINK_FACTOR = 2


class VideoDecodeError(RuntimeError):
    """A video file is missing, is not a video, is truncated or has no frames. The message names the file."""


@dataclass(frozen=True)
class VideoInfo:
    """A video's frame count and rate, and its frame geometry.

    ``width`` x ``height`` is the size of the frames `VideoSource.read` gives at native size (``image_size=None``):
    upright (rotation applied, as decord does) but with stored pixels (the sample aspect ratio not applied).
    """

    num_frames: int
    fps: float
    width: int
    height: int
    rotation: int = 0  # clockwise degrees decord turns the stored frames by: 0, 90, 180 or 270
    sample_aspect_ratio: float = 1.0  # width of a stored pixel over its height (1: square pixels)

    @property
    def display_size(self) -> tuple[float, float]:
        """(width, height) as shown: upright, with the sample aspect ratio applied to the stored width."""
        return _shown_size(self.width, self.height, self.rotation, self.sample_aspect_ratio)


def _shown_size(width: int, height: int, rotation: int, sample_aspect_ratio: float) -> tuple[float, float]:
    """(width, height) as shown, from the upright stored size: the stored width is vertical after a 90/270 turn."""
    if rotation in (90, 270):
        return float(width), height * sample_aspect_ratio
    return width * sample_aspect_ratio, float(height)


def sample_frame_indices(
    num_frames_in_video: int,
    fps: float,
    max_frames: int,
    protocol: str = "uniform",
    train: bool = False,
    rng: np.random.Generator | None = None,
) -> list[int]:
    """Choose which frames of a video to decode, in temporal order.

    Args:
        num_frames_in_video: frames in the video (decord's count).
        fps: the video's frame rate; used by the ``"fps"`` protocol only.
        max_frames: the most frames to return.
        protocol: ``"fps"`` (CLIP4Clip's: 1 frame per second, then evenly thinned; see `_one_per_second_indices`)
            or ``"uniform"`` (equal segments, X-Pool's lineage).
        train: ``"uniform"`` only: a random frame per segment instead of the middle one.
        rng: the generator for training draws; pass a seeded one for reproducible epochs. ``None`` draws fresh entropy.

    Returns:
        At most ``max_frames`` increasing frame indices; fewer when the video is short (the caller pads and masks).
    """
    if num_frames_in_video < 1:
        raise ValueError(
            f"a video needs at least one frame to sample from, got num_frames_in_video={num_frames_in_video}"
        )
    if max_frames < 1:
        raise ValueError(f"max_frames must be at least 1, got {max_frames}")
    if protocol == "uniform":
        return _uniform_segment_indices(num_frames_in_video, max_frames, train, rng)
    if protocol == "fps":
        return _one_per_second_indices(num_frames_in_video, fps, max_frames)
    raise ValueError(f"unknown frame protocol {protocol!r}; choose one of {', '.join(FRAME_PROTOCOLS)}")


def _uniform_segment_indices(n: int, max_frames: int, train: bool, rng: np.random.Generator | None) -> list[int]:
    if n <= max_frames:
        return list(range(n))
    # Segment k covers frames [starts[k], ends[k]); with n > max_frames every segment holds at least one frame.
    bounds = np.linspace(0, n, max_frames + 1)
    starts = np.floor(bounds[:-1]).astype(np.int64)
    ends = np.floor(bounds[1:]).astype(np.int64)
    if train:
        rng = rng if rng is not None else np.random.default_rng()
        picks = rng.integers(starts, ends)  # high is exclusive
    else:
        picks = (starts + ends) // 2
    return picks.tolist()


def _one_per_second_indices(n: int, fps: float, max_frames: int) -> list[int]:
    """CLIP4Clip's rule (``RawVideoExtractorCV2.video_to_tensor`` with ``sample_fp=1``, then ``slice_framepos=2``).

    The frame rate is truncated to an integer F (as CLIP4Clip's ``int(cap.get(CAP_PROP_FPS))``: 29.97 fps gives F = 29,
    so its "seconds" drift by 0.1% on NTSC video), the frames s·F for s = 0, 1, ... that exist are taken, and when there
    are more than ``max_frames`` of them, ``np.linspace(0, count − 1, max_frames)`` truncated to integers picks among
    them. The same frames at training and test.
    """
    if not math.isfinite(fps) or fps <= 0:
        raise ValueError(
            f"the 'fps' frame protocol needs a positive frame rate, got fps={fps}; re-encode the video with a valid "
            "frame rate or use protocol='uniform'"
        )
    step = max(1, int(fps))  # below 1 fps CLIP4Clip divides by zero; here every frame is a "second"
    per_second = np.arange(0, n, step, dtype=np.int64)
    if len(per_second) > max_frames:
        keep = np.linspace(0, len(per_second) - 1, num=max_frames).astype(np.int64)
        per_second = per_second[keep]
    return per_second.tolist()


class VideoSource:
    """One opened video: its frame count and rate, and `read(indices)` giving square uint8 frames.

    Open once, sample, then read: the DataModule and a frame cache share this, so that both see identical pixels.
    ``image_size=None`` reads frames at their native size (no resize, no crop).
    """

    def __init__(self, path: str | Path, image_size: int | None, num_threads: int = 1):
        self.path = Path(path)
        self.image_size = image_size
        if image_size is not None and image_size < 1:
            raise ValueError(f"image_size must be at least 1, got {image_size}")
        geometry = _probe_geometry(self.path)
        decode_width, decode_height = _decode_size(geometry, image_size)
        import decord

        try:
            reader = decord.VideoReader(
                str(self.path), ctx=decord.cpu(0), width=decode_width, height=decode_height, num_threads=num_threads
            )
        except (decord.DECORDError, RuntimeError, AssertionError) as err:
            raise _decode_error(self.path, f"decord cannot open it ({_first_line(err)})") from err
        num_frames = len(reader)
        if num_frames < 1:
            raise _decode_error(self.path, "it has no video frames")
        self._reader = reader
        self.info = VideoInfo(num_frames=num_frames, fps=float(reader.get_avg_fps()), width=geometry.width,
                              height=geometry.height, rotation=geometry.rotation,
                              sample_aspect_ratio=geometry.sample_aspect_ratio)

    @property
    def num_frames(self) -> int:
        return self.info.num_frames

    @property
    def fps(self) -> float:
        return self.info.fps

    def read(self, indices: list[int] | None = None) -> torch.Tensor:
        """Decode frames (all of them when ``indices`` is None) as uint8 ``(len(indices), 3, S, S)``.

        The frame as shown (upright, sample aspect ratio applied) is resized so that its short side is ``image_size``
        (bicubic, antialiased) and the centre square kept. At native size (``image_size=None``): upright stored pixels.
        """
        import decord

        indices = list(range(self.num_frames)) if indices is None else [int(i) for i in indices]
        if not indices:
            height, width = (self.info.height, self.info.width) if self.image_size is None else (self.image_size,) * 2
            return torch.zeros(0, 3, height, width, dtype=torch.uint8)
        bad = [i for i in indices if not 0 <= i < self.num_frames]
        if bad:
            raise IndexError(f"frame indices {bad[:5]} are out of range for {self.path} ({self.num_frames} frames)")
        try:
            frames = self._reader.get_batch(indices).asnumpy()
        except (decord.DECORDError, RuntimeError, AssertionError) as err:
            raise _decode_error(self.path, f"decoding frames failed ({_first_line(err)})") from err
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise _decode_error(self.path, f"decord returned frames of shape {frames.shape}, expected (N, H, W, 3)")
        # (N, H, W, 3) -> (N, 3, H, W) as a channels-last view: the layout torch's fast uint8 resize expects.
        frames = torch.from_numpy(frames).permute(0, 3, 1, 2)
        if self.image_size is None:
            return frames.contiguous()
        if self.info.sample_aspect_ratio == 1.0:
            # decord's frames are upright, native or shrunk in proportion: the array has the shown shape already
            return resize_center_crop(frames, self.image_size)
        display_width, display_height = self.info.display_size
        return resize_center_crop(frames, self.image_size, display_size=(display_height, display_width))


def resize_center_crop(
    frames: torch.Tensor, image_size: int, display_size: tuple[float, float] | None = None
) -> torch.Tensor:
    """Resize uint8 ``(N, 3, H, W)`` so the short side is ``image_size`` (bicubic, antialiased), then centre-crop.

    This is CLIP's image preprocessing without the normalisation, which happens on the device. ``display_size``
    (height, width) is the shape the frames are shown at when it differs from the array's (non-square pixels, or
    frames decoded at a squeezed size): the resize then restores that shape.
    """
    height, width = frames.shape[-2:]
    shown_height, shown_width = display_size if display_size is not None else (height, width)
    scale = image_size / min(shown_height, shown_width)
    new_height = max(image_size, round(shown_height * scale))
    new_width = max(image_size, round(shown_width * scale))
    if (new_height, new_width) != (height, width):
        frames = F.interpolate(frames, size=(new_height, new_width), mode="bicubic", antialias=True)
        height, width = new_height, new_width
    top = (height - image_size) // 2
    left = (width - image_size) // 2
    return frames[..., top : top + image_size, left : left + image_size].contiguous()


def probe_video(path: str | Path) -> VideoInfo:
    """Frame count, frame rate and native size of a video, without decoding frames."""
    return VideoSource(path, image_size=None).info


def decode_frames(path: str | Path, indices: list[int] | None, image_size: int, num_threads: int = 1) -> torch.Tensor:
    """Decode the given frames (all when ``indices`` is None) as uint8 ``(N, 3, image_size, image_size)``."""
    return VideoSource(path, image_size, num_threads=num_threads).read(indices)


def usable_frames(num_source_frames: int, fps: float, max_seconds: float | None) -> int:
    """How many leading frames of a video are sampled: all of them, or those of the first ``max_seconds``."""
    if max_seconds is None or not (math.isfinite(fps) and fps > 0):
        return num_source_frames
    return max(1, min(num_source_frames, math.ceil(max_seconds * fps)))


def read_sampled(
    source: VideoSource,
    max_frames: int,
    protocol: str = "uniform",
    train: bool = False,
    rng: np.random.Generator | None = None,
    max_seconds: float | None = None,
) -> torch.Tensor:
    """The frames the sampling rules pick from an opened video (at most ``max_frames``; not padded)."""
    usable = usable_frames(source.num_frames, source.fps, max_seconds)
    try:
        indices = sample_frame_indices(usable, source.fps, max_frames, protocol, train=train, rng=rng)
    except ValueError as err:
        if protocol not in FRAME_PROTOCOLS:
            raise
        raise _decode_error(source.path, str(err)) from err  # e.g. the fps protocol on a file without a frame rate
    return source.read(indices)


def pad_frames(real: torch.Tensor, max_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad uint8 ``(n, 3, S, S)`` frames to ``max_frames`` and return them with the mask of real frames."""
    frames = real.new_zeros(max_frames, *real.shape[1:])
    frames[: len(real)] = real
    mask = torch.zeros(max_frames, dtype=torch.bool)
    mask[: len(real)] = True
    return frames, mask


def load_video(
    path: str | Path,
    max_frames: int,
    image_size: int,
    protocol: str = "uniform",
    train: bool = False,
    rng: np.random.Generator | None = None,
    num_threads: int = 1,
    max_seconds: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample, decode and pad one video (only its first ``max_seconds`` when given).

    Returns:
        frames: uint8 ``(max_frames, 3, image_size, image_size)``, zero after the last real frame.
        mask: bool ``(max_frames,)``, True for real frames.

    Raises:
        VideoDecodeError: the file is missing, not a video, truncated, or has no frames.
    """
    source = VideoSource(path, image_size, num_threads=num_threads)
    return pad_frames(read_sampled(source, max_frames, protocol, train, rng, max_seconds), max_frames)


@dataclass(frozen=True)
class _Geometry:
    width: int  # of decord's native-size frames: upright (stored axes swapped for 90/270)
    height: int
    rotation: int  # clockwise degrees, as decord applies them
    sample_aspect_ratio: float


def _probe_geometry(path: Path) -> _Geometry:
    """Frame geometry of the first video stream, read by PyAV: stored size, rotation, sample aspect ratio.

    This also rejects files decord would accept by mistake (it reads a text file as a one-frame video).
    """
    if not path.exists():
        raise VideoDecodeError(
            f"video file not found: {path}. Check the video root and the dataset's file naming, or download the video."
        )
    if not path.is_file():
        raise VideoDecodeError(f"{path} is not a file; expected a video file such as an .mp4.")
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise _decode_error(path, "it has no video stream (no video frames)")
            stream = container.streams.video[0]
            codec = stream.codec_context
            width, height = int(codec.width), int(codec.height)
            sar = stream.sample_aspect_ratio or codec.sample_aspect_ratio
            rotation = _decord_rotation(container, stream)
    except VideoDecodeError:
        raise
    except (av.FFmpegError, OSError, ValueError) as err:
        raise _decode_error(path, f"it is not a readable video ({_first_line(err)})") from err
    if width < 1 or height < 1:
        raise _decode_error(path, f"its video stream reports size {width}x{height}")
    if rotation in (90, 270):
        width, height = height, width
    # an unknown ratio (0/1, or none) means square pixels, as for every player
    sample_aspect_ratio = float(sar) if sar is not None and sar > 0 else 1.0
    return _Geometry(width, height, rotation, sample_aspect_ratio)


def _decord_rotation(container, stream) -> int:
    """The clockwise rotation decord 0.6.0 applies (`VideoReader::GetRotation`): a nonzero ``rotate`` tag wins (case
    is ignored, as FFmpeg's dictionary does; Matroska writes ``ROTATE``), else the display matrix; then only exactly
    90, 180 and 270 turn the frames (decord truncates the angle to an integer and ignores the rest).

    PyAV exposes the display matrix only on decoded frames (``VideoFrame.rotation``, counter-clockwise), so the first
    frame is decoded (about 2 ms for 720p, against ~80 ms for decord to read 10 frames of it). A file whose first
    frame does not decode reads as unrotated; decord then reports what is wrong with it.
    """
    import av

    theta = 0.0
    tag = next((value for key, value in stream.metadata.items() if key.lower() == "rotate"), None)
    if tag is not None:
        try:
            theta = float(tag)
        except ValueError:
            theta = 0.0
    if theta == 0.0:
        try:
            stream.codec_context.thread_count = 1
            frame = next(container.decode(stream), None)
        except (av.FFmpegError, ValueError):
            frame = None
        if frame is not None:
            theta = -float(frame.rotation)
    degrees = int(math.fmod(theta, 360.0) + (360.0 if theta < 0 else 0.0))
    return degrees if degrees in (90, 180, 270) else 0


def _decode_size(geometry: _Geometry, image_size: int | None) -> tuple[int, int]:
    """Size to ask decord for, in upright axes (decord rotates, then scales): -1 means native; large frames shrink to
    twice the target in their shown shape (rotation and sample aspect ratio), the rest `resize_center_crop` does."""
    width, height = geometry.width, geometry.height
    display_width, display_height = _shown_size(width, height, geometry.rotation, geometry.sample_aspect_ratio)
    if image_size is not None and min(display_width, display_height) > _DECORD_SHRINK_FACTOR * image_size:
        scale = _DECORD_SHRINK_FACTOR * image_size / min(display_width, display_height)
        width, height = round(display_width * scale), round(display_height * scale)
    elif width not in _DECORD_BROKEN_WIDTHS:
        return -1, -1
    while width in _DECORD_BROKEN_WIDTHS:
        # One column wider keeps the aspect within one pixel; the centre crop absorbs it. (At native size,
        # image_size=None, such a video reads one column wider than it is; widths 2-4 step up to 5.)
        width += 1
    return width, height


def _decode_error(path: Path, reason: str) -> VideoDecodeError:
    return VideoDecodeError(
        f"cannot decode video {path}: {reason}. The file may be truncated or corrupt: re-download it, or re-encode it "
        f"(e.g. `ffmpeg -i {path.name} -c:v libx264 -pix_fmt yuv420p fixed.mp4`), or remove it from the split."
    )


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
