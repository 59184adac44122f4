"""Retrieval throughput: queries/s of chunked ranking with every metric, on synthetic 512-d embeddings.

Galleries of 1k, 10k and 100k clustered unit vectors (classes of about 50 clips, as VGGSound's test sets have), each
query ranked against the whole gallery with itself left out (pooled cosine, as a2a and ``--score pooled``), then
A@k / P@k / R@k / mAP and the exact random baseline. Optionally the localisation score (max of the cosine map over
14 x 14 positions, ``--score loc``) on a small gallery, which costs h*w times more.

    python benchmarks/retrieve_throughput.py                     # CPU, all torch threads
    python benchmarks/retrieve_throughput.py --device cuda
    python benchmarks/retrieve_throughput.py --galleries 1000 10000 --queries 500 --threads 2

Memory: the gallery takes G x 512 x 4 bytes (100k: 205 MB; VGGSound's 200k: 410 MB); ranking adds one block of about
``BLOCK_ELEMENTS`` (2**23) elements x ~30 bytes (~250 MB) whatever G is, because queries are ranked in chunks of
2**23 / G rows. The figure printed as "peak" is the process's peak resident memory (CPU) or peak allocated memory
(CUDA).
"""
from __future__ import annotations

import argparse
import resource
import time

import torch

from sslt_cli.retrieve import (BLOCK_ELEMENTS, block_rows, cosine_rows, localisation_rows, random_baseline,
                               rank_in_chunks, summarise)


def clustered(n: int, dim: int, per_class: int, noise: float,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n unit vectors in ``n // per_class`` clusters: (n, dim) embeddings and (n,) class ids. Made in slices of
    10k rows, so making them needs little more memory than they take (the peak printed is the ranking's)."""
    n_classes = max(2, n // per_class)
    labels = torch.randint(0, n_classes, (n,), generator=generator)
    centres = torch.nn.functional.normalize(torch.randn(n_classes, dim, generator=generator), dim=1)
    points = torch.empty(n, dim)
    for start in range(0, n, 10_000):
        part = centres[labels[start:start + 10_000]]
        part += noise * torch.randn(part.shape, generator=generator) / dim ** 0.5
        points[start:start + 10_000] = torch.nn.functional.normalize(part, dim=1)
    return points, labels


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_pooled(gallery: int, queries: int, dim: int, device: torch.device, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    emb, labels = clustered(gallery, dim, per_class=50, noise=4.0, generator=g)
    emb = emb.to(device)
    q = min(queries, gallery)
    exclude = torch.arange(q)
    warm = min(q, 8)  # first calls pay for allocator and kernel start-up
    rank_in_chunks(cosine_rows(emb[:warm], emb), warm, labels[:warm], labels, exclude[:warm])
    sync(device)
    start = time.perf_counter()
    ranked = rank_in_chunks(cosine_rows(emb[:q], emb), q, labels[:q], labels, exclude)
    metrics = summarise(ranked)
    baseline = random_baseline(ranked.n_relevant, ranked.gallery_size)
    sync(device)
    seconds = time.perf_counter() - start
    return {"gallery": gallery, "queries": q, "seconds": seconds, "qps": q / seconds,
            "rows_per_chunk": block_rows(gallery), "p_at_1": metrics["p_at_1"], "random_p_at_1": baseline["p_at_1"],
            "map": metrics["map"], "peak_mb": peak_memory_mb(device)}


def bench_loc(gallery: int, queries: int, dim: int, positions: int, device: torch.device, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    audio, labels = clustered(gallery, dim, per_class=50, noise=4.0, generator=g)
    # Only the cost matters here: random unit maps, stored as float16 as retrieval keeps them.
    maps = torch.nn.functional.normalize(torch.randn(gallery, positions, dim, generator=g), dim=2)
    maps = maps.to(torch.float16).to(device)
    audio = audio.to(device)
    q = min(queries, gallery)
    sync(device)
    start = time.perf_counter()
    ranked = rank_in_chunks(localisation_rows(audio, maps, "audio"), q, labels[:q], labels, torch.arange(q))
    summarise(ranked)
    random_baseline(ranked.n_relevant, ranked.gallery_size)
    sync(device)
    seconds = time.perf_counter() - start
    return {"gallery": gallery, "queries": q, "seconds": seconds, "qps": q / seconds, "peak_mb": peak_memory_mb(device)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--galleries", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--queries", type=int, default=2000, help="queries timed per gallery (at most the gallery)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--loc-gallery", type=int, default=1000, help="gallery for the loc score (0: skip)")
    parser.add_argument("--loc-queries", type=int, default=200)
    parser.add_argument("--positions", type=int, default=196, help="map positions for loc (14 x 14)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"retrieval throughput on {name}; torch {torch.__version__}; block {BLOCK_ELEMENTS} elements", flush=True)
    print(f"{'score':<8}{'gallery':>9}{'queries':>9}{'rows/chunk':>12}{'seconds':>10}{'queries/s':>12}"
          f"{'P@1':>8}{'rand P@1':>10}{'mAP':>8}{'peak MB':>10}", flush=True)
    last_qps = 0.0
    for gallery in args.galleries:
        r = bench_pooled(gallery, args.queries, args.dim, device, args.seed)
        last_qps = r["qps"]
        print(f"{'pooled':<8}{r['gallery']:>9}{r['queries']:>9}{r['rows_per_chunk']:>12}{r['seconds']:>10.2f}"
              f"{r['qps']:>12.1f}{100 * r['p_at_1']:>8.2f}{100 * r['random_p_at_1']:>10.2f}{100 * r['map']:>8.2f}"
              f"{r['peak_mb']:>10.0f}", flush=True)
    if args.loc_gallery:
        r = bench_loc(args.loc_gallery, args.loc_queries, args.dim, args.positions, device, args.seed)
        print(f"{'loc':<8}{r['gallery']:>9}{r['queries']:>9}{'':>12}{r['seconds']:>10.2f}{r['qps']:>12.1f}"
              f"{'':>8}{'':>10}{'':>8}{r['peak_mb']:>10.0f}", flush=True)
    full = args.galleries[-1]
    print(f"all {full} clips of the {full}-clip gallery as queries: about {full / last_qps:.0f} s at that rate")
    print(f"memory: gallery {full} x {args.dim} x 4 B = {full * args.dim * 4 / 2 ** 20:.0f} MB; one ranking block "
          f"{BLOCK_ELEMENTS} elements x ~30 B = {BLOCK_ELEMENTS * 30 / 2 ** 20:.0f} MB whatever the gallery size")

if __name__ == "__main__":
    main()
