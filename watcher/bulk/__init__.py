"""Bulk mode: the one preprocessing path and model over a whole tree of files, local or in an
object store, on Ray Data (the `ray` extra).

    sources.py   which files a source holds, and reading them from a pyarrow filesystem
    rows.py      the output's schema, and `Classifier`: a callable class for Dataset.map_batches
    output.py    the output folder: staged parts, the rename when done, _SUCCESS, --resume
    engine.py    starting Ray (or joining a cluster) and running a source through the classifier
    __main__.py  python -m watcher.bulk

Only engine.py imports Ray; the service and --once never import this package.
"""
