"""Tools for tests, demos and benchmarks, outside the runtime package: `ttsd make-tiny` (seeded
random IndexTTS-2 checkpoints in the official and converted layouts, a synthetic reference voice)
and the random-weight models of `ttsd serve --random-weights`. They build models only through the
files `Pipeline.load` reads, never by wiring modules together themselves. Needs the `convert` extra."""
