#!/usr/bin/env bash
# Drift check: upgrades a cached venv to the newest releases that pip resolves for ".[test]" (torch
# held at 2.13.0, whose CPU build is what this machine has), runs the tests that exercise other
# projects' code, and prints one line: "newest releases: pass" or "newest releases: FAIL", with the
# versions that differ from constraints.txt. Always exits 0: the README's commands install the
# constrained versions, so a new release breaking us is news for the next session, not a broken CI.
set -uo pipefail
cd "$(dirname "$0")/.."
CACHE="${QWEN3_KERNELS_CI_CACHE:-$HOME/.cache/qwen3_kernels_ci}"
VENV="$CACHE/newest-venv"
LOG="$CACHE/newest-releases.log"
mkdir -p "$CACHE"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV" >&2
fi
if ! "$VENV/bin/python" -m pip install --quiet --upgrade --upgrade-strategy eager "torch==2.13.0" -e ".[test]" > "$LOG" 2>&1; then
  echo "newest releases: FAIL: pip could not install them (last lines of $LOG):"
  tail -n 5 "$LOG"
  exit 0
fi
moved=$("$VENV/bin/python" - <<'PY'
import importlib.metadata as md, re
moved = []
for line in open("constraints.txt"):
    m = re.match(r"([A-Za-z0-9_.-]+)==([^;\s]+)", line)
    if not m:
        continue
    try:
        now = md.version(m.group(1))
    except md.PackageNotFoundError:
        continue
    if now.split("+")[0] != m.group(2).split("+")[0]:
        moved.append(f"{m.group(1)} {m.group(2)} -> {now}")
print(", ".join(moved) or "none")
PY
)
"$VENV/bin/python" -m pytest tests/test_test_layout.py tests/test_hf.py tests/test_hf_moe.py tests/test_parity.py \
  tests/test_tokenizer.py tests/test_config.py tests/test_data_formats.py tests/test_readme.py \
  -q -p no:cacheprovider >> "$LOG" 2>&1
rc=$?
if [ "$rc" -eq 0 ]; then
  echo "newest releases: pass (moved since constraints.txt: $moved)"
else
  echo "newest releases: FAIL, exit $rc (moved since constraints.txt: $moved); last lines of the run:"
  tail -n 15 "$LOG"
fi
exit 0
