"""Training the PCam patch classifier with fastai (the article's ResNet50 one-cycle recipe).

Depends on :mod:`wsi_toolkit`, never the reverse. The training code arrives with the
patch-model issue; until then this package holds no public names.
"""

__all__: list[str] = []
