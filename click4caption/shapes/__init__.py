"""The shapes world: an offline, drawable world the whole pipeline can learn.

See design/shapes_world.md. ``world`` draws scenes and speaks their language,
``writers`` writes them in the real dataset formats, ``tokenizer`` builds a tiny
LLaMA-like tokenizer, and ``scoring`` measures a model against the spec's bars.
"""

from click4caption.shapes.scoring import format_table, make_eval_items, score
from click4caption.shapes.world import (
    COLORS,
    COUNT_WORDS,
    IMG_PLACEHOLDER,
    PAIR_QUESTIONS,
    QUESTION_COLOR,
    QUESTION_DESCRIBE,
    QUESTION_SAME_COLOR,
    QUESTION_SAME_SHAPE,
    QUESTION_SHAPE,
    QUESTION_SIZE,
    SHAPES,
    SINGLE_QUESTIONS,
    SIZES,
    Scene,
    ShapeObject,
    draw_scene,
    pair_answer,
    pair_prompt,
    region_description,
    region_phrase,
    render_scene,
    sample_scene,
    single_answer,
    single_prompt,
    whole_image_caption,
)
from click4caption.shapes.writers import write_shapes_dataset

# The tokenizer (which imports transformers) is not re-exported: import
# click4caption.shapes.tokenizer.build_shapes_tokenizer where it is needed.

__all__ = [
    "COLORS",
    "COUNT_WORDS",
    "IMG_PLACEHOLDER",
    "PAIR_QUESTIONS",
    "QUESTION_COLOR",
    "QUESTION_DESCRIBE",
    "QUESTION_SAME_COLOR",
    "QUESTION_SAME_SHAPE",
    "QUESTION_SHAPE",
    "QUESTION_SIZE",
    "SHAPES",
    "SINGLE_QUESTIONS",
    "SIZES",
    "Scene",
    "ShapeObject",
    "draw_scene",
    "format_table",
    "make_eval_items",
    "pair_answer",
    "pair_prompt",
    "region_description",
    "region_phrase",
    "render_scene",
    "sample_scene",
    "score",
    "single_answer",
    "single_prompt",
    "whole_image_caption",
    "write_shapes_dataset",
]
