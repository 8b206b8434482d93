#!/usr/bin/env bash
# Install a working NVIDIA `perf_analyzer` into a self-contained directory.
#
#   .ci/install_perf_analyzer.sh [DEST]     (default: <repo>/.perf_analyzer)
#
# Why this is not just `pip install perf-analyzer`: the PyPI perf-analyzer
# wheels (2.58+) need glibc >= 2.38 (Debian 12 has 2.36) and the bare name may
# resolve to an empty placeholder.  tritonclient 2.44.0 ships a perf_analyzer
# binary in its wheel's data files that runs on glibc 2.34+, so we *download*
# that wheel (never install it: the project itself uses the newest
# tritonclient) and extract only the binary.  Its extra runtime deps are
# libcudart.so.12 (from the nvidia-cuda-runtime-cu12 wheel, installed with
# --target into DEST/cuda; no GPU needed) and libb64.so.0d (Debian libb64-0d).
#
# Layout produced:
#   DEST/perf_analyzer          wrapper: sets LD_LIBRARY_PATH, execs the binary
#   DEST/bin/perf_analyzer      the real binary from tritonclient 2.44.0
#   DEST/cuda/                  pip --target tree holding libcudart.so.12
#   DEST/lib/                   only when not root: libs extracted from .debs
#
# Idempotent: if DEST/perf_analyzer exists and `--version` runs, nothing is
# done.  The wrapper is written last, so its presence implies a full install.
# Overridable via env: PYTHON, TRITONCLIENT_VERSION, TRITONCLIENT_WHEEL_SHA256,
# CUDART_VERSION.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DEST="${1:-$SCRIPT_DIR/../.perf_analyzer}"
mkdir -p "$DEST"
DEST="$(cd "$DEST" && pwd)"

PYTHON="${PYTHON:-python3}"
TRITONCLIENT_VERSION="${TRITONCLIENT_VERSION:-2.44.0}"
# sha256 of tritonclient-2.44.0-py3-none-manylinux1_x86_64.whl (PyPI).
# Set TRITONCLIENT_WHEEL_SHA256="" to skip the check (e.g. other versions).
TRITONCLIENT_WHEEL_SHA256="${TRITONCLIENT_WHEEL_SHA256-ed8a64ecbb7594ea196dfdc9678d6356b24fdf484995f53400004a195ef33749}"
# tritonclient 2.44 (Triton 24.03) was built against CUDA 12.4.
CUDART_VERSION="${CUDART_VERSION:-12.4.127}"

WRAPPER="$DEST/perf_analyzer"
log() { printf '[install_perf_analyzer] %s\n' "$*" >&2; }

is_working() {
    [[ -x "$WRAPPER" ]] && "$WRAPPER" --version >/dev/null 2>&1
}

if is_working; then
    log "already installed: $("$WRAPPER" --version 2>&1 | head -n1)"
    echo "$WRAPPER"
    exit 0
fi

# Serialize concurrent runs (e.g. parallel CI jobs sharing DEST).
if command -v flock >/dev/null 2>&1; then
    exec 9>"$DEST/.install.lock"
    flock 9
    if is_working; then
        echo "$WRAPPER"
        exit 0
    fi
fi

[[ "$(uname -m)" == "x86_64" ]] || { log "only x86_64 is supported"; exit 1; }

WORK="$(mktemp -d "$DEST/.work.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

PIP=("$PYTHON" -m pip --disable-pip-version-check --no-input)

# --- 1. the perf_analyzer binary, extracted from the tritonclient wheel -----
log "downloading tritonclient==$TRITONCLIENT_VERSION wheel (not installing it)"
"${PIP[@]}" download --quiet --no-deps --only-binary=:all: \
    --platform manylinux1_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --python-version 3 --implementation py \
    --dest "$WORK/wheel" "tritonclient==$TRITONCLIENT_VERSION"
WHEEL="$(ls "$WORK"/wheel/tritonclient-"$TRITONCLIENT_VERSION"-*manylinux*x86_64*.whl | head -n1)"
if [[ -n "$TRITONCLIENT_WHEEL_SHA256" && "$TRITONCLIENT_VERSION" == "2.44.0" ]]; then
    echo "$TRITONCLIENT_WHEEL_SHA256  $WHEEL" | sha256sum --check --quiet \
        || { log "sha256 mismatch for $WHEEL"; exit 1; }
fi

mkdir -p "$DEST/bin"
"$PYTHON" - "$WHEEL" "$WORK/perf_analyzer" <<'PY'
import sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist()
             if n.endswith("/bin/perf_analyzer") or n.endswith("/scripts/perf_analyzer")]
    if not names:
        sys.exit(f"no perf_analyzer binary found in {wheel}")
    with open(out, "wb") as f:
        f.write(z.read(names[0]))
PY
chmod 0755 "$WORK/perf_analyzer"
mv -f "$WORK/perf_analyzer" "$DEST/bin/perf_analyzer"
BIN="$DEST/bin/perf_analyzer"

# --- 2. libcudart.so.12 via pip --target (isolated, no environment touched) -
if ! compgen -G "$DEST/cuda/nvidia/cuda_runtime/lib/libcudart.so.12" >/dev/null; then
    log "installing nvidia-cuda-runtime-cu12==$CUDART_VERSION into $DEST/cuda"
    rm -rf "$DEST/cuda"
    "${PIP[@]}" install --quiet --no-deps --only-binary=:all: --no-compile \
        --target "$WORK/cuda" "nvidia-cuda-runtime-cu12==$CUDART_VERSION"
    mv "$WORK/cuda" "$DEST/cuda"
fi
CUDART_DIR="$(dirname "$(find "$DEST/cuda" -name 'libcudart.so.12' -print -quit)")"
[[ -f "$CUDART_DIR/libcudart.so.12" ]] || { log "libcudart.so.12 not found under $DEST/cuda"; exit 1; }

# --- 3. any other missing shared libraries (found via ldd) -----------------
missing_libs() {
    LD_LIBRARY_PATH="$CUDART_DIR:$DEST/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
        ldd "$BIN" | awk '/=> not found/ {print $1}'
}
lib_to_deb() {
    case "$1" in
        libb64.so.0d) echo libb64-0d ;;
        libssl.so.3 | libcrypto.so.3) echo libssl3 ;;
        libz.so.1) echo zlib1g ;;
        libstdc++.so.6) echo libstdc++6 ;;
        libgcc_s.so.1) echo libgcc-s1 ;;
        *) return 1 ;;
    esac
}

mapfile -t MISSING < <(missing_libs)
if ((${#MISSING[@]})); then
    log "missing shared libraries: ${MISSING[*]}"
    PKGS=()
    for lib in "${MISSING[@]}"; do
        pkg="$(lib_to_deb "$lib")" || { log "don't know which Debian package provides $lib"; exit 1; }
        [[ " ${PKGS[*]-} " == *" $pkg "* ]] || PKGS+=("$pkg")
    done
    export DEBIAN_FRONTEND=noninteractive
    if [[ "$(id -u)" == 0 ]]; then
        log "apt-get install ${PKGS[*]}"
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${PKGS[@]}" >/dev/null
    else
        # Not root: fetch the .debs and unpack their libraries into DEST/lib.
        log "not root: unpacking ${PKGS[*]} into $DEST/lib"
        mkdir -p "$WORK/debs" "$WORK/root" "$DEST/lib"
        (cd "$WORK/debs" && apt-get download -qq "${PKGS[@]}")
        for deb in "$WORK"/debs/*.deb; do dpkg-deb -x "$deb" "$WORK/root"; done
        find "$WORK/root" -name '*.so*' \( -type f -o -type l \) -exec cp -a {} "$DEST/lib/" \;
    fi
    mapfile -t STILL < <(missing_libs)
    if ((${#STILL[@]})); then
        log "still missing after install: ${STILL[*]}"
        exit 1
    fi
fi

# --- 4. wrapper (written last, atomically) ---------------------------------
cat >"$WORK/wrapper" <<'SH'
#!/usr/bin/env bash
# Generated by .ci/install_perf_analyzer.sh -- runs perf_analyzer from
# tritonclient 2.44.0 with its bundled runtime libraries.
HERE="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" && pwd)"
CUDART_DIR="$(dirname "$(find "$HERE/cuda" -name 'libcudart.so.12' -print -quit)")"
export LD_LIBRARY_PATH="$CUDART_DIR:$HERE/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
exec "$HERE/bin/perf_analyzer" "$@"
SH
# Bake the cudart dir in (relative to the wrapper) to avoid `find` per call.
rel_cudart="${CUDART_DIR#"$DEST"/}"
sed -i "s|^CUDART_DIR=.*|CUDART_DIR=\"\$HERE/$rel_cudart\"|" "$WORK/wrapper"
chmod 0755 "$WORK/wrapper"
mv -f "$WORK/wrapper" "$WRAPPER"

# --- 5. prove it works -------------------------------------------------------
if ! version="$("$WRAPPER" --version 2>&1)"; then
    log "wrapper failed to run: $version"
    rm -f "$WRAPPER"
    exit 1
fi
log "installed: ${version%%$'\n'*}"
echo "$WRAPPER"
