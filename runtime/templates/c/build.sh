#!/bin/sh
# Builds __NAME__.wasm: bindings from wit/ with `wit-bindgen c`, a wasm32-wasi
# reactor module with zig's C compiler (from PyPI, with wasi-libc inside; the
# first run installs it into .tools/), then a component with the WASI preview1
# adapter. Set STEPBOX_ZIG_DIR to use a zig installed elsewhere (with pip
# --target). Needs python3 with pip, and wit-bindgen and wasm-tools:
#   cargo install --locked __WASM_TOOLS__
#   cargo install --locked __WIT_BINDGEN__ --no-default-features --features c
set -eu
cd "$(dirname "$0")"
ZIG=__ZIG__
TOOLS="${STEPBOX_ZIG_DIR:-.tools}"
if [ ! -f "$TOOLS/.installed-$ZIG" ]; then
    python3 -m pip install --quiet --disable-pip-version-check --target "$TOOLS" "$ZIG"
    touch "$TOOLS/.installed-$ZIG"
fi
wit-bindgen c wit --world step --features clocks-timezone --out-dir bindings
PYTHONPATH="$TOOLS" python3 -m ziglang cc --target=wasm32-wasi -mexec-model=reactor -O2 -s -Wall -I bindings \
    __NAME__.c json.c bindings/step.c bindings/step_component_type.o -o __NAME__.core.wasm
wasm-tools component new __NAME__.core.wasm \
    --adapt wasi_snapshot_preview1=wasi_snapshot_preview1.reactor.wasm -o __NAME__.wasm
