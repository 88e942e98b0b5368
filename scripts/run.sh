#!/usr/bin/env bash
# The main job. With converted weights in checkpoints/IndexTTS-2 (see checkpoints/README.md):
# serve them. Without them: generate a tiny IndexTTS2 with RANDOM weights, serve it on a free
# local port, speak a sentence through ttsd-say into out/hello.wav, and stop. The tiny model's
# audio is loud noise by construction; it exercises every stage, the daemon and the client for real.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
. .venv/bin/activate
if [ -f checkpoints/IndexTTS-2/manifest.json ]; then
    exec ttsd serve --checkpoints checkpoints/IndexTTS-2 "$@"
fi
echo "ttsd: no converted weights in checkpoints/IndexTTS-2 — running the demo on a generated tiny model with RANDOM weights"
work=out/tiny
mkdir -p out
[ -f "$work/ckpt/manifest.json" ] || ttsd make-tiny "$work/official" --seed 1 --convert "$work/ckpt" --voice "$work/voice.wav"
# Port 0: the daemon binds a free port itself and names it in its "ttsd ready url=..." log line.
log=out/daemon.log
ttsd serve --checkpoints "$work/ckpt" --host 127.0.0.1 --port 0 2>"$log" &
daemon=$!
trap 'kill -TERM $daemon 2>/dev/null; wait $daemon 2>/dev/null || true' EXIT
url=""
for _ in $(seq 1 240); do
    url=$(sed -n 's/.*ttsd ready url=\([^ ]*\).*/\1/p' "$log")
    [ -n "$url" ] && break
    kill -0 "$daemon" 2>/dev/null || { cat "$log" >&2; exit 1; }
    sleep 0.5
done
[ -n "$url" ] || { echo "ttsd: the daemon did not become ready; its log:" >&2; cat "$log" >&2; exit 1; }
# --max-mel-tokens keeps the trial short: random weights rarely emit the stop token on their own.
ttsd-say --url "$url" --voice "$work/voice.wav" --seed 1 --max-mel-tokens 250 --out out/hello.wav \
    "Hello from ttsd. This tiny model has random weights, so it sounds like noise."
python - <<'PY'
# The random model's output is near full-scale noise; bring it down to a -20 dBFS peak so that
# opening out/hello.wav does not hurt. (Real weights need no such step; ttsd never rescales audio.)
import numpy as np
import soundfile as sf
pcm, rate = sf.read("out/hello.wav", dtype="int16")
peak = max(int(np.abs(pcm.astype(np.int32)).max()), 1)
gain = min(1.0, 0.1 * 32767 / peak)
sf.write("out/hello.wav", (pcm * gain).astype(np.int16), rate, subtype="PCM_16")
print(f"ttsd: wrote out/hello.wav ({len(pcm) / rate:.2f} s, {rate} Hz, mono) from a RANDOM-weight tiny model, "
      f"lowered by {20 * np.log10(1 / gain):.0f} dB to spare your ears; put real weights in checkpoints/ to hear speech. "
      "Daemon log: out/daemon.log")
PY
