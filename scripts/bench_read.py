"""What reading a slide costs, without the model (a SYNTHETIC slide made by scripts/bench_infer.py,
or any slide):

- ``decode_floor``: every level-2 JPEG tile decoded once on one core (imagecodecs,
  libjpeg-turbo): megapixels/s, the physical floor of reading; also the tiles the reader touches
  alone (tissue tiles decode slower than blank glass).
- ``read_only``: the inference reader alone (region reads by reader threads sharing one slide
  handle, patches cut in memory), with 0 / 1 / 2 threads: patches/s, region megapixels per wall
  second and per CPU-second of all processes.
- ``readers``: reader designs alone, interleaved over rounds: the package's threads, WSInfer's
  plain ``worker_init_fn`` DataLoader, and the slot ring of DataLoader workers with shared-memory
  slots this project used before; median and spread of patches/s with the load average.

    python scripts/bench_read.py SLIDE [--strides 96 32] [--read-workers 0 1 2] [--read-passes 3]
        [--only floor read readers] [--reader-designs threads dataloader slots] [--reader-rounds 5]

``scripts/bench_infer.py --only floor read readers`` runs the same functions on its slide.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from bench_harness import loadavg


def grid_blocks(slide_path: Path, stride_px: int):
    from wsi_toolkit.inference import InferenceConfig, plan_blocks
    from wsi_toolkit.slide import open_slide
    from wsi_toolkit.tiling import GridConfig, make_grid
    from wsi_toolkit.tissue import detect_tissue

    with open_slide(slide_path) as slide:
        tissue = detect_tissue(slide.thumbnail(mpp=8.0), l0_mpp=slide.mpp)
        grid = make_grid(l0_size=slide.dimensions, l0_mpp=slide.mpp, config=GridConfig(stride_px=stride_px),
                         tissue_mask=tissue.mask, mask_l0_per_px=tissue.l0_per_px)
    return grid, plan_blocks(grid, block_cells=InferenceConfig().cells_per_block(patch_px=96, stride_px=stride_px))


def decode_floor(slide_path: Path, level: int = 2, blocks=None) -> dict:
    """Decode every tile of one pyramid level once, single thread (the decode floor; best of 3). With
    ``blocks`` also the tiles those block regions touch, alone: tissue tiles decode slower than
    the blank glass tiles that make up much of a level, so this is the floor for what is read."""
    import tifffile

    from wsi_toolkit.slide._metadata import largest_series

    with tifffile.TiffFile(slide_path) as tif:
        series = largest_series(tif)
        page = series.levels[level].keyframe
        fh = tif.filehandle
        data = []
        for off, cnt in zip(page.dataoffsets, page.databytecounts):
            fh.seek(off)
            data.append(fh.read(cnt))

        def run(indices, repeats: int = 3):
            """Pixels decoded and the best of ``repeats`` timings (a floor: the least disturbed)."""
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                px = 0
                for i in indices:
                    arr, _, _ = page.decode(data[i], i, jpegtables=page.jpegtables)
                    px += arr.shape[-3] * arr.shape[-2]
                best = min(best, time.perf_counter() - t0)
            return px, best

        px, dt = run(range(len(data)))
        rec = {"bench": "decode_floor", "level": level, "tiles": len(data), "megapixels": round(px / 1e6, 2),
               "seconds": round(dt, 3), "mp_per_s_one_core": round(px / 1e6 / dt, 1),
               "patches96_per_s_one_core": round(px / (96 * 96) / dt, 0)}
        if blocks:
            tw, th = page.tilewidth, page.tilelength
            across = -(-page.imagewidth // tw)
            ds = round(series.levels[0].keyframe.imagewidth / page.imagewidth)  # integer pyramid
            touched = set()
            for b in blocks:
                x0, y0 = b.region_l0_xy[0] / ds, b.region_l0_xy[1] / ds
                x1, y1 = x0 + b.region_px[0] - 1, y0 + b.region_px[1] - 1
                for ty in range(max(0, int(y0 // th)), int(y1 // th) + 1):
                    for tx in range(max(0, int(x0 // tw)), min(across - 1, int(x1 // tw)) + 1):
                        if ty * across + tx < len(data):
                            touched.add(ty * across + tx)
            tpx, tdt = run(sorted(touched))
            rec.update({"tissue_tiles": len(touched), "tissue_tiles_mp_per_s_one_core": round(tpx / 1e6 / tdt, 1)})
    return rec


def read_only(slide_path: Path, stride_px: int, workers: int, passes: int = 3, design: str = "threads") -> dict:
    """The inference reader alone: grid over tissue, blocks read and patches cut, no model. The slide
    is read ``passes`` times, each time by a new reader (new slide handle and tile cache, new worker
    processes), as ``passes`` runs of wsi-infer would: start-up and decoding count every time.
    ``design``: ``threads`` (the package's reader, ``workers`` threads) or an alternative from
    :data:`READER_DESIGNS`. "Per CPU-second" divides by the CPU seconds of all processes (this one +
    DataLoader workers, from getrusage), not by wall time x cores."""
    import resource

    _, blocks = grid_blocks(slide_path, stride_px)
    rep = blocks * passes
    cls = READER_DESIGNS[design]()

    def cpu() -> float:
        a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime

    load = loadavg()
    c0, t0 = cpu(), time.perf_counter()
    n, read_s, t_first = 0, 0.0, None
    for _ in range(passes):
        for patches, _index, seconds in cls(slide_path, blocks, patch_px=96, spacing_um_px=0.972).read(workers):
            if t_first is None:
                t_first = time.perf_counter() - t0
            n += len(patches)
            read_s += float(seconds)
    dt, used = time.perf_counter() - t0, cpu() - c0
    region_mp = sum(b.region_px[0] * b.region_px[1] for b in rep) / 1e6
    return {"bench": "read_only", "design": design, "stride_px": stride_px, "workers": workers, "passes": passes,
            "patches": n, "blocks": len(rep), "region_megapixels": round(region_mp, 2), "seconds_wall": round(dt, 3),
            "seconds_to_first_region": round(t_first or 0.0, 3), "cpu_seconds_all_processes": round(used, 3),
            "patches_per_s": round(n / dt, 1),
            "region_mp_per_s_wall": round(region_mp / dt, 1),
            "region_mp_per_cpu_second": round(region_mp / used, 1),
            "read_ms_per_patch": round(read_s / n * 1000, 4), "loadavg": load}


def _dataloader_design(slots: bool):
    """A DataLoader reader. ``slots=False``: WSInfer's pattern, a map-style DataLoader over the blocks,
    each worker opening its slide in ``worker_init_fn``, regions pickled back to this process,
    default order. ``slots=True``: this project's reader before issue 14 (commit cb490e4, without
    its error relay): workers in a contiguous-band order (``worker_order``), regions copied into a
    ring of ``prefetch + 2`` shared-memory slots per worker made before the workers fork. Patches are
    cut in this process in both."""
    import math

    import numpy as np
    import torch

    from wsi_toolkit.inference import cut_patches
    from wsi_toolkit.slide import open_slide

    def worker_order(n: int, workers: int) -> np.ndarray:
        if workers <= 1 or n <= 1:
            return np.arange(n)
        i = np.arange(n)
        w, k = i % workers, i // workers
        sizes = np.array([len(range(v, n, workers)) for v in range(workers)])
        return np.concatenate([[0], np.cumsum(sizes)[:-1]])[w] + k

    class LoaderBlocks(torch.utils.data.Dataset):
        def __init__(self, slide_path, blocks, *, patch_px, spacing_um_px, mpp=None, backend="auto"):
            self.slide_path, self.blocks, self.patch_px, self.spacing = str(slide_path), blocks, patch_px, spacing_um_px
            self.mpp, self.backend, self.slide, self.slots, self.served = mpp, backend, None, None, 0

        def __len__(self):
            return len(self.blocks)

        def __getstate__(self):
            return {**self.__dict__, "slide": None}

        def open(self, _worker_id=None):
            info = torch.utils.data.get_worker_info()
            ds = info.dataset if info is not None else self
            ds.slide = open_slide(ds.slide_path, mpp=ds.mpp, backend=ds.backend)
            ds.slide.reserve_tile_cache(ds.spacing)

        def __getitem__(self, i):
            t0 = time.perf_counter()
            if self.slide is None:
                self.open()
            b = self.blocks[i]
            region = self.slide.read_at_mpp(b.region_l0_xy, b.region_px, self.spacing)
            info = torch.utils.data.get_worker_info()
            if self.slots is None or info is None:
                return region, b.index, b.offsets_px, time.perf_counter() - t0
            slot = self.served % self.slots.shape[1]
            self.served += 1
            h, w = region.shape[:2]
            self.slots[info.id, slot, :h, :w].numpy()[...] = region
            return (info.id, slot, h, w), b.index, b.offsets_px, time.perf_counter() - t0

        def read(self, workers, prefetch=4):
            if slots:
                self.blocks = [self.blocks[i] for i in worker_order(len(self.blocks), workers)]
            if slots and workers:
                shape = (workers, prefetch + 2, max(b.region_px[1] for b in self.blocks),
                         max(b.region_px[0] for b in self.blocks), 3)
                assert math.prod(shape) < shutil.disk_usage("/dev/shm").free // 2, "/dev/shm too small"
                self.slots = torch.empty(shape, dtype=torch.uint8).share_memory_()
            loader = torch.utils.data.DataLoader(self, batch_size=None, num_workers=workers, collate_fn=_as_is,
                                                 worker_init_fn=None if slots or not workers else self.open,
                                                 prefetch_factor=prefetch if workers else None)
            for field, index, offsets, seconds in loader:
                t0 = time.perf_counter()
                region = field if isinstance(field, np.ndarray) else self.slots[field[0], field[1], :field[2],
                                                                                :field[3]].numpy()
                yield cut_patches(region, offsets, self.patch_px), index, seconds + time.perf_counter() - t0

    return LoaderBlocks


def _as_is(item):
    return item


def _package_reader():
    from wsi_toolkit.inference import PatchBlocks

    return PatchBlocks


#: Reader designs, each a factory of a class with PatchBlocks' constructor and ``read(workers)``.
READER_DESIGNS = {"threads": _package_reader, "dataloader": lambda: _dataloader_design(slots=False),
                  "slots": lambda: _dataloader_design(slots=True)}


def compare_readers(slide_path: Path, strides: list[int], workers: list[int], designs: list[str], rounds: int,
                    passes: int) -> list[dict]:
    """Each design x stride x worker count measured ``rounds`` times, interleaved (A B C A B C ...) so
    they share the machine's conditions; then per design/stride/workers the median and spread."""
    import statistics

    runs: dict = {}
    for r in range(rounds):
        for stride in strides:
            for w in workers:
                for design in designs:
                    rec = read_only(slide_path, stride, w, passes=passes, design=design)
                    rec["round"] = r
                    print(json.dumps(rec), flush=True)
                    runs.setdefault((design, stride, w), []).append(rec)
    out = []
    for (design, stride, w), recs in runs.items():
        pps = [x["patches_per_s"] for x in recs]
        out.append({"bench": "reader_design", "design": design, "stride_px": stride, "workers": w, "rounds": len(pps),
                    "patches_per_s_median": round(statistics.median(pps), 1), "patches_per_s_min": min(pps),
                    "patches_per_s_max": max(pps),
                    "cpu_seconds_median": round(statistics.median(x["cpu_seconds_all_processes"] for x in recs), 3),
                    "loadavg": [x["loadavg"] for x in recs]})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("slide", type=Path)
    ap.add_argument("--strides", type=int, nargs="+", default=[96, 32])
    ap.add_argument("--read-workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--read-passes", type=int, default=3, help="sweeps of the slide per reader-alone run")
    ap.add_argument("--only", nargs="+", default=["floor", "read"], choices=["floor", "read", "readers"])
    ap.add_argument("--reader-designs", nargs="+", choices=list(READER_DESIGNS), default=list(READER_DESIGNS))
    ap.add_argument("--reader-rounds", type=int, default=5)
    args = ap.parse_args(argv)
    for rec in read_parts(args.slide, set(args.only), args.strides, args.read_workers, args.read_passes,
                          args.reader_designs, args.reader_rounds):
        print(json.dumps(rec), flush=True)
    return 0


def read_parts(slide: Path, parts: set[str], strides: list[int], read_workers: list[int], passes: int,
               designs: list[str], rounds: int):
    """The records of the parts asked for (floor, readers, read), in that order."""
    if "floor" in parts:
        yield decode_floor(slide, blocks=grid_blocks(slide, 96)[1])
    if "readers" in parts:
        yield from compare_readers(slide, strides, read_workers, designs, rounds, passes)
    if "read" in parts:
        for w in sorted(set(read_workers)):
            for stride in strides:
                yield read_only(slide, stride, w, passes=passes)


if __name__ == "__main__":
    sys.exit(main())
