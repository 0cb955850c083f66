"""Benchmark: wsi-view tile latency (cold and warm, several zoom levels, concurrent clients) and the
static export, on a SYNTHETIC slide with ~40 mm^2 of tissue. Aims: warm tiles p95 < 20 ms, cold
tiles p95 < 150 ms, the export in under a minute.

Makes (or reuses) the slide in --data (``wsi-synth --tissue-mm2 40``, default ./bench_data). The
server runs as its own process (``python -m wsi_toolkit.cli.view SLIDE``, 2 tile threads by
default, as on a 2-core machine); clients are threads of this process on keep-alive connections.
The slide is served alone (no results): tile cost does not depend on the heatmap, which the page
draws itself from a few kB of data.

- cold: a fresh server, each tile requested once (rendered: read + resize + JPEG), per zoom level
  (full resolution, then 2x, 4x, 16x coarser), tiles drawn at random among those on tissue
- warm: the same tiles again (the server's tile cache)
- concurrent: --clients threads each asking for distinct cold tiles of the full-resolution level at
  once, then the same tiles again (warm)
- export: ``export_site`` of the slide into a temporary folder with --workers threads

Prints one JSON line per measurement and, with --markdown, a table for BENCHMARKS.md.

    python scripts/bench_view.py [--tissue-mm2 40] [--tiles 60] [--clients 1 4 8] [--workers 2] [--markdown]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


class _Skip(Exception):
    pass


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round(q / 100 * (len(v) - 1))))]


def summary(name: str, ms: list[float], **extra) -> dict:
    return {"bench": name, "n": len(ms), "p50_ms": round(pct(ms, 50), 2), "p95_ms": round(pct(ms, 95), 2),
            "max_ms": round(max(ms), 2), "mean_ms": round(statistics.fmean(ms), 2), **extra}


class Server:
    """``wsi-view SLIDE`` as a child process."""

    def __init__(self, slide: Path, workers: int):
        self.proc = subprocess.Popen([sys.executable, "-m", "wsi_toolkit.cli.view", str(slide), "--workers",
                                      str(workers), "--cache-mb", "512"],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        url = self.proc.stdout.readline().strip()  # type: ignore[union-attr]
        if not url.startswith("http://"):
            raise RuntimeError(f"wsi-view did not start (printed {url!r})")
        host_port = url.split("//", 1)[1].rstrip("/")
        self.host, self.port = host_port.rsplit(":", 1)

    def connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, int(self.port), timeout=60)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def fetch(conn: http.client.HTTPConnection, path: str) -> tuple[float, int, bool]:
    t = time.perf_counter()
    conn.request("GET", path)
    resp = conn.getresponse()
    body = resp.read()
    ms = (time.perf_counter() - t) * 1e3
    if resp.status != 200 or resp.getheader("X-WSI-Tile-Error"):
        raise RuntimeError(f"{path}: HTTP {resp.status} {resp.getheader('X-WSI-Tile-Error')}")
    return ms, len(body), resp.getheader("X-WSI-Cache") == "hit"


def run_clients(server: Server, paths_per_client: list[list[str]]) -> tuple[list[float], float]:
    """Each client (thread, own connection) fetches its paths; returns all latencies and the wall time."""
    results: list[list[float]] = [[] for _ in paths_per_client]
    start = threading.Barrier(len(paths_per_client) + 1)

    def client(i: int) -> None:
        conn = server.connect()
        start.wait()
        for p in paths_per_client[i]:
            results[i].append(fetch(conn, p)[0])
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(paths_per_client))]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return [ms for r in results for ms in r], time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tissue-mm2", type=float, default=40.0)
    ap.add_argument("--mpp", type=float, default=0.243)
    ap.add_argument("--tiles", type=int, default=60, help="tiles per zoom level (and per concurrent client)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--workers", type=int, default=2, help="tile threads of the server and of the export")
    ap.add_argument("--data", type=Path, default=Path("bench_data"))
    ap.add_argument("--skip-export", action="store_true")
    ap.add_argument("--export-only", action="store_true")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from wsi_toolkit.synthetic import make_spec, write_synthetic_slide
    from wsi_toolkit.view import Catalogue, DeepZoomGeometry, export_site

    args.data.mkdir(parents=True, exist_ok=True)
    slide = args.data / f"synthetic_{args.tissue_mm2:g}mm2_{args.mpp:g}_seed{args.seed}.tif"
    if not slide.exists():
        t = time.perf_counter()
        s = write_synthetic_slide(slide, make_spec(tissue_mm2=args.tissue_mm2, seed=args.seed), mpp=args.mpp)
        print(json.dumps({"made_slide": str(slide), "seconds": round(time.perf_counter() - t, 1),
                          "level0_size": s.level0_size}), flush=True)
    rows: list[dict] = []
    machine = {"cpu": cpu_model(), "cpus": os.cpu_count(), "python": platform.python_version(),
               "load_before": [round(v, 2) for v in os.getloadavg()]}
    print(json.dumps({"machine": machine}), flush=True)

    catalogue = Catalogue.from_slide(slide)
    view = catalogue.view(catalogue.entries[0].id)
    geo: DeepZoomGeometry = view.geometry
    slide_id = view.entry.id
    top = geo.level_count - 1
    rng = random.Random(args.seed)

    # tiles whose centre is on tissue (what a reviewer looks at; the glass around compresses to ~3 kB)
    from wsi_toolkit.slide import open_slide
    from wsi_toolkit.tissue import detect_tissue

    with open_slide(slide) as reader:
        tissue = detect_tissue(reader.thumbnail(mpp=8.0), l0_mpp=reader.mpp)

    def on_tissue(level: int, c: int, r: int) -> bool:
        x0, y0, w, h = geo.tile_box(level, c, r)
        d = geo.downsample(level)
        row, col = int((y0 + h / 2) * d / tissue.l0_per_px), int((x0 + w / 2) * d / tissue.l0_per_px)
        return row < tissue.mask.shape[0] and col < tissue.mask.shape[1] and bool(tissue.mask[row, col])

    def tile_paths(level: int, n: int, taken: set) -> list[str]:
        cols, rows_ = geo.level_tiles[level]
        cells = [(c, r) for c in range(cols) for r in range(rows_) if (level, c, r) not in taken
                 and on_tissue(level, c, r)]
        pick = rng.sample(cells, min(n, len(cells)))
        taken.update((level, c, r) for c, r in pick)
        return [f"/data/{slide_id}/slide_files/{level}/{c}_{r}.jpeg" for c, r in pick]

    # cold and warm, one client, per zoom level
    server = Server(slide, args.workers) if not args.export_only else None
    taken: set = set()
    try:
        if server is None:
            raise _Skip
        conn = server.connect()
        fetch(conn, f"/data/{slide_id}/info.json")  # opens the slide
        for level in (top, top - 1, top - 2, top - 4):
            paths = tile_paths(level, args.tiles, taken)
            cold = [fetch(conn, p) for p in paths]
            warm = [fetch(conn, p) for p in paths]
            assert not any(hit for _, _, hit in cold) and all(hit for _, _, hit in warm)
            extra = {"level": level, "downsample": geo.downsample(level), "tiles": len(paths),
                     "kb_mean": round(statistics.fmean(b for _, b, _ in cold) / 1024, 1)}
            for name, got in (("cold", cold), ("warm", warm)):
                rows.append(summary(f"{name} 1 client", [ms for ms, _, _ in got], **extra))
                print(json.dumps(rows[-1]), flush=True)
        conn.close()
        for n_clients in args.clients:
            per_client = [tile_paths(top, args.tiles, taken) for _ in range(n_clients)]
            for name in ("cold", "warm"):
                ms, wall = run_clients(server, per_client)
                rows.append(summary(f"{name} {n_clients} clients", ms, level=top, downsample=1,
                                    tiles=len(ms), tiles_per_s=round(len(ms) / wall, 1)))
                print(json.dumps(rows[-1]), flush=True)
    except _Skip:
        pass
    finally:
        if server is not None:
            server.stop()

    export = None
    if not args.skip_export:
        site = Path(tempfile.mkdtemp(prefix="bench_view_site_")) / "site"
        try:
            report = export_site(catalogue, site, workers=args.workers)
            export = {"bench": "export", "seconds": round(report.seconds, 1), "tiles": report.tiles,
                      "error_tiles": report.error_tiles, "mb": round(report.bytes / 2**20, 1),
                      "tiles_per_s": round(report.tiles / report.seconds, 1), "workers": args.workers}
            print(json.dumps(export), flush=True)
        finally:
            shutil.rmtree(site.parent, ignore_errors=True)
    catalogue.close()
    machine["load_after"] = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps({"machine": machine, "slide": str(slide), "level0_size": [geo.width, geo.height],
                      "deep_zoom_levels": geo.level_count, "tile_count": geo.tile_count}), flush=True)
    if args.markdown:
        print("\n| measurement | zoom (downsample) | tiles | p50 ms | p95 ms | max ms | tiles/s |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['bench']} | {r['downsample']} | {r['n']} | {r['p50_ms']} | {r['p95_ms']} | {r['max_ms']} | "
                  f"{r.get('tiles_per_s', '')} |")
        if export:
            print(f"\nexport: {export['tiles']} tiles, {export['mb']} MiB, {export['seconds']} s "
                  f"({export['tiles_per_s']} tiles/s, {export['workers']} threads), "
                  f"{export['error_tiles']} error tiles")
    return 0


if __name__ == "__main__":
    sys.exit(main())
