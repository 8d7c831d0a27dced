"""Peak memory and time of handling hostile images: small files that ask for a lot of memory when decoded.

Each image goes the way an upload goes: ``images.load_image`` then the published presets' 224-px preprocessing
(``images.ImageProcessor``); an exported conversation goes the way an import goes: ``generate.history``'s
``read_history_json`` then ``history_from_dict``. Every hostile input must be refused with a ``ValueError`` (or, for
the many-frame GIF and the odd modes, accepted and converted) within 300 MB of peak resident memory above the
process's own baseline. A few inputs at the limits that are accepted show what the largest allowed ones cost, and
what stays resident afterwards ("kept": resident memory while the result is still held, above the baseline, after
freed memory is handed back to the system).

Each image is handled in a forked child of a process that has already imported everything, so one image's freed
memory cannot hide the next one's peak; the child's peak resident set (VmHWM, reset through /proc/self/clear_refs)
minus its resident set before the image is the figure. The child's address space is capped (``--headroom-mb`` above
what it has mapped) so that an image that would need gigabytes fails there with a MemoryError instead of swapping
the machine. Linux only (fork and /proc).

    python benchmarks/bench_hostile_images.py                   # all images, a table
    python benchmarks/bench_hostile_images.py --quick --json out.json   # the hostile ones only (what the test runs)
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import io
import json
import os
import resource
import struct
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from fromage_gill.generate.history import FORMAT, VERSION, history_from_dict, read_history_json
from fromage_gill.generate.prompt import normalize_message
from fromage_gill.images import ImageProcessor, load_image

BUDGET_MB = 300


# ------------------------------------------------------------------------------------------ hostile files


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(
    width: int, height: int, *, bit_depth: int = 8, colour_type: int = 0, rows: int | None = None, extra: bytes = b""
) -> bytes:
    """A PNG of all-zero pixels declaring ``width`` x ``height``; ``rows``: stop the pixel data after that many rows
    (a truncated file). Written by hand: Pillow would allocate the whole image first."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour_type]
    row = b"\0" * (1 + (width * channels * bit_depth + 7) // 8)  # filter byte + packed samples
    n = height if rows is None else rows
    z = zlib.compressobj(9)
    idat = bytearray()
    batch = max(1, (1 << 22) // len(row))  # rows per compress call: ~4 MB of input at a time
    for start in range(0, n, batch):
        idat += z.compress(row * min(batch, n - start))
    idat += z.flush() if rows is None else z.flush(zlib.Z_SYNC_FLUSH)  # truncated: a valid but unfinished stream
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + extra
        + _chunk(b"IDAT", bytes(idat))
        + (_chunk(b"IEND", b"") if rows is None else b"")
    )


def thin_png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (width, height), 128).save(buf, "PNG", optimize=True)
    return buf.getvalue()


def jpeg_declaring(width: int, height: int) -> bytes:
    """An 8 x 8 JPEG whose frame header claims ``width`` x ``height``: a few hundred bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def gif(screen: tuple[int, int], frames: int, first_frame: tuple[int, int] = (1, 1)) -> bytes:
    """A GIF of ``frames`` one-pixel frames (the first may declare ``first_frame`` as its size)."""
    head = b"GIF89a" + struct.pack("<HHBBB", *screen, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"  # 2-colour palette
    gce = b"\x21\xf9\x04\x00\x0a\x00\x00\x00"  # 0.1 s per frame

    def frame(w: int, h: int) -> bytes:
        return gce + b"\x2c" + struct.pack("<HHHHB", 0, 0, w, h, 0) + b"\x02\x02\x44\x01\x00"  # 1 pixel of data

    return head + frame(*first_frame) + frame(1, 1) * (frames - 1) + b"\x3b"


def truncated_photo() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (1500, 1500, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()[: buf.tell() // 2]


def text_bomb() -> bytes:
    """An 8 x 8 PNG with a compressed text chunk that inflates to 256 MB."""
    z = zlib.compressobj(9)
    text = b"".join(z.compress(b"\0" * (1 << 24)) for _ in range(16)) + z.flush()
    return png(8, 8, extra=_chunk(b"zTXt", b"Comment\0\0" + text))


def photo(size: tuple[int, int], mode: str = "RGB", fmt: str = "JPEG", orientation: int | None = None) -> bytes:
    """A noisy photo-like image (noise does not compress away) in ``mode``, optionally EXIF-rotated."""
    rng = np.random.default_rng(2)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        img.save(buf, fmt, exif=exif, quality=90)
    else:
        img.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def png16(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    ramp = (np.arange(width * height, dtype=np.uint32) % 65536).astype(np.uint16).reshape(height, width)
    Image.fromarray(ramp).save(buf, "PNG")  # uint16: mode I;16
    return buf.getvalue()


def saved_chat(n_images: int, per_turn: int, image: bytes) -> bytes:
    """A conversation export holding ``n_images`` copies of ``image``, ``per_turn`` to a user message."""
    b64 = base64.b64encode(image).decode("ascii")
    turns = []
    for start in range(0, n_images, per_turn):
        segs = [{"type": "text", "text": "look"}] + [{"type": "image", "png": b64}] * min(per_turn, n_images - start)
        turns += [
            {"role": "user", "segments": segs},
            {"role": "assistant", "segments": [{"type": "text", "text": "ok"}]},
        ]
    return json.dumps({"format": FORMAT, "version": VERSION, "model": "bench", "turns": turns}).encode()


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[], bytes]
    expect: str  # "refused" or "accepted"
    quick: bool = True  # in the test's run
    kind: str = "image"  # "image": an upload; "import": an exported conversation read back; "message": 8 copies of
    # the image in one message, as ``Chat.send`` decodes and keeps them before the model runs


CASES = [
    Case("thin PNG 1,000,000 x 1", lambda: thin_png(1_000_000, 1), "refused"),
    Case("thin PNG 20,000 x 1", lambda: thin_png(20_000, 1), "refused"),
    Case("tall PNG 1 x 20,000", lambda: thin_png(1, 20_000), "refused"),
    Case("thin PNG 16,000 x 400 (40:1)", lambda: thin_png(16_000, 400), "refused"),
    Case("bomb PNG 30,000 x 30,000, complete 1-bit data", lambda: png(30_000, 30_000, bit_depth=1), "refused"),
    Case("bomb PNG 20,000 x 20,000, complete 1-bit data", lambda: png(20_000, 20_000, bit_depth=1), "refused"),
    Case("bomb PNG 9,000 x 9,000, complete 1-bit data", lambda: png(9_000, 9_000, bit_depth=1), "refused"),
    Case(
        "PNG header 60,000 x 60,000 RGBA, 1 row of data", lambda: png(60_000, 60_000, colour_type=6, rows=1), "refused"
    ),
    Case("JPEG header 65,000 x 65,000, 8 x 8 data", lambda: jpeg_declaring(65_000, 65_000), "refused"),
    Case(
        "PNG header 8,000 x 8,000 RGBA, 10 rows of data", lambda: png(8_000, 8_000, colour_type=6, rows=10), "refused"
    ),
    Case("truncated PNG photo 1,500 x 1,500", truncated_photo, "refused"),
    Case("PNG with a zTXt chunk inflating to 256 MB", text_bomb, "refused"),
    Case(
        "GIF 10 x 10 whose first frame declares 60,000 x 60,000", lambda: gif((10, 10), 2, (60_000, 60_000)), "refused"
    ),
    Case("GIF 1,000 x 1,000 with 100,000 frames", lambda: gif((1_000, 1_000), 100_000), "accepted"),
    # Odd modes, accepted and converted (they were once mangled, not costly): what a phone or a scanner sends.
    Case("PNG 2,000 x 2,000 16-bit greyscale", lambda: png16(2_000, 2_000), "accepted"),
    Case("JPEG 3,000 x 2,000 CMYK", lambda: photo((3_000, 2_000), "CMYK"), "accepted"),
    Case("JPEG 4,000 x 3,000 EXIF-rotated (orientation 6)", lambda: photo((4_000, 3_000), orientation=6), "accepted"),
    # Imports: the counts are checked before any image is decoded, the JSON's depth before json.loads runs.
    Case(
        "import: 300 x 64-MP PNGs in one message",
        lambda: saved_chat(300, 300, png(8_000, 8_000)),
        "refused",
        kind="import",
    ),
    Case("import: JSON nested 1,000,000 deep", lambda: b"[" * 1_000_000 + b"]" * 1_000_000, "refused", kind="import"),
    # At the limits, accepted: what the largest allowed image costs.
    Case("PNG 8,000 x 8,000 greyscale (64 MP, the pixel limit)", lambda: png(8_000, 8_000), "accepted", False),
    Case(
        "PNG 8,000 x 8,000 RGBA (64 MP, the pixel limit)", lambda: png(8_000, 8_000, colour_type=6), "accepted", False
    ),
    Case("PNG 16,384 x 512 greyscale (32:1, the aspect limit)", lambda: png(16_384, 512), "accepted", False),
    Case("PNG 8,000 x 8,000 16-bit greyscale", lambda: png(8_000, 8_000, bit_depth=16), "accepted", False),
    # Within the pixel limit, so decoded: libjpeg fills the missing blocks with grey and Pillow does not say so.
    Case("JPEG header 8,000 x 8,000, 8 x 8 data", lambda: jpeg_declaring(8_000, 8_000), "accepted", False),
    Case(
        "message: 8 x 64-MP PNGs (8,000 x 8,000 greyscale) in Chat.send",
        lambda: png(8_000, 8_000),
        "accepted",
        False,
        "message",
    ),
    # The 995 KB export: 12 x 64-MP PNGs, 8 to a message; each is decoded in turn and kept at 2 MP.
    Case(
        "import: 12 x 64-MP PNGs (8,000 x 8,000 greyscale)",
        lambda: saved_chat(12, 8, png(8_000, 8_000)),
        "accepted",
        False,
        "import",
    ),
]


# ------------------------------------------------------------------------------------------ measuring


@dataclass
class Result:
    name: str
    file_bytes: int
    expect: str
    outcome: str  # "refused", "accepted", or the name of the unexpected exception
    message: str
    peak_mb: float  # peak resident memory above the child's baseline
    kept_mb: float  # resident memory above the baseline while the result (image or conversation) is still held
    seconds: float


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _handle(data: bytes, case: Case, headroom_mb: int) -> tuple[str, str, object]:
    cap = _status_kb("VmSize") * 1024 + headroom_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    try:
        if case.kind == "message":
            segments = normalize_message(["look", *[data] * 8])
            images = [s.image for s in segments[1:]]
            return "accepted", f"{len(images)} images kept at {images[0].size[0]}x{images[0].size[1]}", segments
        if case.kind == "import":
            turns = history_from_dict(read_history_json(data), model="bench", vocab_size=1)
            images = [s.image for t in turns for s in t.images]
            return "accepted", f"{len(images)} images kept at {images[0].size[0]}x{images[0].size[1]}", turns
        image = load_image(data, name=case.name)
        ImageProcessor(224)([image])
        return "accepted", f"{image.size[0]}x{image.size[1]} {image.mode}", image
    except ValueError as e:  # ImageError and every refusal of an import are ValueErrors naming the problem
        return "refused", str(e), None
    except Exception as e:  # noqa: BLE001 -- the benchmark reports whatever escaped, e.g. MemoryError
        return type(e).__name__, str(e)[:300], None


def _release_freed() -> None:
    """Hand freed memory back to the system (Pillow's block cache, glibc's free lists), so that the resident set
    is what the result holds rather than what the allocator kept for later."""
    Image.core.clear_cache()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def measure(case: Case, data: bytes, headroom_mb: int) -> Result:
    """Handle ``data`` in a forked child; its peak memory above its own starting point."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(read_fd)
            _release_freed()  # the baseline without the parent's freed memory, as the "kept" figure is
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak (VmHWM) to the current resident set
            base = _status_kb("VmRSS")
            t = time.perf_counter()
            outcome, message, result = _handle(data, case, headroom_mb)
            seconds = time.perf_counter() - t
            peak = _status_kb("VmHWM")
            _release_freed()
            kept = _status_kb("VmRSS")
            del result
            os.write(
                write_fd, json.dumps([outcome, message, (peak - base) / 1024, (kept - base) / 1024, seconds]).encode()
            )
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as f:
        raw = f.read()
    _, status = os.waitpid(pid, 0)
    if not raw:
        nan = float("nan")
        return Result(case.name, len(data), case.expect, f"child died (status {status})", "", nan, nan, 0.0)
    outcome, message, peak_mb, kept_mb, seconds = json.loads(raw)
    return Result(
        case.name, len(data), case.expect, outcome, message, round(peak_mb, 1), round(kept_mb, 1), round(seconds, 3)
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="only the hostile images (the test's run)")
    ap.add_argument(
        "--headroom-mb",
        type=int,
        default=3072,
        help="address space each child may map beyond what it has (default 3072)",
    )
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if sys.platform != "linux":
        ap.error("Linux only: the measurement forks and reads /proc/self/status")
    cases = [c for c in CASES if c.quick or not args.quick]
    load_image(thin_png(8, 8))  # the children inherit Pillow's plugins already registered: only the image counts
    made = [(c, c.make()) for c in cases]  # all files made first, so no child inherits a half-built one
    results = [measure(c, data, args.headroom_mb) for c, data in made]
    width = max(len(r.name) for r in results)
    print(f"{'input':<{width}}  {'bytes':>9}  {'peak MB':>7}  {'kept MB':>7}  {'s':>6}  outcome")
    for r, (c, _) in zip(results, made, strict=True):
        # the budget is for hostile files; the images at the limits are there to show what accepting one costs
        ok = r.outcome == r.expect and (r.peak_mb < BUDGET_MB or not c.quick)
        flag = "" if ok else "   <-- UNEXPECTED"
        print(
            f"{r.name:<{width}}  {r.file_bytes:>9,}  {r.peak_mb:>7.1f}  {r.kept_mb:>7.1f}  {r.seconds:>6.2f}  "
            f"{r.outcome}: {r.message[:110]}{flag}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
