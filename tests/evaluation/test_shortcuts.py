"""The shortcut audit's arithmetic on hand-made maps: region shares and enrichments, blank maps,
the letterbox of ``pad``, the groups it picks and the sentence it concludes with."""

from __future__ import annotations

import numpy as np
import pytest

from pneumonia.evaluation.shortcuts import (
    HEALTHY_HIGH,
    HEALTHY_LOW,
    REGIONS,
    SICK_FOUND,
    ImageRow,
    compare_groups,
    finding,
    letterbox_mask,
    region_masks,
    region_shares,
    select_groups,
    summarize_group,
)

SIZE = 64


@pytest.fixture(scope="module")
def masks():
    return region_masks(SIZE)


def test_regions_are_where_the_docs_say(masks):
    assert set(masks) == set(REGIONS)
    border = masks["border"]
    assert border[0].all() and border[-1].all() and border[:, 0].all() and border[:, -1].all()
    assert not border[SIZE // 2, SIZE // 2] and masks["lung_field"][SIZE // 2, SIZE // 2]
    assert (masks["outside_lung"] == ~masks["lung_field"]).all()
    assert (masks["top_strip"] <= masks["border"]).all()
    assert masks["corners"][0, 0] and masks["corners"][-1, -1] and not masks["corners"][0, SIZE // 2]
    assert 8 == int(border[SIZE // 2].sum()) // 2  # 12 % of 64 px: 8 px on each side
    assert masks["lung_field"].mean() == pytest.approx(0.76 * 0.77, abs=0.03)


def test_a_map_all_in_the_border_has_border_share_one_and_enrichment_one_over_area(masks):
    heatmap = masks["border"].astype(np.float32) * np.random.default_rng(0).uniform(0.1, 1, (SIZE, SIZE))
    shares = region_shares(heatmap, masks)
    area = masks["border"].mean()
    assert shares.share["border"] == pytest.approx(1.0)
    assert shares.enrichment["border"] == pytest.approx(1 / area)
    assert shares.share["outside_lung"] > 0.75 and shares.share["top_strip"] < 0.5


def test_a_uniform_map_has_enrichment_one_everywhere(masks):
    shares = region_shares(np.full((SIZE, SIZE), 0.3, np.float32), masks)
    for name in REGIONS:
        assert shares.enrichment[name] == pytest.approx(1.0)
        assert shares.share[name] == pytest.approx(masks[name].mean())


def test_a_map_in_the_centre_is_enriched_in_the_lungs(masks):
    heatmap = np.zeros((SIZE, SIZE), np.float32)
    heatmap[24:40, 24:40] = 1
    shares = region_shares(heatmap, masks)
    assert shares.share["lung_field"] == 1.0 and shares.share["border"] == 0.0
    assert shares.enrichment["lung_field"] == pytest.approx(1 / masks["lung_field"].mean())


def test_an_all_zero_map_is_blank_left_out_of_the_means_and_counted(masks):
    assert region_shares(np.zeros((SIZE, SIZE), np.float32), masks) is None
    uniform = region_shares(np.ones((SIZE, SIZE), np.float32), masks)
    rows = [ImageRow(HEALTHY_HIGH, "clean", "a.png", "NORMAL", 0.9, uniform.share, uniform.enrichment),
            ImageRow(HEALTHY_HIGH, "clean", "b.png", "NORMAL", 0.7, None, None)]
    summary = summarize_group(HEALTHY_HIGH, "clean", rows, threshold=0.8)
    assert summary.n == 2 and summary.blank == 1
    assert summary.enrichment["border"] == pytest.approx(1.0)  # the blank map did not pull it to 0
    assert summary.counts["border"] == 1
    assert summary.mean_probability == pytest.approx(0.8) and summary.above_threshold == 1


def test_letterbox_bands_of_a_wide_image_are_top_and_bottom():
    bands = letterbox_mask((200, 100), SIZE)  # pad centres it on a 200 x 200 square
    assert bands[0].all() and bands[-1].all() and not bands[SIZE // 2].any()
    assert bands.mean() == pytest.approx(0.5, abs=2 / SIZE)
    assert letterbox_mask((100, 100), SIZE) is None
    tall = letterbox_mask((100, 200), SIZE)
    assert tall[:, 0].all() and not tall[:, SIZE // 2].any()


def test_groups_pick_the_right_images():
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
    probabilities = np.array([0.9, 0.1, 0.5, 0.05, 0.7, 0.3, 0.99, 0.2, 0.8, 0.6])
    groups = select_groups(labels, probabilities, top=2)
    assert groups[HEALTHY_HIGH].tolist() == [0, 4]  # the healthy scored highest: false-alarm candidates
    assert groups[HEALTHY_LOW].tolist() == [3, 1]
    assert groups[SICK_FOUND].tolist() == [6, 8]


def test_too_few_healthy_images_are_split_not_shared():
    labels = np.array([0, 0, 0, 1])
    groups = select_groups(labels, np.array([0.5, 0.5, 0.5, 0.9]), top=5)  # ties, and top > what exists
    assert len(groups[HEALTHY_HIGH]) == 2 and len(groups[HEALTHY_LOW]) == 1
    assert not set(groups[HEALTHY_HIGH].tolist()) & set(groups[HEALTHY_LOW].tolist())
    assert groups[SICK_FOUND].tolist() == [3]
    with pytest.raises(ValueError, match="at least 1"):
        select_groups(labels, np.zeros(4), top=0)


def _rows(masks, group: str, heatmaps) -> list[ImageRow]:
    rows = []
    for index, heatmap in enumerate(heatmaps):
        shares = region_shares(heatmap, masks)
        rows.append(ImageRow(group, "clean", f"{group}{index}.png", "NORMAL" if group != SICK_FOUND else "PNEUMONIA",
                             0.9, shares.share, shares.enrichment))
    return rows


def test_the_finding_says_more_when_false_alarms_look_at_the_border(masks):
    rng = np.random.default_rng(1)
    edge = [masks["border"] * rng.uniform(0.5, 1, (SIZE, SIZE)) + 0.05 for _ in range(12)]
    centre = [masks["lung_field"] * rng.uniform(0.5, 1, (SIZE, SIZE)) + 0.05 for _ in range(12)]
    rows = _rows(masks, HEALTHY_HIGH, edge) + _rows(masks, SICK_FOUND, centre)
    comparisons = {region: compare_groups(rows, region) for region in ("border", "outside_lung")}
    assert comparisons["outside_lung"]["low"] > 0
    sentence = finding(comparisons)
    assert "look outside the lungs more" in sentence and "95% CI" in sentence

    same = _rows(masks, HEALTHY_HIGH, centre) + _rows(masks, SICK_FOUND, centre)
    comparisons = {region: compare_groups(same, region) for region in ("border", "outside_lung")}
    assert "no more than" in finding(comparisons)

    no_maps = _rows(masks, HEALTHY_HIGH, edge)
    assert compare_groups(no_maps, "border") is None
    assert finding({"border": None, "outside_lung": None}).startswith("no comparison")
