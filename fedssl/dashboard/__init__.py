"""`fedssl dashboard`: a read-only web page over a run directory (or a site state dir) that updates live.

snapshot.py reads the run into one JSON-able dict with the project's own readers (fedssl.runlog,
fedssl.audit.ledgers, fedssl.evaluation.results); projection.py says when each site's budget runs
out; page.py renders the self-contained HTML; app.py serves it (Starlette, server-sent events).
Nothing here imports torch or Flower, and nothing reads site data: only metrics, ledgers and results.
"""
