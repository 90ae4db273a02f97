"""The site proxy: families and kinds read from file names, every pairing scored clean and under
harsh_site, and the worst counted pairing named: the one a model leans on."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pneumonia.data.preprocess import PreprocessSpec
from pneumonia.data.records import ImageRecord, discover
from pneumonia.evaluation.proxy import MIN_GROUP, healthy_family, sick_kind, site_proxy

SPEC = PreprocessSpec(64, 1, "stretch")


def _record(name: str, label: int, subtype: str = "normal") -> ImageRecord:
    return ImageRecord(f"/data/train/X/{name}", label, "p", subtype, "train")


def test_families_and_kinds_come_from_the_file_names():
    assert healthy_family(_record("NORMAL2-IM-1427-0001.jpeg", 0)) == "NORMAL2-IM"
    assert healthy_family(_record("IM-0115-0001.jpeg", 0)) == "IM"
    assert healthy_family(_record("scan_7.png", 0)) == "other"
    assert sick_kind(_record("person1946_bacteria_4874.jpeg", 1, "bacteria")) == "bacteria"
    assert sick_kind(_record("person1_virus_6.jpeg", 1, "virus")) == "virus"
    assert sick_kind(_record("x.png", 1, "unknown")) == "unknown"


@pytest.fixture(scope="module")
def leaning_dataset(tmp_path_factory):
    """Brightness is the signal, but NORMAL2 healthy films are bright too and viral pneumonia is
    fainter: a brightness reader looks perfect on 'all vs all' only where those pairs are rare."""
    root = tmp_path_factory.mktemp("proxy")
    rng = np.random.default_rng(0)
    groups = [("NORMAL", "IM-{:04d}-0001.jpeg", 60, 70), ("NORMAL", "NORMAL2-IM-{:04d}-0001.jpeg", 25, 135),
              ("PNEUMONIA", "person{}_bacteria_1.jpeg", 60, 160), ("PNEUMONIA", "person{}_virus_1.jpeg", 25, 140)]
    for folder, pattern, count, level in groups:
        (root / "train" / folder).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            pixels = np.clip(rng.normal(level + rng.normal(0, 12), 12, (64, 64)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(root / "train" / folder / pattern.format(1000 + index), quality=95)
    return discover(str(root)).records


def _brightness(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float64).mean(axis=(1, 2, 3)) / 255.0


def test_the_worst_pairing_is_the_one_the_model_leans_on(leaning_dataset):
    report = site_proxy(_brightness, leaning_dataset, SPEC, target_recall=0.95, threads=2)
    rows = {(row.view, row.healthy, row.sick): row for row in report.rows}
    assert set(rows) == {(view, healthy, sick) for view in ("clean", "harsh_site")
                         for healthy, sick in [("all", "all"), ("IM", "all"), ("NORMAL2-IM", "all"),
                                               ("all", "bacteria"), ("all", "virus")]}
    assert rows["clean", "NORMAL2-IM", "all"].n_healthy == 25 and rows["clean", "all", "virus"].n_sick == 25
    assert rows["clean", "IM", "all"].roc_auc > rows["clean", "NORMAL2-IM", "all"].roc_auc
    assert rows["clean", "all", "bacteria"].roc_auc > rows["clean", "all", "virus"].roc_auc
    summary = report.summary()
    assert summary["proxy_pairing"] in {"NORMAL2-IM vs all", "all vs virus"}
    assert summary["proxy_roc_auc"] == min(row.roc_auc for row in report.rows if row.view == "harsh_site")
    assert summary["proxy_harsh_all_roc_auc"] == rows["harsh_site", "all", "all"].roc_auc
    assert "site proxy: ROC-AUC" in report.table() and summary["proxy_pairing"] in report.table()
    json.dumps(report.to_json())


def test_a_pairing_too_small_is_shown_but_never_the_worst(leaning_dataset):
    few_normal2 = [r for r in leaning_dataset if not r.location.endswith(tuple(
        f"NORMAL2-IM-{1000 + i:04d}-0001.jpeg" for i in range(25 - MIN_GROUP + 1, 25)))]
    report = site_proxy(_brightness, few_normal2, SPEC, threads=2)
    small = [row for row in report.rows if row.healthy == "NORMAL2-IM"]
    assert small and not any(row.counted for row in small)
    assert "too few to count" in report.table()
    assert report.summary()["proxy_pairing"] != "NORMAL2-IM vs all"


def test_one_class_is_refused(leaning_dataset):
    with pytest.raises(ValueError, match="needs NORMAL and PNEUMONIA"):
        site_proxy(_brightness, [r for r in leaning_dataset if r.label == 1], SPEC)


def test_the_harsh_view_is_the_mean_of_its_draws_and_says_their_spread(leaning_dataset):
    one = site_proxy(_brightness, leaning_dataset, SPEC, threads=2, draws=1)
    three = site_proxy(_brightness, leaning_dataset, SPEC, threads=2, draws=3)
    clean = [(row.roc_auc, row.roc_auc_spread) for row in three.rows if row.view == "clean"]
    assert clean == [(row.roc_auc, 0.0) for row in one.rows if row.view == "clean"], "clean is one exact score"
    harsh_one = {(row.healthy, row.sick): row.roc_auc for row in one.rows if row.view == "harsh_site"}
    harsh_three = [row for row in three.rows if row.view == "harsh_site"]
    assert any(row.roc_auc_spread > 0 for row in harsh_three), "the draws differ"
    assert any(row.roc_auc != harsh_one[row.healthy, row.sick] for row in harsh_three), "a mean, not the first draw"
    assert "spread" in three.table()
