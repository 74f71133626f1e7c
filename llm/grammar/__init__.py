"""Grammar-constrained decoding: what a request asks for (spec.py), the library behind a small interface
(backend.py, llguidance_backend.py), compiled off the engine thread and cached (compiler.py), and one
request's state as the sampler applies it (constraint.py)."""
