"""Data: import a collection, ingest it into a manifest, validate it with Great Expectations, split it by slide.

``importer`` (Kaggle/TCIA downloads into class folders), ``ingest`` (the manifest), ``manifest`` (reading it),
``validate`` (tile checks and GX suites), ``split`` (grouped folds), ``datasets`` (torch datasets of tiles).
"""
