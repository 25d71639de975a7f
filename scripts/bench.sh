#!/usr/bin/env bash
# Builds pipebridge in release and runs the pipeline benchmark (benches/pipeline.rs) with
# the given arguments, e.g.:
#   scripts/bench.sh                          # 6 interleaved rounds, every installed tool
#   scripts/bench.sh --install-competitors    # apt-get install socat stunnel4 openssh first
#   scripts/bench.sh --smoke                  # a few seconds, pipebridge only (CI)
#   scripts/bench.sh --only pipebridge,ssh --rounds 8
#   scripts/bench.sh --kind seqpacket         # records end to end: pipebridge and direct
# The table goes to stdout (markdown), progress to stderr. See BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
cargo build --release --locked --bin pipebridge
exec cargo bench --locked --bench pipeline -- "$@"
