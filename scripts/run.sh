#!/usr/bin/env bash
# The main job. With converted weights in checkpoints/ (see checkpoints/README.md): serve them.
# Without them: generate a tiny IndexTTS2 with RANDOM weights, serve it on a free local port,
# speak a sentence through ttsd-say into out/hello.wav, and stop. The tiny model's audio is
# noise-like by construction; it exercises every stage, the daemon and the client for real.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
. .venv/bin/activate
if [ -f checkpoints/manifest.json ]; then
    exec ttsd serve --checkpoints checkpoints "$@"
fi
echo "ttsd: no converted weights in checkpoints/ — running the demo on a generated tiny model with RANDOM weights"
work=out/tiny
mkdir -p out
[ -f "$work/ckpt/manifest.json" ] || ttsd make-tiny "$work/official" --seed 1 --convert "$work/ckpt" --voice "$work/voice.wav"
port=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
ttsd serve --checkpoints "$work/ckpt" --host 127.0.0.1 --port "$port" &
daemon=$!
trap 'kill -TERM $daemon 2>/dev/null; wait $daemon 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
    python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/healthz', timeout=1)" 2>/dev/null && break
    sleep 0.5
done
ttsd-say --url "ws://127.0.0.1:$port" --voice "$work/voice.wav" --seed 1 --max-mel-tokens 250 --out out/hello.wav \
    "Hello from ttsd. This tiny model has random weights, so it sounds like noise."
python - <<'PY'
import soundfile as sf
info = sf.info("out/hello.wav")
print(f"ttsd: wrote out/hello.wav ({info.duration:.2f} s, {info.samplerate} Hz, {info.channels} channel) "
      "from a RANDOM-weight tiny model; put real weights in checkpoints/ to hear speech")
PY
