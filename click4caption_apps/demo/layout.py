"""The page: creates the components and wires each event to a method of
:class:`~click4caption_apps.demo.handlers.DemoHandlers`; no logic of its own.

The UI's events are private (not in "Use via API", not callable by clients: they need
a browser session's state); scripts get two named endpoints, ``/describe`` and
``/ask``, that share the model's queue and lock with the UI.
"""
from __future__ import annotations

from typing import Any, Callable

import gradio as gr

from click4caption_apps.demo.handlers import (
    DESCRIBE,
    MAX_BEAMS,
    MAX_NEW_TOKENS_UI,
    MAX_TEMPERATURE,
    MIN_NEW_TOKENS,
    QA,
    DemoHandlers,
)

TITLE = "Click4Caption"
INTRO = (
    "Pick an image (an example scene below, or upload one), then **click two opposite corners** of a region, in "
    "any order. **Describe** mode describes every box you draw; in **QA** mode add one or more regions (from one "
    "image or several) and ask about them, with `[IMG]` marking each region (left out, the app inserts them: "
    "`image 1[IMG] image 2[IMG] Are they the same color?`)."
)
#: example names in full (the gallery cuts captions to the thumbnail's width)
CSS = """
#status {min-height: 2.4em}
#status .error {color: #b91c1c; font-weight: 600}
#canvas img {cursor: crosshair}
#examples .caption-label {max-width: none !important; overflow: visible !important; text-overflow: clip !important}
"""
MODEL_QUEUE: dict[str, Any] = dict(concurrency_id="model", concurrency_limit=1)  # one model call at a time


def _ui(listener: Callable[..., Any], fn: Callable[..., Any], inputs: list[Any], outputs: list[Any],
        **kwargs: Any) -> Any:
    """Wire one UI event: private (it needs a browser session's state), and named
    ``ui_<method>`` so that no UI name takes the API's ``describe`` or ``ask``."""
    return listener(fn, inputs, outputs, api_name=f"ui_{fn.__name__}", api_visibility="private", **kwargs)


def build_app(handlers: DemoHandlers) -> gr.Blocks:
    """The Gradio Blocks of the demo; call ``.queue()`` and ``.launch(css=CSS)`` on it."""
    h = handlers
    settings = h.settings
    with gr.Blocks(title=TITLE) as app:
        state = gr.State(None)
        gr.Markdown(f"# {TITLE}\n{INTRO}")
        with gr.Row():
            with gr.Column(scale=5):
                canvas = gr.Image(label="Image: click two corners", type="pil", interactive=False, height=420,
                                  format="png", elem_id="canvas", buttons=[],
                                  placeholder="Pick an example scene below or upload an image")
                with gr.Row():
                    upload = gr.UploadButton("Upload an image", file_types=["image"], file_count="single",
                                             type="filepath", elem_id="upload")
                    whole = gr.Button("Whole image", elem_id="whole")
                    add = gr.Button("Add region", variant="primary", elem_id="add", visible=False)
                gallery = gr.Gallery(value=h.example_gallery(), label="Example scenes (click one)", columns=5,
                                     height=150, format="png", allow_preview=False, object_fit="contain",
                                     elem_id="examples", interactive=False, buttons=[])
                mode = gr.Radio([DESCRIBE, QA], value=DESCRIBE, label="Mode", elem_id="mode")
                with gr.Accordion("Generation settings", open=False):
                    beams = gr.Slider(1, MAX_BEAMS, value=settings.num_beams, step=1, label="Beams",
                                      elem_id="beams")
                    temperature = gr.Slider(0.0, MAX_TEMPERATURE, value=settings.temperature, step=0.1,
                                            label="Temperature (0 = greedy)", elem_id="temperature")
                    max_new = gr.Slider(MIN_NEW_TOKENS, MAX_NEW_TOKENS_UI, value=settings.max_new_tokens, step=1,
                                        label="Maximum new tokens", elem_id="max_new_tokens")
            with gr.Column(scale=6):
                status = gr.Markdown("Pick an example scene or upload an image.", elem_id="status")
                chatbot = gr.Chatbot(label="Chat", height=420, elem_id="chat", feedback_options=None,
                                     buttons=["copy"])
                regions = gr.Gallery(label="Regions for QA (numbered as in the question)", columns=6, height=150,
                                     fit_columns=False, allow_preview=False, object_fit="contain",
                                     elem_id="regions", visible=False, interactive=False, buttons=[])
                with gr.Row():
                    question = gr.Textbox(show_label=False, scale=5, elem_id="question", lines=1, max_lines=4,
                                          placeholder="Ask about the regions, e.g. 'Are they the same color?' "
                                                      "([IMG] placeholders are optional)")
                    ask = gr.Button("Ask", variant="primary", scale=1, min_width=80, elem_id="ask")
                restart = gr.Button("Restart", elem_id="restart")
                info = gr.Markdown(h.info_text(), elem_id="model-info")

        gen = [beams, temperature, max_new]
        described = [chatbot, state, status, info]
        _ui(upload.upload, h.upload, [upload, state], [canvas, state, status])
        _ui(gallery.select, h.select_example, [state], [canvas, state, status])
        for selected in (_ui(canvas.select, h.click, [state, mode], [canvas, state, status]),
                         _ui(whole.click, h.whole_image, [state, mode], [canvas, state, status])):
            _ui(selected.then, h.describe, [state] + gen, described, **MODEL_QUEUE)
        _ui(add.click, h.add_region, [state], [canvas, regions, state, status])
        for asked in (question.submit, ask.click):
            _ui(asked, h.ask, [question, state, mode] + gen, [chatbot, state, status, info, question, regions],
                **MODEL_QUEUE)
        _ui(restart.click, h.restart, [state], [canvas, state, chatbot, regions, question, status, info])
        _ui(mode.change, h.change_mode, [mode, state], [canvas, state, chatbot, regions, add, status])

        gr.api(h.api_describe, api_name="describe", **MODEL_QUEUE)
        gr.api(h.api_ask, api_name="ask", **MODEL_QUEUE)
    return app
