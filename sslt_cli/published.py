"""Published numbers beside yours: what the papers report on a published test list, and the lookup for a test set.

Every number here is one of REFERENCE.md (the project's record of the papers, kept beside the repository; sections 7-8),
cited by the paper, the table of that record and its row and column; a number the record does not hold is left out
(SLAVC's, for one). A published number is only comparable with yours on the same list and protocol: each entry names
the list and protocol the record gives for it, or ``None`` where the record does not say, and the lookup marks every
entry that differs from the evaluated set.

A test set is recognised as a published list by its clip ids (a set equal to a built-in list's ids, however it was
given: ``--list NAME``, the user's copy of the file, or a prepared folder holding exactly those clips).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any, Collection

from sslt_cli.catalog import BY_NAME, builtin_names


@dataclass(frozen=True)
class Published:
    """One published result (cIoU / AUC as fractions, AUC None where only cIoU was published)."""

    method: str
    paper: str
    benchmark: str
    trained_on: str
    test_list: str | None
    protocol: str | None
    ciou: float
    auc: float | None
    cited: str


_S8 = "REFERENCE.md s.8 'Published results'"
SSLTIE = "Liu et al., SSL-TIE, ACM MM 2022 (arXiv 2206.12772)"
LVS = "Chen et al., LVS, CVPR 2021"
EZVSL = "Mo & Morgado, EZ-VSL, ECCV 2022"
FNAC = "Sun et al., FNAC, CVPR 2023"
SSLALIGN = "Senocak et al., SSL-Align, ICCV 2023"
VGG, FLK = "VGGSound-144k -> VGG-SS", "VGGSound-144k -> Flickr"


def _row(method: str, paper: str, benchmark: str, column: str, ciou: float, auc: float | None, *,
         test_list: str | None = None, protocol: str | None = None, row: str | None = None) -> Published:
    trained_on = column.split(" -> ")[0]
    cited = f"{_S8}, row '{row or method}', column '{column}'"
    return Published(method, paper, benchmark, trained_on, test_list, protocol, ciou, auc, cited)


# lists and protocols only where REFERENCE.md s.5 says them: VGG-SS N = 5158 for LVS and EZ-VSL, 4911 for SSL-TIE;
# Flickr "249 or 250" (not said per paper); each method's protocol is its preset (REFERENCE.md s.5)
PUBLISHED: tuple[Published, ...] = (
    _row("SSL-TIE", SSLTIE, "vggss", VGG, 0.3863, 0.3965, test_list="ssltie-vggss-4911", protocol="ssltie",
         row="SSL-TIE (MM 22); ablation row F, s.7"),
    _row("LVS", LVS, "vggss", VGG, 0.344, 0.382, test_list="vggss-5158", protocol="lvs", row="LVS (CVPR 21)"),
    _row("EZ-VSL", EZVSL, "vggss", VGG, 0.3885, 0.3954, test_list="vggss-5158", protocol="ezvsl",
         row="EZ-VSL (ECCV 22)"),
    _row("FNAC", FNAC, "vggss", VGG, 0.3950, 0.3966, protocol="fnac", row="FNAC (CVPR 23)"),
    _row("SSL-Align", SSLALIGN, "vggss", VGG, 0.4142, None, row="SSL-Align (ICCV 23)"),
    _row("SSL-TIE", SSLTIE, "flickr", "Flickr-10k", 0.755, 0.588, protocol="ssltie", row="SSL-TIE (MM 22)"),
    _row("SSL-TIE", SSLTIE, "flickr", "Flickr-144k", 0.815, 0.611, protocol="ssltie", row="SSL-TIE (MM 22)"),
    _row("SSL-TIE", SSLTIE, "flickr", FLK, 0.795, 0.612, protocol="ssltie", row="SSL-TIE (MM 22)"),
    Published("SSL-TIE (third-party re-test of the released checkpoint)", SSLTIE, "flickr", "Flickr-10k", None,
              None, 0.7791, 0.5927, "REFERENCE.md s.8, the note below the table"),
    _row("LVS", LVS, "flickr", "Flickr-10k", 0.582, 0.525, protocol="lvs", row="LVS (CVPR 21)"),
    _row("LVS", LVS, "flickr", "Flickr-144k", 0.699, 0.573, protocol="lvs", row="LVS (CVPR 21)"),
    _row("LVS", LVS, "flickr", FLK, 0.719, 0.582, protocol="lvs", row="LVS (CVPR 21)"),
    _row("EZ-VSL", EZVSL, "flickr", "Flickr-10k", 0.8193, 0.6258, protocol="ezvsl", row="EZ-VSL (ECCV 22)"),
    _row("EZ-VSL", EZVSL, "flickr", "Flickr-144k", 0.8313, 0.6306, protocol="ezvsl", row="EZ-VSL (ECCV 22)"),
    _row("EZ-VSL", EZVSL, "flickr", FLK, 0.8394, 0.6360, protocol="ezvsl", row="EZ-VSL (ECCV 22)"),
    _row("SSL-Align", SSLALIGN, "flickr", "Flickr-144k", 0.860, None, row="SSL-Align (ICCV 23)"),
    Published("SSL-TIE", SSLTIE, "openset-heard", "VGGSound, 110 heard classes (70k)", "ssltie-openset-heard-2425",
              "ssltie", 0.390, 0.403, "REFERENCE.md s.8, 'Open set (SSL-TIE): heard'"),
    Published("SSL-TIE", SSLTIE, "openset-unheard", "VGGSound, 110 heard classes (70k)",
              "ssltie-openset-unheard-2463", "ssltie", 0.365, 0.386, "REFERENCE.md s.8, 'Open set (SSL-TIE): unheard'"),
)

# which benchmark each built-in test list belongs to (lists with no published numbers are absent)
LIST_BENCHMARK = {
    "vggss-5158": "vggss", "ssltie-vggss-4911": "vggss", "flickr-249": "flickr", "slavc-flickr-250": "flickr",
    "ssltie-openset-heard-2425": "openset-heard", "ezvsl-vggss-heard-2564": "openset-heard",
    "ssltie-openset-unheard-2463": "openset-unheard", "ezvsl-vggss-unheard-2575": "openset-unheard",
}


@lru_cache(maxsize=1)
def _list_ids() -> dict[frozenset[str], str]:
    from sslt_cli.data.annotations import read_id_list

    return {frozenset(read_id_list(BY_NAME[name].path)): name for name in builtin_names("list")
            if name in LIST_BENCHMARK}


def identify_list(ids: Collection[str]) -> str | None:
    """The built-in published list whose ids are exactly ``ids`` (order and duplicates aside), else None."""
    return _list_ids().get(frozenset(ids))


def lookup(ids: Collection[str], protocol: str) -> dict[str, Any] | None:
    """The published numbers for a test set of ``ids`` scored under ``protocol``, or None when the set is not one of
    the published lists. Each entry says whether the paper's list and protocol are this evaluation's
    (``same_list`` / ``same_protocol``: True, False, or None where REFERENCE.md does not say)."""
    name = identify_list(ids)
    if name is None:
        return None
    entries = []
    for entry in PUBLISHED:
        if entry.benchmark != LIST_BENCHMARK[name]:
            continue
        same_list = None if entry.test_list is None else entry.test_list == name
        same_protocol = None if entry.protocol is None else entry.protocol == protocol
        entries.append({**asdict(entry), "same_list": same_list, "same_protocol": same_protocol})
    return {"list": name, "benchmark": LIST_BENCHMARK[name], "protocol": protocol, "entries": entries}


def _mark(entry: dict[str, Any]) -> str:
    """'' when list and protocol are this evaluation's, '*' when either differs, '?' when either is not stated."""
    flags = (entry["same_list"], entry["same_protocol"])
    return "*" if False in flags else ("?" if None in flags else "")


def add_rows(table: Any, published: dict[str, Any] | None, columns: int) -> None:
    """Append the published numbers to an eval table (``columns`` cells after the label; cIoU and AUC first) and
    a caption line explaining the marks."""
    if not published:
        return
    for entry in published["entries"]:
        label = f"published: {entry['method']}, {entry['trained_on']}{_mark(entry)}"
        auc = "-" if entry["auc"] is None else f"{100 * entry['auc']:.2f}"
        table.add_row(label, f"{100 * entry['ciou']:.2f}", auc, *["-"] * (columns - 2), style="cyan")
    table.caption = (table.caption or "") + (
        f"\npublished ({published['list']} is a published list; numbers from the papers as recorded in REFERENCE.md, "
        "cited in metrics.json): * measured on another list or protocol; ? list or protocol not stated")
