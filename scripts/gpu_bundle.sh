#!/usr/bin/env bash
# The trainer for an air-gapped GPU node: DeepSpeed built beforehand as a
# wheel, with the trainer's other dependencies as wheels for the node's
# Python and platform, and this project's own wheel, in one directory that
# installs with no package index. GPU nodes bring their own torch (CUDA
# build): it is not in the bundle, and the install keeps it.
#
#   scripts/gpu_bundle.sh [OUT]              # default dist/gpu-bundle
#   PYTHON_VERSION=3.10 PLATFORM=manylinux2014_x86_64 scripts/gpu_bundle.sh
#   # on the node (torch already installed):
#   OUT/install.sh                           # pip install --no-index --find-links OUT
#
# DeepSpeed is built here with DS_BUILD_OPS=0 (pure Python; its ops are
# JIT-compiled where used: on a GPU the trainer uses NCCL and torch's SGD,
# so none is), against this machine's torch (build isolation off: pip would
# otherwise fetch torch again just to build).
# Variables: PY (the Python that builds, default the project's venv or
# python3), PYTHON_VERSION (the node's, default the builder's),
# PLATFORM (default manylinux2014_x86_64), DEEPSPEED (default the version
# installed here, else the range setup.py's trainer extra allows).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${1:-$ROOT/dist/gpu-bundle}"
PY="${PY:-$( [ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || command -v python3)}"
PYTHON_VERSION="${PYTHON_VERSION:-$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}"
PLATFORM="${PLATFORM:-manylinux2014_x86_64}"
DEEPSPEED="${DEEPSPEED:-$("$PY" -c 'import importlib.metadata as m; print("deepspeed==" + m.version("deepspeed"))' 2>/dev/null \
  || echo 'deepspeed>=0.17.2,<0.20')}"

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
echo "gpu-bundle: $DEEPSPEED and the trainer's dependencies for Python $PYTHON_VERSION on $PLATFORM -> $OUT"

# 1. DeepSpeed as a pure-Python wheel, built here.
DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --no-deps --no-build-isolation "$DEEPSPEED" -w "$OUT"
WHEEL="$(ls -t "$OUT"/deepspeed-*.whl | head -n1)"

# 2. What DeepSpeed and the trainer need besides torch, as wheels for the node.
REQUIREMENTS="$OUT/requirements.txt"
"$PY" - "$WHEEL" "$ROOT/setup.py" > "$REQUIREMENTS" <<'EOF'
import ast, sys, zipfile
wheel, setup_py = sys.argv[1:3]
with zipfile.ZipFile(wheel) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    requires = [l.split(":", 1)[1].strip() for l in z.read(meta).decode().splitlines() if l.startswith("Requires-Dist:")]
tree = ast.parse(open(setup_py).read())
values = {t.id: n.value for n in ast.walk(tree) if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
core = ast.literal_eval(values["CORE"])
trainer = ast.literal_eval(values["STAGES"])["trainer"]
keep = [r for r in requires if "extra ==" not in r] + core + trainer
name = lambda r: r.split(";")[0].replace(" ", "").split("[")[0].split("<")[0].split(">")[0].split("=")[0].split("!")[0].lower()
seen = set()
for r in keep:
    n = name(r)
    if n in ("torch", "deepspeed") or n in seen:
        continue
    seen.add(n)
    print(r.split(";")[0].strip())
EOF
"$PY" -m pip download --quiet --only-binary=:all: --platform "$PLATFORM" --python-version "$PYTHON_VERSION" \
  --implementation cp -d "$OUT" -r "$REQUIREMENTS"

# 3. This project, as a wheel (pure Python).
"$PY" -m pip wheel --quiet --no-deps --no-build-isolation "$ROOT" -w "$OUT"

# 4. The install step for the node, and what the bundle holds.
cat > "$OUT/install.sh" <<'EOF'
#!/usr/bin/env bash
# Install the trainer from this directory, with no package index; torch must be installed already.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
PY="${PY:-python3}"
"$PY" -c 'import torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}")'
"$PY" -m pip install --no-index --find-links "$HERE" "adaptive-transfer[trainer]"
"$PY" -m trainer.ops build   # DeepSpeed's CPU op where there is no GPU; nothing to do where there is
EOF
chmod +x "$OUT/install.sh"
(cd "$OUT" && sha256sum -- *.whl > SHA256SUMS)
echo "gpu-bundle: $(ls "$OUT"/*.whl | wc -l) wheels, $(du -sh "$OUT" | cut -f1); install on the node with $OUT/install.sh"
