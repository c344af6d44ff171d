#!/usr/bin/env bash
# The long schemathesis run: all phases, all checks, 200 examples per
# operation and a new seed each time, against the real binary on loopback
# (tests/schemathesis.py does the work; tests/openapi_conformance.rs is the
# short CI run). Prints schemathesis' figures and the wall time.
#
#   bench/schemathesis.sh [MAX_EXAMPLES] [MAX_SECONDS]
#
# TIDEPOOL_BIN picks the binary (default target/release/tidepool if built,
# else target/debug/tidepool). Needs: pip install schemathesis==4.32.5
set -euo pipefail
cd "$(dirname "$0")/.."
examples=${1:-200}
seconds=${2:-900}
bin=${TIDEPOOL_BIN:-}
if [ -z "$bin" ]; then
  if [ -x target/release/tidepool ]; then bin=target/release/tidepool; else
    cargo build --quiet --locked
    bin=target/debug/tidepool
  fi
fi
report=$(mktemp -d)
trap 'rm -rf "$report"' EXIT
start=$(date +%s)
set +e
python3 tests/schemathesis.py --bin "$bin" --max-examples "$examples" --max-time "$seconds" \
  --seed random --report "$report" | tee "$report/out.txt"
code=${PIPESTATUS[0]}
set -e
echo
echo "bench/schemathesis.sh: binary $bin, --max-examples $examples, --max-time ${seconds}s"
echo "bench/schemathesis.sh: $(( $(date +%s) - start )) s wall time; exit $code"
grep -E "^Seed:|generated|Scenarios:|API Links:|Failures:|❌|Errors:" "$report/out.txt" || true
python3 - "$report" <<'PY'
import glob, json, sys
requests = 0
for path in glob.glob(sys.argv[1] + "/har-*.json"):
    requests += len(json.load(open(path))["log"]["entries"])
print(f"bench/schemathesis.sh: {requests} HTTP requests sent")
PY
exit "$code"
