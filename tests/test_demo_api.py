"""The demo's API as a script sees it: ``gradio_client`` against ``demo.py`` running
(:mod:`tests.demo_server`). Exactly two named endpoints, ``/describe`` and ``/ask``; the
UI's events (bound to a browser session's state) are not listed and not callable."""
from __future__ import annotations

import itertools
import json
from typing import Any, Iterator

import pytest

from tests.demo_server import REPO, demo_cfg, server  # noqa: F401 - fixtures

pytestmark = pytest.mark.slow

EXAMPLES = REPO / "assets" / "examples"


@pytest.fixture(scope="module")
def client(server: str) -> Iterator[Any]:
    import gradio_client
    yield gradio_client.Client(server, verbose=False, download_files=False)


def scene(n: int) -> dict[str, Any]:
    return json.loads((EXAMPLES / f"scene_{n}.json").read_text())


def image(n: int) -> Any:
    from gradio_client import handle_file

    return handle_file(str(EXAMPLES / f"scene_{n}.png"))


def test_the_api_lists_exactly_describe_and_ask(client: Any):
    api = client.view_api(return_format="dict", print_info=False)
    assert set(api["named_endpoints"]) == {"/describe", "/ask"} and api["unnamed_endpoints"] == {}
    params = {name: [p["parameter_name"] for p in info["parameters"]] for name, info in api["named_endpoints"].items()}
    assert params == {"/describe": ["image", "boxes"], "/ask": ["image", "boxes", "question"]}
    with pytest.raises(ValueError):  # a UI event cannot be called by name
        client.predict(api_name="/ui_click")


def test_describe_names_each_object_in_box_order(client: Any, demo_cfg: tuple[str, bool]):
    objects = scene(1)["objects"]
    boxes = [o["box_xyxy"] for o in objects]
    x1, y1, x2, y2 = boxes[0]
    boxes[0] = [x2, y2, x1, y1]  # any corner order, as the CLI
    answers = client.predict(image(1), boxes, api_name="/describe")
    assert isinstance(answers, list) and len(answers) == len(objects)
    assert all(isinstance(a, str) and a.strip() for a in answers), answers
    if demo_cfg[1]:  # the shipped model names each shape's colour
        for obj, answer in zip(objects, answers):
            assert obj["color"] in answer.lower(), (obj, answer)


def test_ask_about_two_boxes(client: Any, demo_cfg: tuple[str, bool]):
    """Every pair of objects of every example scene, asked through ``/ask``. With the shipped
    model the Yes/No answers must meet the shapes world's pair bar (balanced accuracy), as in
    its evaluation table: one pair's answer is the model's draw, a box-blind model scores 50 %."""
    from click4caption.shapes.scoring import score

    items, answers = [], []
    for n in range(1, 6):
        objects = scene(n)["objects"]
        for i, j in itertools.combinations(range(len(objects)), 2):
            boxes = [objects[i]["box_xyxy"], objects[j]["box_xyxy"]]
            answer = client.predict(image(n), boxes, "Are they the same color?", api_name="/ask")
            assert isinstance(answer, str) and answer.strip()
            same = objects[i]["color"] == objects[j]["color"]
            items.append({"meta": {"kind": "same_color", "answer": "Yes." if same else "No."}, "scene": n})
            answers.append(answer)
    if demo_cfg[1]:  # the evaluation's own scorer and bar
        assert {item["meta"]["answer"] for item in items} == {"Yes.", "No."}, "the examples need pairs of both answers"
        result = score(items, answers)["same_color"]
        asked = [(item["scene"], item["meta"]["answer"], a) for item, a in zip(items, answers)]
        assert result["passed"], (result, asked)
    objects = scene(4)["objects"][:2]
    boxes = [o["box_xyxy"] for o in objects]
    answer = client.predict(image(4), boxes, "Are they the same color?", api_name="/ask")
    marked = client.predict(image(4), boxes, "image 1[IMG] image 2[IMG] Are they the same color?", api_name="/ask")
    assert marked == answer  # the placeholders the app inserts are the ones a script may write


@pytest.mark.parametrize("boxes, question, message", [
    ([[5, 5, 5, 5]], None, "empty box"),
    ([[1, 2, 3]], None, "a box must be four numbers"),
    ([], None, "boxes must be a non-empty list"),
    ([[0, 0, 10, 10]], "image[IMG] image[IMG] What is it?", "2 [IMG] placeholder(s) but 1"),
])
def test_bad_input_is_a_one_line_error(client: Any, boxes: list[Any], question: str | None, message: str):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as caught:
        if question is None:
            client.predict(image(2), boxes, api_name="/describe")
        else:
            client.predict(image(2), boxes, question, api_name="/ask")
    text = str(caught.value)
    assert message in text and "Traceback" not in text and "\n" not in text.strip(), text
