"""The feature browser: a static single-page site generated from the feature tables.

One concept per module (import from them directly; this package re-exports nothing):

``generate``   the site's files from the feature tables: index, per-shard folders of list rows and
               feature chunks, page shell
``index_files`` the site-wide sort orders, density column and search postings
``publish``    writing a build atomically (local versions folder and link switch, or fsspec/S3),
               sweeping older builds, reading a published site's pointer
``address``    the default host, port and URL it is served at (imports nothing)
``server``     the local HTTP server (``serve``, ``serve_in_thread``, ``make_server``)
``synthetic``  random feature tables with the pipeline's schemas (demo, tests, size figures)
``__main__``   ``python -m sae_platform.browser serve DIR`` / ``demo DIR``

None of them imports torch: building and serving a site never loads it.
"""
