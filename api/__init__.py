"""What the daemon and its clients share, without torch: the wire protocol (`protocol`), the error
codes and the errors a client is told about (`errors`), the synthesis options table and its one
validator (`options`), the text, reference-audio and output-file rules (`rules`) and the float →
s16le PCM conversion (`pcm`).

Nothing here imports torch, `ttsd.pipeline` or `ttsd.daemon` (tests/test_api.py checks it):
`pip install ttsd` without the `server` extra is enough for `ttsd-say` and the client library."""
