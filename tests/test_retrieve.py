"""Retrieval: metrics on hand-computed cases, ties, self-exclusion, chunking, the exact random baseline, labels,
the pipeline on an oracle embedding, and ``retrieve`` end to end with an untrained checkpoint (no training)."""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from fractions import Fraction

import pytest
import torch

from sslt_cli import retrieve as R


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors run faster on one thread, and the test machine's cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _ranked(sim, q_labels, g_labels, exclude=None, max_k=3, top_n=3):
    return R.rank_block(torch.tensor(sim, dtype=torch.float32), torch.tensor(q_labels), torch.tensor(g_labels),
                        None if exclude is None else torch.tensor(exclude), max_k=max_k, top_n=top_n)


# ------------------------------------------------------------------------------------------ hand-computed cases

def test_3x3_by_hand():
    # q0 (label 0): order g0 g2 g1 -> hits 1 0 1, AP (1 + 2/3)/2 = 5/6
    # q1 (label 1): order g1 g2 g0 -> hits 0 1 0, AP 1/2
    # q2 (label 0): order g2, then the 0.4 tie g0 before g1 -> hits 0 1 1, AP (1/2 + 2/3)/2 = 7/12
    ranked = _ranked([[0.9, 0.1, 0.5], [0.2, 0.8, 0.3], [0.4, 0.4, 0.7]], [0, 1, 0], [0, 0, 1])
    assert ranked.top_indices.tolist() == [[0, 2, 1], [1, 2, 0], [2, 0, 1]]
    assert ranked.hits.int().tolist() == [[1, 0, 1], [0, 1, 0], [0, 1, 1]]
    assert ranked.n_relevant.tolist() == [2, 1, 2]
    assert ranked.gallery_size.tolist() == [3, 3, 3]
    assert ranked.ap.tolist() == pytest.approx([5 / 6, 1 / 2, 7 / 12])
    got = R.summarise(ranked, ks=(1, 2, 3))
    want = {"a_at_1": 1 / 3, "a_at_2": 1, "a_at_3": 1, "p_at_1": 1 / 3, "p_at_2": 1 / 2, "p_at_3": 5 / 9,
            "r_at_1": 1 / 6, "r_at_2": 2 / 3, "r_at_3": 1, "map": 23 / 36}
    assert got == pytest.approx(want)


FIVE = [[1.0, 0.8, 0.6, 0.1, 0.3],
        [0.8, 1.0, 0.7, 0.2, 0.5],
        [0.6, 0.7, 1.0, 0.4, 0.9],
        [0.1, 0.2, 0.4, 1.0, 0.0],
        [0.3, 0.5, 0.9, 0.0, 1.0]]
FIVE_LABELS = [0, 0, 1, 1, 0]


def test_5x5_with_self_exclusion_by_hand():
    # Each clip queries the other four (a2a): q0 1 2 4 3 -> 1 0 1 0; q1 0 2 4 3 -> 1 0 1 0; q2 4 1 0 3 -> 0 0 0 1;
    # q3 2 1 0 4 -> 1 0 0 0; q4 2 1 0 3 -> 0 1 1 0.
    ranked = _ranked(FIVE, FIVE_LABELS, FIVE_LABELS, exclude=[0, 1, 2, 3, 4])
    assert ranked.top_indices.tolist() == [[1, 2, 4], [0, 2, 4], [4, 1, 0], [2, 1, 0], [2, 1, 0]]
    assert ranked.n_relevant.tolist() == [2, 2, 1, 1, 2]
    assert ranked.gallery_size.tolist() == [4, 4, 4, 4, 4]
    assert ranked.ap.tolist() == pytest.approx([5 / 6, 5 / 6, 1 / 4, 1, 7 / 12])
    got = R.summarise(ranked, ks=(1, 2, 3))
    want = {"a_at_1": 3 / 5, "a_at_2": 4 / 5, "a_at_3": 4 / 5, "p_at_1": 3 / 5, "p_at_2": 2 / 5, "p_at_3": 7 / 15,
            "r_at_1": 2 / 5, "r_at_2": 1 / 2, "r_at_3": 4 / 5, "map": 7 / 10}
    assert got == pytest.approx(want)


def test_without_exclusion_the_query_finds_itself_first():
    ranked = _ranked(FIVE, FIVE_LABELS, FIVE_LABELS)
    assert ranked.top_indices[:, 0].tolist() == [0, 1, 2, 3, 4]
    assert R.summarise(ranked, ks=(1,))["p_at_1"] == 1.0


def test_ties_break_by_gallery_index():
    # All scores equal: the order is the gallery order, so moving the relevant items changes every metric.
    first = _ranked([[0.5, 0.5, 0.5, 0.5]], [0], [1, 0, 1, 0], max_k=4)
    assert first.top_indices.tolist() == [[0, 1, 2]]
    assert first.hits.int().tolist() == [[0, 1, 0, 1]]
    assert first.ap.tolist() == pytest.approx([(1 / 2 + 2 / 4) / 2])
    second = _ranked([[0.5, 0.5, 0.5, 0.5]], [0], [0, 1, 0, 1], max_k=4)
    assert second.hits.int().tolist() == [[1, 0, 1, 0]]
    assert second.ap.tolist() == pytest.approx([(1 + 2 / 3) / 2])


def test_ranking_keys_order_by_score_then_index():
    sim = torch.tensor([[-1.0, -0.0, 0.0, -2.5, 3.0, 1e-30, -1e-30, -1.0, 3.0]])
    order = torch.argsort(R.ranking_keys(sim), dim=1, descending=True)
    assert order.tolist() == [[4, 8, 5, 1, 2, 6, 0, 7, 3]]
    assert R.ranking_keys(sim).unique().numel() == sim.numel()


def test_excluded_item_is_never_ranked_even_when_it_scores_best():
    ranked = _ranked([[0.9, 0.1, 0.2, 0.3]], [0], [0, 1, 1, 0], exclude=[0])
    assert ranked.top_indices.tolist() == [[3, 2, 1]]
    assert ranked.n_relevant.tolist() == [1]
    assert ranked.gallery_size.tolist() == [3]
    assert ranked.ap.tolist() == [1.0]


def test_query_without_relevant_item_is_left_out_of_the_means():
    ranked = _ranked([[0.9, 0.1, 0.5], [0.2, 0.8, 0.3]], [0, 7], [0, 0, 1])
    assert ranked.n_relevant.tolist() == [2, 0]
    assert math.isnan(ranked.ap[1])
    got = R.summarise(ranked, ks=(1, 3))
    assert got["p_at_1"] == 1.0 and got["map"] == pytest.approx(5 / 6)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="NaN or infinite"):
        _ranked([[0.1, float("nan"), 0.2]], [0], [0, 1, 0])
    with pytest.raises(ValueError, match="smaller than k = 3"):
        _ranked([[0.1, 0.2, 0.3]], [0], [0, 1, 0], exclude=[0])


# --------------------------------------------------------------------------------------- against a naive reference

def _naive(sim, q_labels, g_labels, exclude, ks):
    """Per-query loops, sorting by (-score, index)."""
    sums = {f"{w}_at_{k}": 0.0 for k in ks for w in "apr"} | {"map": 0.0}
    n_scored = 0
    tops = []
    for i, row in enumerate(sim):
        items = [j for j in range(len(row)) if j != exclude[i]]
        order = sorted(items, key=lambda j: (-row[j], j))
        tops.append(order[:5])
        hits = [g_labels[j] == q_labels[i] for j in order]
        m = sum(hits)
        if m == 0:
            continue
        n_scored += 1
        for k in ks:
            found = sum(hits[:k])
            sums[f"a_at_{k}"] += found > 0
            sums[f"p_at_{k}"] += found / k
            sums[f"r_at_{k}"] += found / m
        found, ap = 0, 0.0
        for r, h in enumerate(hits, start=1):
            if h:
                found += 1
                ap += found / r
        sums["map"] += ap / m
    return {k: v / n_scored for k, v in sums.items()}, tops


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chunked_equals_unchunked_equals_naive_with_ties(seed):
    g = torch.Generator().manual_seed(seed)
    n = 60
    # Scores on a coarse grid around 0, so many ties (-0.0 among them); some queries exclude nothing.
    sim = torch.randint(-3, 3, (n, n), generator=g).float() / 5
    sim[(sim == 0) & torch.randint(0, 2, (n, n), generator=g).bool()] = -0.0
    assert bool(torch.signbit(sim[sim == 0]).any()) and not bool(torch.signbit(sim[sim == 0]).all())
    labels = torch.randint(0, 4, (n,), generator=g)
    exclude = torch.arange(n)
    exclude[::7] = -1
    whole = R.rank_block(sim, labels, labels, exclude)
    for rows in (1, 7, 64):
        chunked = R.rank_in_chunks(lambda a, b: sim[a:b], n, labels, labels, exclude, rows_per_chunk=rows)
        for field in ("top_indices", "hits", "n_relevant", "gallery_size"):
            assert torch.equal(getattr(chunked, field), getattr(whole, field)), field
        assert torch.allclose(chunked.ap, whole.ap, equal_nan=True)
    want, tops = _naive(sim.tolist(), labels.tolist(), labels.tolist(), exclude.tolist(), R.KS)
    assert R.summarise(whole) == pytest.approx(want)
    assert whole.top_indices.tolist() == tops


def test_cosine_rows_and_localisation_rows_match_the_full_product():
    g = torch.Generator().manual_seed(3)
    audio = torch.nn.functional.normalize(torch.randn(9, 8, generator=g), dim=1)
    maps = torch.nn.functional.normalize(torch.randn(7, 6, 8, generator=g), dim=2)   # (images, positions, D)
    full = torch.einsum("ipd,ad->aip", maps, audio).amax(dim=2)                         # (audio, images)
    a2i = R.localisation_rows(audio, maps, "audio", budget=13)
    i2a = R.localisation_rows(audio, maps, "image", budget=13)
    assert torch.allclose(a2i(2, 9), full[2:9], atol=1e-6)
    assert torch.allclose(i2a(1, 7), full.T[1:7], atol=1e-6)
    assert torch.allclose(R.cosine_rows(audio, audio)(0, 4), audio[:4] @ audio.T)


# ------------------------------------------------------------------------------------------------ random baseline

def _enumerated_random(m, n, k):
    """Exact expectations over every placement of m relevant items among n ranks (all equally likely)."""
    a = p = r = ap = Fraction(0)
    placements = list(itertools.combinations(range(n), m))
    for where in placements:
        hits = [i in where for i in range(n)]
        found = sum(hits[:k])
        a += found > 0
        p += Fraction(found, k)
        r += Fraction(found, m)
        seen, total = 0, Fraction(0)
        for rank, h in enumerate(hits, start=1):
            if h:
                seen += 1
                total += Fraction(seen, rank)
        ap += total / m
    c = len(placements)
    return float(a / c), float(p / c), float(r / c), float(ap / c)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_random_baseline_formulas_match_enumeration(n):
    for m in range(1, n + 1):
        for k in range(1, n + 1):
            a, p, r, ap = _enumerated_random(m, n, k)
            got = R.random_baseline(torch.tensor([m]), torch.tensor([n]), ks=(k,))
            assert got[f"a_at_{k}"] == pytest.approx(a, abs=1e-12)
            assert got[f"p_at_{k}"] == pytest.approx(p, abs=1e-12)
            assert got[f"r_at_{k}"] == pytest.approx(r, abs=1e-12)
            assert got["map"] == pytest.approx(ap, abs=1e-12)


def test_random_baseline_is_the_mean_over_every_ordering_of_the_5x5_gallery():
    # Averaging the real metrics over all 5! score orders equals the closed form on the same (m, N) per query.
    labels = torch.tensor(FIVE_LABELS)
    totals: dict[str, float] = {}
    perms = list(itertools.permutations(range(5)))
    for perm in perms:
        sim = torch.tensor(perm, dtype=torch.float32).expand(5, 5)
        got = R.summarise(R.rank_block(sim, labels, labels, torch.arange(5), max_k=3, top_n=3), ks=(1, 2, 3))
        for key, value in got.items():
            totals[key] = totals.get(key, 0.0) + value / len(perms)
    expected = R.random_baseline(torch.tensor([2, 2, 1, 1, 2]), torch.tensor([4] * 5), ks=(1, 2, 3))
    assert expected == pytest.approx(totals)


def test_harmonic_number_expansion_is_continuous_with_the_sum():
    exact = math.fsum(1.0 / i for i in range(1, 1001))
    assert R.harmonic_number(1000) == pytest.approx(exact, rel=1e-15)
    assert R.harmonic_number(999) == pytest.approx(exact - 1 / 1000, rel=1e-15)


# ------------------------------------------------------------------------------------------------ labels, classes

def test_vggsound_csv_two_column_csv_and_vggss_json(tmp_path, repo_root):
    path = tmp_path / "vggsound.csv"
    path.write_text(
        "---g-f_I2yQ,1,people marching,test\n"
        '-2Dm0VjW8oM,1,"pigeon, dove cooing",train\n'
        "\n# a comment\n"
        "abcdefghijk,30,subway, metro, underground,train\n"
        "zzzzzzzzzzz,7,,train\n"
        "---g-f_I2yQ,1,people marching,test\n")
    assert R.read_labels(path) == {"---g-f_I2yQ_000001": "people marching",
                                   "-2Dm0VjW8oM_000001": "pigeon, dove cooing",
                                   "abcdefghijk_000030": "subway, metro, underground"}
    acl = tmp_path / "acl.csv"
    acl.write_text("-0BIyqJj9ZU_000030,people belly laughing\n")
    assert R.read_labels(acl) == {"-0BIyqJj9ZU_000030": "people belly laughing"}
    vggss = tmp_path / "vggss.json"
    vggss.write_text(json.dumps([{"file": "zpWuikVorYg_000032", "class": "elk bugling", "bbox": [[0, 0, 1, 1]]}]))
    assert R.read_labels(vggss) == {"zpWuikVorYg_000032": "elk bugling"}
    vggss = R.read_labels("vggss")  # the built-in vggss.json
    assert vggss["zpWuikVorYg_000032"] == "elk bugling"
    assert len(set(vggss.values())) == 221


def test_label_headers_three_columns_and_clip_file_names(tmp_path):
    with_header = tmp_path / "with_header.csv"
    with_header.write_text("ytid,start,label,split\n---g-f_I2yQ,1,people marching,test\n")
    assert R.read_labels(with_header) == {"---g-f_I2yQ_000001": "people marching"}
    two_columns = tmp_path / "two_columns.csv"
    two_columns.write_text("id,label\n-0BIyqJj9ZU_30,people belly laughing\n__2MwJ2uHu0_000004_000014,dog barking\n")
    assert R.read_labels(two_columns) == {"-0BIyqJj9ZU_000030": "people belly laughing",
                                          "__2MwJ2uHu0_000004": "dog barking"}
    three_columns = tmp_path / "three_columns.csv"
    three_columns.write_text("---g-f_I2yQ,1,people marching\n")
    assert R.read_labels(three_columns) == {"---g-f_I2yQ_000001": "people marching"}
    # only a first row made of header words is a header: a data row that looks odd is an error, not skipped
    odd = tmp_path / "odd.csv"
    odd.write_text("---g-f_I2yQ,1,people marching,test\nytid,start,label,split\n")
    with pytest.raises(R.DataError, match="line 2: cannot read 'ytid,start,label,split'"):
        R.read_labels(odd)


def test_label_file_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("a_000001,dog\nxyz,notanumber,dog barking,train\n")
    with pytest.raises(R.DataError) as exc:
        R.read_labels(bad)
    assert exc.value.message == (f"{bad}, line 2: cannot read 'xyz,notanumber,dog barking,train'; expected "
                                 "VGGSound's ytid,start,label,split (start an integer) or id,label")
    after_header = tmp_path / "after_header.csv"
    after_header.write_text("ytid,start,label,split\nzpWuikVorYg,3.5,elk bugling,test\n")
    with pytest.raises(R.DataError) as exc:
        R.read_labels(after_header)
    assert exc.value.message == (f"{after_header}, line 2: cannot read 'zpWuikVorYg,3.5,elk bugling,test'; expected "
                                 "VGGSound's ytid,start,label,split (start an integer) or id,label")
    conflict = tmp_path / "conflict.csv"
    conflict.write_text("aaaaaaaaaaa,1,dog,train\naaaaaaaaaaa,1,cat,test\n")
    with pytest.raises(R.DataError) as exc:
        R.read_labels(conflict)
    assert exc.value.render() == (f"{conflict}: 1 clip id(s) have two different labels; fix the file\n"
                                  "  - aaaaaaaaaaa_000001: 'dog' and 'cat'")
    with pytest.raises(R.DataError, match="no such label file"):
        R.read_labels(tmp_path / "missing.csv")
    binary = tmp_path / "labels.csv"
    binary.write_bytes(b"abc,1,\xff\xfe,train\n")
    with pytest.raises(R.DataError) as exc:
        R.read_labels(binary)
    assert exc.value.message == f"{binary}: not UTF-8 text (invalid start byte at byte 6); expected a CSV label file"


def test_class_selection(tmp_path):
    known = ["dog barking", "pigeon, dove cooing", "subway, metro, underground", "cat"]
    present = ["cat", "dog barking"]
    assert R.select_classes("all", present, known, []) == ["cat", "dog barking"]
    assert R.select_classes("cat,pigeon, dove cooing , dog barking", present, known, []) == \
        ["cat", "pigeon, dove cooing", "dog barking"]
    assert R.select_classes("novel", present, known, ["subway, metro, underground"]) == ["subway, metro, underground"]
    listing = tmp_path / "classes.txt"
    listing.write_text("# held out\ncat\n\npigeon, dove cooing\ncat\n")
    assert R.select_classes(str(listing), present, known, []) == ["cat", "pigeon, dove cooing"]
    with pytest.raises(R.DataError) as exc:
        R.select_classes("novel", present, known, [])
    assert exc.value.message == ("--classes novel: this run held no classes out of training (data.holdout_classes "
                                 "is empty); use --classes all, a comma list, or train with data.holdout_classes set")
    with pytest.raises(R.DataError) as exc:
        R.select_classes("dog barkin,cat", present, known, [])
    assert exc.value.render() == ("--classes: 1 class name(s) are not the label of any clip in the label file\n"
                                  "  - 'dog barkin' (did you mean 'dog barking'?)")


# ------------------------------------------------------------------------------------------- embeddings and cache

class _TinyModel(torch.nn.Module):
    """embed_image: the top-left 2x2 of a 4-channel image as a normalised map; embed_audio: the spec's time means."""

    def embed_image(self, images):
        return torch.nn.functional.normalize(images[:, :, :2, :2], dim=1)

    def embed_audio(self, spec):
        return torch.nn.functional.normalize(spec.mean(dim=(1, 3)), dim=1)


def test_embed_clips_pools_keeps_maps_and_counts_skipped():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(5, 4, 3, 3, generator=g) + 0.1
    specs = torch.randn(5, 1, 4, 6, generator=g)
    batches = [{"id": ["a", "b", "c"], "image": images[:3], "spec": specs[:3], "skipped": [("x", "corrupt")]},
               {"skipped": [("y", "missing")]},
               {"id": ["d", "e"], "image": images[3:], "spec": specs[3:], "skipped": []}]
    emb = R.embed_clips(_TinyModel(), batches, torch.device("cpu"), keep_maps=True)
    v = torch.nn.functional.normalize(images[:, :, :2, :2], dim=1)
    assert emb.ids == ["a", "b", "c", "d", "e"]
    assert emb.skipped == [("x", "corrupt"), ("y", "missing")]
    assert emb.map_size == (2, 2)
    assert torch.allclose(emb.image_avg, torch.nn.functional.normalize(v.mean(dim=(2, 3)), dim=1))
    assert torch.allclose(emb.image_max, torch.nn.functional.normalize(v.amax(dim=(2, 3)), dim=1))
    assert emb.maps.dtype == torch.float16 and emb.maps.shape == (5, 4, 4)
    assert torch.allclose(emb.maps[1, 2].float(), v[1, :, 1, 0], atol=1e-3)   # position (1, 0) = index 2
    bad = [{"id": ["n1", "n2"], "image": torch.full((2, 4, 3, 3), float("nan")), "spec": specs[:2]}]
    with pytest.raises(R.CheckpointError) as exc:
        R.embed_clips(_TinyModel(), bad, torch.device("cpu"), keep_maps=False)
    assert exc.value.message == ("the model gives a non-finite embedding for clip n1; the checkpoint has probably "
                                 "diverged: use an earlier checkpoint")


def test_embedding_cache_is_keyed(tmp_path):
    batches = [{"id": ["a", "b"], "image": torch.rand(2, 4, 3, 3) + 0.1, "spec": torch.randn(2, 1, 4, 6)}]
    emb = R.embed_clips(_TinyModel(), batches, torch.device("cpu"), keep_maps=False)
    path = tmp_path / "retrieve" / "embeddings_test.pt"
    key = {"checkpoint_sha256": "abc", "step": 3}
    R.save_embeddings(path, emb, key)
    back = R.load_embeddings(path, key, need_maps=False)
    assert back.ids == ["a", "b"] and torch.equal(back.audio, emb.audio) and back.map_size == (2, 2)
    assert R.load_embeddings(path, {**key, "step": 4}, need_maps=False) is None      # another checkpoint
    assert R.load_embeddings(path, key, need_maps=True) is None                      # made without maps
    path.write_bytes(b"truncated")
    assert R.load_embeddings(path, key, need_maps=False) is None
    assert R.file_sha256(path) == hashlib.sha256(b"truncated").hexdigest()


# ------------------------------------------------------------------------------------- the pipeline on an oracle

N_CLASSES, PER_CLASS, DIM, POSITIONS = 5, 8, 16, 4


def _oracle_embeddings(seed: int = 0) -> tuple[R.ClipEmbeddings, dict[str, str]]:
    """Audio = its class direction plus a little noise; the visual map leans to the class direction everywhere and
    strongly at one position: every score ranks the same class first. Three more clips have no label."""
    g = torch.Generator().manual_seed(seed)
    n = N_CLASSES * PER_CLASS + 3
    classes = torch.arange(n) % N_CLASSES
    direction = torch.eye(DIM)[classes]
    audio = torch.nn.functional.normalize(direction + 0.05 * torch.randn(n, DIM, generator=g), dim=1)
    maps = direction[:, None, :] + 0.3 * torch.randn(n, POSITIONS, DIM, generator=g)
    maps[torch.arange(n), torch.arange(n) % POSITIONS] = direction * 3
    maps = torch.nn.functional.normalize(maps, dim=2)
    v = maps.transpose(1, 2).reshape(n, DIM, 2, 2)
    ids = [f"clip{i:08d}_{i:06d}" for i in range(n)]
    labels = {clip_id: f"class {int(c)}" for clip_id, c in zip(ids[:-3], classes[:-3])}
    emb = R.ClipEmbeddings(ids=ids, audio=audio, image_avg=R.pool_visual_map(v, "avg"),
                           image_max=R.pool_visual_map(v, "max"), maps=maps.half(), map_size=(2, 2),
                           skipped=[("gone_000001", "decode error")])
    return emb, labels


def _colour_pixels(png, rgb, tol=12):
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(png).convert("RGB")).astype(int)
    return int((np.abs(pixels - np.array(rgb)).max(axis=2) <= tol).sum())


@pytest.mark.parametrize("cross_score", ["loc", "pooled"])
def test_oracle_pipeline_beats_random_and_writes_everything(tmp_path, cross_score):
    import csv
    import json

    import numpy as np

    emb, labels = _oracle_embeddings()
    report = R.run_retrieval(emb, labels, classes="all", tasks=R.TASKS, cross_score=cross_score)
    assert report.unlabeled == ["clip00000040_000040", "clip00000041_000041", "clip00000042_000042"]
    assert report.n_embedded == 43 and len(report.ids) == 40 and report.classes == [f"class {c}" for c in range(5)]
    # Perfect ranking: 7 relevant among 39 per query.
    perfect = {"a_at_1": 1, "a_at_5": 1, "a_at_10": 1, "p_at_1": 1, "p_at_5": 1, "p_at_10": 0.7,
               "r_at_1": 1 / 7, "r_at_5": 5 / 7, "r_at_10": 1, "map": 1}
    for result in report.tasks:
        assert result.score == ("cosine" if result.task == "a2a" else
                                "loc" if cross_score == "loc" else "pooled-avg")
        assert result.metrics == pytest.approx(perfect), result.task
        assert result.random["p_at_1"] == pytest.approx(7 / 39)
        assert result.random["a_at_5"] == pytest.approx(1 - math.comb(32, 5) / math.comb(39, 5))
        assert all(result.metrics[k] > result.random[k] for k in result.metrics), result.task
        assert result.metrics["p_at_1"] - result.random["p_at_1"] > 0.8
    out = tmp_path / "retrieve"
    for result in report.tasks:
        folder = R.write_task_outputs(out, result, report, {"checkpoint": "x.pt"})
        saved = json.loads((folder / "metrics.json").read_text())
        assert saved["metrics"] == pytest.approx(result.metrics) and saved["checkpoint"] == "x.pt"
        assert saved["n_unlabeled"] == 3 and saved["n_skipped"] == 1 and saved["gallery_size"] == 40
        with open(folder / "queries.csv") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 40 and all(r["hits_top5"] == "11111" for r in rows)
        assert rows[0]["label"] == "class 0" and rows[0]["top1_label"] == "class 0"
        assert rows[0]["top1_id"] != rows[0]["query_id"]
    excluded = (out / "excluded.csv").read_text() if R.write_excluded(out, report) else ""
    assert excluded.splitlines() == ["id,reason", "gone_000001,could not be read: decode error",
                                     "clip00000040_000040,no label in the label file or manifest",
                                     "clip00000041_000041,no label in the label file or manifest",
                                     "clip00000042_000042,no label in the label file or manifest"]
    metrics = R.mlflow_metrics(report)
    assert metrics["retrieve/a2a/p_at_1"] == 1.0
    assert metrics["retrieve/i2a/random/p_at_1"] == pytest.approx(7 / 39)
    assert all(re.fullmatch(r"[/\w.\- ]*", name) for name in metrics)

    frame = lambda clip_id: np.full((24, 24, 3), 128, dtype=np.uint8)   # noqa: E731
    spec = lambda clip_id: np.zeros((8, 12))                             # noqa: E731
    png = out / "a2i" / "gallery.png"
    drawn = R.save_gallery(png, report.tasks[1], report, frame, spec, n_rows=4)
    assert drawn == [[True] * 5] * 4
    assert _colour_pixels(png, (0x1A, 0x98, 0x50)) > 500 and _colour_pixels(png, (0xD7, 0x30, 0x27)) == 0


def test_gallery_marks_wrong_results_red_and_the_table_has_a_random_row(tmp_path):
    import numpy as np
    from rich.console import Console

    emb, labels = _oracle_embeddings()
    # Relabel so the oracle's neighbours are of another class: every shown result is wrong.
    shifted = {clip_id: f"class {(int(label.split()[1]) + i // 5) % 5}"
               for i, (clip_id, label) in enumerate(labels.items())}
    report = R.run_retrieval(emb, shifted, tasks=["a2a"])
    png = tmp_path / "g.png"
    drawn = R.save_gallery(png, report.tasks[0], report, lambda c: np.zeros((8, 8, 3), np.uint8),
                           lambda c: np.zeros((4, 4)), n_rows=3)
    flat = [hit for row in drawn for hit in row]
    assert flat.count(False) > flat.count(True)
    assert _colour_pixels(png, (0xD7, 0x30, 0x27)) > 300
    console = Console(width=200, record=True)
    console.print(R.results_table(report))
    text = " ".join(console.export_text().split())
    assert "random" in text and "a2a" in text and "3 without a label" in text


def test_output_scope_keeps_settings_apart():
    assert R.output_scope("test_vggss", True, "all") == ""
    assert R.output_scope("test_flickr", False, "novel") == "test_flickr/novel"
    assert R.output_scope("test_vggss", True, "cat,dog", "pooled", "max") == \
        "classes-" + hashlib.sha256(b"cat,dog").hexdigest()[:8] + "/pooled-max"


def test_run_retrieval_novel_classes_and_errors():
    emb, labels = _oracle_embeddings()
    report = R.run_retrieval(emb, labels, classes="novel", holdout_classes=["class 1", "class 3"], tasks=["a2a"])
    assert report.classes == ["class 1", "class 3"] and len(report.ids) == 16
    assert report.n_other_classes == 24
    assert report.tasks[0].random["p_at_1"] == pytest.approx(7 / 15)
    with pytest.raises(R.DataError) as exc:
        R.run_retrieval(emb, labels, classes="class 1", tasks=["a2a"])
    assert exc.value.message == "retrieval needs at least 11 labelled clips of the chosen classes; found 8"
    with pytest.raises(R.DataError) as exc:
        R.run_retrieval(emb, labels, tasks=["a2b"])
    assert exc.value.message == "--task: unknown task(s) a2b; use a2a, a2i, i2a or all"


# ---------------------------------------------------------------------------- sslt retrieve on an untrained model

@pytest.fixture(scope="module")
def synthetic_test_set(tmp_path_factory):
    from sslt_cli.data.synthetic import generate

    root = tmp_path_factory.mktemp("synth")
    generate(root, n_train=0, n_val=0, n_test=40, n_flickr=0, image_size=64, workers=1, progress=False)
    return root


def _untrained_run(tmp_path, data_root, step=7, holdout=("rain falling", "horn honking", "siren wailing"),
                   tracking=True):
    from sslt_cli.config import recipe_dict, validate_tree
    from sslt_cli.model import build_model
    from sslt_cli.runs import Run
    from sslt_cli.train import CHECKPOINT_FORMAT

    recipe = validate_tree({
        "name": "tiny", "runs_dir": str(tmp_path / "runs"),
        "data": {"root": str(data_root), "val": None, "test": {"vggss": "test_vggss"}, "image_size": 64,
                 "num_workers": 0, "holdout_classes": list(holdout)},
        "audio": {"clip_seconds": 1.0, "n_mels": 32}, "eval": {"batch_size": 16},
        "tracking": {"enabled": tracking}}, "test recipe")
    run = Run.create(recipe)
    torch.manual_seed(step)
    state = {"format": CHECKPOINT_FORMAT, "model": build_model().state_dict(), "step": step,
             "recipe": recipe_dict(recipe)}
    return run, run.save_checkpoint(state, f"last-{step:08d}")


def _quiet():
    import io

    from rich.console import Console

    return Console(file=io.StringIO(), width=200)


def retrieve_run(run_dir, console=None, out=None, tasks="all", **fields):
    """`sslt retrieve RUN` as the command runs it: it resolves the target, opens the run's MLflow run, hands the sink
    down and prints the table."""
    from sslt_cli.tracking import run_tracking

    console, out = console or _quiet(), out or _quiet()
    model, clip_set, labels = R.retrieval_inputs(run_dir, device="cpu")
    options = R.RetrieveOptions.parse(tasks, device="cpu", **fields)
    with run_tracking(model.run, model.recipe) as sink:
        report = R.retrieve(model, clip_set, labels, options, sink, say=console.print)
    out.print(R.results_table(report))
    return report


def test_retrieve_end_to_end_writes_caches_and_logs(tmp_path, synthetic_test_set):
    import csv
    import json

    from mlflow.tracking import MlflowClient

    run, checkpoint = _untrained_run(tmp_path, synthetic_test_set)
    console, out = _quiet(), _quiet()
    report = retrieve_run(run.dir, console, out, gallery_rows=2)
    folder = run.dir / "retrieve"
    assert (folder / "embeddings_test_vggss.pt").is_file()
    labels = {r["id"]: r["label"] for r in csv.DictReader(open(synthetic_test_set / "test_vggss" / "manifest.csv"))}
    assert sorted(report.ids) == sorted(labels) and report.labels == [labels[i] for i in report.ids]
    for task in R.TASKS:
        saved = json.loads((folder / task / "metrics.json").read_text())
        assert saved["step"] == 7 and saved["checkpoint"] == str(checkpoint)
        assert saved["gallery_size"] == 40 and saved["score"] == ("cosine" if task == "a2a" else "loc")
        assert (folder / task / "gallery.png").stat().st_size > 1000
        assert len((folder / task / "queries.csv").read_text().splitlines()) == 41
    assert "random" in out.file.getvalue() and "embeddings from the cache" not in console.file.getvalue()
    record = [r for r in run.metrics() if r.get("kind") == "retrieve"][-1]
    assert record["retrieve/a2a/p_at_1"] == report.tasks[0].metrics["p_at_1"]
    mlflow_run = MlflowClient().get_run(run.meta()["mlflow_run_id"])
    assert mlflow_run.data.metrics["retrieve/i2a/map"] == pytest.approx(report.tasks[2].metrics["map"])

    # Same checkpoint again: the cached embeddings give the same numbers; novel classes go to their own folder.
    console = _quiet()
    again = retrieve_run(run.dir, console, classes="novel", gallery_rows=1)
    assert "embeddings from the cache" in console.file.getvalue()
    assert again.classes == ["rain falling", "horn honking", "siren wailing"] and len(again.ids) == 12
    assert (folder / "novel" / "a2a" / "metrics.json").is_file()
    assert json.loads((folder / "a2a" / "metrics.json").read_text())["classes_spec"] == "all"
    metrics = MlflowClient().get_run(run.meta()["mlflow_run_id"]).data.metrics
    assert metrics["retrieve/novel/a2a/p_at_1"] == pytest.approx(again.tasks[0].metrics["p_at_1"])
    chosen = [i for i, label in zip(report.ids, report.labels) if label in again.classes]
    assert again.ids == chosen


def test_retrieve_recomputes_for_another_checkpoint(tmp_path, synthetic_test_set):
    run, _ = _untrained_run(tmp_path, synthetic_test_set, step=3, tracking=False)
    first = retrieve_run(run.dir, tasks="a2a", gallery_rows=1)
    _, newer = _untrained_run(tmp_path, synthetic_test_set, step=5, tracking=False)
    target = run.dir / "checkpoints" / newer.name
    target.write_bytes(newer.read_bytes())   # a later checkpoint of the same run: best.pt is absent, so it wins
    console = _quiet()
    second = retrieve_run(run.dir, console, tasks="a2a", gallery_rows=1)
    assert "embeddings from the cache" not in console.file.getvalue()
    assert second.tasks[0].metrics != first.tasks[0].metrics


def test_load_target_picks_a_checkpoint_and_places_outputs(tmp_path):
    from sslt_cli.checkpoint import save_official_checkpoint
    from sslt_cli.model import build_model

    run, last = _untrained_run(tmp_path, tmp_path / "nowhere", tracking=False)
    target = R.load_target(run.dir, torch.device("cpu"))
    assert (target.checkpoint, target.step, target.out_dir) == (last, 7, run.dir / "retrieve")
    best = run.dir / "checkpoints" / "best.pt"
    best.write_bytes(last.read_bytes())
    assert R.load_target(run.dir, torch.device("cpu")).checkpoint == best
    assert R.load_target(run.dir, torch.device("cpu"), which="last").checkpoint == last
    assert R.load_target(best, torch.device("cpu")).run.dir == run.dir
    with pytest.raises(R.SsltError) as exc:
        R.load_target(run.dir, torch.device("cpu"), which="newest")
    assert exc.value.message == "--which 'newest': use auto (best, else last), best or last"
    official = tmp_path / "ssltie_vggsound.pth.tar"
    save_official_checkpoint(build_model(), official)
    target = R.load_target(official, torch.device("cpu"))
    assert target.step is None and target.run is None and target.recipe.data.image_size == 224
    assert target.out_dir == tmp_path / "ssltie_vggsound.pth-retrieve"
    assert target.checkpoint_sha256 == hashlib.sha256(official.read_bytes()).hexdigest()


def test_retrieve_lists_every_clip_it_leaves_out(tmp_path, synthetic_test_set):
    import csv
    import shutil

    root = tmp_path / "synth"
    shutil.copytree(synthetic_test_set, root)
    manifest = root / "test_vggss" / "manifest.csv"
    rows = list(csv.reader(open(manifest)))
    lines = manifest.read_text().splitlines()
    lines.append("AAAAAAAAAAA_000001,rain falling,frame/AAAAAAAAAAA_000001.jpg,audio/AAAAAAAAAAA_000001.wav,,"
                 "missing,video not downloaded")
    lines.append("BBBBBBBBBBB_000002,rain falling,frame/BBBBBBBBBBB_000002.jpg,audio/BBBBBBBBBBB_000002.wav,,ok,")
    manifest.write_text("\n".join(lines) + "\n")
    unlabelled = rows[1][0]
    ytid, start = unlabelled.rsplit("_", 1)
    labels = root / "vggsound.csv"
    labels.write_text("".join(line + "\n" for line in labels.read_text().splitlines()
                              if not line.startswith(f"{ytid},{int(start)},")))
    run, _ = _untrained_run(tmp_path, root, tracking=False)
    report = retrieve_run(run.dir, tasks="a2a", gallery_rows=1)
    assert len(report.ids) == 39 and report.unlabeled == [unlabelled]
    assert [clip_id for clip_id, _ in report.skipped] == ["BBBBBBBBBBB_000002"]
    excluded = list(csv.reader(open(run.dir / "retrieve" / "excluded.csv")))
    assert [row[0] for row in excluded] == ["id", "AAAAAAAAAAA_000001", "BBBBBBBBBBB_000002", unlabelled]
    assert excluded[1][1] == "manifest status 'missing': video not downloaded"
    assert excluded[2][1].startswith("could not be read: unreadable frame ")
    assert excluded[3][1] == "no label in the label file or manifest"


def test_loc_maps_that_cannot_fit_in_memory_are_refused_before_embedding():
    # 200k clips at 224 px: 200000 x 14 x 14 x 512 float16, held twice while the batches are joined (~74.8 GiB)
    with pytest.raises(R.DataError) as exc:
        R.check_map_memory(200_000, 224, available=64 * 2**30)
    assert exc.value.message == ("--score loc keeps every clip's 14 x 14 x 512 visual map in memory: 200000 clips "
                                 "need about 74.8 GiB, and 64.0 GiB is available")
    assert exc.value.problems == ["use --score pooled (512 numbers a clip), or retrieve on fewer clips (--classes, "
                                  "or a smaller --data set)"]
    R.check_map_memory(5158, 224, available=64 * 2**30)  # VGG-SS: about 2 GiB
    R.check_map_memory(200_000, 224, available=None)      # unknown: no check
    assert R.available_memory_bytes() > 0


def test_openset_recipe_holds_out_the_classes_of_ssltie_unheard_list(repo_root):
    from sslt_cli.config import load_recipe
    from sslt_cli.data.annotations import read_id_list

    labels = R.read_labels("vggss")
    unheard = {labels[i] for i in read_id_list("ssltie-openset-unheard-2463")}
    heard = {labels[i] for i in read_id_list("ssltie-openset-heard-2425")}
    recipe = load_recipe(repo_root / "recipes" / "tie_openset.yaml")
    assert set(recipe.data.holdout_classes) == unheard and len(unheard) == 110 and not unheard & heard
