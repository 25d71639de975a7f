#!/usr/bin/env bash
# The Windows part of CI (issue 5): cross-build pipebridge for x86_64-pc-windows-gnu with
# mingw, lint it for that target, and run its tests under Wine (headless).
#
#   scripts/windows-ci.sh build   install mingw + Wine + the Rust target, build and clippy
#                                 the Windows binaries, make the Wine prefix (with the
#                                 bcryptprimitives shim built from scripts/windows/) and
#                                 start its wineserver once (-p: it stays up)
#   scripts/windows-ci.sh test    the Windows-target tests under Wine (lib unit tests and
#                                 tests/windows.rs: the pipe endpoints)
#   scripts/windows-ci.sh e2e     the Linux ↔ Wine end-to-end suite tests/wine.rs (also
#                                 part of a plain `cargo test` once `env` is applied)
#   scripts/windows-ci.sh env     print the variables tests/wine.rs needs (for eval)
#   scripts/windows-ci.sh stop    stop the prefix's wineserver (and every Wine process in it)
#   scripts/windows-ci.sh         build, test, e2e, stop
#
# Wine 8.0 (Debian bookworm) lacks bcryptprimitives.dll, which every Rust >= 1.78 .exe
# imports; scripts/windows/bcryptprimitives.c stands in for it inside the test prefix
# only (../shared/notes/feasibility.md). What Wine cannot show (DACLs, first-instance
# squatting, real impersonation, reject_remote_clients) is listed in README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=x86_64-pc-windows-gnu
export WINEPREFIX="${WINEPREFIX:-$PWD/target/wineprefix}"
export WINEDEBUG=-all
unset DISPLAY
EXE_DIR="target/$TARGET/debug"

env_lines() {
  echo "export WINEPREFIX=$WINEPREFIX WINEDEBUG=-all"
  echo "export PIPEBRIDGE_WINE_EXE=$PWD/$EXE_DIR/pipebridge.exe"
  echo "export PIPEBRIDGE_WINE_ECHO=$PWD/$EXE_DIR/examples/npipe-echo.exe"
}

build() {
  local need=()
  command -v x86_64-w64-mingw32-gcc >/dev/null || need+=(gcc-mingw-w64-x86-64)
  command -v wine >/dev/null || need+=(wine wine64)
  if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq "${need[@]}" >/dev/null
  fi
  rustup target list --installed | grep -x "$TARGET" >/dev/null || rustup target add "$TARGET"
  cargo build --locked --target "$TARGET" --bins --examples
  cargo clippy --locked --target "$TARGET" --lib --bins --tests --examples -- -D warnings
  mkdir -p target/wine-shim
  x86_64-w64-mingw32-gcc -O2 -shared -o target/wine-shim/bcryptprimitives.dll \
    scripts/windows/bcryptprimitives.c scripts/windows/bcryptprimitives.def -lbcrypt
  if [ ! -d "$WINEPREFIX/drive_c/windows/system32" ]; then
    timeout 300 wine wineboot --init </dev/null >/dev/null 2>&1 || true
    timeout 120 wineserver -w || true
  fi
  cp target/wine-shim/bcryptprimitives.dll "$WINEPREFIX/drive_c/windows/system32/"
  # One wineserver for the whole run: each .exe then starts in ~0.1 s instead of ~0.7 s.
  # (Its stdio goes to /dev/null: a daemon holding our stdout would keep a pipe on it open.)
  timeout 30 wineserver -p </dev/null >/dev/null 2>&1
  # Smoke: the .exe loads and runs (Wine's service processes start here: same reason).
  timeout 60 wine "$EXE_DIR/pipebridge.exe" --help </dev/null >/dev/null 2>&1
}

run_tests() {
  # runner = "wine" (.cargo/config.toml) runs the test executables under Wine.
  timeout 600 cargo test --locked --target "$TARGET" --lib --test windows
}

e2e() {
  eval "$(env_lines)"
  timeout 600 cargo test --locked --test wine
}

stop() {
  timeout 30 wineserver -k 2>/dev/null || true
}

case "${1:-all}" in
  build) build ;;
  test) run_tests ;;
  e2e) e2e ;;
  env) env_lines ;;
  stop) stop ;;
  all)
    trap stop EXIT
    build
    run_tests
    e2e
    ;;
  *) echo "usage: $0 [build|test|e2e|env|stop]" >&2; exit 2 ;;
esac
