"""``wsi-view``: review ``wsi-infer`` results in a web browser (docs/viewer.md).

The slide in Deep Zoom tiles (OpenSeadragon, vendored in ``static/vendor``), its heatmap as a second
layer on the same Deep Zoom grid with the overlay's colour map, the tumour regions as outlines with
their measurements, and the slides of a results folder in review order (slide score).

- :class:`Catalogue` (:mod:`.catalogue`): the slides it was started with, the only ones it serves.
- :mod:`.tiles`: the Deep Zoom tile contract (OpenSlide's ``DeepZoomGenerator`` or our reader), the
  bounded tile cache, the error tile.
- :func:`create_app`, :class:`ViewerServer` (:mod:`.server`): FastAPI + uvicorn, 127.0.0.1 by default.
- :func:`export_site` (:mod:`.site`): the same page and tiles as a static folder.
- Review mode (:class:`ReviewSettings`, docs/viewer.md "Review mode"): the pathologist's outlines saved
  as ``review.geojson`` (:mod:`wsi_toolkit.annotations.review`), writes guarded by a per-start token;
  :func:`review_queue` (:mod:`.queue`): where to look first, by the model's uncertainty.

Needs the ``view`` extra (``pip install wsi-toolkit[view]``) for the server; the catalogue, tiles
and export need only the toolkit.
"""

from __future__ import annotations

from wsi_toolkit.view.catalogue import Catalogue, SlideEntry, SlideView, ViewerError
from wsi_toolkit.view.queue import QueueItem, review_queue
from wsi_toolkit.view.server import ReviewSettings, ViewerServer, create_app
from wsi_toolkit.view.site import ExportReport, export_site
from wsi_toolkit.view.tiles import DeepZoomGeometry, OpenSlideTiles, ReaderTiles, TileCache

__all__ = ["Catalogue", "SlideEntry", "SlideView", "ViewerError", "create_app", "ViewerServer", "export_site",
           "ExportReport", "DeepZoomGeometry", "OpenSlideTiles", "ReaderTiles", "TileCache", "ReviewSettings",
           "QueueItem", "review_queue"]
