"""A training aid for models trained from scratch: pull the learned queries'
cross-attention inside the box.

From random initialisation the learned queries attend almost uniformly, so the box's
content never reaches the LLM (the shapes model's prototype found shape at chance). This
aid adds ``weight * mean(-log(attention mass of each query inside its target))`` to the
training loss, the target being the box, or with ``grid`` g > 0 the query's own cell of a
g x g grid over the box (so the box's layout reaches the LLM). With ``whole_image="free"``
the queries of a (near-)whole-image box may look anywhere in the image instead: cells
split large objects between queries, and the whole-image description has to count them.
With ``whole_image="objects"`` and the training data's object boxes (``objects`` of
:meth:`BoxAttentionAid.record`), each object of a (near-)whole-image box is seen by
exactly one query, and each query sees at most one object: the query of the grid cell
holding the object's centre (or, when an earlier object took it, the free query whose
cell centre is nearest) targets the object's patches, a query owning no object targets
the background of its cell, so that counting the objects is counting the queries that see
one (with ``object_layers`` n > 0 in the last n cross-attention layers only, the earlier
ones letting those queries look anywhere, so that they can first gather where the objects
lie: a first layer's queries read no image yet). With ``owner_weight`` > 0 the queries
must also say so: the first channel of each query's Q-Former output is read as the logit
of "I own an object" and trained with binary cross-entropy on those rows, so that the LLM
only has to add up (no parameter is added: the output LayerNorm's scale and shift of that
channel act as the logit's); with ``owner_focal`` gamma > 0 each query's term is weighed by
``(1 - p_t)^gamma`` (the focal loss of dense detectors), so that the few hard decisions,
objects near a cell border, weigh more than the many easy background queries. With
``owner_count_weight`` > 0 the queries' answers must also add up to the count: the squared
difference between the sum of their probabilities and the number of owned objects, so that
an object whose centre lies near a cell border is claimed once over the neighbouring
queries, not by both or by neither. With ``owner_ramp``
w > 0 ownership itself is shared near cell borders: an object's centre is spread over a
w x w square (in cells) and each cell owns the share of that square it holds, so that
owning changes smoothly with the object's position instead of flipping at a border; every
query owning a share targets the object's patches and answers its share. With
``owner_match`` b > 0 the owners are matched, not fixed (as a set-prediction detector
matches its queries): each object goes to the free query of lowest cost, the squared
distance (in cells) from the query's cell centre to the object's centre less b times the
query's attention mass on the object's patches in the last cross-attention layer of this
very pass (detached), cheapest (query, object) pair first. Far from a border the geometry
decides; near one, whichever neighbour already looks at the object owns it, so the target
follows the model instead of flipping where the model cannot see a difference. With
``owner_cells="patches"`` the whole image's g x g cells (which the fixed rule gives out and
whose background the other queries target) have their edges moved to the nearest patch
border (14 patches in 4 cells: 4, 3, 3 and 4 patches wide), so that no patch lies in two
cells and whether an object's centre lies in a cell is decided by which patch holds it:
with the object-centre aid (:mod:`click4caption.models.object_centres`) marking that patch,
owning becomes a question each query can answer from its own cell.

It is one object: it owns the forward hooks on the Q-Former's cross-attention layers
(which need eager attention to return their maps), records while the model encodes
regions, and hands out its loss. Off by default (``box_attention_loss_weight: 0``), as
upstream; removing it removes nothing else.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Tuple

import torch
from torch import nn

from click4caption.boxes import NEAR_FULL_BOX_JITTER
from click4caption.errors import ConfigError

#: the Q-Former attention implementation the aid needs (it reads attention maps)
ATTN_IMPLEMENTATION = "eager"
#: object boxes of each Q-Former row's image: ``(NxMx2x2 zero-padded, N counts)``
ObjectBoxes = Tuple[torch.Tensor, torch.Tensor]
#: what the queries of a (near-)whole-image box target (``box_attention_whole_image``)
WHOLE_IMAGE_TARGETS = ("cells", "free", "objects")
#: how the whole image is cut into the owners' cells (``box_attention_owner_cells``)
OWNER_CELLS = ("even", "patches")


class BoxAttentionAid:
    """Records cross-attention maps of the learned queries and turns them into a loss.

    Args:
        weight: factor of the loss in the total.
        grid: g > 0: query q targets cell ``q mod g*g`` (row-major) of a g x g grid over
            its box; 0: every query targets the whole box.
        num_queries: Q, the learned queries (the corner tokens after them are not pulled).
        grid_size: ``(H, W)`` patches of the image tokens.
        image_size: S, the model input side (boxes are in ``[0, S]`` pixels).
        whole_image: ``"cells"``: (near-)whole-image boxes get cells like any box;
            ``"free"``: their queries target the whole image; ``"objects"``: one query per
            object where the object boxes are known (:meth:`object_targets`), else
            ``"free"``.
        owner_weight: with ``"objects"``: factor of the owner loss (:meth:`owner_loss`);
            0: off.
        object_layers: with ``"objects"``: n > 0 pulls whole-image queries onto objects
            in the last n cross-attention layers only (earlier ones: anywhere); 0: in all.
        owner_count_weight: with ``"objects"``: factor of the owner count loss
            (:meth:`owner_count_loss`); 0: off.
        owner_ramp: with ``"objects"``: w in ``(0, 1]`` shares an object between the cells
            its centre's w x w square (in cells) overlaps (:meth:`shared_owners`); 0: the
            one query of :meth:`object_owners`.
        owner_match: with ``"objects"``: b > 0 matches owners to the queries' own attention
            (:meth:`matched_owners`); 0: the fixed rule. Not with ``owner_ramp``.
        owner_focal: with ``owner_weight``: gamma >= 0 of the owner loss's focal factor
            ``(1 - p_t)^gamma``; 0: plain binary cross-entropy.
        owner_cells: with ``"objects"``: ``"even"`` cuts the whole image into g x g equal
            cells; ``"patches"`` moves their edges to the nearest patch border
            (:meth:`whole_image_cells`). Not with ``owner_ramp`` or ``owner_match``.
    """

    def __init__(self, weight: float, grid: int, num_queries: int, grid_size: tuple[int, int],
                 image_size: int, whole_image: str = "cells", owner_weight: float = 0.0,
                 object_layers: int = 0, owner_count_weight: float = 0.0, owner_ramp: float = 0.0,
                 owner_match: float = 0.0, owner_focal: float = 0.0, owner_cells: str = "even") -> None:
        if whole_image not in WHOLE_IMAGE_TARGETS:
            raise ConfigError(f"box attention: whole_image must be one of {', '.join(WHOLE_IMAGE_TARGETS)}, "
                              f"got {whole_image!r}")
        for name, value in (("owner_weight", owner_weight), ("owner_count_weight", owner_count_weight)):
            if value < 0 or (value and (whole_image != "objects" or grid <= 0)):
                raise ConfigError(f"box attention: {name} must be >= 0 and needs whole_image 'objects' "
                                  f"and a grid > 0, got {value}")
        if object_layers < 0 or (object_layers and (whole_image != "objects" or grid <= 0)):
            raise ConfigError("box attention: object_layers must be >= 0 and needs whole_image 'objects' "
                              f"and a grid > 0, got {object_layers}")
        if not 0 <= owner_ramp <= 1 or (owner_ramp and (whole_image != "objects" or grid <= 0)):
            raise ConfigError("box attention: owner_ramp must be in [0, 1] cells and needs whole_image 'objects' "
                              f"and a grid > 0, got {owner_ramp}")
        if owner_match < 0 or (owner_match and (whole_image != "objects" or grid <= 0 or owner_ramp)):
            raise ConfigError("box attention: owner_match must be >= 0 and needs whole_image 'objects', a grid > 0 "
                              f"and no owner_ramp, got {owner_match}")
        if owner_focal < 0 or (owner_focal and not owner_weight):
            raise ConfigError(f"box attention: owner_focal must be >= 0 and needs owner_weight > 0, got {owner_focal}")
        if owner_cells not in OWNER_CELLS or (owner_cells != "even" and (whole_image != "objects" or grid <= 0
                                                                           or owner_ramp or owner_match)):
            raise ConfigError(f"box attention: owner_cells must be one of {', '.join(OWNER_CELLS)}; 'patches' needs "
                              f"whole_image 'objects', a grid > 0 and no owner_ramp or owner_match, got {owner_cells!r}")
        self.owner_cells = owner_cells
        self.owner_focal = owner_focal
        self.object_layers = object_layers
        self.owner_ramp = owner_ramp
        self.owner_match = owner_match
        self.weight = weight
        self.owner_weight = owner_weight
        self.owner_count_weight = owner_count_weight
        self.grid = grid
        self.whole_image = whole_image
        self.num_queries = num_queries
        self.grid_size = grid_size
        self.image_size = image_size
        self._maps: list[torch.Tensor] | None = None
        self._outputs: torch.Tensor | None = None
        self._losses: list[torch.Tensor] = []
        self._owner_losses: list[torch.Tensor] = []
        self._count_losses: list[torch.Tensor] = []
        self._handles: list[Any] = []

    # ------------------------------------------------------------------ hooks
    def attach(self, qformer: nn.Module) -> "BoxAttentionAid":
        """Hook every cross-attention layer of a ``Blip2QFormerModel`` built with eager attention."""
        for layer in qformer.encoder.layer:
            if layer.has_cross_attention:
                self._handles.append(layer.crossattention.attention.register_forward_hook(self._record))
        if self.owner_weight or self.owner_count_weight:
            self._handles.append(qformer.register_forward_hook(self._record_outputs))
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _record(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._maps is not None and isinstance(output, tuple) and output[1] is not None:
            self._maps.append(output[1])

    def _record_outputs(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._maps is not None:
            self._outputs = output.last_hidden_state[:, : self.num_queries]

    @contextmanager
    def record(self, boxes: torch.Tensor, objects: ObjectBoxes | None = None) -> Iterator[None]:
        """Keep the maps of the Q-Former pass inside the block and add its loss for
        ``boxes`` (``Nx2x2``, one per Q-Former row); ``objects`` (``NxMx2x2`` zero-padded,
        ``N`` counts) are the boxes of every object in each row's image, where known."""
        self._maps, self._outputs = [], None
        try:
            yield
            attention = self.last_attention(self._maps) if self.owner_match and self._maps else None
            if self._maps:
                self._losses.append(self.loss(self._maps, boxes.float(), objects, attention))
            if self._outputs is not None and objects is not None:
                if self.owner_weight:
                    owner = self.owner_loss(self._outputs, boxes.float(), objects, attention)
                    if owner is not None:
                        self._owner_losses.append(owner)
                if self.owner_count_weight:
                    count = self.owner_count_loss(self._outputs, boxes.float(), objects, attention)
                    if count is not None:
                        self._count_losses.append(count)
        finally:
            self._maps, self._outputs = None, None

    def last_attention(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """The learned queries' attention in the last cross-attention layer, averaged over
        heads and detached: maps (per layer ``NxHx(Q+2)xT``) -> ``NxQxT``."""
        return maps[-1][:, :, : self.num_queries].detach().float().mean(dim=1)

    def take_loss(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        """The passes recorded since the last call: ``(weighted total, {name: mean loss,
        detached})`` with ``box_attention_loss`` and, where a pass had them, ``owner_loss``
        and ``owner_count_loss``; None if nothing was recorded."""
        losses, self._losses = self._losses, []
        owner, self._owner_losses = self._owner_losses, []
        count, self._count_losses = self._count_losses, []
        if not losses:
            return None
        mean = torch.stack(losses).mean()
        total, parts = self.weight * mean, {"box_attention_loss": mean.detach()}
        for name, weight, values in (("owner_loss", self.owner_weight, owner),
                                     ("owner_count_loss", self.owner_count_weight, count)):
            if values:
                part = torch.stack(values).mean()
                total, parts[name] = total + weight * part, part.detach()
        return total, parts

    # ------------------------------------------------------------------ the loss
    def inside_box_mask(self, boxes: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """Which image tokens lie in each box: ``Nx2x2`` boxes -> ``NxT`` float mask.

        A patch is inside when its centre is; a box holding no centre gets the patch
        nearest to its own centre. A kept CLS token (``T = 1 + H*W``) is never inside.
        """
        gh, gw = self.grid_size
        s = float(self.image_size)
        ys = (torch.arange(gh, device=boxes.device, dtype=boxes.dtype) + 0.5) * s / gh
        xs = (torch.arange(gw, device=boxes.device, dtype=boxes.dtype) + 0.5) * s / gw
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        cx, cy = cx.reshape(1, -1), cy.reshape(1, -1)
        b = boxes.clip(0, s)
        x1, y1, x2, y2 = b[:, 0, 0:1], b[:, 0, 1:2], b[:, 1, 0:1], b[:, 1, 1:2]
        mask = (cx >= x1) & (cx <= x2) & (cy >= y1) & (cy <= y2)
        dist = (cx - (x1 + x2) / 2) ** 2 + (cy - (y1 + y2) / 2) ** 2
        nearest = torch.zeros_like(mask).scatter_(1, dist.argmin(dim=1, keepdim=True), True)
        mask = torch.where(mask.any(dim=1, keepdim=True), mask, nearest).to(boxes.dtype)
        if num_tokens == mask.shape[1] + 1:
            mask = torch.cat([mask.new_zeros(mask.shape[0], 1), mask], dim=1)
        return mask

    def query_cells(self, boxes: torch.Tensor) -> torch.Tensor:
        """Each learned query's target: ``Nx2x2`` boxes -> ``NxQx2x2``."""
        g, q = self.grid, self.num_queries
        if g <= 0:
            return boxes[:, None].expand(-1, q, -1, -1)
        cell = torch.arange(q, device=boxes.device) % (g * g)
        row, col = (cell // g).to(boxes.dtype), (cell % g).to(boxes.dtype)
        tl, size = boxes[:, None, 0], (boxes[:, 1] - boxes[:, 0])[:, None]  # Nx1x2
        start = torch.stack([col, row], dim=-1)[None] / g  # 1xQx2 (x, y)
        top_left = tl + start * size
        return torch.stack([top_left, top_left + size / g], dim=2)

    def cell_edges(self, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The g + 1 edges of the whole image's owner cells, ``(x edges, y edges)`` in model
        pixels: ``k * S / g``, or with ``owner_cells="patches"`` each moved to the nearest
        patch border (halves to the even patch count, so the cells are symmetric)."""
        g, s = self.grid, float(self.image_size)
        k = torch.arange(g + 1, device=device, dtype=torch.float32)
        if self.owner_cells == "even":
            return k * s / g, k * s / g
        gh, gw = self.grid_size
        return (torch.round(k * gw / g) * s / gw, torch.round(k * gh / g) * s / gh)

    def whole_image_cells(self, device: torch.device | None = None) -> torch.Tensor:
        """Each learned query's owner cell on the whole image: ``Qx2x2`` (query q: cell
        ``q mod g*g`` of :meth:`cell_edges`, row-major; with ``owner_cells="even"`` the
        cells :meth:`query_cells` gives a whole-image box)."""
        g = self.grid
        xs, ys = self.cell_edges(device)
        cell = torch.arange(self.num_queries, device=device) % (g * g)
        row, col = cell // g, cell % g
        top_left = torch.stack([xs[col], ys[row]], dim=-1)
        return torch.stack([top_left, torch.stack([xs[col + 1], ys[row + 1]], dim=-1)], dim=1)

    def is_near_full(self, boxes: torch.Tensor) -> torch.Tensor:
        """``Nx2x2`` boxes -> ``N`` bools: every corner within the near-full jitter of the border."""
        s, j = float(self.image_size), NEAR_FULL_BOX_JITTER
        return (boxes[:, 0] <= j).all(-1) & (boxes[:, 1] >= s - j).all(-1)

    def object_owners(self, objects: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Which query owns which object on whole images: ``NxMx2x2`` object boxes
        (zero-padded) and ``N`` counts -> ``NxQxM`` 0/1.

        Objects are given out in their order: each to the free query whose cell
        (:meth:`whole_image_cells`) has its centre nearest to the
        object's centre, i.e. the query of the cell holding the object's centre unless an
        earlier object took it. Every object gets its own query (while queries are left),
        so the number of owners is the number of objects.
        """
        n, m = objects.shape[:2]
        cells = self.whole_image_cells(objects.device).to(objects.dtype)  # Qx2x2
        cell_centres = (cells[:, 0] + cells[:, 1]) / 2  # Qx2
        centres = (objects[:, :, 0] + objects[:, :, 1]) / 2  # NxMx2 (x, y)
        dist = ((centres[:, :, None] - cell_centres[None, None]) ** 2).sum(-1)  # NxMxQ
        g = self.grid
        xs, ys = (e.to(objects.dtype) for e in self.cell_edges(objects.device))
        col = torch.bucketize(centres[..., 0].contiguous(), xs[1:-1], right=True).to(objects.dtype)
        row = torch.bucketize(centres[..., 1].contiguous(), ys[1:-1], right=True).to(objects.dtype)
        cell_of_query = (torch.arange(self.num_queries, device=objects.device) % (g * g)).to(objects.dtype)
        # the cell holding the centre (on a border: the one below / right) comes first
        holds = (row * g + col)[..., None] == cell_of_query  # NxMxQ
        dist = dist.masked_fill(holds, -1.0)
        owners = objects.new_zeros(n, self.num_queries, m)
        taken = torch.zeros(n, self.num_queries, dtype=torch.bool, device=objects.device)
        for k in range(m):
            pick = dist[:, k].masked_fill(taken, float("inf")).argmin(dim=1)  # N
            rows = ((k < counts) & ~taken.all(dim=1)).nonzero().flatten()
            owners[rows, pick[rows], k] = 1.0
            taken[rows, pick[rows]] = True
        return owners

    def shared_owners(self, objects: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Shares of each object owned by each query on whole images: ``NxMx2x2`` object
        boxes (zero-padded) and ``N`` counts -> ``NxQxM`` in ``[0, 1]``, each real object's
        shares summing to 1.

        The object's centre, in cells of the g x g grid over the image, is spread over a
        square of side w = ``owner_ramp`` (moved inside the image where it would stick
        out); cell c owns the share of the square it holds (the product of the overlaps
        along x and along y, over w^2), and the first query of cell c (query c) answers
        for it. With w = 0 this is :meth:`object_owners`.
        """
        if not self.owner_ramp:
            return self.object_owners(objects, counts)
        g, s, w = self.grid, float(self.image_size), self.owner_ramp
        n, m = objects.shape[:2]
        centres = (objects[:, :, 0] + objects[:, :, 1]) / 2 / s * g  # NxMx2 (x, y) in cells
        lo = (centres - w / 2).clamp(0.0, g - w)  # the square's low edge, inside [0, g]
        edges = torch.arange(g + 1, device=objects.device, dtype=objects.dtype)
        overlap = (torch.minimum(lo[..., None] + w, edges[1:]) - torch.maximum(lo[..., None], edges[:-1]))
        share = overlap.clamp(min=0.0) / w  # NxMx2xg: along x, along y
        cells = (share[:, :, 1, :, None] * share[:, :, 0, None, :]).reshape(n, m, g * g)  # row-major
        valid = (torch.arange(m, device=objects.device)[None] < counts[:, None]).to(objects.dtype)
        owners = objects.new_zeros(n, self.num_queries, m)
        first = min(self.num_queries, g * g)
        owners[:, :first] = (cells * valid[..., None]).transpose(1, 2)[:, :first]
        return owners

    def matched_owners(self, objects: torch.Tensor, counts: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """Owners matched to the queries' attention: ``NxMx2x2`` object boxes (zero-padded),
        ``N`` counts and ``NxQxT`` attention (:meth:`last_attention`) -> ``NxQxM`` 0/1.

        Cost of query q owning object m: the squared distance, in cells, from q's cell
        centre (cell ``q mod g*g``) to m's centre, less ``owner_match`` times q's attention
        mass on m's patches (:meth:`inside_box_mask`). The cheapest (query, object) pair
        of a row is matched first, then the cheapest of the free queries and unmatched
        objects, until every object has its query (while queries are left).
        """
        n, m = objects.shape[:2]
        g, s, q = self.grid, float(self.image_size), self.num_queries
        whole = objects.new_tensor([[[0.0, 0.0], [s, s]]])
        cells = self.query_cells(whole)[0]  # Qx2x2
        cell_centres = (cells[:, 0] + cells[:, 1]) / 2 / s * g  # Qx2 in cells
        centres = (objects[:, :, 0] + objects[:, :, 1]) / 2 / s * g  # NxMx2 in cells
        dist = ((cell_centres[None, :, None] - centres[:, None]) ** 2).sum(-1)  # NxQxM
        masks = self.inside_box_mask(objects.reshape(n * m, 2, 2), attention.shape[-1]).reshape(n, m, -1)
        mass = attention.to(objects.dtype) @ masks.transpose(1, 2)  # NxQxM
        valid = torch.arange(m, device=objects.device)[None] < counts[:, None]  # NxM
        cost = (dist - self.owner_match * mass).masked_fill(~valid[:, None], float("inf"))
        owners = objects.new_zeros(n, q, m)
        rows = torch.arange(n, device=objects.device)
        for _ in range(min(m, q)):
            flat = cost.reshape(n, -1)
            best = flat.argmin(dim=1)  # N
            live = torch.isfinite(flat[rows, best])
            pq, pm = best // m, best % m
            owners[rows[live], pq[live], pm[live]] = 1.0
            cost[rows[live], pq[live], :] = float("inf")  # the query is taken
            cost[rows[live], :, pm[live]] = float("inf")  # the object has its owner
        return owners

    def owners(self, objects: torch.Tensor, counts: torch.Tensor,
               attention: torch.Tensor | None = None) -> torch.Tensor:
        """``NxQxM`` share of each object each query owns on whole images: matched to
        ``attention`` (:meth:`matched_owners`) with ``owner_match`` and the attention
        known, else :meth:`shared_owners` (with ``owner_ramp`` 0: :meth:`object_owners`)."""
        if self.owner_match and attention is not None:
            return self.matched_owners(objects, counts, attention)
        return self.shared_owners(objects, counts)

    def object_targets(self, objects: torch.Tensor, counts: torch.Tensor, num_tokens: int,
                       attention: torch.Tensor | None = None) -> torch.Tensor:
        """One query per object on whole images: ``NxMx2x2`` object boxes (zero-padded)
        and ``N`` counts (and with ``owner_match`` the ``NxQxT`` attention of
        :meth:`last_attention`) -> ``NxQxT`` masks.

        Query q owns cell ``q mod g*g`` of the image (:meth:`whole_image_cells`). A query owning an
        object (:meth:`owners`) targets its patches (the whole object, also outside
        the cell); any other query targets its cell's background (its patches outside
        every object), or when it has none, the image's background (or, with none, the cell).
        """
        n, m = objects.shape[:2]
        cells = self.whole_image_cells(objects.device).to(objects.dtype)
        cell_masks = self.inside_box_mask(cells, num_tokens)[None]  # 1xQxT
        valid = (torch.arange(m, device=objects.device)[None] < counts[:, None]).to(objects.dtype)  # NxM
        object_masks = self.inside_box_mask(objects.reshape(n * m, 2, 2), num_tokens).reshape(n, m, -1)
        object_masks = object_masks * valid[..., None]  # NxMxT
        background = 1.0 - object_masks.amax(dim=1)  # NxT
        if num_tokens == self.grid_size[0] * self.grid_size[1] + 1:
            background[:, 0] = 0.0  # a kept CLS token is never a target
        owner = (self.owners(objects, counts, attention) > 0).to(objects.dtype)  # NxQxM
        owned = (owner @ object_masks).clamp(max=1.0)  # NxQxT
        empty_cell = cell_masks * background[:, None]  # NxQxT
        fallback = torch.where(background.sum(-1, keepdim=True)[:, None] > 0, background[:, None], cell_masks)
        out = torch.where(empty_cell.sum(-1, keepdim=True) > 0, empty_cell, fallback)
        return torch.where(owner.sum(-1, keepdim=True) > 0, owned, out)

    def targets(self, boxes: torch.Tensor, num_tokens: int, objects: ObjectBoxes | None = None,
                attention: torch.Tensor | None = None) -> torch.Tensor:
        """Where each learned query should look: ``Nx2x2`` boxes -> ``NxQxT`` masks
        (its cell; for a near-full box with ``whole_image="free"`` the whole image, with
        ``"objects"`` and the row's object boxes known :meth:`object_targets`)."""
        n, q = boxes.shape[0], self.num_queries
        cells = self.query_cells(boxes).reshape(n * q, 2, 2)
        mask = self.inside_box_mask(cells, num_tokens).reshape(n, q, -1)
        if self.whole_image in ("free", "objects") and self.grid > 0:
            near_full = self.is_near_full(boxes)
            image = boxes.new_tensor([[[0.0, 0.0], [float(self.image_size)] * 2]])
            anywhere = self.inside_box_mask(image, num_tokens)  # 1xT
            mask = torch.where(near_full[:, None, None], anywhere[:, None], mask)
            if self.whole_image == "objects" and objects is not None:
                boxes_m, counts = objects
                rows = (near_full & (counts > 0)).nonzero().flatten()
                if len(rows):
                    mask[rows] = self.object_targets(boxes_m[rows].to(mask.dtype), counts[rows], num_tokens,
                                                     None if attention is None else attention[rows])
        return mask

    def owner_loss(self, outputs: torch.Tensor, boxes: torch.Tensor, objects: ObjectBoxes,
                   attention: torch.Tensor | None = None) -> torch.Tensor | None:
        """Binary cross-entropy of "this query owns an object" read from the first channel
        of each query's output, over the (near-)whole-image rows whose objects are known
        (with ``owner_focal`` gamma each term times ``(1 - p_t)^gamma``, ``p_t = y p + (1 - y)
        (1 - p)`` the probability given to the target y).

        Args:
            outputs: ``NxQxD`` Q-Former outputs of the learned queries.
            boxes: ``Nx2x2`` in model pixels.
            objects: ``(NxMx2x2, N counts)``.
            attention: ``NxQxT`` (:meth:`last_attention`), read with ``owner_match`` only.
        Returns:
            the mean over those rows' queries, or None when the batch has no such row.
        """
        owned = self._whole_image_owners(boxes, objects, attention)
        if owned is None:
            return None
        rows, owns = owned
        logits = outputs[rows, :, 0].float()
        if not self.owner_focal:
            return nn.functional.binary_cross_entropy_with_logits(logits, owns)
        terms = nn.functional.binary_cross_entropy_with_logits(logits, owns, reduction="none")
        p = logits.sigmoid()
        p_target = owns * p + (1 - owns) * (1 - p)
        return ((1 - p_target) ** self.owner_focal * terms).mean()

    def owner_count_loss(self, outputs: torch.Tensor, boxes: torch.Tensor, objects: ObjectBoxes,
                         attention: torch.Tensor | None = None) -> torch.Tensor | None:
        """Squared difference between the number of owned objects and the sum of the
        queries' "owns an object" probabilities (sigmoid of the first output channel), over
        the (near-)whole-image rows whose objects are known.

        Args and return as :meth:`owner_loss`.
        """
        owned = self._whole_image_owners(boxes, objects, attention)
        if owned is None:
            return None
        rows, owns = owned
        said = outputs[rows, :, 0].float().sigmoid().sum(-1)  # R
        return ((said - owns.sum(-1)) ** 2).mean()

    def _whole_image_owners(self, boxes: torch.Tensor, objects: ObjectBoxes,
                            attention: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The (near-)whole-image rows with known objects and how much of an object each
        of their queries owns: ``(R row indices, RxQ in [0, 1])`` (0/1 unless ``owner_ramp``
        shares objects), or None when there is no such row."""
        boxes_m, counts = objects
        rows = (self.is_near_full(boxes) & (counts > 0)).nonzero().flatten()
        if not len(rows):
            return None
        owners = self.owners(boxes_m[rows].float(), counts[rows], None if attention is None else attention[rows])
        return rows, owners.sum(-1).clamp(max=1.0)

    def loss(self, maps: list[torch.Tensor], boxes: torch.Tensor, objects: ObjectBoxes | None = None,
             attention: torch.Tensor | None = None) -> torch.Tensor:
        """Mean over layers, heads and queries of ``-log`` (attention mass inside the target).

        Args:
            maps: per cross-attention layer ``NxHx(Q+2)xT`` (queries, then the 2 corners).
            boxes: ``Nx2x2`` in model pixels.
            objects: ``(NxMx2x2, N counts)`` object boxes of each row's image, or None.
            attention: ``NxQxT`` (:meth:`last_attention`), read with ``owner_match`` only.
        """
        n, q, t = boxes.shape[0], self.num_queries, maps[0].shape[-1]
        mask = self.targets(boxes, t, objects, attention).reshape(n, 1, q, -1)
        early = mask  # layers before the last object_layers: whole-image queries look anywhere
        if self.object_layers and objects is not None:
            early = self.targets(boxes, t, None).reshape(n, 1, q, -1)
        first_object_layer = len(maps) - self.object_layers if self.object_layers else 0
        losses = [-(m[:, :, :q] * (mask if i >= first_object_layer else early)).sum(-1).clamp_min(1e-6).log().mean()
                  for i, m in enumerate(maps)]
        return torch.stack(losses).mean()
