"""An example package that adds a merge method, a scorer and a sampler to mergesearch through
entry points (see its pyproject.toml). Nothing here is imported by mergesearch itself."""
