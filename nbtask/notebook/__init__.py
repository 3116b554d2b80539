"""The notebook layer: ``%%task`` and the other magics, widgets, and ``nbtask run``.

Imported only by ``%load_ext nbtask`` (and by workers when they run a cell), so that
``import nbtask`` never loads IPython or ipywidgets.
"""
