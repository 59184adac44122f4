"""Retrieval: audio->audio (a2a), audio->image (a2i) and image->audio (i2a), as in SSL-TIE section 4.5.

No retrieval code was released with the paper, so sslt defines the protocol here.

Protocol
--------
* **Clips.** Every usable clip of the chosen set whose id has a label (``--labels``: VGGSound's CSV
  ``ytid,start,label,split`` with id ``<ytid>_<start:06d>``, a two-column ``id,label`` CSV, the VGG-SS JSON, or, with
  no file, the manifest's ``label`` column). Clips without a label are counted and reported, never used.
* **Classes.** ``all`` (every label present), ``novel`` (the classes the run's recipe held out of training,
  ``data.holdout_classes``), or an explicit list (comma-separated or a file with one class per line).
* **Gallery and queries.** The gallery is every labelled clip of the chosen classes; each of those clips in turn is
  the query, and the query clip itself is left out of its own gallery in every task (for a2i/i2a that removes the
  query's paired image/audio, so the task measures semantic retrieval, not instance matching). A gallery item is
  *relevant* when it has the query's label. A query with no relevant item (its class has one clip) cannot score and is
  counted in ``n_queries_without_relevant`` and left out of every mean.
* **Embeddings.** Audio: the model's pooled, L2-normalised audio embedding (512-d). Image: the L2-normalised visual map
  ``(512, h, w)``, pooled over positions either by averaging (``avg``, default) or by a channel-wise max (``max``), then
  re-normalised.
* **Scores.** a2a: cosine of audio embeddings. a2i/i2a: ``loc`` (default, used for the paper-style figures) = the
  audio-visual localisation score, the maximum over positions of the cosine map between the image's map and the audio
  embedding (the quantity the model is trained on: it only ever compares an audio embedding with map positions), or
  ``pooled`` = cosine of the audio embedding and the pooled image embedding (cheaper: needs no maps).
* **Ranking.** Descending score (compared in float32); ties are broken by ascending gallery index, exactly (every
  score becomes a unique int64 key), so results are deterministic. Ranking runs over chunks of queries so the (Q, G)
  matrix never exists whole; ``loc`` also chunks the gallery so the (q x g x h x w) product stays within a fixed
  budget. ``loc`` keeps every clip's map in memory (float16): N x h*w x 512 x 2 bytes, 1 GB for VGG-SS's 5k clips at
  14 x 14; for galleries of 100k clips and more use ``pooled`` (a run that would not fit is refused up front).
* **Metrics** (means over the queries that have a relevant item; stored as fractions, printed x100):
  A@k = a relevant item among the top k; P@k = relevant items in the top k / k; R@k = relevant items in the top k /
  all relevant items; mAP = mean over queries of average precision over the full ranking,
  ``AP = (1/m) sum over relevant items of (relevant items ranked at or above it) / its rank``.
* **Random baseline**, exact in expectation over uniformly random orderings of the same gallery (no sampling noise),
  with N gallery items of which m are relevant: A@k = 1 - C(N-m, k) / C(N, k); P@k = m / N; R@k = k / N;
  E[AP] = H_N / N + (m - 1)(N - H_N) / (N (N - 1)), H_N the N-th harmonic number (from E[hit_r] = m/N and
  E[hit_r hit_s] = m(m-1)/(N(N-1)) for r != s).

The first part of this module holds the pure metric functions (torch and the standard library only); the rest embeds
clips, caches the embeddings, and writes the tables, files and gallery.
"""
from __future__ import annotations

import csv
import difflib
import hashlib
import io
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import torch

from sslt_cli.data.annotations import read_labels
from sslt_cli.data.manifest import atomic_write_bytes
from sslt_cli.errors import CheckpointError, DataError, SsltError
from sslt_cli.runs import atomic_torch_save

if TYPE_CHECKING:
    import numpy as np
    from rich.table import Table

    from sslt_cli.config import Recipe
    from sslt_cli.data.manifest import ClipSet
    from sslt_cli.runs import Run
    from sslt_cli.tracking import MetricsSink

TASKS = ("a2a", "a2i", "i2a")
KS = (1, 5, 10)
TOP_N = 5
# Elements of one (queries x gallery) block: scores, their int64 ranking keys, relevance flags and searchsorted
# counts take about 30 bytes an element at the peak, so 2**23 elements is ~250 MB whatever the gallery size.
BLOCK_ELEMENTS = 2 ** 23
EMBEDDINGS_FORMAT = "sslt-retrieval-embeddings/1"


# ------------------------------------------------------------------------------------------- pure metric functions

@dataclass
class RankedQueries:
    """Per-query ranking results.

    ``top_indices``: (Q, top_n) gallery indices, best first. ``hits``: (Q, max_k) bool, a relevant item at rank
    1..max_k. ``n_relevant``: (Q,) relevant items in the query's gallery (itself excluded). ``gallery_size``: (Q,) items ranked
    for the query (G, or G - 1 with self-exclusion). ``ap``: (Q,) float64 average precision, NaN where n_relevant is 0.
    """

    top_indices: torch.Tensor
    hits: torch.Tensor
    n_relevant: torch.Tensor
    gallery_size: torch.Tensor
    ap: torch.Tensor


def ranking_keys(similarity: torch.Tensor) -> torch.Tensor:
    """(Q, G) scores -> (Q, G) int64 keys, all distinct in a row, whose descending order is the ranking: the float32
    score's bits made order-preserving in the high 32 bits, the gallery index reversed in the low 32 bits, so equal
    scores rank by ascending gallery index. (-0.0 counts as 0.0; scores are compared in float32.)"""
    n_gallery = similarity.shape[1]
    if n_gallery >= 2 ** 32:
        raise ValueError(f"a gallery of {n_gallery} items exceeds the 2**32 that ranking keys can hold")
    bits = (similarity.float() + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into 0.0 (and copies)
    # Negative floats order backwards as integers: flipping their magnitude bits restores the order.
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    keys = bits.to(torch.int64).bitwise_left_shift_(32)
    return keys.bitwise_or_((2 ** 32 - 1) - torch.arange(n_gallery, device=similarity.device, dtype=torch.int64))


def rank_block(similarity: torch.Tensor, query_labels: torch.Tensor, gallery_labels: torch.Tensor,
               exclude: torch.Tensor | None = None, max_k: int = max(KS), top_n: int = TOP_N) -> RankedQueries:
    """Rank a gallery for each query of one block and score the ranking.

    similarity: (Q, G) finite scores, higher is better. query_labels: (Q,) int class ids. gallery_labels: (G,) int
    class ids. exclude: (Q,) gallery index each query leaves out (its own clip), -1 for none; None for no exclusion.
    Ties are broken by ascending gallery index (:func:`ranking_keys`). Returns a :class:`RankedQueries` on the CPU.

    No row is sorted whole: the top ranks come from ``topk``, and average precision needs only the rank of each
    relevant item, 1 + the number of items with a greater key, counted for all m relevant items at once by a
    ``searchsorted`` of every key among the row's m sorted relevant keys (O(G log m) instead of O(G log G)).
    """
    n_queries, n_gallery = similarity.shape
    if query_labels.shape != (n_queries,) or gallery_labels.shape != (n_gallery,):
        raise ValueError(f"labels have shapes {tuple(query_labels.shape)} and {tuple(gallery_labels.shape)} for a "
                         f"{n_queries} x {n_gallery} similarity")
    if not bool(torch.isfinite(similarity).all()):
        raise ValueError("similarity holds NaN or infinite values")
    device = similarity.device
    keys = ranking_keys(similarity)
    relevant = query_labels.to(device)[:, None] == gallery_labels.to(device)[None, :]
    gallery_size = torch.full((n_queries,), n_gallery, dtype=torch.int64, device=device)
    if exclude is not None:
        exclude = exclude.to(device)
        rows = torch.nonzero(exclude >= 0).squeeze(1)
        # The smallest key ranks the excluded item behind every other one, so it shifts no other rank.
        keys[rows, exclude[rows]] = torch.iinfo(torch.int64).min
        relevant[rows, exclude[rows]] = False
        gallery_size[rows] -= 1
    if n_queries and int(gallery_size.min()) < max(max_k, top_n):
        raise ValueError(f"a gallery of {int(gallery_size.min())} items is smaller than k = {max(max_k, top_n)}")
    top = torch.topk(keys, max(max_k, top_n), dim=1, sorted=True).indices
    hits = torch.gather(relevant, 1, top[:, :max_k])
    n_relevant = relevant.sum(dim=1)

    # The relevant keys of each row, ascending, padded on the right with the largest int64 (never below a key).
    most = int(n_relevant.max()) if n_queries else 0
    row_of, col_of = torch.nonzero(relevant, as_tuple=True)
    first_of_row = torch.cumsum(n_relevant, dim=0) - n_relevant
    slot = torch.arange(row_of.numel(), device=device) - first_of_row[row_of]
    relevant_keys = torch.full((n_queries, max(most, 1)), torch.iinfo(torch.int64).max, device=device)
    relevant_keys[row_of, slot] = keys[row_of, col_of]
    relevant_keys = torch.sort(relevant_keys, dim=1).values
    # below[i] = relevant keys smaller than item i's; the relevant item at ascending slot p has exactly
    # (items with below > p) items ranked above it.
    below = torch.searchsorted(relevant_keys, keys)
    counts = torch.zeros(n_queries, max(most, 1) + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(1, below, torch.ones((), dtype=torch.int64, device=device).expand_as(below))
    above = counts.flip(1).cumsum(dim=1).flip(1)[:, 1:]                     # (Q, most): items above slot p
    slots = torch.arange(max(most, 1), device=device)[None, :]
    found = (n_relevant[:, None] - slots).to(torch.float64)                 # relevant items at or above slot p
    precision = torch.where(slots < n_relevant[:, None], found / (above + 1).to(torch.float64), 0.0)
    ap = precision.sum(dim=1) / n_relevant.to(torch.float64)                # 0/0 -> NaN: nothing to find
    return RankedQueries(top_indices=top[:, :top_n].cpu(), hits=hits.cpu(), n_relevant=n_relevant.cpu(),
                         gallery_size=gallery_size.cpu(), ap=ap.cpu())


def block_rows(n_gallery: int, budget: int = BLOCK_ELEMENTS) -> int:
    """Queries per block so a (queries x n_gallery) block holds about ``budget`` elements (at least 1)."""
    return max(1, budget // max(1, n_gallery))


def rank_in_chunks(score_rows: Callable[[int, int], torch.Tensor], n_queries: int, query_labels: torch.Tensor,
                   gallery_labels: torch.Tensor, exclude: torch.Tensor | None = None, max_k: int = max(KS),
                   top_n: int = TOP_N, rows_per_chunk: int | None = None,
                   progress: Callable[[int], None] | None = None) -> RankedQueries:
    """:func:`rank_block` over chunks of queries, so the (Q, G) similarity never exists whole.

    score_rows(start, stop): the (stop - start, G) similarity of queries start..stop-1 with the whole gallery.
    rows_per_chunk: queries per chunk (default :func:`block_rows`). progress(n): called with the queries done so far.
    Identical to one :func:`rank_block` call on the full matrix.
    """
    rows = rows_per_chunk or block_rows(len(gallery_labels))
    parts = []
    for start in range(0, n_queries, rows):
        stop = min(n_queries, start + rows)
        parts.append(rank_block(score_rows(start, stop), query_labels[start:stop], gallery_labels,
                                None if exclude is None else exclude[start:stop], max_k=max_k, top_n=top_n))
        if progress is not None:
            progress(stop)
    if not parts:
        empty = torch.zeros(0, dtype=torch.int64)
        return RankedQueries(torch.zeros(0, top_n, dtype=torch.int64), torch.zeros(0, max_k, dtype=torch.bool),
                             empty, empty, torch.zeros(0, dtype=torch.float64))
    return RankedQueries(*(torch.cat([getattr(p, f) for p in parts]) for f in
                           ("top_indices", "hits", "n_relevant", "gallery_size", "ap")))


def summarise(ranked: RankedQueries, ks: Sequence[int] = KS) -> dict[str, float]:
    """Mean metrics over the queries with at least one relevant item: ``a_at_k``, ``p_at_k``, ``r_at_k`` for each k,
    and ``map``; fractions in [0, 1]. NaN everywhere if no query has a relevant item."""
    scored = ranked.n_relevant > 0
    hits = ranked.hits[scored].to(torch.float64)
    m = ranked.n_relevant[scored].to(torch.float64)
    out: dict[str, float] = {}
    for k in ks:
        if k > hits.shape[1]:
            raise ValueError(f"k = {k} exceeds the {hits.shape[1]} ranks kept")
        found = hits[:, :k].sum(dim=1)
        out[f"a_at_{k}"] = float((found > 0).to(torch.float64).mean())
        out[f"p_at_{k}"] = float((found / k).mean())
        out[f"r_at_{k}"] = float((found / m).mean())
    out["map"] = float(ranked.ap[scored].mean())
    return out


def harmonic_number(n: int) -> float:
    """H_n = 1 + 1/2 + ... + 1/n: the sum below n = 1000, the asymptotic expansion above (next term < 1e-20)."""
    if n < 1000:
        return math.fsum(1.0 / i for i in range(1, n + 1))
    return math.log(n) + 0.5772156649015329 + 1 / (2 * n) - 1 / (12 * n ** 2) + 1 / (120 * n ** 4)


def random_hit_probability(n_relevant: int, gallery_size: int, k: int) -> float:
    """P(a relevant item among the top k) under a uniformly random order: 1 - C(N-m, k) / C(N, k)."""
    miss = 1.0
    for i in range(k):
        if gallery_size - n_relevant - i <= 0:
            return 1.0
        miss *= (gallery_size - n_relevant - i) / (gallery_size - i)
    return 1.0 - miss


def random_average_precision(n_relevant: int, gallery_size: int) -> float:
    """E[AP] under a uniformly random order of N items, m of them relevant: H_N/N + (m-1)(N-H_N)/(N(N-1))."""
    n, m = gallery_size, n_relevant
    if n == 1:
        return 1.0
    h = harmonic_number(n)
    return h / n + (m - 1) * (n - h) / (n * (n - 1))


def random_baseline(n_relevant: torch.Tensor, gallery_size: torch.Tensor,
                    ks: Sequence[int] = KS) -> dict[str, float]:
    """The exact expectation of :func:`summarise` under uniformly random rankings of the same galleries.

    n_relevant: (Q,) relevant items per query; gallery_size: (Q,) items ranked per query. Queries with no relevant
    item are left out, as in :func:`summarise`. Same keys as :func:`summarise`.
    """
    pairs = [(int(m), int(n)) for m, n in zip(n_relevant.tolist(), gallery_size.tolist()) if m > 0]
    if not pairs:
        return {**{f"{w}_at_{k}": math.nan for k in ks for w in "apr"}, "map": math.nan}
    # Queries share a handful of (m, N) pairs (one per class), so each expectation is computed once per pair.
    counts: dict[tuple[int, int], int] = {}
    for pair in pairs:
        counts[pair] = counts.get(pair, 0) + 1
    total = len(pairs)

    def mean(f: Callable[[int, int], float]) -> float:
        return math.fsum(c * f(m, n) for (m, n), c in counts.items()) / total

    out: dict[str, float] = {}
    for k in ks:
        out[f"a_at_{k}"] = mean(lambda m, n: random_hit_probability(m, n, k))
        out[f"p_at_{k}"] = mean(lambda m, n: m / n)
        out[f"r_at_{k}"] = mean(lambda m, n: min(k, n) / n)
    out["map"] = mean(random_average_precision)
    return out


def cosine_rows(queries: torch.Tensor, gallery: torch.Tensor) -> Callable[[int, int], torch.Tensor]:
    """score_rows for :func:`rank_in_chunks`: dot products of L2-normalised queries (Q, D) with a gallery (G, D)."""
    def rows(start: int, stop: int) -> torch.Tensor:
        return queries[start:stop].float() @ gallery.T.float()
    return rows


def localisation_rows(audio: torch.Tensor, maps: torch.Tensor, queries_are: str,
                      budget: int = BLOCK_ELEMENTS) -> Callable[[int, int], torch.Tensor]:
    """score_rows for the audio-visual localisation score: max over positions p of <maps[i, p], audio[j]>.

    audio: (Na, D) L2-normalised audio embeddings. maps: (Ni, P, D) L2-normalised visual maps, positions flattened.
    queries_are: ``audio`` (a2i: rows are audio, columns images) or ``image`` (i2a). The gallery is walked in chunks
    so the (q x g x P) product stays within ``budget`` elements.
    """
    if queries_are not in ("audio", "image"):
        raise ValueError(f"queries_are must be 'audio' or 'image', got {queries_are!r}")
    n_positions = maps.shape[1]

    def rows(start: int, stop: int) -> torch.Tensor:
        step = max(1, budget // max(1, (stop - start) * n_positions))      # gallery items per product
        cols = []
        if queries_are == "audio":
            query_audio = audio[start:stop].float()
            for g in range(0, maps.shape[0], step):
                chunk = maps[g:g + step].float()                              # (g, P, D)
                cols.append((chunk @ query_audio.T).amax(dim=1).T)            # (g, P, q) -> (q, g)
        else:
            query_maps = maps[start:stop].float()                             # (q, P, D)
            for g in range(0, audio.shape[0], step):
                cols.append((query_maps @ audio[g:g + step].float().T).amax(dim=1))  # (q, P, g) -> (q, g)
        return torch.cat(cols, dim=1)

    return rows


# ----------------------------------------------------------------------------------------------- labels and classes

def check_classes(names: Sequence[str], known: Sequence[str], where: str) -> list[str]:
    """``names`` without repeats, once every one is a class of ``known``; else a DataError naming ``where``."""
    known_set = set(known)
    unknown = [n for n in names if n not in known_set]
    if unknown:
        hints = []
        for name in unknown[:10]:
            close = difflib.get_close_matches(name, list(known), n=1)
            hints.append(repr(name) + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise DataError(f"{where}: {len(unknown)} class name(s) are not the label of any clip in the label file",
                        hints)
    if not names:
        raise DataError(f"{where}: names no class; give 'all', 'novel', a comma list or a file with one per line")
    return list(dict.fromkeys(names))


def parse_class_list(spec: str, known: Sequence[str]) -> list[str]:
    """Classes named by ``spec``: a file with one class per line, or a comma-separated list.

    VGGSound class names can hold commas (``pigeon, dove cooing``): in a comma list, adjacent pieces are joined back
    when together they name a known class (longest match first). Every name must be a class of ``known``.
    """
    path = Path(spec).expanduser()
    if path.is_file():
        lines = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
        return check_classes([n for n in lines if n and not n.startswith("#")], known, str(path))
    known_set = set(known)
    pieces = [p.strip() for p in spec.split(",")]
    names, i = [], 0
    while i < len(pieces):
        j = next((j for j in range(len(pieces), i + 1, -1) if ", ".join(pieces[i:j]) in known_set), i + 1)
        names.append(", ".join(pieces[i:j]))
        i = j
    return check_classes([n for n in names if n], known, "--classes")


def select_classes(spec: str, present: Sequence[str], known: Sequence[str],
                   holdout_classes: Sequence[str]) -> list[str]:
    """The classes to retrieve on: ``all`` (the classes ``present`` in the set, sorted), ``novel``
    (``holdout_classes``, those held out of training) or a list / file (:func:`parse_class_list`). Named classes are
    checked against ``known`` (every class of the label file), so a class the set lacks is accepted and reported."""
    if spec == "all":
        return sorted(set(present))
    if spec == "novel":
        if not holdout_classes:
            raise DataError("--classes novel: this run held no classes out of training (data.holdout_classes is "
                            "empty); use --classes all, a comma list, or train with data.holdout_classes set")
        return check_classes(list(holdout_classes), known, "data.holdout_classes")
    return parse_class_list(spec, known)


# --------------------------------------------------------------------------------------------------- embeddings

@dataclass
class ClipEmbeddings:
    """Every embedded clip of a set, in loader order.

    ``audio``: (N, D) pooled audio embeddings; ``image_avg`` / ``image_max``: (N, D) the visual map averaged /
    max-pooled over positions and re-normalised; ``maps``: (N, h*w, D) float16 L2-normalised visual maps (positions
    flattened, channels last), or None when not kept; ``map_size``: (h, w). ``skipped``: (id, reason) of clips the
    loader could not read.
    """

    ids: list[str]
    audio: torch.Tensor
    image_avg: torch.Tensor
    image_max: torch.Tensor
    maps: torch.Tensor | None
    map_size: tuple[int, int]
    skipped: list[tuple[str, str]]


def pool_visual_map(v: torch.Tensor, how: str) -> torch.Tensor:
    """v: (B, D, h, w) L2-normalised map -> (B, D): the mean (``avg``) or channel-wise max (``max``) over positions,
    re-normalised to unit length."""
    if how == "avg":
        pooled = v.mean(dim=(2, 3))
    elif how == "max":
        pooled = v.amax(dim=(2, 3))
    else:
        raise ValueError(f"image pooling must be 'avg' or 'max', got {how!r}")
    return torch.nn.functional.normalize(pooled, dim=1)


def available_memory_bytes() -> int | None:
    """Memory the system can still give (Linux ``MemAvailable``), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_map_memory(n_clips: int, image_size: int, available: int | None) -> None:
    """Refuse a ``loc`` retrieval whose visual maps cannot fit in memory, before hours of embedding.

    ``loc`` keeps every clip's (h*w, 512) map in float16 (h = w = ceil(image_size / 16)), and joining the batches
    briefly holds them twice; with less than that available the run would be killed near its end. None: unknown,
    no check."""
    from sslt_cli.model import EMBED_DIM

    side = math.ceil(image_size / 16)
    needed = 2 * n_clips * side * side * EMBED_DIM * 2
    if available is not None and needed > available:
        raise DataError(f"--score loc keeps every clip's {side} x {side} x {EMBED_DIM} visual map in memory: "
                        f"{n_clips} clips need about {needed / 2**30:.1f} GiB, and {available / 2**30:.1f} GiB is "
                        "available", ["use --score pooled (512 numbers a clip), or retrieve on fewer clips "
                                      "(--classes, or a smaller --data set)"])


@torch.no_grad()
def embed_clips(model: torch.nn.Module, loader: Iterable[dict], device: torch.device, keep_maps: bool,
                progress: Callable[[int], None] | None = None) -> ClipEmbeddings:
    """Embed every clip the loader yields, in batches, with ``model`` in eval mode.

    loader: batches ``{"id": [str], "image": (B, 3, H, W), "spec": (B, 1, F, T), "skipped": [(id, reason)]}`` as
    ``datasets.collate_skip_bad`` makes them (a batch of only unreadable clips holds just ``skipped``).
    keep_maps: keep the (h*w, D) visual maps (float16) for the localisation score. progress(n): clips (embedded or
    skipped) in the last batch. A non-finite embedding (a diverged checkpoint) is a CheckpointError naming the clip.
    """
    model.eval()
    ids: list[str] = []
    audio, image_avg, image_max, maps = [], [], [], []
    skipped: list[tuple[str, str]] = []
    map_size = (0, 0)
    for batch in loader:
        bad_clips = list(batch.get("skipped") or [])
        skipped += bad_clips
        if not batch.get("id"):  # every clip of the batch was unreadable
            if progress is not None:
                progress(len(bad_clips))
            continue
        v = model.embed_image(batch["image"].to(device, non_blocking=True)).float()
        a = model.embed_audio(batch["spec"].to(device, non_blocking=True)).float()
        bad = ~(torch.isfinite(v).flatten(1).all(dim=1) & torch.isfinite(a).all(dim=1))
        if bool(bad.any()):
            clip_id = batch["id"][int(torch.nonzero(bad)[0])]
            raise CheckpointError(f"the model gives a non-finite embedding for clip {clip_id}; the checkpoint "
                                  "has probably diverged: use an earlier checkpoint")
        map_size = (v.shape[2], v.shape[3])
        ids += list(batch["id"])
        audio.append(a.cpu())
        image_avg.append(pool_visual_map(v, "avg").cpu())
        image_max.append(pool_visual_map(v, "max").cpu())
        if keep_maps:
            maps.append(v.flatten(2).transpose(1, 2).to(torch.float16).cpu())
        if progress is not None:
            progress(len(batch["id"]) + len(bad_clips))
    if not ids:
        raise DataError(f"no clip could be embedded ({len(skipped)} skipped)",
                        [f"{i}: {r}" for i, r in skipped[:10]])
    return ClipEmbeddings(ids=ids, audio=torch.cat(audio), image_avg=torch.cat(image_avg),
                          image_max=torch.cat(image_max), maps=torch.cat(maps) if keep_maps else None,
                          map_size=map_size, skipped=skipped)


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_embeddings(path: Path, embeddings: ClipEmbeddings, key: dict) -> None:
    """Save to ``path`` atomically (temp file + ``os.replace``) with ``key``, the facts the embeddings depend on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"format": EMBEDDINGS_FORMAT, "key": key, "ids": embeddings.ids, "audio": embeddings.audio,
             "image_avg": embeddings.image_avg, "image_max": embeddings.image_max, "maps": embeddings.maps,
             "map_size": list(embeddings.map_size), "skipped": [list(s) for s in embeddings.skipped]}
    atomic_torch_save(state, path)


def load_embeddings(path: Path, key: dict, need_maps: bool) -> ClipEmbeddings | None:
    """The cached embeddings at ``path`` if they were made under the same ``key`` (and hold maps when
    ``need_maps``); None when absent, stale or unreadable, so the caller recomputes them."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a truncated or foreign file is only a cache miss: it is recomputed and replaced
        return None
    if not isinstance(state, dict) or state.get("format") != EMBEDDINGS_FORMAT or state.get("key") != key:
        return None
    if need_maps and state.get("maps") is None:
        return None
    return ClipEmbeddings(ids=list(state["ids"]), audio=state["audio"], image_avg=state["image_avg"],
                          image_max=state["image_max"], maps=state["maps"] if need_maps else None,
                          map_size=tuple(state["map_size"]), skipped=[tuple(s) for s in state["skipped"]])


# ----------------------------------------------------------------------------------------------------- protocol

@dataclass
class TaskResult:
    """One task's outcome. ``score``: ``cosine`` (a2a), ``loc`` or ``pooled-avg`` / ``pooled-max`` (a2i, i2a).
    ``metrics`` / ``random``: :func:`summarise` of the ranking and the exact random baseline. ``gallery_size``: clips
    in the gallery (each query ranks the others)."""

    task: str
    score: str
    metrics: dict[str, float]
    random: dict[str, float]
    ranked: RankedQueries
    n_queries: int
    n_without_relevant: int
    gallery_size: int
    n_classes: int


@dataclass
class RetrievalReport:
    """Everything :func:`run_retrieval` found. ``ids`` / ``labels``: the gallery clips (also the queries), in order.
    ``unlabeled``: embedded clips without a label; ``skipped``: (id, reason) of clips that could not be embedded;
    ``classes_without_clips``: chosen classes with no clip in the set. :func:`retrieve` adds where it wrote the
    outputs (``folder``), the list of clips it left out (``excluded_file``, None when none was) and how many clips the
    manifest marks unusable (``n_unusable``)."""

    tasks: list[TaskResult]
    ids: list[str]
    labels: list[str]
    classes: list[str]
    classes_without_clips: list[str]
    n_embedded: int
    unlabeled: list[str]
    n_other_classes: int
    skipped: list[tuple[str, str]]
    folder: Path | None = None
    excluded_file: Path | None = None
    n_unusable: int = 0


def check_options(tasks: Sequence[str], cross_score: str, image_pool: str) -> None:
    """DataError for an unknown task, cross-modal score or image pooling (before any work is done)."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise DataError(f"--task: unknown task(s) {', '.join(unknown) or '(none)'}; use a2a, a2i, i2a or all")
    if cross_score not in ("loc", "pooled"):
        raise DataError(f"--score {cross_score!r}: use loc (max of the cosine map) or pooled")
    if image_pool not in ("avg", "max"):
        raise DataError(f"--image-pool {image_pool!r}: use avg or max")


def _check_gallery(rows: Sequence[tuple[int, str]], n_embedded: int, n_unlabeled: int,
                   n_other: int) -> dict[str, int]:
    """The clips per class of a gallery of (index, label) ``rows``, once it can be scored: enough clips, two classes
    at least, a class with two clips at least (else a DataError that says what to choose)."""
    need = max(max(KS), TOP_N) + 1
    if len(rows) < need:
        raise DataError(f"retrieval needs at least {need} labelled clips of the chosen classes; found {len(rows)}",
                        [f"{n_embedded} clips embedded, {n_unlabeled} without a label, {n_other} of other classes",
                         "choose more classes or a bigger set"])
    per_class: dict[str, int] = {}
    for _, label in rows:
        per_class[label] = per_class.get(label, 0) + 1
    if len(per_class) < 2:
        raise DataError(f"retrieval within a single class is trivial (every gallery item is relevant); the chosen "
                        f"classes have clips of only {rows[0][1]!r} in this set: choose at least 2 classes")
    if max(per_class.values()) < 2:
        raise DataError(f"every chosen class has a single clip in this set ({len(per_class)} classes), so no query "
                        "has a same-class item to find: choose classes with at least 2 clips")
    return per_class


def run_retrieval(embeddings: ClipEmbeddings, clip_labels: dict[str, str], classes: str = "all",
                  holdout_classes: Sequence[str] = (), tasks: Sequence[str] = TASKS, cross_score: str = "loc",
                  image_pool: str = "avg", device: torch.device | str = "cpu",
                  progress: Callable[[str, int, int], None] | None = None) -> RetrievalReport:
    """Rank every chosen clip against the others for each task and score the rankings (protocol: module docstring).

    clip_labels: {clip id: class}; known classes are its values. classes: ``all`` | ``novel`` | list | file.
    cross_score: ``loc`` (needs ``embeddings.maps``) or ``pooled``. image_pool: ``avg`` | ``max`` (for ``pooled``).
    progress(task, done, total): called after each chunk of queries.
    """
    check_options(tasks, cross_score, image_pool)
    if cross_score == "loc" and embeddings.maps is None and any(t != "a2a" for t in tasks):
        raise ValueError("cross_score='loc' needs embeddings made with keep_maps=True")
    device = torch.device(device)
    labelled = [(i, clip_labels[c]) for i, c in enumerate(embeddings.ids) if c in clip_labels]
    unlabeled = [c for c in embeddings.ids if c not in clip_labels]
    present = sorted({label for _, label in labelled})
    chosen = select_classes(classes, present, sorted(set(clip_labels.values())), holdout_classes)
    class_index = {name: k for k, name in enumerate(chosen)}
    rows = [(i, label) for i, label in labelled if label in class_index]
    per_class = _check_gallery(rows, len(embeddings.ids), len(unlabeled), len(labelled) - len(rows))
    index = torch.tensor([i for i, _ in rows])
    labels = torch.tensor([class_index[label] for _, label in rows])
    exclude = torch.arange(len(rows))
    audio = embeddings.audio[index].to(device)
    maps = embeddings.maps[index].to(device) if cross_score == "loc" and embeddings.maps is not None else None
    pooled = (embeddings.image_avg if image_pool == "avg" else embeddings.image_max)[index].to(device)
    results = []
    for task in tasks:
        if task == "a2a":
            score, score_rows = "cosine", cosine_rows(audio, audio)
        elif maps is not None:
            score, score_rows = "loc", localisation_rows(audio, maps, "audio" if task == "a2i" else "image")
        else:
            score = f"pooled-{image_pool}"
            score_rows = cosine_rows(audio, pooled) if task == "a2i" else cosine_rows(pooled, audio)
        report_progress = None if progress is None else (lambda done, t=task: progress(t, done, len(rows)))
        ranked = rank_in_chunks(score_rows, len(rows), labels, labels, exclude, progress=report_progress)
        results.append(TaskResult(
            task=task, score=score, metrics=summarise(ranked), random=random_baseline(ranked.n_relevant,
                                                                                      ranked.gallery_size),
            ranked=ranked, n_queries=len(rows), n_without_relevant=int((ranked.n_relevant == 0).sum()),
            gallery_size=len(rows), n_classes=len(per_class)))
    return RetrievalReport(
        tasks=results, ids=[embeddings.ids[i] for i, _ in rows], labels=[label for _, label in rows],
        classes=chosen, classes_without_clips=[c for c in chosen if c not in set(present)],
        n_embedded=len(embeddings.ids), unlabeled=unlabeled, n_other_classes=len(labelled) - len(rows),
        skipped=list(embeddings.skipped))


# ------------------------------------------------------------------------------------------------------ outputs

TABLE_METRICS = (("A@5", "a_at_5"), ("A@10", "a_at_10"), ("P@1", "p_at_1"), ("P@5", "p_at_5"), ("R@1", "r_at_1"),
                 ("R@5", "r_at_5"), ("R@10", "r_at_10"), ("mAP", "map"))
CORRECT, WRONG = "#1a9850", "#d73027"
MARK = {True: "\u2713", False: "\u2717"}  # check / cross beside the colour, for readers who cannot tell them apart


def task_summary(result: TaskResult, report: RetrievalReport, context: dict | None = None) -> dict:
    """The JSON-ready record of one task: metrics, random baseline, counts and the protocol facts."""
    return {
        "task": result.task, "score": result.score, "metrics": result.metrics, "random": result.random,
        "n_queries": result.n_queries, "n_queries_scored": result.n_queries - result.n_without_relevant,
        "n_queries_without_relevant": result.n_without_relevant, "gallery_size": result.gallery_size,
        "n_classes": result.n_classes, "classes": report.classes,
        "classes_without_clips": report.classes_without_clips, "n_embedded": report.n_embedded,
        "n_unlabeled": len(report.unlabeled), "n_other_classes": report.n_other_classes,
        "n_skipped": len(report.skipped),
        "protocol": "each clip of the chosen classes queries all the others (itself left out); ties broken by "
                    "gallery index; means over queries with a relevant item; random = exact expectation",
        **(context or {}),
    }


def write_task_outputs(out_dir: Path, result: TaskResult, report: RetrievalReport, context: dict | None = None) -> Path:
    """Write ``<out_dir>/<task>/metrics.json`` and ``queries.csv`` (query id, label, relevant items, top-5 ids and
    labels, hits as a 0/1 string best first, average precision). Returns the task folder."""
    folder = out_dir / result.task
    summary = task_summary(result, report, context)
    atomic_write_bytes(folder / "metrics.json", (json.dumps(summary, indent=2, allow_nan=True) + "\n").encode())
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["query_id", "label", "n_relevant", *[f"top{r}_id" for r in range(1, TOP_N + 1)],
                     *[f"top{r}_label" for r in range(1, TOP_N + 1)], f"hits_top{TOP_N}", "ap"])
    ranked = result.ranked
    for q, (clip_id, label) in enumerate(zip(report.ids, report.labels)):
        top = ranked.top_indices[q].tolist()
        hits = "".join(str(int(report.labels[g] == label)) for g in top)
        ap = float(ranked.ap[q])
        writer.writerow([clip_id, label, int(ranked.n_relevant[q]), *[report.ids[g] for g in top],
                         *[report.labels[g] for g in top], hits, "" if math.isnan(ap) else f"{ap:.6f}"])
    atomic_write_bytes(folder / "queries.csv", buf.getvalue().encode())
    return folder


def write_excluded(out_dir: Path, report: RetrievalReport,
                   unusable: Sequence[tuple[str, str]] = ()) -> Path | None:
    """``<out_dir>/excluded.csv``: every clip left out of retrieval for a data problem (id, reason): ``unusable``
    (rows the manifest marks unusable), then unreadable and unlabelled clips; None (and no file) if there are none."""
    rows = list(unusable)
    rows += [(c, f"could not be read: {reason}") for c, reason in report.skipped]
    rows += [(c, "no label in the label file or manifest") for c in report.unlabeled]
    if not rows:
        (out_dir / "excluded.csv").unlink(missing_ok=True)  # a list from an earlier invocation would mislead
        return None
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["id", "reason"])
    writer.writerows(rows)
    atomic_write_bytes(out_dir / "excluded.csv", buf.getvalue().encode())
    return out_dir / "excluded.csv"


def gallery_queries(result: TaskResult, report: RetrievalReport, n_rows: int, seed: int = 0) -> list[int]:
    """Up to ``n_rows`` query indices for the picture, each of a different class: classes in a seeded random order,
    the first scored query of each (deterministic for a given gallery and seed)."""
    first_of_class: dict[str, int] = {}
    for q, label in enumerate(report.labels):
        if int(result.ranked.n_relevant[q]) > 0:
            first_of_class.setdefault(label, q)
    classes = sorted(first_of_class)
    random.Random(seed).shuffle(classes)
    return [first_of_class[c] for c in classes[:n_rows]]


def save_gallery(path: Path, result: TaskResult, report: RetrievalReport,
                 frame_of: Callable[[str], "np.ndarray"], spectrogram_of: Callable[[str], "np.ndarray"],
                 n_rows: int = 6, seed: int = 0) -> list[list[bool]]:
    """A PNG of a few queries (first column) and their top 5, frames for images and spectrograms for audio, each
    result framed green (same class) or red. frame_of(id): (H, W, 3) uint8; spectrogram_of(id): (F, T) log-mel.
    Returns the hit flags drawn, one list per row."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    query_kind, gallery_kind = {"a2a": ("audio", "audio"), "a2i": ("audio", "image"),
                                "i2a": ("image", "audio")}[result.task]
    queries = gallery_queries(result, report, n_rows, seed)
    fig = Figure(figsize=(1.9 * (TOP_N + 1), 2.0 * max(1, len(queries))), dpi=100)
    FigureCanvasAgg(fig)
    drawn: list[list[bool]] = []

    def show(ax, clip_id: str, kind: str, title: str, edge: str | None) -> None:
        if kind == "image":
            ax.imshow(frame_of(clip_id))
        else:
            ax.imshow(spectrogram_of(clip_id), origin="lower", aspect="auto", cmap="magma")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(title, fontsize=7)
        for spine in ax.spines.values():
            spine.set_edgecolor(edge or "black")
            spine.set_linewidth(5 if edge else 1)

    for row, q in enumerate(queries):
        label = report.labels[q]
        show(fig.add_subplot(len(queries), TOP_N + 1, row * (TOP_N + 1) + 1), report.ids[q], query_kind,
             f"query\n{label[:22]}", None)
        flags = []
        for r, g in enumerate(result.ranked.top_indices[q].tolist(), start=1):
            hit = report.labels[g] == label
            flags.append(hit)
            show(fig.add_subplot(len(queries), TOP_N + 1, row * (TOP_N + 1) + 1 + r), report.ids[g], gallery_kind,
                 f"{r}. {MARK[hit]} {report.labels[g][:22]}", CORRECT if hit else WRONG)
        drawn.append(flags)
    fig.suptitle(f"{result.task} ({result.score}): query, then the top {TOP_N}; green = same class, red = not",
                 fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return drawn


def results_table(report: RetrievalReport, title: str = "retrieval") -> "Table":
    """A rich table: per task, the model's row and the random baseline's (x100) and the queries scored; the gallery,
    class and data-problem counts go in the caption."""
    from rich import box
    from rich.table import Table

    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 0, 0, 1))
    for name in ("task", "score", *[m for m, _ in TABLE_METRICS], "queries"):
        table.add_column(name, justify="left" if name in ("task", "score") else "right", no_wrap=True)
    for result in report.tasks:
        scored = result.n_queries - result.n_without_relevant
        for name, values, style in ((result.score, result.metrics, None), ("random", result.random, "dim")):
            table.add_row(result.task, name, *[f"{100 * values[k]:.2f}" for _, k in TABLE_METRICS], str(scored),
                          style=style)
    first = report.tasks[0]
    notes = [f"gallery {first.gallery_size} clips of {first.n_classes} classes, each query ranks the others",
             f"{report.n_embedded} clips embedded", f"{len(report.unlabeled)} without a label",
             f"{len(report.skipped)} unreadable"]
    if first.n_without_relevant:
        notes.append(f"{first.n_without_relevant} queries alone in their class (not scored)")
    if report.n_other_classes:
        notes.append(f"{report.n_other_classes} of other classes")
    if report.classes_without_clips:
        notes.append(f"{len(report.classes_without_clips)} chosen classes have no clip")
    table.caption = "metrics x100; random = exact expectation; " + "; ".join(notes)
    return table


def mlflow_metrics(report: RetrievalReport, prefix: str = "retrieve") -> dict[str, float]:
    """Flat MLflow metrics: ``<prefix>/<task>/<metric>``, ``<prefix>/<task>/random/<metric>`` (fractions),
    ``<prefix>/<task>/n_queries`` (scored) and ``<prefix>/<task>/gallery_size``; names match ``^[/\\w.\\- ]*$``."""
    out: dict[str, float] = {}
    for result in report.tasks:
        task_prefix = f"{prefix}/{result.task}"
        out.update({f"{task_prefix}/{k}": v for k, v in result.metrics.items()})
        out.update({f"{task_prefix}/random/{k}": v for k, v in result.random.items()})
        out[f"{task_prefix}/n_queries"] = float(result.n_queries - result.n_without_relevant)
        out[f"{task_prefix}/gallery_size"] = float(result.gallery_size)
    return out


# ---------------------------------------------------------------------------------------- sslt retrieve, end to end

@dataclass
class Target:
    """What ``sslt retrieve`` runs: a model with its weights, the recipe it was trained with, the checkpoint file
    (and its SHA-256, which keys the embedding cache), the run folder if any, and where outputs go."""

    model: torch.nn.Module
    recipe: "Recipe"
    checkpoint: Path
    checkpoint_sha256: str
    step: int | None
    run: "Run | None"
    out_dir: Path


def load_target(target: str | Path, device: torch.device, out_dir: str | Path | None = None,
                which: str = "auto", family: str | None = None, branch: str | None = None,
                front_end: str | None = None) -> Target:
    """A run folder or a checkpoint file (sslt, or a released model of any family), resolved and loaded by
    :func:`~sslt_cli.checkpoint.resolve_checkpoints` and :func:`~sslt_cli.families.load_released` (``family`` /
    ``branch`` / ``front_end`` as there). which: for a run
    folder, ``best`` / ``last`` checkpoint, or ``auto`` (best when the run has one, else last). Outputs go to
    ``out_dir`` if given, else ``<run>/retrieve``, else ``<checkpoint stem>-retrieve`` beside the checkpoint."""
    from sslt_cli.checkpoint import resolve_checkpoints
    from sslt_cli.families import load_released
    from sslt_cli.runs import Run

    if which not in ("auto", "best", "last"):
        raise SsltError(f"--which {which!r}: use auto (best, else last), best or last")
    recipe, found, run_dir = resolve_checkpoints(target, "both" if which == "auto" else which)
    by_label = dict(found)
    checkpoint = by_label.get("best") or by_label.get("last") or found[0][1]
    loaded = load_released(checkpoint, family, recipe=recipe, branch=branch, device=device, front_end=front_end)
    run = Run(run_dir) if run_dir is not None else None
    if out_dir is not None:
        where = Path(out_dir)
    elif run is not None:
        where = run.dir / "retrieve"
    else:
        where = checkpoint.parent / f"{checkpoint.stem}-retrieve"
    return Target(model=loaded.model, recipe=loaded.recipe, checkpoint=checkpoint,
                  checkpoint_sha256=file_sha256(checkpoint), step=loaded.step, run=run, out_dir=where)


def clip_labels_for(clip_set: "ClipSet", labels_path: Path | None) -> tuple[dict[str, str], str]:
    """{clip id: class} from ``labels_path`` (:func:`read_labels`) or, with none, from the manifest's ``label``
    column; and a description of the source."""
    if labels_path is not None:
        return read_labels(labels_path), str(labels_path)
    return {c.id: c.label for c in clip_set.clips if c.label}, f"{clip_set.root / 'manifest.csv'} (label column)"


def output_scope(set_name: str, default_set: bool, classes: str, cross_score: str = "loc",
                 image_pool: str = "avg") -> str:
    """The sub-folder (and MLflow prefix part) of one retrieval setting, so settings never overwrite each other:
    '' for all classes of the recipe's test set with the ``loc`` score; otherwise, joined by '/', the set's name when
    it is another set, ``novel`` or ``classes-<8 hex of the list>``, and ``pooled-<pool>`` for the pooled score."""
    parts = [] if default_set else [set_name]
    if classes == "novel":
        parts.append("novel")
    elif classes != "all":
        parts.append("classes-" + hashlib.sha256(classes.encode()).hexdigest()[:8])
    if cross_score != "loc":
        parts.append(f"pooled-{image_pool}")
    return "/".join(parts)


@dataclass(frozen=True)
class RetrieveOptions:
    """How to retrieve: ``tasks`` (of a2a, a2i, i2a), ``classes`` (``all`` | ``novel`` | comma list | file),
    ``cross_score`` (``loc`` | ``pooled``) and ``image_pool`` (``avg`` | ``max``; protocol: module docstring), the
    queries drawn in each gallery PNG, ``refresh`` (embed even when the cache is current) and the ``device`` (the
    caller picks it)."""

    tasks: tuple[str, ...] = TASKS
    classes: str = "all"
    cross_score: str = "loc"
    image_pool: str = "avg"
    gallery_rows: int = 6
    refresh: bool = False
    device: str = "cpu"

    @classmethod
    def parse(cls, tasks: str = "all", **fields) -> "RetrieveOptions":
        """The options of ``sslt retrieve`` (``tasks``: ``all`` or a comma list), checked before any work."""
        chosen = TASKS if tasks == "all" else tuple(t.strip() for t in tasks.split(",") if t.strip())
        options = cls(tasks=chosen, **fields)
        check_options(options.tasks, options.cross_score, options.image_pool)
        return options

    @property
    def needs_maps(self) -> bool:
        """Whether the localisation score needs every clip's visual map (``loc`` with a cross-modal task)."""
        return self.cross_score == "loc" and any(task != "a2a" for task in self.tasks)


@dataclass(frozen=True)
class ClipLabels:
    """{clip id: class} and where it came from (a label file, or the manifest's ``label`` column)."""

    by_clip: dict[str, str]
    source: str


def retrieval_inputs(target: str | Path, *, data: str | Path | None = None, labels: str | Path | None = None,
                     which: str = "auto", device: str | torch.device = "cpu", out_dir: str | Path | None = None,
                     family: str | None = None, branch: str | None = None, front_end: str | None = None
                     ) -> tuple[Target, "ClipSet", ClipLabels]:
    """What ``sslt retrieve`` (and an ablation with ``retrieve: true``) resolves before retrieving: the model of a run
    folder or checkpoint (:func:`load_target`), the set (``data``, default: the recipe's first test set) and its
    labels (``labels``, default: the recipe's ``data.labels`` when it exists, else the manifest's)."""
    from sslt_cli.data.manifest import read_set

    loaded = load_target(target, torch.device(device), out_dir, which, family, branch, front_end)
    recipe = loaded.recipe
    clip_set = read_set(Path(data) if data is not None else recipe.data.set_path(next(iter(recipe.data.test.values()))))
    label_file = Path(labels) if labels is not None else recipe.data.labels_file()
    return loaded, clip_set, ClipLabels(*clip_labels_for(clip_set, label_file))


def check_retrieval_inputs(recipe: Recipe) -> None:
    """What an ablation that retrieves after training checks before its first step: the recipe's retrieval set (its
    first test set) reads, its labels (``data.labels``, else the manifest's label column) read, and its usable
    labelled clips make a gallery retrieval can score (:func:`_check_gallery`); a DataError otherwise, before hours of
    training are spent on a cell whose retrieval cannot run."""
    from sslt_cli.data.manifest import read_set

    clip_set = read_set(recipe.data.set_path(next(iter(recipe.data.test.values()))))
    by_clip, source = clip_labels_for(clip_set, recipe.data.labels_file())
    rows = [(k, by_clip[c.id]) for k, c in enumerate(clip_set.clips) if c.id in by_clip]
    try:
        _check_gallery(rows, len(clip_set.clips), len(clip_set.clips) - len(rows), 0)
    except DataError as exc:
        raise DataError(f"retrieval after training (retrieve: true) on {clip_set.root}, labels from {source}: "
                        f"{exc.message}; nothing was trained", exc.problems) from None


def retrieve(model: Target, clip_set: "ClipSet", labels: ClipLabels, options: RetrieveOptions, sink: "MetricsSink",
             *, progress: Callable[[str, int, int], None] | None = None,
             say: Callable[[str], None] | None = None) -> RetrievalReport:
    """Retrieval with a loaded model on a set: embed its clips (cached beside the outputs), run every task, write the
    outputs and record the numbers through ``sink``; returns the report. The caller resolves the target
    (:func:`retrieval_inputs`), owns the run and the sink, prints the table (:func:`results_table`) and draws the
    progress: ``progress(what, done, total)`` for the embedding (``embed clips``) and each ranking (``rank <task>``);
    ``say`` gets the lines worth reading (what is retrieved with what, a cache hit).

    Writes ``<out>/embeddings_<set>.pt``, ``<out>/<scope>/<task>/{metrics.json, queries.csv, gallery.png}`` and
    ``<out>/<scope>/excluded.csv`` (:func:`output_scope`: empty for all classes of the recipe's test set); records
    one ``retrieve`` record (``retrieve/<scope>/<task>/...``) in metrics.jsonl and MLflow, with the outputs as
    artifacts.
    """
    say = say or (lambda line: None)
    recipe = model.recipe
    default_set = recipe.data.set_path(next(iter(recipe.data.test.values())))
    scope = output_scope(clip_set.name, clip_set.root.resolve() == default_set.resolve(), options.classes,
                         options.cross_score, options.image_pool)
    # the class choice is checked before the (long) embedding; run_retrieval applies it
    select_classes(options.classes, [labels.by_clip[c.id] for c in clip_set.clips if c.id in labels.by_clip],
                   sorted(set(labels.by_clip.values())), recipe.data.holdout_classes)
    say(f"retrieval with {model.checkpoint} (step {model.step if model.step is not None else 'n/a'}) on "
        f"{clip_set.root} ({len(clip_set.clips)} clips, {len(clip_set.unusable)} unusable in the manifest); labels "
        f"from {labels.source}; device {options.device}")
    embeddings = _embeddings(model, clip_set, options, progress, say)
    report = run_retrieval(embeddings, labels.by_clip, classes=options.classes,
                           holdout_classes=recipe.data.holdout_classes, tasks=options.tasks,
                           cross_score=options.cross_score, image_pool=options.image_pool,
                           device=options.device, progress=_ranking_progress(progress))
    report.folder = model.out_dir / scope if scope else model.out_dir
    _write_outputs(report, model, clip_set, labels, options)
    prefix = f"retrieve/{scope}" if scope else "retrieve"
    flat = mlflow_metrics(report, prefix)
    sink.log("retrieve", model.step or 0, flat, fields={"set": clip_set.name, "classes": options.classes},
             mlflow=flat)
    for result in report.tasks:
        sink.artifact(report.folder / result.task, f"{prefix}/{result.task}")
    if report.excluded_file is not None:
        sink.artifact(report.excluded_file, prefix)
    return report


def _ranking_progress(progress: Callable[[str, int, int], None] | None) -> Callable[[str, int, int], None] | None:
    """run_retrieval's ``progress(task, done, total)`` as ``progress("rank <task>", done, total)``."""
    if progress is None:
        return None
    return lambda task, done, total: progress(f"rank {task}", done, total)


def _embeddings(model: Target, clip_set: "ClipSet", options: RetrieveOptions,
                progress: Callable[[str, int, int], None] | None, say: Callable[[str], None]) -> ClipEmbeddings:
    """Every clip's embeddings: from the cache when it was made with the same checkpoint, set and settings (and
    ``options.refresh`` is off), else embedded now and cached."""
    from sslt_cli.evaluate import eval_loader

    recipe = model.recipe
    if options.needs_maps:
        check_map_memory(len(clip_set.clips), recipe.data.image_size, available_memory_bytes())
    image_mode = _image_mode(recipe)
    cache = model.out_dir / f"embeddings_{clip_set.name}.pt"
    key = {"checkpoint_sha256": model.checkpoint_sha256, "step": model.step, "set": str(clip_set.root.resolve()),
           "manifest_sha256": file_sha256(clip_set.root / "manifest.csv"), "image_size": recipe.data.image_size,
           "audio": recipe.audio.model_dump(), "image_mode": image_mode}
    embeddings = None if options.refresh else load_embeddings(cache, key, options.needs_maps)
    if embeddings is not None:
        say(f"embeddings from the cache {cache} (same checkpoint, set and settings)")
        return embeddings
    done = [0]

    def advance(n: int) -> None:
        done[0] += n
        if progress is not None:
            progress("embed clips", done[0], len(clip_set.clips))

    device = torch.device(options.device)
    loader = eval_loader(clip_set.clips, recipe, device, image_mode)
    embeddings = embed_clips(model.model, loader, device, keep_maps=options.needs_maps, progress=advance)
    save_embeddings(cache, embeddings, key)
    return embeddings


def _image_mode(recipe: Any) -> str:
    """How retrieval prepares frames: SSL-TIE's test pre-processing (Resize + CenterCrop; retrieval does not depend
    on an eval protocol), or a released model's own (its preset's), for which its features were trained."""
    from sslt_cli.protocols import PROTOCOLS

    if recipe.audio.front_end == "logmel":
        return "resize_centercrop"
    return PROTOCOLS[recipe.eval.protocol].image_preprocessing


def _write_outputs(report: RetrievalReport, model: Target, clip_set: "ClipSet", labels: ClipLabels,
                   options: RetrieveOptions) -> None:
    """Each task's ``metrics.json``, ``queries.csv`` and ``gallery.png`` under ``report.folder``, and its
    ``excluded.csv`` (``report.excluded_file``)."""
    import numpy as np

    from sslt_cli.data.datasets import AudioVisualDataset, read_frame

    context = {"checkpoint": str(model.checkpoint), "step": model.step, "set": str(clip_set.root),
               "labels": labels.source, "classes_spec": options.classes, "cross_score": options.cross_score,
               "image_pool": options.image_pool}
    clips_by_id = {c.id: c for c in clip_set.clips}
    shown = AudioVisualDataset([clips_by_id[i] for i in report.ids], image_transform=None, audio=model.recipe.audio,
                               train=False)
    position = {clip_id: k for k, clip_id in enumerate(report.ids)}

    def frame_of(clip_id: str) -> np.ndarray:
        return np.asarray(read_frame(clips_by_id[clip_id].frame))

    def spectrogram_of(clip_id: str) -> np.ndarray:
        item = shown[position[clip_id]]
        if not isinstance(item, dict):  # a clip that embedded fine is readable; say so if it stopped being
            raise DataError(f"clip {clip_id}: cannot draw its spectrogram ({item.reason})")
        return item["spec"][0].numpy()

    for result in report.tasks:
        folder = write_task_outputs(report.folder, result, report, context)
        save_gallery(folder / "gallery.png", result, report, frame_of, spectrogram_of, n_rows=options.gallery_rows)
    unusable = [(c.id, f"manifest status '{c.status}': {c.reason}") for c in clip_set.unusable]
    report.excluded_file = write_excluded(report.folder, report, unusable)
    report.n_unusable = len(unusable)


def report_lines(report: RetrievalReport) -> list[str]:
    """What a caller says after the table: the clips left out and where they are listed, chosen classes without a
    clip, where the outputs are."""
    lines = []
    if report.excluded_file is not None:
        lines.append(f"left out: {report.n_unusable} clips the manifest marks unusable, {len(report.skipped)} "
                     f"unreadable, {len(report.unlabeled)} without a label; listed in {report.excluded_file}")
    if report.classes_without_clips:
        lines.append(f"{len(report.classes_without_clips)} chosen classes have no clip in this set: "
                     f"{', '.join(report.classes_without_clips[:10])}")
    lines.append(f"retrieval outputs in {report.folder}")
    return lines
