#!/usr/bin/env python3
"""The image pipeline alone, per engine, side by side in one run: where does the time per image go?

    python scripts/engines.py                              # the S2 photo to 800 px, 2 threads, 20 s each
    python scripts/engines.py --file photo.jpg --width 300 --threads 1 --seconds 10

No HTTP. For each variant, ``--threads`` threads run it back to back for ``--seconds``; the script reports
images/s, CPU per image (this process's utime + stime over the images) and the output size:

- ``pillow``: ``optimizer.pipeline.optimize`` with the default Pillow resize;
- ``pillow+vips``: the same with ``resizer="vips"`` (Pillow decodes and encodes, libvips resizes);
- ``libvips``: libvips alone doing the same job as sharp/ipx would (``thumbnail_buffer`` with
  shrink-on-load and lanczos3, then a progressive optimized JPEG at the same quality), for reference.
- the same with ``--jpeg-progressive 0`` (``--baseline``): every JPEG baseline.

Variants run one after the other, alternating over ``--rounds`` (default 2) so that a noisy neighbour
hits all of them; the table gives each variant's best round. The libvips variants need the optional
wheels (``pip install 'optimizer[vips]'``) and are skipped without them. Not part of CI.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from optimizer import vips  # noqa: E402
from optimizer.pipeline import Limits, Params, optimize  # noqa: E402
from optimizer.settings import Settings  # noqa: E402
from optimizer.state import pipeline_limits  # noqa: E402

DEFAULT_FILE = "photos/kleiber-lukas-baubkus-6028x3391.jpg"  # the S2 photo


@dataclasses.dataclass(frozen=True)
class Result:
    name: str
    images_per_second: float
    cpu_ms_per_image: float
    output_bytes: int


def measure(name: str, job: Callable[[], int], threads: int, seconds: float) -> Result:
    """Run ``job`` on ``threads`` threads until ``seconds`` have passed; CPU is the whole process's."""
    job()  # warm up: first-use costs (plugin imports, libvips start) are not per image
    sizes: list[int] = []

    def worker(deadline: float) -> int:
        count = 0
        while time.perf_counter() < deadline:
            size = job()
            count += 1
            if not sizes:
                sizes.append(size)
        return count

    before = os.times()
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        images = sum(pool.map(worker, [started + seconds] * threads))
    wall = time.perf_counter() - started
    after = os.times()
    cpu = (after.user + after.system) - (before.user + before.system)
    return Result(name, images / wall, cpu / max(1, images) * 1000, sizes[0] if sizes else 0)


def variants(data: bytes, width: int, quality: int, baseline: bool) -> dict[str, Callable[[], int]]:
    params = Params(width=width, quality=quality)
    pillow = pipeline_limits(Settings(threads=1, jpeg_progressive=not baseline))
    jobs: dict[str, Callable[[], int]] = {"pillow": lambda: len(optimize(data, params, pillow).data)}
    try:
        pyvips = vips.load()
        vips.configure_process()  # as the server runs it: no cache, one thread per resize
    except vips.VipsUnavailable as exc:
        print(f"libvips variants skipped: {exc}", file=sys.stderr)
        return jobs
    with_vips: Limits = dataclasses.replace(pillow, resizer="vips")
    jobs["pillow+vips"] = lambda: len(optimize(data, params, with_vips).data)
    # configure_process() blocks libvips's file loaders for the service; this reference needs one.
    pyvips.operation_block_set("VipsForeignLoadJpeg", False)

    def libvips_alone() -> int:
        image = pyvips.Image.thumbnail_buffer(data, width, height=10_000_000, size="down")
        out: bytes = image.jpegsave_buffer(
            Q=quality, optimize_coding=True, interlace=not baseline, keep="none"
        )
        return len(out)

    jobs["libvips"] = libvips_alone
    return jobs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--file", default=DEFAULT_FILE, help=f"image [default: {DEFAULT_FILE}]")
    parser.add_argument(
        "--corpus",
        type=Path,
        default=Path(os.environ.get("OPTIMIZER_CORPUS", ROOT.parent / "shared" / "corpus")),
    )
    parser.add_argument("--width", type=int, default=800)
    parser.add_argument("--quality", type=int, default=80)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--baseline", action="store_true", help="baseline JPEG output for every variant")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.seconds <= 0 or args.threads < 1:
        parser.error("--rounds and --threads must be 1 or more, --seconds above 0")
    path = Path(args.file)
    if not path.is_file():
        path = args.corpus / args.file
    if not path.is_file():
        parser.error(f"no such image: {args.file} (also looked in {args.corpus})")
    jobs = variants(path.read_bytes(), args.width, args.quality, args.baseline)
    print(
        f"{path.name}, width {args.width}, quality {args.quality}, "
        f"{'baseline' if args.baseline else 'progressive'} JPEG, {args.threads} thread(s), "
        f"{args.seconds:g} s per variant, {args.rounds} round(s), load average {os.getloadavg()[0]:.2f}"
    )
    best: dict[str, Result] = {}
    for round_number in range(args.rounds):
        for name, job in jobs.items():
            result = measure(name, job, args.threads, args.seconds)
            print(
                f"  round {round_number + 1} {name:12} {result.images_per_second:6.2f} images/s"
                f"  {result.cpu_ms_per_image:6.1f} ms CPU/image  {result.output_bytes} bytes",
                flush=True,
            )
            if name not in best or result.images_per_second > best[name].images_per_second:
                best[name] = result
    reference = best["pillow"].images_per_second
    print(f"\n{'variant':12} {'images/s':>9} {'vs pillow':>10} {'CPU ms/image':>13} {'bytes':>8}")
    for result in best.values():
        print(
            f"{result.name:12} {result.images_per_second:9.2f} {result.images_per_second / reference:9.0%}"
            f" {result.cpu_ms_per_image:13.1f} {result.output_bytes:8d}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
