"""The values of the training losses, computed by hand: the box-attention aid, and the
conversation-mode loss (only the replies are targets)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from click4caption.errors import ConfigError
from click4caption.models.box_attention import BoxAttentionAid


# --------------------------------------------------------------------------- box attention
def aid(grid: int, queries: int = 2) -> BoxAttentionAid:
    # a 2x2 patch grid over a 4-pixel image: patch centres (1, 1), (3, 1), (1, 3), (3, 3)
    return BoxAttentionAid(weight=1.0, grid=grid, num_queries=queries, grid_size=(2, 2), image_size=4)


def test_inside_box_mask_by_patch_centres() -> None:
    a = aid(0)
    boxes = torch.tensor([[[0.0, 0.0], [2.0, 2.0]],     # holds centre (1, 1)
                          [[0.0, 0.0], [4.0, 2.0]],     # the top row
                          [[2.5, 2.5], [2.9, 2.9]],     # holds no centre: the nearest one, (3, 3)
                          [[-3.0, -3.0], [9.0, 9.0]]])  # clipped to the image: all
    assert a.inside_box_mask(boxes, 4).tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 1], [1, 1, 1, 1]]
    # a kept CLS token (T = 1 + 4) is never inside
    assert a.inside_box_mask(boxes[:1], 5).tolist() == [[0, 1, 0, 0, 0]]


def test_query_cells_split_the_box_row_major() -> None:
    box = torch.tensor([[[0.0, 0.0], [4.0, 4.0]]])
    cells = aid(2, queries=5).query_cells(box)[0]
    assert cells.tolist() == [[[0, 0], [2, 2]], [[2, 0], [4, 2]], [[0, 2], [2, 4]], [[2, 2], [4, 4]],
                              [[0, 0], [2, 2]]]  # query 4 wraps to cell 0
    assert aid(0, queries=3).query_cells(box)[0].tolist() == [[[0, 0], [4, 4]]] * 3


def maps_for(rows: list[list[float]]) -> list[torch.Tensor]:
    """One layer, one box, one head: attention rows of the queries, then the 2 corner tokens."""
    corners = [[1.0, 0.0, 0.0, 0.0]] * 2  # the corner tokens' rows are not pulled
    return [torch.tensor([rows + corners])[:, None]]  # 1x1x(Q+2)x4


def test_loss_is_minus_log_attention_mass_inside_the_target() -> None:
    box = torch.tensor([[[0.0, 0.0], [2.0, 2.0]]])  # target: patch 0 only
    maps = maps_for([[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    expected = (-math.log(0.5) - math.log(0.25)) / 2
    assert float(aid(0).loss(maps, box)) == pytest.approx(expected, rel=1e-6)
    # with a 2x2 grid over the whole image, query 0 targets patch 0 and query 1 patch 1
    whole = torch.tensor([[[0.0, 0.0], [4.0, 4.0]]])
    maps = maps_for([[0.8, 0.2, 0.0, 0.0], [0.5, 0.1, 0.2, 0.2]])
    assert float(aid(2).loss(maps, whole)) == pytest.approx((-math.log(0.8) - math.log(0.1)) / 2, rel=1e-6)
    # several layers: their mean
    two = maps_for([[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]) + maps_for([[0.5, 0.5, 0.0, 0.0]] * 2)
    assert float(aid(0).loss(two, box)) == pytest.approx(-math.log(0.5) / 2, rel=1e-6)


def test_the_aid_records_only_inside_its_block_and_hands_its_loss_out_once() -> None:
    a = aid(0)
    a._record(None, None, (None, torch.ones(1)))  # outside record(): ignored
    assert a.take_loss() is None
    box = torch.tensor([[[0.0, 0.0], [2.0, 2.0]]])
    with a.record(box):
        a._record(None, None, (None, maps_for([[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0]])[0]))
    total, parts = a.take_loss()
    assert float(total) == pytest.approx(-math.log(0.5), rel=1e-6) and set(parts) == {"box_attention_loss"}
    assert a.take_loss() is None


def test_owner_loss_reads_the_first_channel_of_whole_image_rows() -> None:
    """Binary cross-entropy of "owns an object" from channel 0 of each query's output, on
    near-full rows with known objects only; take_loss adds it with its own weight."""
    a = BoxAttentionAid(weight=1.0, grid=2, num_queries=4, grid_size=(2, 2), image_size=32,
                        whole_image="objects", owner_weight=0.5)
    whole, corner = [[0.0, 0.0], [32.0, 32.0]], [[0.0, 0.0], [16.0, 16.0]]
    boxes = torch.tensor([whole, corner, whole])
    objects = (torch.tensor([[[[20.0, 4.0], [28.0, 12.0]], [[0.0, 0.0], [0.0, 0.0]]],  # one object in cell 1
                             [[[20.0, 4.0], [28.0, 12.0]], [[0.0, 0.0], [0.0, 0.0]]],  # not a whole-image box
                             [[[0.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]]]),  # objects unknown
               torch.tensor([1, 1, 0]))
    logits = [2.0, 1.0, -1.0, 0.5]
    outputs = torch.zeros(3, 4, 3)
    outputs[0, :, 0] = torch.tensor(logits)
    outputs[1:, :, 0] = 9.0  # ignored rows
    outputs[0, :, 1:] = 5.0  # other channels are not read

    def bce(x: float, y: int) -> float:
        return -math.log(1 / (1 + math.exp(-x))) if y else -math.log(1 - 1 / (1 + math.exp(-x)))

    expected = sum(bce(x, y) for x, y in zip(logits, [0, 1, 0, 0])) / 4
    assert float(a.owner_loss(outputs, boxes, objects)) == pytest.approx(expected, rel=1e-6)
    assert a.owner_loss(outputs[1:], boxes[1:], (objects[0][1:], objects[1][1:])) is None
    # record() reads the Q-Former's outputs through its hook and take_loss() weighs both losses
    maps = maps_for([[0.25] * 4] * 4)[0].expand(3, -1, -1, -1)
    with a.record(boxes, objects):
        a._record(None, None, (None, maps))
        a._record_outputs(None, None, type("Out", (), {"last_hidden_state": torch.cat([outputs, outputs[:, :2]], 1)}))
    total, parts = a.take_loss()
    assert float(parts["owner_loss"]) == pytest.approx(expected, rel=1e-6)
    assert float(total) == pytest.approx(float(parts["box_attention_loss"]) + 0.5 * expected, rel=1e-6)
    with pytest.raises(ConfigError, match="owner_weight"):
        BoxAttentionAid(1.0, 2, 4, (2, 2), 32, whole_image="free", owner_weight=0.5)
    # owner_focal gamma = 2 weighs each term by (1 - p_t)^2: query 0's confident wrong "yes"
    # (p 0.88, target 0) keeps 0.77 of its term, queries 1 and 2's right answers (p_t 0.73) 0.07
    focal = BoxAttentionAid(1.0, 2, 4, (2, 2), 32, whole_image="objects", owner_weight=0.5, owner_focal=2.0)

    def p_target(x: float, y: int) -> float:
        p = 1 / (1 + math.exp(-x))
        return p if y else 1 - p

    expected_focal = sum((1 - p_target(x, y)) ** 2 * bce(x, y) for x, y in zip(logits, [0, 1, 0, 0])) / 4
    assert float(focal.owner_loss(outputs, boxes, objects)) == pytest.approx(expected_focal, rel=1e-6)
    with pytest.raises(ConfigError, match="owner_focal"):
        BoxAttentionAid(1.0, 2, 4, (2, 2), 32, whole_image="objects", owner_focal=2.0)


def test_owner_count_loss_makes_the_owner_answers_add_up_to_the_count() -> None:
    """(sum of sigmoid(channel 0) over the queries - owned objects)^2 on near-full rows with
    known objects; take_loss adds it with its own weight, beside (or without) the owner loss."""
    a = BoxAttentionAid(weight=1.0, grid=2, num_queries=4, grid_size=(2, 2), image_size=32,
                        whole_image="objects", owner_count_weight=0.25)
    whole, corner = [[0.0, 0.0], [32.0, 32.0]], [[0.0, 0.0], [16.0, 16.0]]
    boxes = torch.tensor([whole, whole, corner])
    two = [[[20.0, 4.0], [28.0, 12.0]], [[2.0, 18.0], [10.0, 26.0]]]  # cells 1 and 2
    objects = (torch.tensor([two, [two[0], [[0.0, 0.0], [0.0, 0.0]]], two]), torch.tensor([2, 1, 2]))
    logits = torch.tensor([[0.0, 2.0, 1.0, -3.0], [1.0, 1.0, -1.0, 0.0], [9.0, 9.0, 9.0, 9.0]])
    outputs = torch.zeros(3, 4, 3)
    outputs[:, :, 0] = logits
    outputs[:, :, 1:] = 7.0  # not read

    def sig(x: float) -> float:
        return 1 / (1 + math.exp(-x))

    said = [sum(sig(float(x)) for x in row) for row in logits[:2]]
    expected = ((said[0] - 2) ** 2 + (said[1] - 1) ** 2) / 2  # the region row is not counted
    assert float(a.owner_count_loss(outputs, boxes, objects)) == pytest.approx(expected, rel=1e-6)
    assert a.owner_count_loss(outputs[2:], boxes[2:], (objects[0][2:], objects[1][2:])) is None
    maps = maps_for([[0.25] * 4] * 4)[0].expand(3, -1, -1, -1)
    with a.record(boxes, objects):
        a._record(None, None, (None, maps))
        a._record_outputs(None, None, type("Out", (), {"last_hidden_state": torch.cat([outputs, outputs[:, :2]], 1)}))
    total, parts = a.take_loss()
    assert set(parts) == {"box_attention_loss", "owner_count_loss"}
    assert float(parts["owner_count_loss"]) == pytest.approx(expected, rel=1e-6)
    assert float(total) == pytest.approx(float(parts["box_attention_loss"]) + 0.25 * expected, rel=1e-6)
    with pytest.raises(ConfigError, match="owner_count_weight"):
        BoxAttentionAid(1.0, 2, 4, (2, 2), 32, whole_image="cells", owner_count_weight=0.5)


def test_owner_ramp_shares_an_object_near_a_cell_border_between_its_cells() -> None:
    """2 x 2 cells of 16 px, w = 0.5 cell. Object A's centre (18, 8) is 1.125 / 0.5 cells:
    its square spans x 0.875-1.375 (0.125 in column 0, 0.375 in column 1) and y 0.25-0.75
    (row 0), so cells 0 and 1 own 0.25 and 0.75 of it. Object B's centre (4, 30) is 0.25 /
    1.875 cells: its square is moved inside the image (x 0-0.5, y 1.5-2), all in cell 2."""
    a = BoxAttentionAid(weight=1.0, grid=2, num_queries=4, grid_size=(2, 2), image_size=32,
                        whole_image="objects", owner_weight=1.0, owner_ramp=0.5)
    objects = (torch.tensor([[[[14.0, 4.0], [22.0, 12.0]], [[0.0, 28.0], [8.0, 32.0]]]]), torch.tensor([2]))
    shares = a.shared_owners(*objects)
    assert torch.allclose(shares[0], torch.tensor([[0.25, 0.0], [0.75, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    # every query with a share looks at the object: A holds no patch centre, its nearest is
    # patch 1's (24, 8), B's is patch 2; query 3 looks at its cell's
    # background (patch 3). One owner per object (w = 0) would send query 0 to patch 0.
    targets = a.targets(torch.tensor([[[0.0, 0.0], [32.0, 32.0]]]), 4, objects)
    assert targets[0].tolist() == [[0, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    hard = BoxAttentionAid(1.0, 2, 4, (2, 2), 32, whole_image="objects")
    assert hard.targets(torch.tensor([[[0.0, 0.0], [32.0, 32.0]]]), 4, objects)[0, 0].tolist() == [1, 0, 0, 0]
    # the owner loss learns the shares: binary cross-entropy against 0.25 / 0.75 / 1 / 0
    logits = torch.tensor([0.5, -1.0, 2.0, -2.0])
    outputs = torch.zeros(1, 4, 3)
    outputs[0, :, 0] = logits
    p = logits.sigmoid()
    y = torch.tensor([0.25, 0.75, 1.0, 0.0])
    expected = float(-(y * p.log() + (1 - y) * (1 - p).log()).mean())
    assert float(a.owner_loss(outputs, torch.tensor([[[0.0, 0.0], [32.0, 32.0]]]), objects)) == pytest.approx(expected)
    with pytest.raises(ConfigError, match="owner_ramp"):
        BoxAttentionAid(1.0, 2, 4, (2, 2), 32, whole_image="objects", owner_ramp=1.5)
    with pytest.raises(ConfigError, match="owner_ramp"):
        BoxAttentionAid(1.0, 2, 4, (2, 2), 32, whole_image="cells", owner_ramp=0.5)


def test_owner_match_gives_a_border_object_to_the_query_that_looks_at_it() -> None:
    """2 x 2 cells of 16 px, b = 1. Object A's centre (16.5, 8) is (1.03, 0.5) cells, just
    right of the border: the fixed rule gives it to query 1 (squared distance 0.2197 against
    query 0's 0.2822), but query 0 puts 0.8 of its attention on A's patch (patch 1, the
    nearest: A holds no patch centre) and query 1 only 0.2, so query 0 costs 0.2822 - 0.8
    and owns it. Object B sits at cell 2's centre: query 3 looks at it harder (0.9) than
    query 2 (0.4), but its cell is a whole cell away (cost 1 - 0.9 against 0 - 0.4), so the
    geometry keeps it with query 2."""
    a = BoxAttentionAid(weight=1.0, grid=2, num_queries=4, grid_size=(2, 2), image_size=32,
                        whole_image="objects", owner_weight=1.0, owner_match=1.0)
    two = [[[12.5, 4.0], [20.5, 12.0]], [[4.0, 20.0], [12.0, 28.0]]]
    objects = (torch.tensor([two, two]), torch.tensor([2, 1]))  # the second row lists A only
    rows = [[0.1, 0.8, 0.1, 0.0], [0.3, 0.2, 0.3, 0.2], [0.4, 0.1, 0.4, 0.1], [0.0, 0.0, 0.9, 0.1]]
    attention = torch.tensor([rows, rows])
    owners = a.matched_owners(*objects, attention)
    assert owners[0].tolist() == [[1, 0], [0, 0], [0, 1], [0, 0]]
    assert owners[1].tolist() == [[1, 0], [0, 0], [0, 0], [0, 0]]
    assert a.object_owners(*objects)[0].tolist() == [[0, 0], [1, 0], [0, 1], [0, 0]]  # the fixed rule
    # a small b leaves the border to the geometry: 0.2822 - 0.05 * 0.8 > 0.2197 - 0.05 * 0.2
    weak = BoxAttentionAid(1.0, 2, 4, (2, 2), 32, whole_image="objects", owner_match=0.05)
    assert weak.matched_owners(*objects, attention)[0].tolist() == [[0, 0], [1, 0], [0, 1], [0, 0]]
    # through record(): the last layer's attention (mean over heads) picks the owners of both
    # the attention targets and the owner loss. Query 1 owns nothing and its cell's only patch
    # is A's, so it targets the image's background (patches 0 and 3: 0.3 + 0.2); query 3 its
    # cell's background (patch 3: 0.1)
    whole = torch.tensor([[[0.0, 0.0], [32.0, 32.0]]])
    one = (objects[0][:1], objects[1][:1])
    maps = [torch.tensor([rows + [[1.0, 0.0, 0.0, 0.0]] * 2])[:, None].expand(-1, 2, -1, -1)]  # 2 equal heads
    logits = torch.tensor([2.0, -1.0, 0.5, -2.0])
    outputs = torch.zeros(1, 6, 3)
    outputs[0, :4, 0] = logits
    with a.record(whole, one):
        a._record(None, None, (None, maps[0]))
        a._record_outputs(None, None, type("Out", (), {"last_hidden_state": outputs}))
    _, parts = a.take_loss()
    expected_attention = (-math.log(0.8) - math.log(0.5) - math.log(0.4) - math.log(0.1)) / 4
    assert float(parts["box_attention_loss"]) == pytest.approx(expected_attention, rel=1e-6)
    p, y = logits.sigmoid(), torch.tensor([1.0, 0.0, 1.0, 0.0])
    expected_owner = float(-(y * p.log() + (1 - y) * (1 - p).log()).mean())
    assert float(parts["owner_loss"]) == pytest.approx(expected_owner, rel=1e-6)
    for bad in ({"owner_match": -1.0}, {"owner_match": 1.0, "owner_ramp": 0.5}):
        with pytest.raises(ConfigError, match="owner_match"):
            BoxAttentionAid(1.0, 2, 4, (2, 2), 32, whole_image="objects", **bad)
    with pytest.raises(ConfigError, match="owner_match"):
        BoxAttentionAid(1.0, 2, 4, (2, 2), 32, whole_image="cells", owner_match=1.0)


def test_object_layers_pull_whole_image_queries_onto_objects_in_the_last_layers_only() -> None:
    """box_attention_object_layers n: the earlier cross-attention layers let a whole-image
    row's queries look anywhere (no loss), region rows keep their cells in every layer."""
    # a 2x2 patch grid over a 64-pixel image (the 4-pixel one of aid() is near-full everywhere)
    whole, region = [[0.0, 0.0], [64.0, 64.0]], [[0.0, 0.0], [32.0, 32.0]]
    boxes = torch.tensor([whole, region])
    # one object over the top row (patches 0 and 1), centre (32, 16): cell 1 holds it
    objects = (torch.tensor([[[[0.0, 0.0], [64.0, 32.0]]]] * 2), torch.tensor([1, 1]))
    rows = [[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1]]
    corners = [[1.0, 0.0, 0.0, 0.0]] * 2
    layer0 = torch.tensor([rows + corners] * 2)[:, None]  # 2 boxes x 1 head x (4+2) x 4
    layer1 = torch.tensor([rows[::-1] + corners] * 2)[:, None]
    # whole image: query 1 owns the object (patches 0, 1); query 0's cell is all object, so it
    # targets the image's background (2, 3); queries 2, 3 their cells' background; the
    # region box's cells hold no patch centre: the nearest patch, 0, for every query
    object_targets, region_targets = [[2, 3], [0, 1], [2], [3]], [[0]] * 4

    def mean_minus_log(rws: list[list[float]], targets: list[list[int]]) -> float:
        return sum(-math.log(sum(r[t] for t in ts)) for r, ts in zip(rws, targets)) / 4

    def expected(first_layer_objects: bool) -> float:
        per_layer = []
        for i, rws in enumerate([rows, rows[::-1]]):
            w = mean_minus_log(rws, object_targets) if (i == 1 or first_layer_objects) else 0.0
            per_layer.append((w + mean_minus_log(rws, region_targets)) / 2)
        return sum(per_layer) / 2

    def make(layers: int) -> BoxAttentionAid:
        return BoxAttentionAid(weight=1.0, grid=2, num_queries=4, grid_size=(2, 2), image_size=64,
                               whole_image="objects", object_layers=layers)

    every, last = make(0).loss([layer0, layer1], boxes, objects), make(1).loss([layer0, layer1], boxes, objects)
    assert float(every) == pytest.approx(expected(True), rel=1e-6)
    assert float(last) == pytest.approx(expected(False), rel=1e-6)
    assert float(last) < float(every)
    # n >= the number of layers: every layer, as 0
    assert float(make(2).loss([layer0, layer1], boxes, objects)) == pytest.approx(expected(True), rel=1e-6)
    for bad in (dict(whole_image="free", object_layers=1), dict(whole_image="objects", object_layers=-1)):
        with pytest.raises(ConfigError, match="object_layers"):
            BoxAttentionAid(1.0, 2, 4, (2, 2), 64, **bad)


def test_training_adds_the_weighted_aid_loss(tiny_files, tmp_path) -> None:
    from tests.tiny import tiny_model_config
    from click4caption.models.builder import build_model

    model = build_model(tiny_model_config(tmp_path, box_attention_loss_weight=0.5, box_attention_grid=2),
                        for_training=True)
    model.train()
    batch = {"image": torch.randn(1, 3, 32, 32), "bbox": torch.tensor([[[[0.0, 0.0], [16.0, 16.0]]]]),
             "text_input": ["A red circle."]}
    out = model(batch)
    assert float(out["box_attention_loss"]) > 0
    assert float(out["loss"].detach()) == pytest.approx(float(out["lm_loss"]) + 0.5 * float(out["box_attention_loss"]),
                                               rel=1e-5)
    model.eval()
    assert set(model(batch)) == {"loss"}  # the aid is a training aid: nothing recorded in eval mode


def test_owner_cells_on_patch_borders_decide_by_the_patch_holding_the_centre() -> None:
    """A 4 x 4 grid over 14 x 14 patches of 16 px: even cells cut patch 3 (48-64 px) at 56
    px; "patches" cells are 4, 3, 3 and 4 patches wide (edges 0, 64, 112, 160, 224)."""
    def grid_aid(cells: str) -> BoxAttentionAid:
        return BoxAttentionAid(1.0, 4, 16, (14, 14), 224, "objects", owner_cells=cells)

    patches, even = grid_aid("patches"), grid_aid("even")
    assert patches.cell_edges()[0].tolist() == [0, 64, 112, 160, 224]
    whole = torch.tensor([[[0.0, 0.0], [224.0, 224.0]]])
    assert torch.equal(even.whole_image_cells(), even.query_cells(whole)[0])
    assert patches.whole_image_cells()[5].tolist() == [[64, 64], [112, 112]]  # row 1, column 1
    # centre (60, 20): patch column 3, right of the even line at 56, left of the patch edge at 64
    # centre (170, 120): column 10, right of both lines (168 and 160); row 7 (112-128) in cell row 2
    objects = torch.tensor([[[[50.0, 10.0], [70.0, 30.0]], [[160.0, 110.0], [180.0, 130.0]]]])
    def owner_of(a: BoxAttentionAid) -> list[int]:
        return a.object_owners(objects, torch.tensor([2]))[0].argmax(dim=0).tolist()

    assert owner_of(even) == [1, 11] and owner_of(patches) == [0, 11]
    # the background targets follow the cells: query 1 (no object) targets patch columns 4-6
    # of rows 0-3 (even cells: columns 3-6, the patches whose centre lies in 56-112 px)
    masks = patches.object_targets(objects, torch.tensor([2]), 196)[0]
    cell1 = torch.zeros(14, 14, dtype=torch.bool)
    cell1[:4, 4:7] = True
    assert torch.equal(masks[1].reshape(14, 14) > 0, cell1)
    assert masks[0].sum() > 0 and torch.equal(masks[0], patches.inside_box_mask(objects[0, :1], 196)[0])
    for bad in ({"owner_cells": "odd"}, {"owner_cells": "patches", "owner_ramp": 0.4},
                {"owner_cells": "patches", "owner_match": 1.0}):
        with pytest.raises(ConfigError):
            BoxAttentionAid(1.0, 4, 16, (14, 14), 224, "objects", **bad)
    with pytest.raises(ConfigError):
        BoxAttentionAid(1.0, 4, 16, (14, 14), 224, "free", owner_cells="patches")


# --------------------------------------------------------------------------- object centres
def test_centre_targets_mark_each_centre_patch_and_leave_its_neighbours_out() -> None:
    from click4caption.models.object_centres import centre_targets

    # a 4 x 4 patch grid over a 16-pixel image; row 0: two objects, centres (2, 2) -> patch
    # (0, 0) and (13.5, 9) -> patch (2, 3); row 1: padding only (no known objects)
    objects = torch.tensor([[[[0.0, 0.0], [4.0, 4.0]], [[12.0, 7.0], [15.0, 11.0]]],
                            [[[0.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]]])
    targets, weights = centre_targets(objects, torch.tensor([2, 0]), (4, 4), 16)
    expect = torch.zeros(2, 4, 4)
    expect[0, 0, 0] = expect[0, 2, 3] = 1
    assert torch.equal(targets, expect)
    left_out = {(r, c) for r in range(4) for c in range(4) if weights[0, r, c] == 0}
    assert left_out == {(0, 1), (1, 0), (1, 1), (1, 2), (1, 3), (2, 2), (3, 2), (3, 3)}
    assert torch.all(weights[1] == 0)


def test_centre_loss_is_the_balanced_cross_entropy_of_channel_zero() -> None:
    from click4caption.models.object_centres import centre_loss

    gen = torch.Generator().manual_seed(0)
    tokens = torch.randn(1, 1 + 4, 3, generator=gen)  # a CLS token, then a 2 x 2 grid
    objects = torch.tensor([[[[0.0, 0.0], [2.0, 2.0]]]])  # centre (1, 1): patch (0, 0) of a 4-pixel image
    # neighbours of (0, 0) on a 2 x 2 grid: all three other patches -> only the centre counts
    logit = tokens[0, 1, 0]
    assert float(centre_loss(tokens, objects, torch.tensor([1]), (2, 2), 4)) == pytest.approx(
        0.5 * float(F.softplus(-logit)), rel=1e-6)
    # a 3 x 3 grid over 6 pixels, centre patch (0, 0): patches (2, *) and (*, 2) are the negatives
    tokens = torch.randn(1, 9, 2, generator=gen)
    logits = tokens[0, :, 0].reshape(3, 3)
    negatives = torch.cat([logits[2, :], logits[:2, 2]])
    expect = 0.5 * (F.softplus(-logits[0, 0]) + F.softplus(negatives).mean())
    assert float(centre_loss(tokens, objects, torch.tensor([1]), (3, 3), 6)) == pytest.approx(float(expect), rel=1e-6)
    assert centre_loss(tokens, objects, torch.tensor([0]), (3, 3), 6) is None


def test_training_adds_the_weighted_centre_loss_on_rows_with_objects(tiny_files, tmp_path) -> None:
    from tests.tiny import tiny_model_config
    from click4caption.models.builder import build_model
    from click4caption.models.object_centres import centre_loss

    model = build_model(tiny_model_config(tmp_path, object_centre_weight=0.25), for_training=True)
    model.train()
    objects = torch.tensor([[[[0.0, 0.0], [10.0, 10.0]], [[20.0, 20.0], [30.0, 30.0]]]])
    batch = {"image": torch.randn(1, 3, 32, 32), "bbox": torch.tensor([[[[0.0, 0.0], [32.0, 32.0]]]]),
             "text_input": ["two shapes"], "objects": objects, "num_objects": [2]}
    out = model(batch)
    with torch.no_grad():
        expect = centre_loss(model.image_tokens(batch["image"]), objects, torch.tensor([2]),
                             model.visual_encoder.grid_size, 32)
    assert float(out["centre_loss"]) == pytest.approx(float(expect), rel=1e-5)
    assert float(out["loss"].detach()) == pytest.approx(float(out["lm_loss"]) + 0.25 * float(expect), rel=1e-5)
    assert set(model({k: v for k, v in batch.items() if k not in ("objects", "num_objects")})) == {"loss"}
    # conversation mode: per record, the image its image_index names (a record listing no objects adds nothing)
    images = torch.randn(2, 3, 32, 32)
    conv = [{"from": "human", "value": "image[IMG] What color is it?"}, {"from": "gpt", "value": "Red."}]
    records = {"image": images, "image_index": [1, 0], "bbox": torch.tensor([[[[0.0, 0.0], [16.0, 16.0]]]] * 2),
               "num_boxes": [1, 1], "conversations": [conv, conv],
               "objects": torch.cat([objects, torch.zeros_like(objects)]), "num_objects": [2, 0]}
    out = model(records)
    with torch.no_grad():
        expect = centre_loss(model.image_tokens(images)[[1, 0]], records["objects"], torch.tensor([2, 0]),
                             model.visual_encoder.grid_size, 32)
        other = centre_loss(model.image_tokens(images), records["objects"], torch.tensor([2, 0]),
                            model.visual_encoder.grid_size, 32)
    assert float(out["centre_loss"]) == pytest.approx(float(expect), rel=1e-5)
    assert float(expect) != pytest.approx(float(other), rel=1e-3)  # the test tells the images apart
    with pytest.raises(ConfigError):
        build_model(tiny_model_config(tmp_path, object_centre_weight=-1.0), for_training=True)


# --------------------------------------------------------------------------- conversation mode
def test_conversation_loss_is_the_cross_entropy_of_the_replies(tiny_model) -> None:
    """Two records (one with two regions and a text-only follow-up): the loss is the mean
    cross-entropy of the reply tokens, with the context built by hand from the template."""
    model = tiny_model
    tok = model.llama_tokenizer
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(1, 3, 32, 32, generator=gen)
    records = [
        [{"from": "human", "value": "image[IMG] What color is it?"}, {"from": "gpt", "value": "Red."},
         {"from": "human", "value": "What shape is it?"}, {"from": "gpt", "value": "Circle."}],
        [{"from": "human", "value": "image 1[IMG] image 2[IMG] Are they the same color?"},
         {"from": "gpt", "value": "No."}],
    ]
    boxes = torch.tensor([[[[0.0, 0.0], [16.0, 16.0]], [[0.0, 0.0], [0.0, 0.0]]],
                          [[[2.0, 2.0], [20.0, 30.0]], [[16.0, 8.0], [32.0, 32.0]]]])
    samples = {"image": image, "image_index": [0, 0], "bbox": boxes, "num_boxes": [1, 2], "conversations": records}
    with torch.no_grad():
        loss = float(model(samples)["loss"])
        image_embeds = model.encode_image(image)
        soft = [model.encode_regions(image_embeds.expand(n, -1, -1), boxes[b, :n]) for b, n in enumerate((1, 2))]
        pieces = [  # (text, is_target, regions spliced after it)
            [("### Human: image", False, 1), (" What color is it?\n### Assistant:", False, 0), ("Red.\n###", True, 0),
             (" Human: What shape is it?\n### Assistant:", False, 0), ("Circle.\n###", True, 0)],
            [("### Human: image 1", False, 1), (" image 2", False, 1),
             (" Are they the same color?\n### Assistant:", False, 0), ("No.\n###", True, 0)],
        ]
        table = model.llama_model.get_input_embeddings().weight
        total, count = 0.0, 0
        for b, record in enumerate(pieces):
            embs, labels, used, first = [], [], 0, True
            for text, target, regions in record:
                ids = tok.encode(text, add_bos=first)
                first = False
                embs.append(table[ids])
                labels += ids if target else [-100] * len(ids)
                for _ in range(regions):
                    embs.append(soft[b][used])
                    labels += [-100] * model.num_query_token
                    used += 1
            logits = model.llama_model(inputs_embeds=torch.cat(embs)[None]).logits[0]
            target = torch.tensor(labels)
            total += float(F.cross_entropy(logits[:-1], target[1:], ignore_index=-100, reduction="sum"))
            count += int((target[1:] != -100).sum())
    assert count == len(tok.encode("Red.\n###")) + len(tok.encode("Circle.\n###")) + len(tok.encode("No.\n###"))
    assert loss == pytest.approx(total / count, rel=1e-4)
