"""Serving: `cnnkit serve` under load, batched against one forward a request.
`python -m benchmarks.serving.serve_load --help`."""
