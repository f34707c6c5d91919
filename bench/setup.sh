#!/usr/bin/env bash
# Venvs for the benchmark, built once and cached under .tools/bench:
# - agent: the delegate with its runtime dependencies only (what the image ships: no moto, no
#   cryptography), so memory and CPU are measured for the real thing;
# - awscli: the AWS CLI baseline (it pins its own botocore, so it lives apart).
# `setup.sh agent` builds only the first (all the start-up section needs: python -m bench --only startup).
set -euo pipefail
cd "$(dirname "$0")/.."
B=.tools/bench
quiet() { grep -v "is ignored: it is neither" || true; }
# Rebuilt whenever the delegate's code or pins change (committed or not).
digest="$(find agent pyproject.toml constraints.txt -type f ! -name '*.pyc' -print0 | sort -z | xargs -0 cat | sha1sum | cut -c1-16)"
stamp="$B/agent/.installed-$digest"
if [ ! -f "$stamp" ]; then
  rm -rf "$B/agent"; python3 -m venv "$B/agent"
  # As the image installs it: the runtime part of constraints.txt, hash-checked, then the project.
  sed '/^# RUNTIME_END/,$d' constraints.txt > "$B/runtime-requirements.txt"
  { "$B/agent/bin/pip" install -q --require-hashes --no-deps -r "$B/runtime-requirements.txt" 2>&1; } | quiet
  { PYTHONWARNINGS=ignore "$B/agent/bin/pip" install -q --no-deps --no-build-isolation . 2>&1; } | quiet
  touch "$stamp"
fi
[ "${1:-all}" = agent ] && exit 0
if [ ! -x "$B/awscli/bin/aws" ]; then
  python3 -m venv "$B/awscli"
  { "$B/awscli/bin/pip" install -q "awscli==1.46.3" 2>&1; } | quiet
fi
if [ ! -x "$B/py-spy/bin/py-spy" ]; then
  # The sampling profiler behind `make profile` (a binary wheel; attaches to the running delegate).
  python3 -m venv "$B/py-spy"
  { "$B/py-spy/bin/pip" install -q "py-spy==0.4.3" 2>&1; } | quiet
fi
